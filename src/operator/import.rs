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
use std::net::IpAddr;
use std::path::{Path, PathBuf};

mod translate;
use translate::Translation;

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

#[cfg(test)]
mod tests;
