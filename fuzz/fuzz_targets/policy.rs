//! Fuzz the policy decision on a generated catalog.
//!
//! The catalog (built once) has exact names, wildcards at several depths,
//! `deny` carve-outs out of wildcards, port lists and ranges, IP-literal
//! `addresses`, `methods`, and `bypass` rules. For arbitrary input — a host
//! (the bytes after the first three, through `normalize_host`), a port (two
//! bytes) and a method (one byte) — `decide` must not panic, and:
//!
//! * the decision depends on the normalised host only: the input with its
//!   ASCII letters upper-cased, or with one trailing dot, decides the same;
//! * a spelling variant of a denied exact name (its letters upper-cased as
//!   the input's bits say, a trailing dot or not) normalises to the name
//!   and is denied by the same rule.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use egress_proxy::config::{parse_catalog, DefaultAction};
use egress_proxy::policy::{Decision, Policy, Verdict};
use egress_proxy::target::{self, Host, Target};
use http::Method;
use libfuzzer_sys::fuzz_target;

/// Exact names carved out of `*.zone{i}.example.com` by a `deny` rule, on
/// every port.
const DENIED: [&str; 4] = [
    "blocked.zone0.example.com",
    "tracker.zone1.example.com",
    "telemetry.zone2.example.com",
    "x--y.zone3.example.com",
];

fn catalog() -> String {
    let mut text = String::new();
    let mut rule = |name: String, body: String| {
        text.push_str(&format!("[[rule]]\nname = \"{name}\"\n{body}\n"));
    };
    for i in 0..40 {
        let action = ["allow", "bypass"][i % 2];
        rule(
            format!("exact {i}"),
            format!(
                "hosts = [\"api{i}.svc{}.example.com\", \"cdn{i}.example.net\"]\nports = [443, {}]\naction = \"{action}\"\n",
                i / 4,
                8000 + i
            ),
        );
        rule(
            format!("wildcard {i}"),
            format!(
                "hosts = [\"*.zone{i}.example.com\"]\nports = [\"1-1024\"]\naction = \"allow\"\n"
            ),
        );
        rule(
            format!("deep wildcard {i}"),
            format!(
                "hosts = [\"*.deep.zone{i}.example.com\"]\nports = [443]\naction = \"bypass\"\n"
            ),
        );
    }
    for (i, name) in DENIED.iter().enumerate() {
        rule(
            format!("carve-out {i}"),
            format!("hosts = [\"{name}\"]\nports = [\"1-65535\"]\naction = \"deny\"\n"),
        );
    }
    rule(
        "deny a whole zone".into(),
        "hosts = [\"*.bad.example.com\"]\nports = [\"1-65535\"]\naction = \"deny\"\n".into(),
    );
    rule(
        "mirror".into(),
        "hosts = [\"mirror.example.org\"]\nports = [80]\naction = \"allow\"\nmethods = [\"GET\", \"HEAD\"]\n".into(),
    );
    rule(
        "idn".into(),
        "hosts = [\"xn--bcher-kva.example\", \"*.xn--mnchen-3ya.example\"]\nports = [443]\naction = \"allow\"\n".into(),
    );
    rule(
        "addresses".into(),
        "addresses = [\"203.0.113.0/24\", \"2001:db8::/32\", \"10.1.2.3/32\"]\nports = [443, \"8443-8450\"]\naction = \"bypass\"\n".into(),
    );
    rule(
        "address carve-out".into(),
        "addresses = [\"203.0.113.66/32\"]\nports = [443]\naction = \"deny\"\n".into(),
    );
    text
}

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let specs = parse_catalog("fuzz-catalog.toml", &catalog(), Path::new("."))
            .unwrap_or_else(|e| panic!("the generated catalog must load: {e:?}"));
        Policy::compile(specs, DefaultAction::Deny, false)
    })
}

fn decide(raw: &str, port: u16, method: &Method) -> Option<Decision> {
    let host = target::normalize_host(raw).ok()?;
    Some(policy().decide(&Target { host, port }, method))
}

fuzz_target!(|data: &[u8]| {
    let [p0, p1, m, rest @ ..] = data else {
        return;
    };
    let port = u16::from_be_bytes([*p0, *p1]);
    let method = match m % 4 {
        0 => Method::GET,
        1 => Method::CONNECT,
        2 => Method::POST,
        _ => Method::HEAD,
    };

    // Arbitrary hosts: no panic; ASCII case and one trailing dot never matter.
    if let Ok(raw) = std::str::from_utf8(rest) {
        let decided = decide(raw, port, &method);
        let upper = raw.to_ascii_uppercase();
        assert_eq!(
            decide(&upper, port, &method),
            decided,
            "{raw:?} vs {upper:?}"
        );
        if !raw.ends_with('.') && !raw.is_empty() {
            let dotted = format!("{raw}.");
            if let (Some(a), Some(b)) = (decided, decide(&dotted, port, &method)) {
                assert_eq!(a, b, "{raw:?} vs {dotted:?}");
            }
        }
    }

    // A spelling variant of a denied name is that name, and denied.
    let canonical = DENIED[usize::from(*m) % DENIED.len()];
    let mut bits = rest
        .iter()
        .flat_map(|b| (0..8).map(move |i| b >> i & 1 == 1));
    let mut variant: String = canonical
        .chars()
        .map(|c| {
            if bits.next().unwrap_or(false) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    if bits.next().unwrap_or(false) {
        variant.push('.');
    }
    let host = target::normalize_host(&variant);
    assert_eq!(host, Ok(Host::Name(canonical.into())), "{variant:?}");
    let want = decide(canonical, port.max(1), &method);
    let got = decide(&variant, port.max(1), &method);
    assert_eq!(got, want, "{variant:?} vs {canonical:?}");
    let got = got.unwrap_or_else(|| unreachable!());
    assert_eq!(got.verdict, Verdict::Deny, "{variant:?}: {got:?}");
    assert!(
        got.rule
            .and_then(|i| policy().rule(i))
            .is_some_and(|r| r.name.starts_with("carve-out")),
        "{variant:?}: {got:?}"
    );
});
