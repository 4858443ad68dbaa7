//! `egress-proxy import squid FILE`: a catalog (TOML) from a Squid
//! configuration.
//!
//! Read: `acl NAME dstdomain …`, `acl NAME dstdom_regex …` (where a regex
//! is a plain domain or suffix: `\.example\.com$`, `(^|\.)example\.com$`,
//! `^example\.com$`), `acl NAME port …`, the `"/path/file"` values those
//! name (one value a line, `#` comments), `include` directives, and the
//! `http_access allow|deny` lines. Every other line is ignored (it is not
//! about where traffic may go); `http_access` lines that cannot be
//! translated, and values that cannot, become comments saying why.
//!
//! The translation:
//!
//! - `http_access allow|deny` with one or more `dstdomain`/`dstdom_regex`
//!   ACLs (their names OR'ed together, as Squid does for one ACL name with
//!   many values) becomes a rule: `allow` or `deny`, the hosts, and the
//!   ports of any `port` ACLs on the line, narrowed by the configuration's
//!   `http_access deny !PORTS` lines; with no port restriction at all the
//!   rule says `"1-65535"`, with a comment to narrow it.
//! - Squid's `.example.com` (the domain and every subdomain) becomes
//!   `example.com` and `*.example.com`; an IP address becomes `addresses`.
//! - `http_access deny all` is the catalog's default (deny); `deny !PORTS`
//!   and `deny CONNECT !PORTS` narrow ports (the second only for tunnels in
//!   Squid; the catalog cannot tell, which a comment says).
//! - Client ACLs (`src`, proxy-auth, …) on a line that names destinations
//!   are set aside with a note (use `[clients.groups]` and a rule's
//!   `clients` to narrow the rule).
//! - Not translated (comments): lines without a destination ACL (`allow
//!   localnet` lets a client reach anything), Squid's built-in `localhost`
//!   and `manager`, negated destination
//!   ACLs, ACL types other than those above, regexes that are not plain
//!   suffixes, and `method` ACLs (a comment; rules' `methods` apply to plain
//!   HTTP only).
//!
//! Squid applies the first matching `http_access` line; the catalog applies
//! the most specific host pattern (a `deny` winning a tie). A `deny` line
//! after an `allow` line for overlapping hosts therefore acts differently:
//! the rule says so in a comment.
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// ACLs Squid defines itself (Squid 4 and later).
const BUILT_IN: [&str; 4] = ["localhost", "manager", "to_localhost", "to_linklocal"];

/// ACL types that select clients: set aside (with a note) on a line that
/// names destinations.
const CLIENT_KINDS: [&str; 6] = [
    "src",
    "arp",
    "proxy_auth",
    "proxy_auth_regex",
    "myportname",
    "localport",
];

/// How deep `include` directives may nest (Squid's own limit is 16).
const MAX_INCLUDE_DEPTH: usize = 16;

/// One logical line of the configuration, with where it came from.
#[derive(Clone, Debug)]
struct Line {
    file: PathBuf,
    at: String,
    words: Vec<String>,
    text: String,
}

/// What one ACL name stands for.
#[derive(Debug, Default)]
struct Acl {
    /// Host patterns for the catalog, in first-seen order.
    hosts: Vec<String>,
    /// IP-literal destinations (`addresses`).
    addresses: Vec<String>,
    /// Port ranges.
    ports: Vec<(u16, u16)>,
    /// The methods of a `method` ACL.
    methods: Vec<String>,
    /// The ACL's type(s).
    kinds: BTreeSet<String>,
    /// Values that could not be translated, and why.
    skipped: Vec<String>,
}

impl Acl {
    fn is_destination(&self) -> bool {
        self.kinds
            .iter()
            .any(|k| k == "dstdomain" || k == "dstdom_regex")
    }
    fn is_port(&self) -> bool {
        self.kinds.iter().all(|k| k == "port") && !self.kinds.is_empty()
    }
}

/// Read a Squid configuration (and what it includes) and return the
/// catalog as TOML text.
///
/// # Errors
/// The file, or a file it names, cannot be read; the message says which.
pub fn squid(path: &Path) -> Result<String, String> {
    let mut lines = Vec::new();
    read_config(path, 0, &mut lines)?;
    let mut acls: BTreeMap<String, Acl> = BTreeMap::new();
    let mut out = Translation::default();
    for line in &lines {
        match line.words.first().map(String::as_str) {
            Some("acl") => define_acl(line, &mut acls)?,
            Some("http_access") => out.access(line, &acls),
            _ => {}
        }
    }
    Ok(out.render(path, &acls))
}

/// Read `path` into logical lines (backslash continuations joined,
/// comments dropped), following `include` directives.
fn read_config(path: &Path, depth: usize, out: &mut Vec<Line>) -> Result<(), String> {
    if depth > MAX_INCLUDE_DEPTH {
        return Err(format!(
            "{}: includes nest deeper than {MAX_INCLUDE_DEPTH}",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let name = path.display().to_string();
    let mut pending = String::new();
    let mut start = 0;
    for (i, raw) in text.lines().enumerate() {
        if pending.is_empty() {
            start = i + 1;
        }
        let raw = raw.trim_end();
        if let Some(cont) = raw.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(raw);
        let logical = std::mem::take(&mut pending);
        let trimmed = logical.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        // A word starting with '#' starts a comment (Squid's default
        // configuration writes `acl Safe_ports port 80  # http`).
        let words: Vec<String> = trimmed
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .map(str::to_string)
            .collect();
        if words[0] == "include" {
            for inc in &words[1..] {
                for file in expand(&relative(path, inc.trim_matches('"')))
                    .map_err(|e| format!("{name}:{start}: include {inc}: {e}"))?
                {
                    read_config(&file, depth + 1, out)?;
                }
            }
            continue;
        }
        out.push(Line {
            file: path.to_path_buf(),
            at: format!("{name}:{start}"),
            words,
            text: trimmed.to_string(),
        });
    }
    Ok(())
}

/// The files an `include` names: the path, or the files matching a `*`
/// pattern in its last component (sorted; none is fine, as for Squid).
fn expand(p: &Path) -> Result<Vec<PathBuf>, String> {
    let Some(pattern) = p.file_name().and_then(|n| n.to_str()) else {
        return Ok(vec![p.to_path_buf()]);
    };
    if !pattern.contains('*') {
        return Ok(vec![p.to_path_buf()]);
    }
    let dir = p.parent().unwrap_or(Path::new("."));
    if p.parent()
        .is_some_and(|d| d.to_string_lossy().contains('*'))
    {
        return Err("a pattern only in the file name is followed".into());
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list {}: {e}", dir.display())),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| wildcard(pattern, n)))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// `*` matches any run of characters; everything else itself.
fn wildcard(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(name) = name.strip_prefix(head) else {
                return false;
            };
            (0..=name.len()).any(|i| name.is_char_boundary(i) && wildcard(rest, &name[i..]))
        }
    }
}

/// `p` as Squid would find it: absolute, or next to the file naming it.
fn relative(from: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        from.parent().unwrap_or(Path::new(".")).join(p)
    }
}

fn define_acl(line: &Line, acls: &mut BTreeMap<String, Acl>) -> Result<(), String> {
    let (Some(name), Some(kind)) = (line.words.get(1), line.words.get(2)) else {
        return Ok(());
    };
    let acl = acls.entry(name.clone()).or_default();
    acl.kinds.insert(kind.clone());
    let mut values = Vec::new();
    for w in &line.words[3..] {
        // ACL options (-i, -n, --) come before the values.
        if w.starts_with('-') && values.is_empty() && kind != "port" {
            continue;
        }
        if let Some(file) = w.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
            let path = relative(&line.file, file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "{}: acl {name}: cannot read {}: {e}",
                    line.at,
                    path.display()
                )
            })?;
            for v in text.lines() {
                let v = v.split('#').next().unwrap_or("").trim();
                if !v.is_empty() {
                    values.push(v.to_string());
                }
            }
        } else {
            values.push(w.clone());
        }
    }
    for v in values {
        match kind.as_str() {
            "dstdomain" => domain(acl, &v),
            "dstdom_regex" => match regex_domain(&v) {
                Some((apex, sub)) => {
                    if let Some(a) = apex {
                        push_host(acl, &a);
                    }
                    if let Some(s) = sub {
                        push_host(acl, &format!("*.{s}"));
                    }
                }
                None => acl.skipped.push(format!(
                    "dstdom_regex {v:?}: not a plain domain or suffix (write the names)"
                )),
            },
            "method" => acl.methods.push(v.to_ascii_uppercase()),
            "port" => match port_range(&v) {
                Some(r) => acl.ports.push(r),
                None => acl.skipped.push(format!("port {v:?}: not a port or range")),
            },
            _ => {}
        }
    }
    Ok(())
}

/// A `dstdomain` value: `.example.com` (apex and subdomains), a name, or an IP.
fn domain(acl: &mut Acl, v: &str) {
    let v = v.to_ascii_lowercase();
    let v = v.strip_suffix('.').unwrap_or(&v);
    if let Some(base) = v.strip_prefix('.') {
        push_host(acl, base);
        push_host(acl, &format!("*.{base}"));
    } else if let Ok(ip) = v.trim_matches(['[', ']']).parse::<IpAddr>() {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let a = format!("{ip}/{bits}");
        if !acl.addresses.contains(&a) {
            acl.addresses.push(a);
        }
    } else {
        push_host(acl, v);
    }
}

fn push_host(acl: &mut Acl, h: &str) {
    let name = h.strip_prefix("*.").unwrap_or(h);
    let ok = !name.is_empty()
        && name.contains('.')
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !ok {
        acl.skipped
            .push(format!("{h:?}: not a host name the catalog can match"));
    } else if !acl.hosts.iter().any(|x| x == h) {
        acl.hosts.push(h.to_string());
    }
}

/// A `dstdom_regex` that is a plain name or suffix: `(apex, subdomain base)`.
///
/// `^example\.com$` → apex; `\.example\.com$` → subdomains;
/// `(^|\.)example\.com$` → both.
fn regex_domain(re: &str) -> Option<(Option<String>, Option<String>)> {
    let body = re.strip_suffix('$')?;
    let (apex, sub, rest) = if let Some(r) = body.strip_prefix("(^|\\.)") {
        (true, true, r)
    } else if let Some(r) = body.strip_prefix("^") {
        (true, false, r)
    } else if let Some(r) = body.strip_prefix("\\.") {
        (false, true, r)
    } else if let Some(r) = body.strip_prefix(".*\\.") {
        (false, true, r)
    } else {
        return None;
    };
    // Only escaped dots between labels of plain characters.
    let mut name = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some('.') => name.push('.'),
                _ => return None,
            },
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                name.push(c.to_ascii_lowercase());
            }
            _ => return None,
        }
    }
    if name.is_empty() || name.starts_with('.') || name.ends_with('.') || name.contains("..") {
        return None;
    }
    Some((apex.then(|| name.clone()), sub.then_some(name)))
}

fn port_range(v: &str) -> Option<(u16, u16)> {
    let (a, b) = v.split_once('-').unwrap_or((v, v));
    let (a, b): (u16, u16) = (a.parse().ok()?, b.parse().ok()?);
    (a > 0 && a <= b).then_some((a, b))
}

/// The ports in both sets of ranges.
fn intersect(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for &(alo, ahi) in a {
        for &(blo, bhi) in b {
            let (lo, hi) = (alo.max(blo), ahi.min(bhi));
            if lo <= hi {
                out.push((lo, hi));
            }
        }
    }
    normalise(out)
}

fn normalise(mut r: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    r.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (lo, hi) in r {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

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
struct Translation {
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

impl Translation {
    fn skip(&mut self, line: &Line, why: &str) {
        self.skipped
            .push(format!("{}: {}\n#   {why}", line.at, line.text));
    }

    fn access(&mut self, line: &Line, acls: &BTreeMap<String, Acl>) {
        let Some(action) = line.words.get(1).map(String::as_str) else {
            return self.skip(line, "no action");
        };
        let action = match action {
            "allow" => "allow",
            "deny" => "deny",
            _ => return self.skip(line, "only allow and deny are translated"),
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
        let mut dest: Vec<&Acl> = Vec::new();
        let mut dest_names = Vec::new();
        let mut ports: Option<Vec<(u16, u16)>> = None;
        let mut negated_ports: Option<Vec<(u16, u16)>> = None;
        let mut connect = false;
        let mut clients = Vec::new();
        let mut notes = Vec::new();
        for n in names {
            let (neg, n) = match n.strip_prefix('!') {
                Some(r) => (true, r),
                None => (false, n.as_str()),
            };
            if n == "all" {
                continue;
            }
            let Some(acl) = acls.get(n) else {
                if n == "CONNECT" && !neg {
                    connect = true;
                    continue;
                }
                if BUILT_IN.contains(&n) {
                    return self.skip(line, &format!("Squid's built-in ACL {n:?} (clients or the cache manager) is not translated"));
                }
                return self.skip(line, &format!("ACL {n:?} is not defined before this line"));
            };
            if acl.kinds.len() == 1 && acl.kinds.contains("method") {
                if acl.methods == ["CONNECT"] && !neg {
                    connect = true;
                } else {
                    notes.push(format!(
                        "method ACL {n:?} not translated (a rule's `methods` applies to plain HTTP only)"
                    ));
                }
                continue;
            }
            if acl.is_destination() {
                if neg {
                    return self.skip(line, &format!("a negated destination ACL (!{n}) has no catalog form; list the hosts that are allowed"));
                }
                dest.push(acl);
                dest_names.push(n.to_string());
                continue;
            }
            if acl.is_port() {
                let p = normalise(acl.ports.clone());
                if neg {
                    negated_ports = Some(p);
                } else {
                    ports = Some(match ports {
                        Some(q) => intersect(&q, &p),
                        None => p,
                    });
                }
                continue;
            }
            let kinds: Vec<&str> = acl.kinds.iter().map(String::as_str).collect();
            if acl.kinds.iter().all(|k| CLIENT_KINDS.contains(&k.as_str())) && !neg {
                clients.push(format!("{n} ({})", kinds.join(", ")));
                continue;
            }
            return self.skip(
                line,
                &format!(
                    "ACL {n:?} ({}) is not translated: client ACLs become [clients.groups] and a rule's `clients`; other types have no catalog form",
                    kinds.join(", ")
                ),
            );
        }
        if dest.is_empty() && !clients.is_empty() {
            return self.skip(
                line,
                &format!(
                    "only client ACLs ({}) and no destination: an allowlist lists destinations",
                    clients.join(", ")
                ),
            );
        }
        if dest.is_empty() {
            // `deny !PORTS` and `deny CONNECT !PORTS`: a port restriction.
            if let (Some(p), "deny", None) = (&negated_ports, action, &ports) {
                if connect {
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
            return self.skip(line, "no destination ACL (dstdomain or dstdom_regex) on the line; the catalog lists destinations");
        }
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

    fn render(mut self, path: &Path, acls: &BTreeMap<String, Acl>) -> String {
        let mut out = String::new();
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
        let mut names = BTreeSet::new();
        let mut written: BTreeMap<String, String> = BTreeMap::new();
        for r in &self.rules {
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
                    continue;
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
                continue;
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
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "\n# Not translated:");
            for s in &self.skipped {
                let _ = writeln!(out, "# {s}");
            }
        }
        out
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_regexes_become_names() {
        assert_eq!(
            regex_domain(r"\.example\.com$"),
            Some((None, Some("example.com".into())))
        );
        assert_eq!(
            regex_domain(r"(^|\.)Example\.com$"),
            Some((Some("example.com".into()), Some("example.com".into())))
        );
        assert_eq!(
            regex_domain(r"^example\.com$"),
            Some((Some("example.com".into()), None))
        );
        for bad in [
            r"example\.com",
            r"\.exam.le\.com$",
            r"^ads[0-9]\.example\.com$",
            r"\.com\.$",
        ] {
            assert_eq!(regex_domain(bad), None, "{bad}");
        }
    }

    #[test]
    fn port_sets_intersect() {
        assert_eq!(
            intersect(
                &[(80, 80), (443, 443), (1025, 65535)],
                &[(443, 443), (8000, 8010)]
            ),
            vec![(443, 443), (8000, 8010)]
        );
        assert_eq!(
            normalise(vec![(80, 80), (81, 90), (443, 443)]),
            vec![(80, 90), (443, 443)]
        );
    }
}
