//! The shipped catalog (`config/catalog.toml`) must carry every external
//! TCP 80/443 connection of the vendor's table
//! (a copy in `tests/fixtures/ports-and-protocols.txt`, section "1.2 External
//! Connections"): one rule per row, named after the row's Description, with
//! each host name and port, the right action, and the published addresses.
//!
//! The catalog is read with the `toml` crate directly, independently of the
//! crate's own policy code, so this test checks the data, not the parser.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

const SEED_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/ports-and-protocols.txt"
);
const CATALOG_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/catalog.toml");

/// One row of the "External Connections" table.
#[derive(Debug)]
struct SeedRow {
    description: String,
    protocol: String,
    port: String,
    hosts: Vec<String>,
    ips_text: String,
}

impl SeedRow {
    /// The IPv4 addresses published in "Current IP Address" (none when the
    /// table points elsewhere, e.g. "See https://…" or "Multiple servers exist").
    fn ipv4s(&self) -> Vec<Ipv4Addr> {
        self.ips_text
            .split_whitespace()
            .filter_map(|t| t.parse::<Ipv4Addr>().ok())
            .collect()
    }

    /// Rows the vendor says must not be decrypted: the proprietary AV cloud
    /// look-ups (Avira APC, Kaspersky KSN) and licence-key validation.
    fn expects_bypass(&self) -> bool {
        let d = self.description.to_ascii_lowercase();
        (d.contains("avira") && d.contains("apc"))
            || (d.contains("kaspersky") && d.contains("ksn"))
            || d.contains("license key validation")
            || d.contains("licence key validation")
    }
}

fn read_seed() -> String {
    std::fs::read_to_string(SEED_PATH).unwrap_or_else(|e| {
        panic!(
            "the vendor connection table {SEED_PATH} is required by this test \
             (it is the source of config/catalog.toml) but could not be read: {e}"
        )
    })
}

/// Extracts the rows of section "1.2 External Connections", up to
/// "1.3 Internal Connections". The table's header line (repeated mid-table),
/// blank lines and prose lines are skipped.
fn external_rows(seed: &str) -> Vec<SeedRow> {
    let mut lines = seed.lines().map(|l| l.trim_end_matches('\r'));
    // The table of contents spells its entries with a tab ("1.1\tExternal
    // Connections"), the section heading with a space.
    lines
        .by_ref()
        .find(|l| l.trim_start().starts_with("1.2 External Connections"))
        .unwrap_or_else(|| panic!("{SEED_PATH}: no \"1.2 External Connections\" heading"));

    let mut rows = Vec::new();
    let mut saw_header = false;
    let mut reached_end = false;
    for line in lines {
        if line.trim_start().starts_with("1.3 Internal Connections") {
            reached_end = true;
            break;
        }
        if line.trim().is_empty() || !line.contains('\t') {
            continue; // blank line or prose
        }
        let mut fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        if fields.first() == Some(&"Description") {
            saw_header = true;
            continue; // the header line, repeated once mid-table
        }
        assert!(
            fields.len() <= 6,
            "{SEED_PATH}: external-connections row has {} tab-separated fields, expected at most 6: {line:?}",
            fields.len()
        );
        fields.resize(6, "");
        rows.push(SeedRow {
            description: fields[0].to_string(),
            protocol: fields[1].to_ascii_uppercase(),
            port: fields[2].to_string(),
            hosts: fields[4]
                .split_whitespace()
                .map(str::to_ascii_lowercase)
                .collect(),
            ips_text: fields[5].to_string(),
        });
    }
    assert!(
        saw_header,
        "{SEED_PATH}: no table header line in section 1.2"
    );
    assert!(
        reached_end,
        "{SEED_PATH}: section 1.2 is not followed by \"1.3 Internal Connections\""
    );
    assert!(!rows.is_empty(), "{SEED_PATH}: section 1.2 has no rows");
    rows
}

/// The TCP 80/443 rows with at least one host name, with their port.
fn proxied_rows(rows: &[SeedRow]) -> Vec<(&SeedRow, u16)> {
    rows.iter()
        .filter(|r| r.protocol == "TCP" && !r.hosts.is_empty())
        .filter_map(|r| {
            let port: u16 = r.port.parse().unwrap_or_else(|e| {
                panic!(
                    "{SEED_PATH}: TCP row {:?} has port {:?}: {e}",
                    r.description, r.port
                )
            });
            matches!(port, 80 | 443).then_some((r, port))
        })
        .collect()
}

fn read_catalog() -> Vec<toml::Value> {
    let text = std::fs::read_to_string(CATALOG_PATH)
        .unwrap_or_else(|e| panic!("cannot read {CATALOG_PATH}: {e}"));
    let doc: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{CATALOG_PATH} is not valid TOML: {e}"));
    let rules = doc
        .get("rule")
        .and_then(toml::Value::as_array)
        .unwrap_or_else(|| panic!("{CATALOG_PATH} has no [[rule]] array"));
    assert!(!rules.is_empty(), "{CATALOG_PATH}: [[rule]] array is empty");
    rules.clone()
}

fn rule_name(rule: &toml::Value) -> &str {
    rule.get("name")
        .and_then(toml::Value::as_str)
        .unwrap_or("<unnamed rule>")
}

fn str_list<'a>(rule: &'a toml::Value, key: &str) -> Vec<&'a str> {
    match rule.get(key) {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .unwrap_or_else(|| panic!("rule {:?}: `{key}` is not an array", rule_name(rule)))
            .iter()
            .map(|x| {
                x.as_str().unwrap_or_else(|| {
                    panic!(
                        "rule {:?}: `{key}` has a non-string entry {x:?}",
                        rule_name(rule)
                    )
                })
            })
            .collect(),
    }
}

/// Whether the rule's `ports` (numbers or "lo-hi" ranges) contain `port`.
fn rule_has_port(rule: &toml::Value, port: u16) -> bool {
    let ports = rule
        .get("ports")
        .and_then(toml::Value::as_array)
        .unwrap_or_else(|| {
            panic!(
                "rule {:?}: `ports` missing or not an array",
                rule_name(rule)
            )
        });
    ports.iter().any(|p| match p {
        toml::Value::Integer(n) => *n == i64::from(port),
        toml::Value::String(s) => {
            let (lo, hi) = s.split_once('-').unwrap_or((s.as_str(), s.as_str()));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
                _ => panic!("rule {:?}: bad port entry {s:?}", rule_name(rule)),
            }
        }
        other => panic!("rule {:?}: bad port entry {other:?}", rule_name(rule)),
    })
}

#[test]
fn seed_external_tcp_rows_are_catalogued() {
    let seed = read_seed();
    let rows = external_rows(&seed);
    let rules = read_catalog();

    let mut checked: BTreeSet<(String, u16)> = BTreeSet::new();
    for (row, port) in proxied_rows(&rows) {
        let want_action = if row.expects_bypass() {
            "bypass"
        } else {
            "allow"
        };
        for host in &row.hosts {
            let candidates: Vec<&toml::Value> = rules
                .iter()
                .filter(|r| str_list(r, "hosts").contains(&host.as_str()) && rule_has_port(r, port))
                .collect();
            assert!(
                !candidates.is_empty(),
                "seed row {:?}: no rule in {CATALOG_PATH} lists host {host:?} (exactly, in `hosts`) \
                 with port {port} in `ports`",
                row.description
            );
            assert_eq!(
                candidates.len(),
                1,
                "seed row {:?}: {host}:{port} is matched by several rules ({:?}); expected exactly one",
                row.description,
                candidates.iter().map(|r| rule_name(r)).collect::<Vec<_>>()
            );
            let rule = candidates[0];
            assert_eq!(
                rule_name(rule),
                row.description,
                "rule for {host}:{port} should be named after the seed row's Description"
            );
            let action = rule.get("action").and_then(toml::Value::as_str);
            assert_eq!(
                action,
                Some(want_action),
                "rule {:?} ({host}:{port}): action should be {want_action:?}{}",
                rule_name(rule),
                if want_action == "bypass" {
                    " (proprietary protocol / licence validation: never decrypted)"
                } else {
                    ""
                }
            );
            let ips = str_list(rule, "ips");
            for ip in row.ipv4s() {
                let ip = ip.to_string();
                assert!(
                    ips.contains(&ip.as_str()),
                    "rule {:?}: published address {ip} of seed row {:?} is missing from `ips` {ips:?}",
                    rule_name(rule),
                    row.description
                );
            }
            assert!(
                checked.insert((host.clone(), port)),
                "seed lists {host}:{port} twice"
            );
        }
    }
    assert!(
        checked.len() >= 30,
        "only {} (host, port) pairs found in {SEED_PATH} section 1.2; expected at least 30 \
         (is the seed parser still finding the table?): {checked:?}",
        checked.len()
    );
}

#[test]
fn seed_udp_hosts_are_not_catalogued() {
    let seed = read_seed();
    let rows = external_rows(&seed);
    let rules = read_catalog();

    let udp_hosts: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.protocol == "UDP")
        .flat_map(|r| r.hosts.iter().map(|h| (h.as_str(), r.description.as_str())))
        .collect();
    assert!(
        udp_hosts.iter().any(|(h, _)| *h == "time.clearswift.net"),
        "expected the UDP NTP row (time.clearswift.net) in {SEED_PATH} section 1.2, found {udp_hosts:?}"
    );
    for (host, description) in udp_hosts {
        for rule in &rules {
            assert!(
                !str_list(rule, "hosts").contains(&host),
                "rule {:?} lists {host:?}, but seed row {description:?} is UDP traffic that never \
                 passes through the proxy",
                rule_name(rule)
            );
        }
    }
}

#[test]
fn seed_table_parses_as_expected() {
    let seed = read_seed();
    let rows = external_rows(&seed);
    let proxied = proxied_rows(&rows);
    assert!(
        proxied.len() >= 12,
        "expected at least 12 external TCP 80/443 rows, found {}: {rows:#?}",
        proxied.len()
    );
    assert_eq!(
        proxied.iter().filter(|(r, _)| r.expects_bypass()).count(),
        3,
        "expected exactly three bypass rows (Avira APC, Kaspersky KSN, licence key validation)"
    );
}
