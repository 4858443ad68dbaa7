//! The catalog: rule specs parsed and checked one by one.
use super::*;

/// Parse and validate catalog text into rule specs.
///
/// # Errors
/// Every problem found, each naming the rule by index and name.
pub fn parse_catalog(
    file: &str,
    text: &str,
    base: &Path,
) -> Result<Vec<RuleSpec>, Vec<ConfigError>> {
    validate_catalog(file, parse_raw_catalog(file, text)?, base)
}

/// The TOML of a catalog, not yet validated (the parse phase of a load).
pub(super) fn parse_raw_catalog(file: &str, text: &str) -> Result<RawCatalog, Vec<ConfigError>> {
    toml::from_str(text).map_err(|e| {
        vec![ConfigError {
            location: file.to_string(),
            message: format!("cannot parse the catalog: {}", e.message().trim_end()),
        }]
    })
}

/// Each rule checked, then the catalog for exact duplicates (the validate
/// phase of a load).
pub(super) fn validate_catalog(
    file: &str,
    raw: RawCatalog,
    base: &Path,
) -> Result<Vec<RuleSpec>, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut specs = Vec::with_capacity(raw.rule.len());
    for (i, r) in raw.rule.into_iter().enumerate() {
        let name = r.name.clone().unwrap_or_default();
        let loc = rule_location(file, i, &name);
        let mut err = |key: &str, message: String| {
            errors.push(ConfigError {
                location: format!("{loc}: {key}"),
                message,
            });
        };
        if let Some(spec) = validate_rule(r, base, &mut err) {
            specs.push(spec);
        }
    }
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::with_capacity(specs.len());
    for (i, a) in specs.iter().enumerate() {
        let same = seen.entry(a.effect_hash()).or_default();
        let dup = same.iter().copied().find(|&j| specs[j].same_effect(a));
        same.push(i);
        if let Some(j) = dup {
            errors.push(ConfigError {
                location: rule_location(file, i, &a.name),
                message: format!(
                    "exact duplicate of rule #{} \"{}\"; remove one of them",
                    j + 1,
                    specs[j].name
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}

fn validate_rule(r: RawRule, base: &Path, err: &mut impl FnMut(&str, String)) -> Option<RuleSpec> {
    let mut bad = false;
    let mut fail = |key: &str, message: String| {
        bad = true;
        err(key, message);
    };
    let name = rule_name(r.name, &mut fail);
    let (hosts, addresses, ports) = rule_targets(&r.hosts, &r.addresses, &r.ports, &mut fail);
    let action = rule_action(r.action.as_deref(), &mut fail);
    let methods = rule_methods(r.methods, &mut fail);
    let (sni, ech) = rule_modes(r.sni.as_deref(), r.ech.as_deref(), &mut fail);
    let ips = rule_ips(&r.ips, r.pin, &mut fail);
    let rate = r
        .rate
        .and_then(|v| parse_rate(&v).map_err(|m| fail("rate", m)).ok());
    let client_cert = r.client_cert.map(|c| rule_client_cert(&c, base, &mut fail));
    let route = match r.route.as_deref() {
        None => None,
        Some("direct") => Some(Route::Direct),
        Some("parent") => Some(Route::Parent),
        Some(other) => {
            fail(
                "route",
                format!("unknown route {other:?}; write \"direct\" or \"parent\""),
            );
            None
        }
    };
    if bad {
        return None;
    }
    Some(RuleSpec {
        name,
        hosts,
        addresses,
        ports,
        action,
        methods,
        sni,
        ech,
        ips,
        pin: r.pin,
        rate,
        client_cert,
        route,
        clients: r.clients,
    })
}

fn rule_name(name: Option<String>, fail: &mut impl FnMut(&str, String)) -> String {
    match name {
        Some(n) if !n.trim().is_empty() => n,
        _ => {
            fail(
                "name",
                "missing; every rule needs a name = \"...\" (it is shown in every audit record)"
                    .into(),
            );
            String::new()
        }
    }
}

/// `hosts` and `addresses` (one of them is needed) and `ports`.
fn rule_targets(
    hosts: &[String],
    addresses: &[String],
    ports: &[RawPort],
    fail: &mut impl FnMut(&str, String),
) -> (Vec<String>, Vec<IpNet>, Vec<PortRange>) {
    if hosts.is_empty() && addresses.is_empty() {
        fail(
            "hosts",
            "a rule needs hosts = [\"name\", \"*.domain\"] or addresses = [\"203.0.113.7/32\"]"
                .into(),
        );
    }
    let mut host_patterns = Vec::with_capacity(hosts.len());
    for h in hosts {
        match validate_host_pattern(h) {
            Ok(p) => host_patterns.push(p),
            Err(m) => fail("hosts", m),
        }
    }
    let mut nets = Vec::with_capacity(addresses.len());
    for a in addresses {
        match parse_cidr(a) {
            Ok(n) => nets.push(n),
            Err(m) => fail("addresses", m),
        }
    }
    if ports.is_empty() {
        fail("ports", "missing; write ports = [443], ports = [\"8000-8010\"], or [\"1-65535\"] for every port".into());
    }
    let mut ranges = Vec::with_capacity(ports.len());
    for p in ports {
        match parse_port(p) {
            Ok(range) => ranges.push(range),
            Err(m) => fail("ports", m),
        }
    }
    (host_patterns, nets, ranges)
}

fn rule_action(action: Option<&str>, fail: &mut impl FnMut(&str, String)) -> Action {
    match action {
        Some("allow") => Action::Allow,
        Some("bypass") => Action::Bypass,
        Some("deny") => Action::Deny,
        Some(other) => {
            fail(
                "action",
                format!("unknown action {other:?}; write \"allow\", \"bypass\" or \"deny\""),
            );
            Action::Deny
        }
        None => {
            fail(
                "action",
                "missing; write action = \"allow\", \"bypass\" or \"deny\"".into(),
            );
            Action::Deny
        }
    }
}

fn rule_methods(
    methods: Option<Vec<String>>,
    fail: &mut impl FnMut(&str, String),
) -> Option<Vec<http::Method>> {
    let methods = methods.map(|ms| {
        let mut out = Vec::with_capacity(ms.len());
        for m in ms {
            match http::Method::from_bytes(m.as_bytes()) {
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => out.push(method),
                _ => fail("methods", format!("{m:?} is not an HTTP method; write upper-case names such as \"GET\", \"HEAD\"")),
            }
        }
        out
    });
    if methods.as_ref().is_some_and(Vec::is_empty) {
        fail(
            "methods",
            "empty list; remove the key to allow every method".into(),
        );
    }
    methods
}

fn rule_modes(
    sni: Option<&str>,
    ech: Option<&str>,
    fail: &mut impl FnMut(&str, String),
) -> (SniMode, EchMode) {
    let sni_mode = match sni {
        None | Some("match-if-tls") => SniMode::MatchIfTls,
        Some("off") => SniMode::Off,
        Some("require") => SniMode::Require,
        Some(other) => {
            fail(
                "sni",
                format!("unknown mode {other:?}; write \"off\", \"match-if-tls\" or \"require\""),
            );
            SniMode::MatchIfTls
        }
    };
    let ech_mode = match ech {
        None | Some("allow") => EchMode::Allow,
        Some("deny") => EchMode::Deny,
        Some(other) => {
            fail(
                "ech",
                format!("unknown mode {other:?}; write \"allow\" or \"deny\""),
            );
            EchMode::Allow
        }
    };
    (sni_mode, ech_mode)
}

fn rule_ips(ips: &[String], pin: bool, fail: &mut impl FnMut(&str, String)) -> Vec<IpAddr> {
    let mut addrs = Vec::with_capacity(ips.len());
    for ip in ips {
        match ip.parse::<IpAddr>() {
            Ok(a) => addrs.push(a),
            Err(_) => fail(
                "ips",
                format!("{ip:?} is not an IP address; write e.g. \"185.155.104.24\""),
            ),
        }
    }
    if pin && addrs.is_empty() {
        fail(
            "pin",
            "pin = true needs the addresses in ips = [...]".into(),
        );
    }
    addrs
}

fn rule_client_cert(
    c: &RawClientCert,
    base: &Path,
    fail: &mut impl FnMut(&str, String),
) -> (PathBuf, PathBuf) {
    let cert = resolve(base, &c.cert);
    let key = resolve(base, &c.key);
    for (what, p) in [("cert", &cert), ("key", &key)] {
        if let Err(e) = std::fs::metadata(p) {
            fail(
                &format!("client_cert.{what}"),
                format!("cannot read {}: {e}", p.display()),
            );
        }
    }
    (cert, key)
}

/// Validate one catalog host pattern: an exact normalised name, or `*.` plus one.
fn validate_host_pattern(h: &str) -> Result<String, String> {
    if h == "*" || h == "*." {
        return Err(format!(
            "{h:?} would match every host; list the domains, e.g. \"*.example.com\""
        ));
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h),
    };
    if name.contains('*') {
        return Err(format!(
            "{h:?}: a wildcard may only be a leading \"*.\"; write \"*.example.com\""
        ));
    }
    match target::normalize_host(name) {
        Ok(Host::Name(n)) if *n == *name => Ok(h.to_string()),
        Ok(Host::Name(n)) => {
            let suggestion = if wild {
                format!("*.{n}")
            } else {
                n.to_string()
            };
            Err(format!("{h:?} is not normalised; write {suggestion:?}"))
        }
        Ok(Host::Ip(ip)) => Err(format!(
            "{h:?} is an IP address; list it in addresses = [\"{ip}/{}\"]",
            if ip.is_ipv4() { 32 } else { 128 }
        )),
        Err(e) => Err(format!("{h:?} is not a host name ({e})")),
    }
}

fn parse_port(p: &RawPort) -> Result<PortRange, String> {
    let check = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("{n} is not a port; ports are 1-65535"))
    };
    match p {
        RawPort::Number(n) => {
            let n = check(*n)?;
            Ok(PortRange { lo: n, hi: n })
        }
        RawPort::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (t.trim(), t.trim()),
            };
            let num = |s: &str| -> Result<u16, String> {
                let n: i64 = s.parse().map_err(|_| {
                    format!("{t:?} is not a port or range; write 443 or \"8000-8010\"")
                })?;
                check(n)
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("{t:?} is an inverted range; write \"{hi}-{lo}\""));
            }
            Ok(PortRange { lo, hi })
        }
    }
}
