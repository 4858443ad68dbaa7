use super::*;
use crate::audit::read::read_log;
use std::path::Path;
use std::time::Duration;

#[test]
fn registrable_domains() {
    assert_eq!(registrable_domain("a.b.example.com"), "example.com");
    assert_eq!(registrable_domain("example.com"), "example.com");
    assert_eq!(registrable_domain("localhost"), "localhost");
    assert_eq!(registrable_domain("www.bbc.co.uk"), "bbc.co.uk");
    assert_eq!(registrable_domain("bbc.co.uk"), "bbc.co.uk");
    assert_eq!(registrable_domain("co.uk"), "co.uk");
    assert_eq!(registrable_domain("x.y.example.com.au"), "example.com.au");
    assert_eq!(
        registrable_domain("ksn1.kaspersky-labs.com"),
        "kaspersky-labs.com"
    );
    assert_eq!(registrable_domain("a.net.com"), "net.com");
    // The list's private section: each tenant is its own domain.
    assert_eq!(
        registrable_domain("d1a.cloudfront.net"),
        "d1a.cloudfront.net"
    );
    assert_eq!(
        registrable_domain("foo.s3.amazonaws.com"),
        "foo.s3.amazonaws.com"
    );
}

/// Add one `not_in_catalog` CONNECT denial per host on port 443.
fn denied(hosts: &[&str]) -> Evidence {
    let mut ev = Evidence::default();
    let c: &[(IpAddr, u64)] = &[("10.0.0.5".parse().unwrap(), 1)];
    for h in hosts {
        assert!(ev.add(
            h,
            443,
            Some(Reason::NotInCatalog),
            Decided::Deny,
            c,
            t(0),
            t(1),
            1
        ));
    }
    ev
}

fn wildcards(toml: &str) -> Vec<&str> {
    toml.lines().filter(|l| l.contains("*.")).collect()
}

#[test]
fn never_a_wildcard_over_a_shared_platform() {
    let ev = denied(&[
        "d1a.cloudfront.net",
        "d2b.cloudfront.net",
        "d3c.cloudfront.net",
        "foo.s3.amazonaws.com",
        "bar.s3.amazonaws.com",
        "baz.s3.amazonaws.com",
    ]);
    let toml = ev.to_toml("test");
    for w in [
        "*.cloudfront.net\"",
        "*.amazonaws.com\"",
        "*.s3.amazonaws.com\"",
    ] {
        assert!(!toml.contains(&format!("hosts = [\"{w}")), "{toml}");
    }
    assert!(
        wildcards(&toml).iter().all(|l| l.contains("never *.")),
        "{toml}"
    );
    assert!(
        toml.contains(
            "# cloudfront.net is a public suffix (Public Suffix List, private section): anyone can"
        ),
        "{toml}"
    );
    assert!(toml.contains("never *.s3.amazonaws.com."), "{toml}");
    // One rule per tenant, each with its exact name.
    let specs = crate::config::parse_catalog("suggestion", &toml, Path::new(".")).unwrap();
    assert_eq!(specs.len(), 6, "{toml}");
    assert!(specs
        .iter()
        .all(|s| s.hosts.len() == 1 && !s.hosts[0].contains('*')));
}

#[test]
fn never_a_wildcard_over_an_icann_suffix() {
    // Three different registrants under co.uk: three rules, no *.co.uk.
    let toml = denied(&["a.co.uk", "b.co.uk", "c.co.uk"]).to_toml("test");
    assert!(wildcards(&toml).is_empty(), "{toml}");
    let specs = crate::config::parse_catalog("suggestion", &toml, Path::new(".")).unwrap();
    assert_eq!(specs.len(), 3, "{toml}");
    // One registrant under co.uk: grouped, and the hint names its domain.
    let toml = denied(&["www.bbc.co.uk", "api.bbc.co.uk", "cdn.bbc.co.uk"]).to_toml("test");
    assert!(
        toml.contains("hosts = [\"*.bbc.co.uk\"] covers them"),
        "{toml}"
    );
    assert!(!toml.contains("*.co.uk"), "{toml}");
}

#[test]
fn a_vendor_domain_is_grouped_as_before() {
    let toml = denied(&[
        "ksn1.kaspersky-labs.com",
        "ksn2.kaspersky-labs.com",
        "dnl-01.geo.kaspersky-labs.com",
    ])
    .to_toml("test");
    assert!(
        toml.contains("hosts = [\"*.kaspersky-labs.com\"] covers them"),
        "{toml}"
    );
    assert!(!toml.contains("public suffix"), "{toml}");
    let specs = crate::config::parse_catalog("suggestion", &toml, Path::new(".")).unwrap();
    assert_eq!(specs.len(), 1);
    assert_eq!(specs[0].hosts.len(), 3);
}

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

#[test]
fn groups_by_domain_and_port_with_exact_hosts() {
    let mut ev = Evidence::default();
    let ip: IpAddr = "10.0.0.5".parse().unwrap();
    let c: &[(IpAddr, u64)] = &[(ip, 1)];
    for h in ["a.example.com", "b.example.com", "c.example.com"] {
        assert!(ev.add(
            h,
            443,
            Some(Reason::NotInCatalog),
            Decided::Deny,
            c,
            t(0),
            t(5),
            2
        ));
    }
    // (host, port, reason, kept as evidence?)
    let once = [
        ("a.example.com", 8443, Reason::PortNotAllowed, true),
        ("203.0.113.7", 443, Reason::IpLiteral, true),
        ("x.example.com", 443, Reason::DenyRule, false),
        ("x.example.com", 443, Reason::PrivateAddress, false),
        ("Bad Host", 443, Reason::NotInCatalog, false),
    ];
    for (host, port, reason, kept) in once {
        assert_eq!(
            ev.add(host, port, Some(reason), Decided::Deny, c, t(1), t(1), 1),
            kept,
            "{host}:{port} {reason:?}"
        );
    }
    let toml = ev.to_toml("test");
    assert!(
        toml.contains("hosts = [\"*.example.com\"] covers them"),
        "{toml}"
    );
    assert!(
        !toml
            .lines()
            .any(|l| l.starts_with("hosts") && l.contains('*')),
        "{toml}"
    );
    assert!(toml.contains("#     \"203.0.113.7/32\""), "{toml}");
    let specs = crate::config::parse_catalog("suggestion", &toml, Path::new(".")).unwrap();
    assert_eq!(specs.len(), 2);
    assert_eq!(
        specs[0].hosts,
        ["a.example.com", "b.example.com", "c.example.com"]
    );
    assert_eq!(specs[0].ports[0].lo, 443);
    assert_eq!(specs[1].hosts, ["a.example.com"]);
    assert_eq!(specs[1].ports[0].lo, 8443);
    assert!(specs
        .iter()
        .all(|s| s.action == crate::policy::Action::Allow));
}

#[test]
fn reads_logs_and_counts_bad_lines() {
    let log = concat!(
        r#"{"ts":"2025-03-01T10:00:00.000Z","id":"1","client":"10.0.0.5:5000","method":"CONNECT","host":"new.example.org","port":443,"decision":"deny","reason":"not_in_catalog","status":403,"bytes_up":0,"bytes_down":0,"duration_ms":0}"#,
        "\n\nnot json\n",
        r#"{"ts":"2025-03-01T11:00:00.000Z","id":"2","client":"10.0.0.5:5001","method":"GET","host":"new.example.org","port":80,"url":"http://new.example.org/x","decision":"deny","reason":"not_in_catalog","status":403,"bytes_up":0,"bytes_down":0,"duration_ms":0}"#,
        "\n"
    );
    let mut got = Vec::new();
    let since = humantime::parse_rfc3339("2025-03-01T10:30:00Z").unwrap();
    let stats = read_log(log.as_bytes(), Some(since), |l| got.push(l)).unwrap();
    assert_eq!(stats.records, 1);
    assert_eq!(stats.skipped, 1);
    assert_eq!(stats.first_skipped, Some(3));
    assert_eq!(stats.before_since, 1);
    assert_eq!(got[0].line, 4);
    assert_eq!(got[0].method(), http::Method::GET);
    assert_eq!(got[0].target().unwrap().to_string(), "new.example.org:80");
}

#[test]
fn groups_by_client_group_and_scopes_the_rule() {
    let mut ev = Evidence::default();
    let lines = [
        r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.1.5:1","client_group":"web","method":"CONNECT","host":"a.example.com","port":443,"decision":"deny","reason":"not_in_catalog","status":403}"#,
        r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.2.5:1","client_group":"mail","method":"CONNECT","host":"a.example.com","port":443,"decision":"deny","reason":"not_in_catalog","status":403}"#,
        r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.9.5:1","method":"CONNECT","host":"a.example.com","port":443,"decision":"deny","reason":"not_in_catalog","status":403}"#,
    ];
    read_log(lines.join("\n").as_bytes(), None, |l| {
        assert!(ev.add_logged(&l));
    })
    .unwrap();
    let toml = ev.to_toml("test");
    let specs = crate::config::parse_catalog("suggestion", &toml, Path::new(".")).unwrap();
    let scopes: Vec<(&str, Vec<String>)> = specs
        .iter()
        .map(|s| (s.name.as_str(), s.clients.clone()))
        .collect();
    assert_eq!(
        scopes,
        [
            ("suggested: example.com port 443", vec![]),
            (
                "suggested: example.com port 443 for mail",
                vec!["mail".to_string()]
            ),
            (
                "suggested: example.com port 443 for web",
                vec!["web".to_string()]
            ),
        ],
        "{toml}"
    );
}
