//! One suggested rule: the destinations of one client group, registrable
//! domain and port, written as TOML with comments on the evidence.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use super::{ts, Dest, WILDCARD_HINT_HOSTS};
use crate::reason::Reason;

/// The destinations of one suggested rule.
pub(super) struct Group<'a> {
    /// The clients' groups, comma-separated; `""` for clients in none.
    pub(super) client_group: &'a str,
    pub(super) is_ip: bool,
    pub(super) domain: String,
    pub(super) port: u16,
    pub(super) hosts: Vec<(&'a str, &'a Dest)>,
}

/// "denied", "reported" (let through by `policy.default = "report"`), or both.
pub(super) fn seen_as(count: u64, reported: u64) -> &'static str {
    if reported == 0 {
        "denied"
    } else if reported >= count {
        "reported"
    } else {
        "denied or reported"
    }
}

/// The five busiest clients and how many more.
fn write_clients(out: &mut String, clients: BTreeMap<IpAddr, u64>) {
    let mut by_count: Vec<(IpAddr, u64)> = clients.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let shown: Vec<String> = by_count
        .iter()
        .take(5)
        .map(|(c, n)| format!("{c} ({n})"))
        .collect();
    let more = by_count.len().saturating_sub(5);
    if !shown.is_empty() {
        let _ = writeln!(
            out,
            "# clients: {}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
}

impl Group<'_> {
    pub(super) fn count(&self) -> u64 {
        self.hosts.iter().map(|(_, d)| d.count).sum()
    }

    pub(super) fn write(&self, out: &mut String) {
        let (reasons, clients, reported) = self.tally();
        self.write_heading(out, &reasons, reported);
        if self.client_group.contains(',') {
            let _ = writeln!(
                out,
                "# the clients were in several groups ({}); keep only the one this rule is for",
                self.client_group
            );
        }
        write_clients(out, clients);
        self.write_seen(out);
        if self.is_ip {
            self.write_addresses(out);
        } else {
            self.write_hosts(out);
        }
    }

    /// Reasons and clients summed over the hosts, and how many were reported.
    fn tally(&self) -> (BTreeMap<&str, u64>, BTreeMap<IpAddr, u64>, u64) {
        let mut reasons: BTreeMap<&str, u64> = BTreeMap::new();
        let mut clients: BTreeMap<IpAddr, u64> = BTreeMap::new();
        let mut reported = 0;
        for (_, d) in &self.hosts {
            for (r, n) in &d.reasons {
                *reasons.entry(r).or_default() += n;
            }
            for (c, n) in &d.clients {
                *clients.entry(*c).or_default() += n;
            }
            reported += d.reported;
        }
        (reasons, clients, reported)
    }

    /// `# domain, port: count seen as (reasons), n hosts`.
    fn write_heading(&self, out: &mut String, reasons: &BTreeMap<&str, u64>, reported: u64) {
        let count = self.count();
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r} {n}")).collect();
        let what = if self.is_ip {
            "IP-literal targets".to_string()
        } else {
            self.domain.clone()
        };
        let _ = writeln!(
            out,
            "# {what}, port {}: {count} {} ({}), {} {}",
            self.port,
            seen_as(count, reported),
            reasons.join(", "),
            self.hosts.len(),
            if self.is_ip {
                if self.hosts.len() == 1 {
                    "address"
                } else {
                    "addresses"
                }
            } else if self.hosts.len() == 1 {
                "host"
            } else {
                "hosts"
            }
        );
        if reported > 0 {
            let _ = writeln!(
                out,
                "# ({reported} of them let through by policy.default = \"report\")"
            );
        }
    }

    /// When the group was first and last seen, and the port note.
    fn write_seen(&self, out: &mut String) {
        let first = self
            .hosts
            .iter()
            .map(|(_, d)| d.first)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let last = self
            .hosts
            .iter()
            .map(|(_, d)| d.last)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let _ = writeln!(out, "# first seen {}, last seen {}", ts(first), ts(last));
        if self
            .hosts
            .iter()
            .any(|(_, d)| d.reasons.contains_key(Reason::PortNotAllowed.as_str()))
        {
            let _ = writeln!(
                out,
                "# port_not_allowed: the catalog lists {} on other ports; adding {} to that rule's ports is the alternative.",
                if self.hosts.len() == 1 { "this host" } else { "some of these hosts" },
                self.port
            );
        }
    }

    fn write_hosts(&self, out: &mut String) {
        let subdomains: BTreeSet<&str> = self
            .hosts
            .iter()
            .map(|(h, _)| *h)
            .filter(|h| *h != self.domain)
            .collect();
        if let Some(platform) = crate::policy::suffix::shared_platform(&self.domain) {
            let _ = writeln!(
                out,
                "# {platform} is a public suffix (Public Suffix List, private section): anyone can\n# publish a name under it, so only exact names are suggested, never *.{platform}."
            );
        }
        if subdomains.len() >= WILDCARD_HINT_HOSTS
            && !crate::policy::suffix::is_public_suffix(&self.domain)
        {
            let _ = writeln!(
                out,
                "# {} hosts under {d} were seen. If the vendor documents the whole domain,\n# hosts = [\"*.{d}\"] covers them and names not seen yet: broader than this evidence.",
                subdomains.len(),
                d = self.domain
            );
        }
        let _ = writeln!(out, "[[rule]]");
        let _ = writeln!(
            out,
            "name = \"suggested: {} port {}{}\"",
            self.domain,
            self.port,
            self.for_group()
        );
        let _ = writeln!(out, "hosts = [");
        for (h, d) in &self.hosts {
            let _ = writeln!(
                out,
                "    \"{h}\", # {} {}, last {}",
                d.count,
                seen_as(d.count, d.reported),
                ts(d.last)
            );
        }
        let _ = writeln!(out, "]");
        let _ = writeln!(out, "ports = [{}]", self.port);
        let _ = writeln!(out, "action = \"allow\"");
        if let Some(clients) = self.clients_line() {
            let _ = writeln!(out, "{clients}");
        }
    }

    /// `" for web"` in a rule name, `""` for clients in no group.
    fn for_group(&self) -> String {
        if self.client_group.is_empty() {
            String::new()
        } else {
            format!(" for {}", self.client_group)
        }
    }

    /// `clients = ["web"]` for a client group; None for clients in none.
    fn clients_line(&self) -> Option<String> {
        if self.client_group.is_empty() {
            return None;
        }
        let names: Vec<String> = self
            .client_group
            .split(',')
            .map(|g| format!("\"{g}\""))
            .collect();
        Some(format!("clients = [{}]", names.join(", ")))
    }

    fn write_addresses(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# An address rule admits whatever answers at that address: prefer the host"
        );
        let _ = writeln!(
            out,
            "# name if the client can use one; uncomment only for published addresses."
        );
        let _ = writeln!(out, "# [[rule]]");
        let _ = writeln!(
            out,
            "# name = \"suggested: addresses port {}{}\"",
            self.port,
            self.for_group()
        );
        let _ = writeln!(out, "# addresses = [");
        for (h, d) in &self.hosts {
            let bits = if h.contains(':') { 128 } else { 32 };
            let _ = writeln!(
                out,
                "#     \"{h}/{bits}\", # {} {}, last {}",
                d.count,
                seen_as(d.count, d.reported),
                ts(d.last)
            );
        }
        let _ = writeln!(out, "# ]");
        let _ = writeln!(out, "# ports = [{}]", self.port);
        let _ = writeln!(out, "# action = \"allow\"");
        if let Some(clients) = self.clients_line() {
            let _ = writeln!(out, "# {clients}");
        }
    }
}
