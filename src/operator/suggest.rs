//! `egress-proxy suggest`: catalog rules (TOML, ready to paste) for the
//! destinations an audit log shows denied; the status page offers the same
//! for the denials it remembers. Logs are read with [`crate::audit::read`].
//!
//! Evidence: records with `decision: "deny"` and `reason` `not_in_catalog`
//! or `port_not_allowed`, plus `ip_literal` for IP-literal targets, and every
//! `decision: "report"` record (a policy miss let through by
//! `policy.default = "report"`). Other refusals (a deny rule, a private
//! address, DNS, the upstream) are not fixed by adding an allow rule.
//!
//! Grouping: one rule per client group (the record's `client_group`; the
//! rule gets `clients = [...]`), registrable domain and port, listing the exact
//! hosts seen. Never a wildcard: when three or more hosts under one domain
//! were seen, a comment says that `*.domain` would cover them, and that it is
//! broader than the evidence. IP-literal targets get a commented-out rule
//! with `addresses`.
//!
//! The registrable domain comes from the Public Suffix List, compiled in
//! ([`crate::policy::suffix`]), with its private section: a name under a
//! shared platform where anyone can publish (`d1a.cloudfront.net`,
//! `foo.s3.amazonaws.com`, `x.github.io`) is its own registrable domain, so
//! tenants are never merged, and a wildcard whose suffix is a public suffix
//! is never mentioned: such a group says why it lists exact names only.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use crate::audit::read::{expand, parse_since, read_logs, Logged};
use crate::audit::Decided;
use crate::metrics::status::Status;
use crate::policy::{Policy, Verdict};
use crate::reason::Reason;
use crate::target::{self, Host, Target};

/// Distinct hosts under one domain from which a comment mentions `*.domain`.
pub const WILDCARD_HINT_HOSTS: usize = 3;

pub use crate::policy::suffix::registrable_domain;

mod group;
use group::{seen_as, Group};

// === evidence ===

#[derive(Clone, Debug)]
struct Dest {
    count: u64,
    /// Of `count`, how many were let through by `policy.default = "report"`.
    reported: u64,
    reasons: BTreeMap<&'static str, u64>,
    first: SystemTime,
    last: SystemTime,
    clients: BTreeMap<IpAddr, u64>,
}

/// Denied destinations, aggregated per (host, port, client group); the
/// group is `""` for clients in none.
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    dests: BTreeMap<(String, u16, String), Dest>,
}

/// The label of a Squid `TCP_DENIED/403` line whose reason is not known.
pub const SQUID_DENIED: &str = "TCP_DENIED/403 (Squid line, reason not logged)";

/// A host that can be written back into a catalog unchanged.
fn port_ok_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok() || target::is_normalized_name(host)
}

/// The label a record is counted under when a new allow rule would admit
/// it: the deny reason, or `report` for a policy miss let through.
fn wanted(decision: Decided, reason: Option<Reason>, is_ip: bool) -> Option<&'static str> {
    match (decision, reason) {
        (Decided::Report, _) => Some("report"),
        (Decided::Deny, Some(r @ (Reason::NotInCatalog | Reason::PortNotAllowed))) => {
            Some(r.as_str())
        }
        (Decided::Deny, Some(Reason::IpLiteral)) if is_ip => Some(Reason::IpLiteral.as_str()),
        _ => None,
    }
}

impl Evidence {
    /// The evidence for `/api/suggest`: the denied destinations the status
    /// page's table holds now.
    pub fn from_status(status: &Status) -> Evidence {
        let (list, _) = status.denials();
        let mut ev = Evidence::default();
        for d in list {
            ev.add(
                &d.host,
                d.port,
                d.reason,
                d.decision,
                &d.clients,
                d.first_seen,
                d.last_seen,
                d.count,
            );
        }
        ev
    }

    /// Add `count` sightings of (host, port); false (and nothing added) when
    /// the record is not evidence for a rule (see the module docs).
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        host: &str,
        port: u16,
        reason: Option<Reason>,
        decision: Decided,
        clients: &[(IpAddr, u64)],
        first: SystemTime,
        last: SystemTime,
        count: u64,
    ) -> bool {
        let seen = (first, last, count);
        self.add_for("", host, port, reason, decision, clients, seen)
    }

    /// [`Evidence::add`] for clients in `client_group` (`""`: in none);
    /// `seen` is (first, last, count).
    #[allow(clippy::too_many_arguments)]
    fn add_for(
        &mut self,
        client_group: &str,
        host: &str,
        port: u16,
        reason: Option<Reason>,
        decision: Decided,
        clients: &[(IpAddr, u64)],
        seen: (SystemTime, SystemTime, u64),
    ) -> bool {
        if port == 0 || seen.2 == 0 {
            return false;
        }
        // Only hosts that can be written back into a catalog unchanged.
        let is_ip = host.parse::<IpAddr>().is_ok();
        if !is_ip && !target::is_normalized_name(host) {
            return false;
        }
        let Some(label) = wanted(decision, reason, is_ip) else {
            return false;
        };
        let key = (host.to_string(), port, client_group.to_string());
        self.insert(key, label, decision, clients, seen);
        true
    }

    /// Count `seen` = (first, last, count) sightings of the destination
    /// `key` = (host, port, client group) under `label`.
    fn insert(
        &mut self,
        key: (String, u16, String),
        label: &'static str,
        decision: Decided,
        clients: &[(IpAddr, u64)],
        (first, last, count): (SystemTime, SystemTime, u64),
    ) {
        let d = self.dests.entry(key).or_insert(Dest {
            count: 0,
            reported: 0,
            reasons: BTreeMap::new(),
            first,
            last,
            clients: BTreeMap::new(),
        });
        d.count += count;
        if decision == Decided::Report {
            d.reported += count;
        }
        *d.reasons.entry(label).or_default() += count;
        d.first = d.first.min(first);
        d.last = d.last.max(last);
        for (c, n) in clients {
            *d.clients.entry(*c).or_default() += n;
        }
    }

    /// Add one audit log record; false when it is not evidence.
    pub fn add_logged(&mut self, l: &Logged) -> bool {
        let (Some(decision), Some(t)) = (l.decided(), l.time) else {
            return false;
        };
        let Some(target) = l.target() else {
            return false;
        };
        let clients: Vec<(IpAddr, u64)> = l.client_ip().map(|c| (c, 1)).into_iter().collect();
        let group = l.client_group.as_deref().unwrap_or("");
        // A Squid line's TCP_DENIED/403 carries no reason: it is evidence,
        // labelled as such, unless a catalog (`--config`) told the reason.
        if l.squid && decision == Decided::Deny && l.reason.is_none() && l.status == Some(403) {
            let host = target.host.to_string();
            if !port_ok_name(&host) {
                return false;
            }
            let key = (host, target.port, group.to_string());
            self.insert(key, SQUID_DENIED, decision, &clients, (t, t, 1));
            return true;
        }
        self.add_for(
            group,
            &target.host.to_string(),
            target.port,
            l.reason_code(),
            decision,
            &clients,
            (t, t, 1),
        )
    }

    /// Distinct (host, port) destinations.
    pub fn len(&self) -> usize {
        self.dests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dests.is_empty()
    }

    /// Denied transactions in all.
    pub fn transactions(&self) -> u64 {
        self.dests.values().map(|d| d.count).sum()
    }

    /// Drop the destinations that `policy` now lets through by a rule (for
    /// `GET` or `CONNECT`); returns how many were dropped.
    pub fn drop_permitted(&mut self, policy: &Policy) -> usize {
        let before = self.dests.len();
        self.dests.retain(|(host, port, group), _| {
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) => match target::normalize_host(host) {
                    Ok(h) => h,
                    Err(_) => return true,
                },
            };
            let t = Target { host, port: *port };
            let groups = policy.client_groups().set_of(group);
            ![http::Method::CONNECT, http::Method::GET].iter().any(|m| {
                let d = policy.decide_for(&t, m, groups);
                matches!(d.verdict, Verdict::Allow | Verdict::Bypass)
            })
        });
        before - self.dests.len()
    }

    /// The suggestion as catalog TOML. `source` names where the evidence
    /// came from (a file, "the status page").
    pub fn to_toml(&self, source: &str) -> String {
        let mut out = String::new();
        if self.dests.is_empty() {
            let _ = writeln!(
                out,
                "# No denied destinations that a catalog rule would admit (not_in_catalog,\n# port_not_allowed, ip_literal, or a report record) in {source}."
            );
            return out;
        }
        let groups = self.groups();
        let first = self
            .dests
            .values()
            .map(|d| d.first)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let last = self
            .dests
            .values()
            .map(|d| d.last)
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let _ = writeln!(
            out,
            "# Catalog rules suggested by `egress-proxy suggest` from {source}:"
        );
        let _ = writeln!(
            out,
            "# {} {} transaction{} to {} destination{}, {} .. {}.",
            self.transactions(),
            seen_as(
                self.transactions(),
                self.dests.values().map(|d| d.reported).sum()
            ),
            plural(self.transactions()),
            self.dests.len(),
            plural(self.dests.len() as u64),
            ts(first),
            ts(last)
        );
        let _ = writeln!(
            out,
            "# One rule per domain and port with the exact hosts seen; no wildcard is"
        );
        let _ = writeln!(
            out,
            "# suggested. Review each rule before adding it: a denial shows that something"
        );
        let _ = writeln!(
            out,
            "# tried to connect, not that it should. Traffic that breaks under TLS"
        );
        let _ = writeln!(out, "# inspection needs action = \"bypass\" instead.");
        for g in &groups {
            out.push('\n');
            g.write(&mut out);
        }
        out
    }

    fn groups(&self) -> Vec<Group<'_>> {
        // (client group, is an address, domain, port) -> hosts.
        type GroupKey<'a> = (&'a str, bool, String, u16);
        let mut by: BTreeMap<GroupKey<'_>, Vec<(&str, &Dest)>> = BTreeMap::new();
        for ((host, port, client_group), d) in &self.dests {
            let is_ip = host.parse::<IpAddr>().is_ok();
            let domain = if is_ip {
                String::new()
            } else {
                registrable_domain(host).to_string()
            };
            by.entry((client_group.as_str(), is_ip, domain, *port))
                .or_default()
                .push((host.as_str(), d));
        }
        let mut groups: Vec<Group<'_>> = by
            .into_iter()
            .map(|((client_group, is_ip, domain, port), mut hosts)| {
                hosts.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
                Group {
                    client_group,
                    is_ip,
                    domain,
                    port,
                    hosts,
                }
            })
            .collect();
        groups.sort_by(|a, b| {
            a.client_group
                .cmp(b.client_group)
                .then_with(|| a.is_ip.cmp(&b.is_ip))
                .then_with(|| b.count().cmp(&a.count()))
                .then_with(|| a.domain.cmp(&b.domain))
                .then_with(|| a.port.cmp(&b.port))
        });
        groups
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn ts(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// What `suggest` prints: the TOML on standard output, notes on standard error.
pub struct Suggestion {
    pub toml: String,
    pub notes: Vec<String>,
}

/// `egress-proxy suggest --audit FILE... [--since D]`; with `policy` (an
/// explicit `--config`), destinations it already lets through are left out,
/// and Squid lines get their reason from it.
///
/// # Errors
/// A log cannot be read, `--since` does not parse, or no line of a
/// non-empty log is an audit record.
pub fn command(
    audit: &[PathBuf],
    since: Option<&str>,
    policy: Option<&Policy>,
) -> Result<Suggestion, String> {
    let since = since
        .map(|s| parse_since(s, SystemTime::now()))
        .transpose()?;
    let files = expand(audit)?;
    let source = source_label(&files);
    let mut ev = Evidence::default();
    let stats = read_logs(&files, since, |mut l| {
        if let Some(p) = policy {
            l.fill_from(p);
        }
        ev.add_logged(&l);
    })?;
    let mut notes = vec![stats.summary()];
    if stats.records == 0 && stats.before_since == 0 && stats.skipped > 0 {
        return Err(format!(
            "no audit records in {source}: {}",
            notes.join("; ")
        ));
    }
    if let Some(p) = policy {
        let n = ev.drop_permitted(p);
        if n > 0 {
            notes.push(format!(
                "left out {n} destination{} the current catalog already lets through",
                plural(n as u64)
            ));
        }
    }
    let label = match since {
        Some(s) => format!("{source} since {}", ts(s)),
        None => source,
    };
    Ok(Suggestion {
        toml: ev.to_toml(&label),
        notes,
    })
}

/// The files read, for headers: one name, or the first and how many more.
pub fn source_label(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, rest @ ..] => format!(
            "{} and {} more file{}",
            first.display(),
            rest.len(),
            plural(rest.len() as u64)
        ),
        [] => "no files".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
