//! Turning the `http_access` lines into rules, and the rules into TOML.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use super::{intersect, normalise, Acl, Line, BUILT_IN, CLIENT_KINDS};

/// One translated rule.
struct Rule {
    name: String,
    action: &'static str,
    hosts: Vec<String>,
    addresses: Vec<String>,
    ports: Option<Vec<(u16, u16)>>,
    source: String,
    notes: Vec<String>,
}

#[derive(Default)]
pub(super) struct Translation {
    rules: Vec<Rule>,
    /// `http_access` lines left out, and why.
    skipped: Vec<String>,
    /// Ports every request must use (`deny !PORTS`), when set.
    ports: Option<Vec<(u16, u16)>>,
    /// Ports tunnels must use (`deny CONNECT !PORTS`), when set.
    connect_ports: Option<Vec<(u16, u16)>>,
    /// An `allow` line came already.
    allowed: bool,
    /// The final `http_access deny all` was seen.
    deny_all: bool,
    /// Notes for the top of the catalog.
    notes: Vec<String>,
}

/// The ACLs one `http_access` line names, sorted by what they select.
#[derive(Default)]
struct Named<'a> {
    dest: Vec<&'a Acl>,
    dest_names: Vec<String>,
    ports: Option<Vec<(u16, u16)>>,
    negated_ports: Option<Vec<(u16, u16)>>,
    connect: bool,
    clients: Vec<String>,
    notes: Vec<String>,
}

impl<'a> Named<'a> {
    /// Sort the line's ACL names; `Err` says why the line is not translated.
    fn sort(names: &[String], acls: &'a BTreeMap<String, Acl>) -> Result<Named<'a>, String> {
        let mut named = Named::default();
        for n in names {
            let (neg, n) = match n.strip_prefix('!') {
                Some(r) => (true, r),
                None => (false, n.as_str()),
            };
            if n == "all" {
                continue;
            }
            named.add(n, neg, acls)?;
        }
        Ok(named)
    }

    /// One ACL name (`neg`: written `!name`).
    fn add(&mut self, n: &str, neg: bool, acls: &'a BTreeMap<String, Acl>) -> Result<(), String> {
        let Some(acl) = acls.get(n) else {
            if n == "CONNECT" && !neg {
                self.connect = true;
                return Ok(());
            }
            if BUILT_IN.contains(&n) {
                return Err(format!(
                    "Squid's built-in ACL {n:?} (clients or the cache manager) is not translated"
                ));
            }
            return Err(format!("ACL {n:?} is not defined before this line"));
        };
        if acl.kinds.len() == 1 && acl.kinds.contains("method") {
            if acl.methods == ["CONNECT"] && !neg {
                self.connect = true;
            } else {
                self.notes.push(format!(
                    "method ACL {n:?} not translated (a rule's `methods` applies to plain HTTP only)"
                ));
            }
            return Ok(());
        }
        if acl.is_destination() {
            if neg {
                return Err(format!("a negated destination ACL (!{n}) has no catalog form; list the hosts that are allowed"));
            }
            self.dest.push(acl);
            self.dest_names.push(n.to_string());
            return Ok(());
        }
        if acl.is_port() {
            let p = normalise(acl.ports.clone());
            if neg {
                self.negated_ports = Some(p);
            } else {
                self.ports = Some(match self.ports.take() {
                    Some(q) => intersect(&q, &p),
                    None => p,
                });
            }
            return Ok(());
        }
        let kinds: Vec<&str> = acl.kinds.iter().map(String::as_str).collect();
        if acl.kinds.iter().all(|k| CLIENT_KINDS.contains(&k.as_str())) && !neg {
            self.clients.push(format!("{n} ({})", kinds.join(", ")));
            return Ok(());
        }
        Err(format!(
            "ACL {n:?} ({}) is not translated: client ACLs become [clients.groups] and a rule's `clients`; other types have no catalog form",
            kinds.join(", ")
        ))
    }
}

impl Translation {
    fn skip(&mut self, line: &Line, why: &str) {
        self.skipped
            .push(format!("{}: {}\n#   {why}", line.at, line.text));
    }

    pub(super) fn access(&mut self, line: &Line, acls: &BTreeMap<String, Acl>) {
        let action = match line.words.get(1).map(String::as_str) {
            None => return self.skip(line, "no action"),
            Some("allow") => "allow",
            Some("deny") => "deny",
            Some(_) => return self.skip(line, "only allow and deny are translated"),
        };
        let names = &line.words[2..];
        if names.is_empty() {
            return self.skip(line, "no ACL on the line");
        }
        // `all`: the catch-all.
        if names.len() == 1 && names[0] == "all" {
            if action == "deny" {
                self.deny_all = true;
            } else {
                self.skip(line, "allow all lets every destination through; an allowlist cannot express that (policy.default = \"report\" lets misses through but records them)");
            }
            return;
        }
        let named = match Named::sort(names, acls) {
            Ok(named) => named,
            Err(why) => return self.skip(line, &why),
        };
        if named.dest.is_empty() {
            return self.no_destination(line, action, &named);
        }
        self.add_rule(line, action, named);
    }

    /// A line without a destination ACL: a port restriction, or skipped.
    fn no_destination(&mut self, line: &Line, action: &'static str, named: &Named<'_>) {
        if !named.clients.is_empty() {
            return self.skip(
                line,
                &format!(
                    "only client ACLs ({}) and no destination: an allowlist lists destinations",
                    named.clients.join(", ")
                ),
            );
        }
        // `deny !PORTS` and `deny CONNECT !PORTS`: a port restriction.
        if let (Some(p), "deny", None) = (&named.negated_ports, action, &named.ports) {
            if named.connect {
                self.connect_ports = Some(match self.connect_ports.take() {
                    Some(q) => intersect(&q, p),
                    None => p.clone(),
                });
            } else {
                self.ports = Some(match self.ports.take() {
                    Some(q) => intersect(&q, p),
                    None => p.clone(),
                });
            }
            return;
        }
        self.skip(line, "no destination ACL (dstdomain or dstdom_regex) on the line; the catalog lists destinations");
    }

    /// A line with destination ACLs: the rule, with notes on what differs.
    fn add_rule(&mut self, line: &Line, action: &'static str, named: Named<'_>) {
        let Named {
            dest,
            dest_names,
            ports,
            negated_ports,
            connect,
            clients,
            mut notes,
        } = named;
        if !clients.is_empty() {
            notes.push(format!(
                "Squid applies this line only to clients in {}; the rule applies to every client in [clients] allow (name them in [clients.groups] and set the rule's `clients` to narrow it)",
                clients.join(", ")
            ));
        }
        if negated_ports.is_some() {
            notes.push("a negated port ACL on this line is not translated".into());
        }
        if connect {
            notes.push(
                "Squid applies this line to CONNECT only; the rule applies to plain HTTP too"
                    .into(),
            );
        }
        let mut hosts = Vec::new();
        let mut addresses = Vec::new();
        for acl in &dest {
            for h in &acl.hosts {
                if !hosts.contains(h) {
                    hosts.push(h.clone());
                }
            }
            for a in &acl.addresses {
                if !addresses.contains(a) {
                    addresses.push(a.clone());
                }
            }
            notes.extend(acl.skipped.iter().cloned());
        }
        if hosts.is_empty() && addresses.is_empty() {
            return self.skip(
                line,
                "its destination ACLs hold no value the catalog can use",
            );
        }
        if action == "deny" && self.allowed {
            notes.push("Squid applies the first matching line, so this deny did not apply to hosts an earlier allow line matched; here the most specific host pattern wins (deny on a tie): check the rules above".into());
        }
        if action == "allow" {
            self.allowed = true;
        }
        // Deny rules keep their own ports (or all); allow rules are narrowed by
        // the global port restrictions when they are applied at render time.
        self.rules.push(Rule {
            name: dest_names.join(" "),
            action,
            hosts,
            addresses,
            ports,
            source: format!("{}: {}", line.at, line.text),
            notes,
        });
    }

    pub(super) fn render(mut self, path: &Path, acls: &BTreeMap<String, Acl>) -> String {
        let mut out = String::new();
        self.write_header(&mut out, path, acls);
        let mut names = BTreeSet::new();
        let mut written: BTreeMap<String, String> = BTreeMap::new();
        for r in &self.rules {
            self.write_rule(&mut out, r, &mut names, &mut written);
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\n# Not translated:");
            for s in &self.skipped {
                let _ = writeln!(out, "# {s}");
            }
        }
        out
    }

    /// The comment block at the top: where the catalog is from, the notes,
    /// and the destination ACLs no rule uses.
    fn write_header(&mut self, out: &mut String, path: &Path, acls: &BTreeMap<String, Acl>) {
        let _ = writeln!(
            out,
            "# Catalog imported from the Squid configuration {} by `egress-proxy import squid`.\n\
             # Review it, then check it: egress-proxy check --config <a config whose policy.catalog names this file>.\n\
             # Squid applies the first matching http_access line; this catalog applies the most\n\
             # specific host pattern (deny wins a tie), and refuses everything it does not list.",
            path.display()
        );
        if !self.deny_all {
            self.notes.push("the configuration does not end with `http_access deny all`; Squid then applies the opposite of the last line to what no line matched, the catalog denies it".into());
        }
        if let Some(c) = &self.connect_ports {
            self.notes.push(format!(
                "`http_access deny CONNECT !…` limits tunnels to ports {}; the catalog cannot limit tunnels apart from plain HTTP, so allow rules keep the ports below (narrow them where tunnels are meant)",
                show_ports(c)
            ));
        }
        for n in &self.notes {
            let _ = writeln!(out, "#\n# note: {n}");
        }
        let unused: Vec<&String> = acls
            .iter()
            .filter(|(name, a)| {
                a.is_destination()
                    && !self
                        .rules
                        .iter()
                        .any(|r| r.name.split(' ').any(|n| n == *name))
            })
            .map(|(n, _)| n)
            .collect();
        if !unused.is_empty() {
            let names: Vec<&str> = unused.iter().map(|s| s.as_str()).collect();
            let _ = writeln!(
                out,
                "#\n# note: destination ACLs no translated http_access line uses: {}",
                names.join(", ")
            );
        }
    }

    /// One rule as a `[[rule]]` table (or a comment saying why it is left
    /// out); `names` and `written` hold the rules written so far.
    fn write_rule(
        &self,
        out: &mut String,
        r: &Rule,
        names: &mut BTreeSet<String>,
        written: &mut BTreeMap<String, String>,
    ) {
        // Names are unique: a second rule from the same ACLs says where it is from.
        let mut name = format!("squid: {}", r.name);
        if !names.insert(name.clone()) {
            let at = r.source.split(": ").next().unwrap_or("");
            let at = at.rsplit('/').next().unwrap_or(at);
            name = format!("{name} ({at})");
            names.insert(name.clone());
        }
        let ports = match (&r.ports, &self.ports, r.action) {
            (Some(p), Some(g), "allow") => Some(intersect(p, g)),
            (None, Some(g), "allow") => Some(g.clone()),
            (p, _, _) => p.clone(),
        };
        let _ = writeln!(out, "\n# from {}", r.source);
        for n in &r.notes {
            let _ = writeln!(out, "# note: {n}");
        }
        let ports = match ports {
            Some(p) if p.is_empty() => {
                let _ = writeln!(
                    out,
                    "# not translated: no port is left once Squid's port restrictions apply"
                );
                return;
            }
            Some(p) => p,
            None => {
                let _ = writeln!(
                    out,
                    "# note: Squid's line does not restrict ports, so neither does this rule: narrow it"
                );
                vec![(1, 65535)]
            }
        };
        let key = format!("{} {:?} {:?} {ports:?}", r.action, r.hosts, r.addresses);
        if let Some(first) = written.get(&key) {
            let _ = writeln!(out, "# left out: the same as rule {first:?} above");
            return;
        }
        written.insert(key, name.clone());
        let _ = writeln!(out, "[[rule]]");
        let _ = writeln!(out, "name = {}", toml_str(&name));
        if !r.hosts.is_empty() {
            let _ = writeln!(out, "hosts = {}", toml_list(&r.hosts));
        }
        if !r.addresses.is_empty() {
            let _ = writeln!(out, "addresses = {}", toml_list(&r.addresses));
        }
        let _ = writeln!(out, "ports = [{}]", show_ports(&ports));
        let _ = writeln!(out, "action = \"{}\"", r.action);
    }
}

fn show_ports(p: &[(u16, u16)]) -> String {
    p.iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("\"{lo}-{hi}\"")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn toml_str(s: &str) -> String {
    // A JSON string is a TOML basic string (the same escapes).
    serde_json::to_string(s).unwrap_or_default()
}

fn toml_list(v: &[String]) -> String {
    let items: Vec<String> = v.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", items.join(", "))
}
