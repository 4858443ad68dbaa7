//! The `check` and `explain` verbs: what an operator reads, built on the
//! same policy code the proxy runs.
use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use crate::config::{DefaultAction, Settings};
use crate::policy::{Policy, Verdict};
use crate::target::{self, Host, Target};

/// The line every command prints on standard error (after `egress-proxy: `):
/// which configuration and catalog it used.
pub fn used(settings: &Settings) -> String {
    let config = match &settings.source {
        crate::config::ConfigSource::File(p) => p.display().to_string(),
        crate::config::ConfigSource::Builtin => "built-in default".to_string(),
    };
    let catalog = settings
        .policy_settings
        .catalog
        .as_ref()
        .map_or_else(|| "built-in".to_string(), |c| c.display().to_string());
    format!("configuration {config}, catalog {catalog}")
}

/// A one-screen summary of a loaded configuration and catalog.
pub fn summary(settings: &Settings) -> String {
    let p = &settings.policy;
    let mut out = String::new();
    write_settings(&mut out, settings, p);
    write_rule_counts(&mut out, p);
    let _ = writeln!(out);
    write_rule_table(&mut out, p);
    for w in &settings.warnings {
        let _ = writeln!(out, "{w}");
    }
    if let Some(w) = admin_warning(settings) {
        let _ = writeln!(out, "{w}");
    }
    out
}

/// The summary's first lines: configuration, catalog, listeners, default,
/// inspection and parent.
fn write_settings(out: &mut String, settings: &Settings, p: &Policy) {
    let _ = writeln!(out, "configuration: {}", settings.source);
    let catalog = settings
        .policy_settings
        .catalog
        .as_ref()
        .map_or_else(|| "built-in".to_string(), |c| c.display().to_string());
    let _ = writeln!(out, "catalog:       {catalog} (hash {:016x})", p.hash());
    let listen: Vec<String> = settings
        .server
        .listen
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(out, "listen:        {}", listen.join(", "));
    let _ = writeln!(
        out,
        "default:       {}",
        match p.default_action() {
            DefaultAction::Deny => "deny (anything not in the catalog is refused)",
            DefaultAction::Report => "report (misses are let through and recorded)",
        }
    );
    let _ = writeln!(
        out,
        "inspection:    {}",
        if p.inspection_enabled() {
            "on (allow tunnels are terminated with our CA)"
        } else {
            "off (every tunnel is spliced)"
        }
    );
    if let Some(parent) = &settings.parent {
        let _ = writeln!(
            out,
            "parent:        {parent} ({}, {} resolves)",
            if parent.authorization.is_some() {
                "credentials set"
            } else {
                "no credentials"
            },
            match parent.resolve {
                crate::config::ParentResolve::Parent => "the parent",
                crate::config::ParentResolve::Local => "this proxy",
            }
        );
    }
}

/// How many rules of each action, host patterns and client groups.
fn write_rule_counts(out: &mut String, p: &Policy) {
    let mut actions: BTreeMap<&str, usize> = BTreeMap::new();
    let mut hosts = 0;
    for r in p.rules() {
        *actions.entry(r.action.as_str()).or_default() += 1;
        hosts += r.hosts.len() + r.addresses.len();
    }
    let acts: Vec<String> = actions.iter().map(|(a, n)| format!("{n} {a}")).collect();
    let _ = writeln!(
        out,
        "rules:         {} ({}), {hosts} host patterns",
        p.rules().len(),
        acts.join(", ")
    );
    let groups = p.client_groups();
    if !groups.is_empty() {
        let names: Vec<&str> = groups.groups().iter().map(|g| g.name.as_str()).collect();
        let scoped = p.rules().iter().filter(|r| !r.clients.is_empty()).count();
        let _ = writeln!(
            out,
            "client groups: {} ({}); {scoped} rules scoped with `clients`",
            names.len(),
            names.join(", ")
        );
    }
}

/// One line per rule: action, ports, name and (some of) its hosts.
fn write_rule_table(out: &mut String, p: &Policy) {
    let _ = writeln!(
        out,
        "  {:<6} {:<12} {:<34} hosts",
        "action", "ports", "rule"
    );
    for r in p.rules() {
        let ports: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
        let mut names: Vec<String> = r.hosts.clone();
        names.extend(r.addresses.iter().map(ToString::to_string));
        let shown = if names.len() > 3 {
            format!("{} (+{} more)", names[..2].join(" "), names.len() - 2)
        } else {
            names.join(" ")
        };
        let shown = if r.clients.is_empty() {
            shown
        } else {
            format!("{shown} [clients: {}]", r.clients.join(", "))
        };
        let _ = writeln!(
            out,
            "  {:<6} {:<12} {:<34} {shown}",
            r.action.as_str(),
            ports.join(","),
            clip(&r.name, 34)
        );
    }
}

/// A warning when the admin endpoints listen beyond loopback without
/// `server.admin_token`: anyone who reaches the address reads `/metrics`,
/// the status page and `/api/*` (which names denied destinations).
pub fn admin_warning(settings: &Settings) -> Option<String> {
    let addr = settings.server.admin_listen?;
    if addr.ip().to_canonical().is_loopback() || settings.server.admin_token.is_some() {
        return None;
    }
    Some(format!(
        "warning: server.admin_listen = \"{addr}\" is not a loopback address and server.admin_token is not set: \
         anyone who can reach it can read /metrics, the status page and /api/*; set server.admin_token \
         (or EGRESS_PROXY__SERVER__ADMIN_TOKEN) or listen on 127.0.0.1"
    ))
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n - 1).collect();
        c.push('…');
        c
    }
}

/// The answer to `explain TARGET`.
pub struct Explained {
    pub input: String,
    pub target: Target,
    pub method: http::Method,
    pub verdict: Verdict,
    pub rule: Option<String>,
    pub reason: Option<&'static str>,
    pub why: String,
    pub losers: Vec<(String, &'static str)>,
    /// How the input was read when it is not literally what the gateway
    /// sends (an `https://` URL: the CONNECT to its host and port).
    pub note: Option<String>,
    /// How a permitted target leaves: direct, or through `[upstream]
    /// parent` (set by [`explain_routed`]).
    pub route: Option<String>,
    /// `--client`: the address decided for, and its groups (None: in none).
    pub client: Option<(std::net::IpAddr, Option<String>)>,
}

/// [`explain`], with the route the target takes under `settings`
/// (direct, or through the parent proxy, and who resolves the name).
///
/// # Errors
/// The target does not parse; the message says why.
pub fn explain_routed(
    settings: &crate::config::Settings,
    input: &str,
    client: Option<&str>,
) -> Result<Explained, String> {
    use crate::config::ParentResolve;
    let mut ex = explain_for(&settings.policy, input, client)?;
    let groups = ex
        .client
        .as_ref()
        .map_or(crate::policy::GroupSet::EVERYONE, |(ip, _)| {
            settings.policy.groups_of(*ip, None)
        });
    let rule = ex.rule.as_ref().and_then(|_| {
        let d = settings.policy.decide_for(&ex.target, &ex.method, groups);
        d.rule.and_then(|i| settings.policy.rule(i))
    });
    let route = crate::proxy::parent::route(settings, rule);
    ex.route = Some(match (&settings.parent, route) {
        (Some(p), crate::policy::Route::Parent) => {
            let ip_literal = matches!(ex.target.host, crate::target::Host::Ip(_));
            if p.resolve == ParentResolve::Local || ip_literal {
                format!("parent: through {p}; the address is resolved and vetted here, and the parent is asked for the vetted address")
            } else {
                format!("parent: through {p}, which resolves the name (no address vetting here)")
            }
        }
        (Some(_), _) => "direct: the rule's route = \"direct\" bypasses the parent proxy".into(),
        (None, _) => "direct".into(),
    });
    Ok(ex)
}

/// The authority a gateway CONNECTs to for an `https://` URL: the URL's
/// host and port, 443 when it names none. None when `input` is not one.
fn https_authority(input: &str) -> Option<Result<String, String>> {
    let scheme = input.get(..8)?;
    if !scheme.eq_ignore_ascii_case("https://") {
        return None;
    }
    let uri: http::Uri = match input.parse() {
        Ok(u) => u,
        Err(e) => return Some(Err(format!("not a URL: {e}"))),
    };
    let Some(authority) = uri.authority() else {
        return Some(Err("bad_request: the URL has no host".into()));
    };
    Some(Ok(if authority.port().is_some() {
        authority.as_str().to_string()
    } else {
        format!("{}:443", authority.as_str())
    }))
}

/// Parse `http://host/...` (a plain request), `https://host/...` (the
/// CONNECT a gateway sends for it: host, port 443 unless the URL names one)
/// or `host:port` (a CONNECT) and explain it.
///
/// # Errors
/// The target does not parse; the message says why.
pub fn explain(policy: &Policy, input: &str) -> Result<Explained, String> {
    explain_for(policy, input, None)
}

/// [`explain`] for the client at address `client` (`--client`,
/// `/api/explain?client=`): rules with `clients` apply only when it is in
/// one of their groups. Without it, the client is in no group.
///
/// # Errors
/// The target or the client address does not parse.
pub fn explain_for(
    policy: &Policy,
    input: &str,
    client: Option<&str>,
) -> Result<Explained, String> {
    let client = client
        .map(|c| {
            let c = c.trim();
            c.parse::<std::net::IpAddr>()
                .or_else(|_| c.parse::<std::net::SocketAddr>().map(|s| s.ip()))
                .map_err(|_| format!("client {c:?} is not an IP address; write e.g. 10.0.1.5"))
        })
        .transpose()?;
    let groups = client.map_or(crate::policy::GroupSet::EVERYONE, |ip| {
        policy.groups_of(ip, None)
    });
    let input = input.trim();
    let mut note = None;
    let (target, method) = if let Some(authority) = https_authority(input) {
        let t = target::parse_authority(&authority?).map_err(|e| format!("bad_request: {e}"))?;
        note = Some(format!(
            "an https:// URL: the gateway sends CONNECT {t}; the path and the request stay inside the tunnel"
        ));
        (t, http::Method::CONNECT)
    } else if input.contains("://") {
        let uri: http::Uri = input.parse().map_err(|e| format!("not a URL: {e}"))?;
        let t = target::parse_absolute(&uri).map_err(|e| format!("bad_request: {e}"))?;
        (t, http::Method::GET)
    } else {
        let t = target::parse_authority(input).map_err(|e| format!("bad_request: {e}"))?;
        (t, http::Method::CONNECT)
    };
    let ex = policy.explain_for(&target, &method, groups);
    let d = ex.decision;
    let rule = d.rule.and_then(|i| policy.rule(i));
    let why = match (d.verdict, rule, d.reason) {
        (Verdict::Allow, Some(r), _)
            if method == http::Method::CONNECT && policy.inspection_enabled() =>
        {
            format!(
                "rule \"{}\" allows it; the tunnel is inspected with our CA",
                r.name
            )
        }
        (Verdict::Allow, Some(r), _) => format!("rule \"{}\" allows it", r.name),
        (Verdict::Bypass, Some(r), _) => format!(
            "rule \"{}\" bypasses inspection: bytes are spliced untouched (SNI check: {})",
            r.name,
            r.sni.as_str()
        ),
        (Verdict::Report, _, Some(reason)) => format!(
            "no rule decides it ({}); policy.default = \"report\" lets it through and records it",
            reason.describe()
        ),
        (_, _, Some(reason)) => reason.describe().to_string(),
        _ => String::new(),
    };
    let losers = ex
        .losers
        .iter()
        .filter_map(|(i, loss)| policy.rule(*i).map(|r| (r.name.clone(), loss.describe())))
        .collect();
    Ok(Explained {
        input: input.to_string(),
        target,
        method,
        verdict: d.verdict,
        rule: rule.map(|r| r.name.clone()),
        reason: d.reason.map(|r| r.as_str()),
        why,
        losers,
        route: None,
        note,
        client: client.map(|ip| (ip, policy.client_groups().names(groups))),
    })
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "target:   {} ({} {})",
            self.input, self.method, self.target
        )?;
        if let Some(n) = &self.note {
            writeln!(f, "note:     {n}")?;
        }
        if let Some((ip, groups)) = &self.client {
            let groups = groups.as_deref().unwrap_or("(none)");
            writeln!(f, "client:   {ip} (groups: {groups})")?;
        }
        writeln!(f, "decision: {}", self.verdict.as_str())?;
        writeln!(f, "rule:     {}", self.rule.as_deref().unwrap_or("(none)"))?;
        if let Some(r) = self.reason {
            writeln!(f, "reason:   {r}")?;
        }
        writeln!(f, "why:      {}", self.why)?;
        if self.verdict.is_permitted() {
            if let Some(r) = &self.route {
                writeln!(f, "route:    {r}")?;
            }
            let via_parent = self
                .route
                .as_deref()
                .is_some_and(|r| r.starts_with("parent"));
            match self.target.host {
                _ if via_parent => {}
                Host::Ip(_) => writeln!(f, "then:     the address is vetted (private ranges refused unless dns.allow_private covers them)")?,
                Host::Name(_) => writeln!(f, "then:     the name is resolved and every address vetted (private ranges refused unless dns.allow_private covers them)")?,
            }
        }
        for (name, why) in &self.losers {
            writeln!(f, "also matched: \"{name}\": {why}")?;
        }
        Ok(())
    }
}
