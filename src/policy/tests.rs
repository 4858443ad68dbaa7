//! Unit tests of the policy: named cases over the catalogs in
//! `tests/fixtures/policy/`, `explain` and `shadowed`, the shipped catalog, a
//! generated catalog of more than a thousand rules, and properties of
//! spelling variants (a denied name stays denied however it is written).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use http::Method;
use proptest::prelude::*;

use super::*;
use crate::config::{parse_catalog, DefaultAction, BUILTIN_CATALOG};
use crate::reason::Reason;
use crate::target::{self, Host, Target};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy");

const MATCHING: &str = "matching.toml";
const PORTS_METHODS: &str = "ports_methods.toml";
const ADDRESSES: &str = "addresses.toml";
const SHADOWED: &str = "shadowed.toml";

// === helpers ===

fn fixture_text(fixture: &str) -> String {
    let path = Path::new(FIXTURES).join(fixture);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn specs_from(file: &str, text: &str) -> Vec<RuleSpec> {
    parse_catalog(file, text, Path::new(".")).unwrap_or_else(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        panic!("{file} must load:\n{}", lines.join("\n"))
    })
}

fn policy(fixture: &str, default: DefaultAction, inspect: bool) -> Policy {
    Policy::compile(
        specs_from(fixture, &fixture_text(fixture)),
        default,
        inspect,
    )
}

/// `http://…` is a plain request (GET), `host:port` a CONNECT, as in `explain`.
fn target(input: &str) -> (Target, Method) {
    if input.contains("://") {
        let uri: http::Uri = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
        let t = target::parse_absolute(&uri).unwrap_or_else(|e| panic!("{input}: {e}"));
        (t, Method::GET)
    } else {
        let t = target::parse_authority(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        (t, Method::CONNECT)
    }
}

fn rule_name(policy: &Policy, d: &Decision) -> Option<String> {
    d.rule
        .map(|i| policy.rule(i).expect("rule index in range").name.clone())
}

// === the decision table ===

/// What a case expects: verdict, deciding rule (by name), reason.
#[derive(Debug, PartialEq, Eq)]
struct Want {
    verdict: Verdict,
    rule: Option<String>,
    reason: Option<Reason>,
}

fn allow(rule: &str) -> Want {
    Want {
        verdict: Verdict::Allow,
        rule: Some(rule.into()),
        reason: None,
    }
}

fn bypass(rule: &str) -> Want {
    Want {
        verdict: Verdict::Bypass,
        rule: Some(rule.into()),
        reason: None,
    }
}

/// Refused by an explicit deny rule.
fn deny_rule(rule: &str) -> Want {
    refused_by(rule, Reason::DenyRule)
}

/// Refused by a rule for `reason` (method_not_allowed).
fn refused_by(rule: &str, reason: Reason) -> Want {
    Want {
        verdict: Verdict::Deny,
        rule: Some(rule.into()),
        reason: Some(reason),
    }
}

/// Refused with no deciding rule.
fn refused(reason: Reason) -> Want {
    Want {
        verdict: Verdict::Deny,
        rule: None,
        reason: Some(reason),
    }
}

/// A policy miss let through by `policy.default = "report"`.
fn reported(reason: Reason) -> Want {
    Want {
        verdict: Verdict::Report,
        rule: None,
        reason: Some(reason),
    }
}

struct Case {
    name: &'static str,
    fixture: &'static str,
    target: &'static str,
    method: Option<Method>,
    default: DefaultAction,
    inspect: bool,
    want: Want,
}

fn case(name: &'static str, fixture: &'static str, target: &'static str, want: Want) -> Case {
    Case {
        name,
        fixture,
        target,
        method: None,
        default: DefaultAction::Deny,
        inspect: false,
        want,
    }
}

impl Case {
    fn method(mut self, m: Method) -> Self {
        self.method = Some(m);
        self
    }

    fn report(mut self) -> Self {
        self.default = DefaultAction::Report;
        self
    }

    fn inspect(mut self) -> Self {
        self.inspect = true;
        self
    }

    /// Run the case; a description of the mismatch on failure.
    fn check(&self) -> Result<(), String> {
        let p = policy(self.fixture, self.default, self.inspect);
        let (t, default_method) = target(self.target);
        let method = self.method.clone().unwrap_or(default_method);
        let d = p.decide(&t, &method);
        let got = Want {
            verdict: d.verdict,
            rule: rule_name(&p, &d),
            reason: d.reason,
        };
        if got != self.want {
            return Err(format!(
                "{}: {method} {} ({}): want {:?}, got {got:?}",
                self.name, self.target, self.fixture, self.want
            ));
        }
        let explained = p.explain(&t, &method).decision;
        if explained != d {
            return Err(format!(
                "{}: explain() decided {explained:?}, decide() {d:?}",
                self.name
            ));
        }
        Ok(())
    }
}

fn matching_cases() -> Vec<Case> {
    use Reason::*;
    let m = MATCHING;
    vec![
        // --- exact vs wildcard
        case(
            "wildcard matches a subdomain",
            m,
            "www.example.com:443",
            allow("example wildcard"),
        ),
        case(
            "wildcard matches a deeper subdomain",
            m,
            "a.b.example.com:443",
            allow("example wildcard"),
        ),
        case(
            "wildcard does not match the apex",
            m,
            "example.com:443",
            refused(NotInCatalog),
        ),
        case(
            "wildcard needs a label boundary",
            m,
            "badexample.com:443",
            refused(NotInCatalog),
        ),
        case(
            "catalogued name as a prefix is not a match",
            m,
            "www.example.com.evil.test:443",
            refused(NotInCatalog),
        ),
        case(
            "exact beats wildcard",
            m,
            "api.example.com:443",
            bypass("example api exact"),
        ),
        case(
            "wildcard decides the port the exact rule lacks",
            m,
            "http://api.example.com/",
            allow("example wildcard"),
        ),
        case(
            "exact name does not cover its subdomains",
            m,
            "x.api.example.com:443",
            allow("example wildcard"),
        ),
        case(
            "target is normalised before matching",
            m,
            "WWW.Example.COM.:443",
            allow("example wildcard"),
        ),
        case(
            "port miss on a wildcard",
            m,
            "www.example.com:8443",
            refused(PortNotAllowed),
        ),
        // --- more labels beat fewer
        case(
            "wildcard with more labels beats fewer",
            m,
            "x.eu.corp.test:443",
            allow("corp eu allow"),
        ),
        case(
            "fewer labels decide outside the longer suffix",
            m,
            "x.us.corp.test:443",
            deny_rule("corp deny"),
        ),
        case(
            "longer wildcard does not match its own apex",
            m,
            "eu.corp.test:443",
            deny_rule("corp deny"),
        ),
        case(
            "longer wildcard off its ports falls to the shorter",
            m,
            "http://x.eu.corp.test/",
            deny_rule("corp deny"),
        ),
        // --- carve-outs
        case(
            "exact deny inside a wildcard allow",
            m,
            "evil.cdn.test:443",
            deny_rule("cdn carve-out"),
        ),
        case(
            "siblings of a carve-out stay allowed",
            m,
            "good.cdn.test:443",
            allow("cdn wildcard"),
        ),
        case(
            "a carve-out is exact, not its subdomains",
            m,
            "sub.evil.cdn.test:443",
            allow("cdn wildcard"),
        ),
        case(
            "exact allow inside a wildcard deny",
            m,
            "updates.blocked.test:443",
            allow("blocked carve-in"),
        ),
        case(
            "an allow carve-out only on its ports",
            m,
            "http://updates.blocked.test/",
            deny_rule("blocked wildcard"),
        ),
        case(
            "the rest of a wildcard deny",
            m,
            "other.blocked.test:443",
            deny_rule("blocked wildcard"),
        ),
        // --- ties at one specificity
        case(
            "tie: deny beats bypass and allow",
            m,
            "tie.test:443",
            deny_rule("tie deny"),
        ),
        case(
            "tie: bypass beats allow",
            m,
            "tie2.test:443",
            bypass("tie2 bypass"),
        ),
        case(
            "tie between equal wildcards: deny wins",
            m,
            "x.wtie.test:443",
            deny_rule("wild tie deny"),
        ),
        case(
            "tie with one action: first in file wins",
            m,
            "first.test:443",
            allow("first A"),
        ),
        case(
            "the later rule still decides its other hosts",
            m,
            "second.test:443",
            allow("first B"),
        ),
        // --- report mode
        case(
            "report: a miss is let through",
            m,
            "example.com:443",
            reported(NotInCatalog),
        )
        .report(),
        case(
            "report: a port miss is let through",
            m,
            "www.example.com:8443",
            reported(PortNotAllowed),
        )
        .report(),
        case(
            "report: a deny rule still denies",
            m,
            "evil.cdn.test:443",
            deny_rule("cdn carve-out"),
        )
        .report(),
        case(
            "report: a wildcard deny still denies",
            m,
            "x.us.corp.test:443",
            deny_rule("corp deny"),
        )
        .report(),
        case(
            "report: a match is not a report",
            m,
            "www.example.com:443",
            allow("example wildcard"),
        )
        .report(),
    ]
}

fn ports_methods_cases() -> Vec<Case> {
    use Reason::*;
    let p = PORTS_METHODS;
    vec![
        // --- ports
        case("range: low end", p, "range.test:8000", allow("port range")),
        case("range: high end", p, "range.test:8010", allow("port range")),
        case(
            "range: below",
            p,
            "range.test:7999",
            refused(PortNotAllowed),
        ),
        case(
            "range: above",
            p,
            "range.test:8011",
            refused(PortNotAllowed),
        ),
        case("every port: 1", p, "anyport.test:1", allow("every port")),
        case(
            "every port: 65535",
            p,
            "anyport.test:65535",
            allow("every port"),
        ),
        case(
            "mixed ports: number",
            p,
            "http://multi.test/",
            allow("mixed ports"),
        ),
        case(
            "mixed ports: range",
            p,
            "multi.test:8081",
            allow("mixed ports"),
        ),
        case(
            "mixed ports: outside",
            p,
            "multi.test:8082",
            refused(PortNotAllowed),
        ),
        case(
            "unknown host on a catalogued port",
            p,
            "unknown.test:8000",
            refused(NotInCatalog),
        ),
        case(
            "split: the exact rule on its port",
            p,
            "www.split.test:443",
            allow("split exact"),
        ),
        case(
            "split: the wildcard on the other port",
            p,
            "http://www.split.test/",
            bypass("split wildcard"),
        ),
        case(
            "split: neither port",
            p,
            "www.split.test:8080",
            refused(PortNotAllowed),
        ),
        case(
            "split: the apex is not matched",
            p,
            "http://split.test/",
            refused(NotInCatalog),
        ),
        // --- methods
        case(
            "methods: GET allowed",
            p,
            "http://methods.test/",
            allow("get only"),
        ),
        case(
            "methods: HEAD allowed",
            p,
            "http://methods.test/",
            allow("get only"),
        )
        .method(Method::HEAD),
        case(
            "methods: POST refused",
            p,
            "http://methods.test/",
            refused_by("get only", MethodNotAllowed),
        )
        .method(Method::POST),
        case(
            "methods: POST refused in report mode too",
            p,
            "http://methods.test/",
            refused_by("get only", MethodNotAllowed),
        )
        .method(Method::POST)
        .report(),
        case(
            "methods: CONNECT without inspection is refused",
            p,
            "methods.test:443",
            refused_by("get only", MethodNotAllowed),
        ),
        case(
            "methods: CONNECT inspected on an allow rule",
            p,
            "methods.test:443",
            allow("get only"),
        )
        .inspect(),
        case(
            "methods: CONNECT listed",
            p,
            "connect-listed.test:443",
            allow("connect listed"),
        ),
        case(
            "methods: CONNECT to a bypass rule, even with inspection",
            p,
            "bypass-methods.test:443",
            refused_by("bypass with methods", MethodNotAllowed),
        )
        .inspect(),
        case(
            "methods: GET through a bypass rule",
            p,
            "http://bypass-methods.test:443/",
            bypass("bypass with methods"),
        ),
        case(
            "methods: a deny rule denies a listed method",
            p,
            "http://deny-methods.test/",
            deny_rule("deny with methods"),
        ),
        case(
            "methods: a deny rule denies an unlisted method",
            p,
            "http://deny-methods.test/",
            deny_rule("deny with methods"),
        )
        .method(Method::POST),
        case(
            "methods: a rule without methods takes any",
            p,
            "http://anymethod.test/",
            allow("any method"),
        )
        .method(Method::DELETE),
    ]
}

fn address_cases() -> Vec<Case> {
    use Reason::*;
    let a = ADDRESSES;
    vec![
        case(
            "address inside a CIDR",
            a,
            "203.0.113.9:443",
            allow("documentation net"),
        ),
        case(
            "address as one decimal number",
            a,
            "3405803785:443",
            allow("documentation net"),
        ),
        case(
            "address in hex",
            a,
            "0xcb.0x00.0x71.0x09:443",
            allow("documentation net"),
        ),
        case(
            "address in an http URL",
            a,
            "http://203.0.113.9:443/",
            allow("documentation net"),
        ),
        case(
            "IPv6 inside a CIDR",
            a,
            "[2001:db8::1]:443",
            bypass("documentation net v6"),
        ),
        case(
            "a bare address is a /32",
            a,
            "http://198.51.100.7/",
            allow("one address"),
        ),
        case(
            "next to a bare address",
            a,
            "http://198.51.100.8/",
            refused(IpLiteral),
        ),
        case("outside every CIDR", a, "192.0.2.1:443", refused(IpLiteral)),
        case(
            "outside every CIDR, report mode",
            a,
            "192.0.2.1:443",
            refused(IpLiteral),
        )
        .report(),
        case("loopback literal", a, "127.0.0.1:443", refused(IpLiteral)),
        case("IPv6 loopback literal", a, "[::1]:443", refused(IpLiteral)),
        case(
            "IPv4-mapped IPv6 is not admitted by an IPv4 CIDR",
            a,
            "[::ffff:203.0.113.9]:443",
            refused(IpLiteral),
        ),
        case(
            "address on another port",
            a,
            "203.0.113.9:80",
            refused(PortNotAllowed),
        ),
        case(
            "address on another port, report mode",
            a,
            "203.0.113.9:80",
            refused(PortNotAllowed),
        )
        .report(),
        case(
            "denied address",
            a,
            "192.0.2.66:443",
            deny_rule("denied address"),
        ),
        case(
            "denied address, report mode",
            a,
            "192.0.2.66:443",
            deny_rule("denied address"),
        )
        .report(),
        case(
            "name and address: by name",
            a,
            "mixed.test:443",
            allow("name and address"),
        ),
        case(
            "name and address: by address",
            a,
            "192.0.2.10:443",
            allow("name and address"),
        ),
        case(
            "a name miss is still reported",
            a,
            "unknown.test:443",
            reported(NotInCatalog),
        )
        .report(),
    ]
}

fn run_cases(cases: &[Case]) {
    let mut names = std::collections::HashSet::new();
    for c in cases {
        assert!(names.insert(c.name), "duplicate case name {:?}", c.name);
    }
    let failures: Vec<String> = cases.iter().filter_map(|c| c.check().err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decides_host_matching_cases() {
    run_cases(&matching_cases());
}

#[test]
fn decides_port_and_method_cases() {
    run_cases(&ports_methods_cases());
}

#[test]
fn decides_address_cases() {
    run_cases(&address_cases());
}

// === explain ===

fn losers(fixture: &str, input: &str) -> (Option<String>, Vec<(String, Loss)>) {
    let p = policy(fixture, DefaultAction::Deny, false);
    let (t, m) = target(input);
    let ex = p.explain(&t, &m);
    let named = ex
        .losers
        .iter()
        .map(|&(i, loss)| (p.rule(i).expect("loser index").name.clone(), loss))
        .collect();
    (rule_name(&p, &ex.decision), named)
}

fn named(list: &[(&str, Loss)]) -> Vec<(String, Loss)> {
    list.iter().map(|&(n, l)| (n.to_string(), l)).collect()
}

/// Name, fixture, target, deciding rule, losers with why they lost.
type ExplainCase = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<(String, Loss)>,
);

#[test]
fn explain_names_each_loser_and_why() {
    use Loss::*;
    let cases: Vec<ExplainCase> = vec![
        (
            "exact beats wildcard",
            MATCHING,
            "api.example.com:443",
            Some("example api exact"),
            named(&[("example wildcard", LessSpecific)]),
        ),
        (
            "the exact rule lacks the port",
            MATCHING,
            "http://api.example.com/",
            Some("example wildcard"),
            named(&[("example api exact", Port)]),
        ),
        (
            "more labels beat fewer",
            MATCHING,
            "x.eu.corp.test:443",
            Some("corp eu allow"),
            named(&[("corp deny", LessSpecific)]),
        ),
        (
            "carve-out",
            MATCHING,
            "evil.cdn.test:443",
            Some("cdn carve-out"),
            named(&[("cdn wildcard", LessSpecific)]),
        ),
        (
            "precedence on a tie",
            MATCHING,
            "tie.test:443",
            Some("tie deny"),
            named(&[("tie allow", Precedence), ("tie bypass", Precedence)]),
        ),
        (
            "precedence between equal wildcards",
            MATCHING,
            "x.wtie.test:443",
            Some("wild tie deny"),
            named(&[("wild tie allow", Precedence)]),
        ),
        (
            "later in file",
            MATCHING,
            "first.test:443",
            Some("first A"),
            named(&[("first B", LaterInFile)]),
        ),
        (
            "port miss: every matching rule lost on the port",
            MATCHING,
            "www.example.com:8443",
            None,
            named(&[("example wildcard", Port)]),
        ),
        (
            "not in catalog: no losers",
            MATCHING,
            "example.com:443",
            None,
            Vec::new(),
        ),
        (
            "address on another port",
            ADDRESSES,
            "203.0.113.9:80",
            None,
            named(&[("documentation net", Port)]),
        ),
        (
            "split ports",
            PORTS_METHODS,
            "www.split.test:443",
            Some("split exact"),
            named(&[("split wildcard", Port)]),
        ),
    ];
    let mut failures = Vec::new();
    for (name, fixture, input, want_rule, want_losers) in cases {
        let (rule, got) = losers(fixture, input);
        if rule.as_deref() != want_rule || got != want_losers {
            failures.push(format!(
                "{name}: {input}: want {want_rule:?} {want_losers:?}, got {rule:?} {got:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_loss_has_a_description() {
    for loss in [
        Loss::Port,
        Loss::LessSpecific,
        Loss::Precedence,
        Loss::LaterInFile,
    ] {
        assert!(!loss.describe().is_empty());
    }
}

// === shadowed ===

/// The rule numbers (1-based) that `shadowed()` warns about, with the text.
fn shadow_warnings(fixture: &str) -> Vec<String> {
    policy(fixture, DefaultAction::Deny, false).shadowed()
}

#[test]
fn shadowed_warns_for_fully_covered_rules_only() {
    let warnings = shadow_warnings(SHADOWED);
    let want = [
        (r#"rule #2 "mirror again""#, vec![r#"#1 "mirror""#]),
        (r#"rule #3 "allow under deny""#, vec![r#"#4 "later deny""#]),
        (
            r#"rule #8 "covered twice""#,
            vec![r#"#1 "mirror""#, r#"#4 "later deny""#],
        ),
    ];
    assert_eq!(warnings.len(), want.len(), "warnings: {warnings:#?}");
    for ((rule, by), w) in want.iter().zip(&warnings) {
        assert!(
            w.starts_with(&format!("warning: {rule} never decides anything")),
            "{w}"
        );
        for b in by {
            assert!(w.contains(b), "{w} should name {b}");
        }
    }
    for quiet in [
        "wide",
        "partly covered",
        "carve-out",
        "walled",
        "walled door",
    ] {
        assert!(
            !warnings
                .iter()
                .any(|w| w.contains(&format!("\"{quiet}\" never"))),
            "{quiet} is not shadowed: {warnings:#?}"
        );
    }
}

#[test]
fn shadowed_in_the_matching_fixture() {
    let warnings = shadow_warnings(MATCHING);
    let mut shadowed: Vec<&str> = warnings
        .iter()
        .filter_map(|w| w.split('"').nth(1))
        .collect();
    shadowed.sort_unstable();
    // The tie losers never decide; carve-outs and "first B" (which still
    // decides second.test) are not warned about.
    assert_eq!(
        shadowed,
        ["tie allow", "tie bypass", "tie2 allow", "wild tie allow"],
        "{warnings:#?}"
    );
}

#[test]
fn shipped_catalog_has_no_shadowed_rules() {
    let p = Policy::compile(
        specs_from("catalog.toml", BUILTIN_CATALOG),
        DefaultAction::Deny,
        false,
    );
    assert_eq!(p.shadowed(), Vec::<String>::new());
}

// === the shipped catalog ===

#[test]
fn shipped_catalog_decides_each_host_as_its_rule() {
    let specs = specs_from("catalog.toml", BUILTIN_CATALOG);
    assert_eq!(specs.len(), 12);
    let p = Policy::compile(specs, DefaultAction::Deny, false);
    let mut checked = 0;
    for (i, r) in p.rules().iter().enumerate() {
        assert!(
            !r.hosts.is_empty(),
            "{}: every shipped rule names hosts",
            r.name
        );
        for host in &r.hosts {
            for range in &r.ports {
                for port in [range.lo, range.hi] {
                    // Plain HTTP on 80 (the update mirrors limit methods), tunnels elsewhere.
                    let method = if port == 80 {
                        Method::GET
                    } else {
                        Method::CONNECT
                    };
                    let t =
                        target::parse_authority(&format!("{host}:{port}")).expect("catalog host");
                    let d = p.decide(&t, &method);
                    let want = match r.action {
                        Action::Allow => Verdict::Allow,
                        Action::Bypass => Verdict::Bypass,
                        Action::Deny => Verdict::Deny,
                    };
                    assert_eq!(
                        (d.verdict, d.rule, d.reason),
                        (want, Some(i), None),
                        "{host}:{port} ({})",
                        r.name
                    );
                    checked += 1;
                }
            }
            let off = target::parse_authority(&format!("{host}:8080")).expect("catalog host");
            let d = p.decide(&off, &Method::CONNECT);
            assert_eq!(
                (d.verdict, d.reason),
                (Verdict::Deny, Some(Reason::PortNotAllowed)),
                "{host}:8080"
            );
            if r.methods.is_some() {
                let d = p.decide(
                    &target::parse_authority(&format!("{host}:80")).expect("host"),
                    &Method::POST,
                );
                assert_eq!(d.reason, Some(Reason::MethodNotAllowed), "POST to {host}");
            }
        }
    }
    assert!(checked >= 30, "only {checked} host/port pairs checked");
}

#[test]
fn shipped_catalog_refuses_what_it_does_not_list() {
    let p = Policy::compile(
        specs_from("catalog.toml", BUILTIN_CATALOG),
        DefaultAction::Deny,
        false,
    );
    for (input, reason) in [
        ("clearswift.net:443", Reason::NotInCatalog),
        ("evil.clearswift.net:80", Reason::NotInCatalog),
        (
            "ksn1.kaspersky-labs.com.evil.test:443",
            Reason::NotInCatalog,
        ),
        ("ksn1.kaspersky-labs.com:80", Reason::PortNotAllowed),
        ("185.155.104.24:80", Reason::IpLiteral),
    ] {
        let (t, m) = target(input);
        let d = p.decide(&t, &m);
        assert_eq!(
            (d.verdict, d.reason),
            (Verdict::Deny, Some(reason)),
            "{input}"
        );
    }
}

// === a large generated catalog ===

/// A catalog of `n` rules in groups of four: an exact allow, a wildcard
/// bypass on two port sets, an exact deny carved out of that wildcard, and a
/// longer wildcard allow inside it.
fn generated_catalog(n: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        let rule = match i % 4 {
            0 => format!("hosts = [\"h{i}.svc{i}.gen.test\"]\nports = [443]\naction = \"allow\""),
            1 => format!("hosts = [\"*.zone{i}.gen.test\"]\nports = [443, \"8000-8010\"]\naction = \"bypass\""),
            2 => format!("hosts = [\"bad.zone{}.gen.test\"]\nports = [443]\naction = \"deny\"", i - 1),
            _ => format!("hosts = [\"*.eu.zone{}.gen.test\"]\nports = [443]\naction = \"allow\"", i - 2),
        };
        out.push_str(&format!("[[rule]]\nname = \"generated {i}\"\n{rule}\n\n"));
    }
    out
}

#[test]
fn large_generated_catalog_decides_correctly() {
    const N: usize = 1200;
    let specs = specs_from("generated.toml", &generated_catalog(N));
    assert_eq!(specs.len(), N);
    let p = Policy::compile(specs, DefaultAction::Deny, false);
    let decide = |input: String| {
        let (t, m) = target(&input);
        let d = p.decide(&t, &m);
        (d.verdict, d.rule, d.reason)
    };
    for i in (0..N).step_by(4) {
        let (w, b) = (i + 1, i + 2);
        let e = i + 3;
        assert_eq!(
            decide(format!("h{i}.svc{i}.gen.test:443")),
            (Verdict::Allow, Some(i), None)
        );
        assert_eq!(
            decide(format!("h{i}.svc{i}.gen.test:80")),
            (Verdict::Deny, None, Some(Reason::PortNotAllowed))
        );
        assert_eq!(
            decide(format!("x.zone{w}.gen.test:443")),
            (Verdict::Bypass, Some(w), None)
        );
        assert_eq!(
            decide(format!("x.y.zone{w}.gen.test:8005")),
            (Verdict::Bypass, Some(w), None)
        );
        assert_eq!(
            decide(format!("zone{w}.gen.test:443")),
            (Verdict::Deny, None, Some(Reason::NotInCatalog))
        );
        assert_eq!(
            decide(format!("bad.zone{w}.gen.test:443")),
            (Verdict::Deny, Some(b), Some(Reason::DenyRule))
        );
        assert_eq!(
            decide(format!("bad.zone{w}.gen.test:8001")),
            (Verdict::Bypass, Some(w), None)
        );
        assert_eq!(
            decide(format!("a.eu.zone{w}.gen.test:443")),
            (Verdict::Allow, Some(e), None)
        );
        assert_eq!(
            decide(format!("eu.zone{w}.gen.test:443")),
            (Verdict::Bypass, Some(w), None)
        );
        assert_eq!(
            decide(format!("a.eu.zone{w}.gen.test:8001")),
            (Verdict::Bypass, Some(w), None)
        );
        assert_eq!(
            decide(format!("h{i}.nowhere.test:443")),
            (Verdict::Deny, None, Some(Reason::NotInCatalog))
        );
    }
}

// === properties ===

/// Every fixture catalog in one policy, for the properties.
static ALL_FIXTURES: LazyLock<Policy> = LazyLock::new(|| {
    let text = [MATCHING, PORTS_METHODS, ADDRESSES]
        .map(fixture_text)
        .join("\n");
    Policy::compile(
        specs_from("all fixtures", &text),
        DefaultAction::Deny,
        false,
    )
});

static SHIPPED: LazyLock<Policy> = LazyLock::new(|| {
    Policy::compile(
        specs_from("catalog.toml", BUILTIN_CATALOG),
        DefaultAction::Deny,
        false,
    )
});

/// Names the matching fixture refuses (a deny rule, a carve-out, an apex,
/// a miss) on 443.
const DENIED: [&str; 7] = [
    "evil.cdn.test",
    "x.us.corp.test",
    "eu.corp.test",
    "other.blocked.test",
    "example.com",
    "cdn.test",
    "tie.test",
];

/// Names the matching fixture permits on 443.
const PERMITTED: [&str; 6] = [
    "www.example.com",
    "api.example.com",
    "good.cdn.test",
    "updates.blocked.test",
    "x.eu.corp.test",
    "first.test",
];

/// One spelling of `name`: each character kept, upper-cased, or written
/// full-width (letters U+FF21.. / U+FF41.., digits U+FF10.., dots U+FF0E or
/// the ideographic U+3002), plus maybe one trailing dot.
fn spelling(name: &'static str) -> impl Strategy<Value = String> {
    let n = name.chars().count();
    (proptest::collection::vec(0u8..4, n), any::<bool>()).prop_map(move |(styles, dot)| {
        let mut out: String = name
            .chars()
            .zip(styles)
            .map(|(c, s)| respell(c, s))
            .collect();
        if dot {
            out.push('.');
        }
        out
    })
}

fn respell(c: char, style: u8) -> char {
    let shift = |base: u32, from: char| {
        char::from_u32(base + (u32::from(c) - u32::from(from))).unwrap_or(c)
    };
    match (c, style) {
        ('a'..='z', 1) => c.to_ascii_uppercase(),
        ('a'..='z', 2) => shift(0xFF41, 'a'),
        ('a'..='z', 3) => shift(0xFF21, 'a'),
        ('0'..='9', 2 | 3) => shift(0xFF10, '0'),
        ('.', 2) => '\u{FF0E}',
        ('.', 3) => '\u{3002}',
        _ => c,
    }
}

fn proptest_config() -> ProptestConfig {
    // No regression files written into the source tree.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn decide_spelling(
    p: &Policy,
    spelt: &str,
    port: u16,
    method: &Method,
) -> Result<(Host, Decision), String> {
    let host =
        target::normalize_host(spelt).map_err(|e| format!("{spelt:?} does not normalise: {e}"))?;
    let t = Target {
        host: host.clone(),
        port,
    };
    Ok((host, p.decide(&t, method)))
}

proptest! {
    #![proptest_config(proptest_config())]

    #[test]
    fn denied_names_stay_denied_in_every_spelling(
        (name, spelt) in prop::sample::select(DENIED.to_vec()).prop_flat_map(|n| (Just(n), spelling(n))),
        connect in any::<bool>(),
    ) {
        let method = if connect { Method::CONNECT } else { Method::GET };
        let p = &*ALL_FIXTURES;
        match decide_spelling(p, &spelt, 443, &method) {
            // A spelling that does not normalise is refused as bad_request.
            Err(_) => {}
            Ok((host, d)) => {
                prop_assert!(!d.verdict.is_permitted(), "{spelt:?} -> {host:?} was {d:?}");
                prop_assert_eq!(host, Host::Name(name.into()));
            }
        }
    }

    #[test]
    fn permitted_names_stay_permitted_in_every_spelling(
        (name, spelt) in prop::sample::select(PERMITTED.to_vec()).prop_flat_map(|n| (Just(n), spelling(n))),
    ) {
        let p = &*ALL_FIXTURES;
        let canonical = p.decide(&target::parse_authority(&format!("{name}:443")).expect("name"), &Method::CONNECT);
        prop_assert!(canonical.verdict.is_permitted());
        let (host, d) = decide_spelling(p, &spelt, 443, &Method::CONNECT).map_err(TestCaseError::fail)?;
        prop_assert_eq!(host, Host::Name(name.into()));
        prop_assert_eq!(d, canonical);
    }

    #[test]
    fn shipped_hosts_decide_alike_in_every_spelling(
        (name, spelt) in prop::sample::select(shipped_hosts()).prop_flat_map(|n| (Just(n), spelling(n))),
        port in prop::sample::select(vec![80u16, 443, 8080]),
    ) {
        let p = &*SHIPPED;
        let method = if port == 443 { Method::CONNECT } else { Method::GET };
        let canonical = p.decide(&target::parse_authority(&format!("{name}:{port}")).expect("name"), &method);
        let (host, d) = decide_spelling(p, &spelt, port, &method).map_err(TestCaseError::fail)?;
        prop_assert_eq!(host, Host::Name(name.into()));
        prop_assert_eq!(d, canonical);
    }

    #[test]
    fn decide_never_panics_on_arbitrary_hosts(
        raw in prop_oneof![any::<String>(), "[a-zA-Z0-9._*%:\\[\\]\\-ＡＺａｚ０９。．]{0,40}"],
        port in 1u16..,
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::CONNECT, Method::HEAD]),
        report in any::<bool>(),
    ) {
        if let Ok(host) = target::normalize_host(&raw) {
            let t = Target { host, port };
            for p in [&*ALL_FIXTURES, &*SHIPPED] {
                let d = p.decide(&t, &method);
                prop_assert_eq!(p.explain(&t, &method).decision, d);
                if let Some(i) = d.rule {
                    prop_assert!(p.rule(i).is_some());
                }
            }
            if report {
                let _ = REPORTING.decide(&t, &method);
            }
        }
    }

    #[test]
    fn decide_never_panics_on_arbitrary_addresses(ip in any::<IpAddr>(), port in 1u16..) {
        let t = Target { host: Host::Ip(ip), port };
        let d = ALL_FIXTURES.decide(&t, &Method::CONNECT);
        // An address no rule lists is never let through, not even in report mode.
        let r = REPORTING.decide(&t, &Method::CONNECT);
        if d.rule.is_none() {
            prop_assert_eq!(d.verdict, Verdict::Deny);
            prop_assert_eq!(r.verdict, Verdict::Deny);
        }
    }
}

/// The fixtures again, with `policy.default = "report"`.
static REPORTING: LazyLock<Policy> = LazyLock::new(|| {
    let text = [MATCHING, PORTS_METHODS, ADDRESSES]
        .map(fixture_text)
        .join("\n");
    Policy::compile(
        specs_from("all fixtures", &text),
        DefaultAction::Report,
        false,
    )
});

fn shipped_hosts() -> Vec<&'static str> {
    static HOSTS: LazyLock<Vec<String>> = LazyLock::new(|| {
        SHIPPED
            .rules()
            .iter()
            .flat_map(|r| r.hosts.clone())
            .collect()
    });
    HOSTS.iter().map(String::as_str).collect()
}

#[test]
fn the_most_specific_address_rule_decides() {
    // Like host patterns: a /32 allow inside a /24 deny is a carve-out.
    let text = "[[rule]]\nname = \"net deny\"\naddresses = [\"198.51.100.0/24\"]\nports = [\"1-65535\"]\naction = \"deny\"\n\n\
                [[rule]]\nname = \"one host\"\naddresses = [\"198.51.100.7/32\"]\nports = [443]\naction = \"allow\"\n";
    let p = Policy::compile(specs_from("inline.toml", text), DefaultAction::Deny, false);
    let (t, m) = target("198.51.100.7:443");
    let d = p.decide(&t, &m);
    assert_eq!(d.verdict, Verdict::Allow, "{d:?}");
    assert_eq!(rule_name(&p, &d).as_deref(), Some("one host"));
    let (t, m) = target("198.51.100.8:443");
    assert_eq!(p.decide(&t, &m).reason, Some(Reason::DenyRule));
    let (t, m) = target("198.51.100.7:80");
    assert_eq!(
        p.decide(&t, &m).reason,
        Some(Reason::DenyRule),
        "the /24 deny covers other ports"
    );
}

// === client-scoped rules ===

const SCOPED: &str = r#"
[[rule]]
name = "web vendor"
hosts = ["update.example.com", "*.cdn.example.com"]
ports = [443]
action = "bypass"
clients = ["web"]

[[rule]]
name = "mail vendor"
hosts = ["update.example.com"]
ports = [8443]
action = "allow"
clients = ["mail"]

[[rule]]
name = "everyone"
hosts = ["*.example.com"]
ports = [443]
action = "allow"

[[rule]]
name = "web literal"
addresses = ["192.0.2.0/24"]
ports = [443]
action = "allow"
clients = ["web"]
"#;

fn scoped() -> Policy {
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let groups = ClientGroups::new(vec![
        ClientGroup {
            name: "mail".into(),
            cidrs: vec![net("10.0.2.0/24")],
            users: vec!["mailgw".into()],
        },
        ClientGroup {
            name: "web".into(),
            cidrs: vec![net("10.0.1.0/24")],
            users: vec![],
        },
    ]);
    Policy::compile_with(
        specs_from("scoped.toml", SCOPED),
        DefaultAction::Deny,
        false,
        Arc::new(groups),
    )
}

fn decide_as(
    p: &Policy,
    ip: &str,
    user: Option<&str>,
    input: &str,
) -> (Verdict, Option<String>, Option<Reason>) {
    let (t, m) = target(input);
    let d = p.decide_for(&t, &m, p.groups_of(ip.parse().unwrap(), user));
    (d.verdict, rule_name(p, &d), d.reason)
}

#[test]
fn client_groups_resolve_by_address_and_user() {
    let p = scoped();
    let g = p.client_groups();
    let web = p.groups_of("10.0.1.7".parse().unwrap(), None);
    assert_eq!(g.names(web).as_deref(), Some("web"));
    let both = p.groups_of("10.0.1.7".parse().unwrap(), Some("mailgw"));
    assert_eq!(g.names(both).as_deref(), Some("mail,web"));
    let none = p.groups_of("10.9.9.9".parse().unwrap(), Some("someone"));
    assert_eq!(none, GroupSet::EVERYONE);
    assert_eq!(g.names(none), None);
}

#[test]
fn a_scoped_rule_is_a_candidate_only_for_its_clients() {
    let p = scoped();
    // The web gateway: its exact rule is more specific than the wildcard.
    let web = decide_as(&p, "10.0.1.7", None, "update.example.com:443");
    assert_eq!(web, (Verdict::Bypass, Some("web vendor".into()), None));
    // Anyone else: the web rule does not exist; the unscoped wildcard decides.
    let other = decide_as(&p, "10.9.9.9", None, "update.example.com:443");
    assert_eq!(other, (Verdict::Allow, Some("everyone".into()), None));
    // The mail gateway's own port, by address or by user.
    let mail = decide_as(&p, "10.0.2.5", None, "update.example.com:8443");
    assert_eq!(mail, (Verdict::Allow, Some("mail vendor".into()), None));
    let by_user = decide_as(&p, "10.9.9.9", Some("mailgw"), "update.example.com:8443");
    assert_eq!(by_user.1.as_deref(), Some("mail vendor"));
    // Not the mail port for the web gateway: the wildcard names the host for
    // every client, so it is a port miss.
    let web8443 = decide_as(&p, "10.0.1.7", None, "update.example.com:8443");
    assert_eq!(web8443, (Verdict::Deny, None, Some(Reason::PortNotAllowed)));
    // `decide` without a client: a client in no group.
    let (t, m) = target("update.example.com:443");
    assert_eq!(p.decide(&t, &m).rule, other_rule(&p, "everyone"));
}

fn other_rule(p: &Policy, name: &str) -> Option<usize> {
    p.rules().iter().position(|r| r.name == name)
}

#[test]
fn a_host_only_another_groups_rule_names_is_not_in_catalog() {
    let p = scoped();
    // `*.cdn.example.com` is the web group's; for others `a.cdn.example.com`
    // still falls to the unscoped `*.example.com` on 443 …
    let other = decide_as(&p, "10.9.9.9", None, "a.cdn.example.com:443");
    assert_eq!(other.1.as_deref(), Some("everyone"));
    // … but an IP literal only the web group's rule names is, for anyone
    // else, outside its catalog: `ip_literal`, not `port_not_allowed`.
    let web = decide_as(&p, "10.0.1.7", None, "192.0.2.9:443");
    assert_eq!(web.0, Verdict::Allow);
    let web_port = decide_as(&p, "10.0.1.7", None, "192.0.2.9:80");
    assert_eq!(web_port.2, Some(Reason::PortNotAllowed));
    let other_port = decide_as(&p, "10.9.9.9", None, "192.0.2.9:80");
    assert_eq!(other_port.2, Some(Reason::IpLiteral));
}

#[test]
fn a_name_only_another_groups_rule_names_is_not_in_catalog_for_others() {
    let text = r#"
[[rule]]
name = "mail only"
hosts = ["mx-update.example.net"]
ports = [443]
action = "allow"
clients = ["mail"]
"#;
    let p = Policy::compile_with(
        specs_from("t.toml", text),
        DefaultAction::Deny,
        false,
        Arc::clone(scoped().client_groups()),
    );
    let other = decide_as(&p, "10.0.1.7", None, "mx-update.example.net:443");
    assert_eq!(other, (Verdict::Deny, None, Some(Reason::NotInCatalog)));
    let mail_port = decide_as(&p, "10.0.2.5", None, "mx-update.example.net:80");
    assert_eq!(mail_port.2, Some(Reason::PortNotAllowed));
    let mail = decide_as(&p, "10.0.2.5", None, "mx-update.example.net:443");
    assert_eq!(mail.0, Verdict::Allow);
}

#[test]
fn explain_names_a_rule_scoped_to_other_clients() {
    let p = scoped();
    let (t, m) = target("update.example.com:443");
    let ex = p.explain_for(&t, &m, p.groups_of("10.9.9.9".parse().unwrap(), None));
    assert_eq!(ex.decision.rule, other_rule(&p, "everyone"));
    assert!(ex
        .losers
        .contains(&(other_rule(&p, "web vendor").unwrap(), Loss::OtherClients)));
}

#[test]
fn a_scoped_rule_shadows_only_within_its_groups() {
    // A scoped rule written first decides for its clients and the unscoped
    // one for everyone else: neither is shadowed. An unscoped rule that wins
    // on precedence does shadow a scoped one.
    let text = r#"
[[rule]]
name = "web allow"
hosts = ["x.example.com"]
ports = [443]
action = "allow"
clients = ["web"]

[[rule]]
name = "all allow"
hosts = ["x.example.com"]
ports = [443]
action = "allow"

[[rule]]
name = "web bypass"
hosts = ["y.example.com"]
ports = [443]
action = "bypass"
clients = ["web"]

[[rule]]
name = "all deny"
hosts = ["y.example.com"]
ports = [443]
action = "deny"
"#;
    let p = Policy::compile_with(
        specs_from("t.toml", text),
        DefaultAction::Deny,
        false,
        Arc::clone(scoped().client_groups()),
    );
    let w = p.shadowed();
    assert!(
        w.iter()
            .any(|l| l.contains("\"web bypass\"") && l.contains("\"all deny\"")),
        "{w:?}"
    );
    assert!(
        !w.iter().any(|l| l.contains("rule #2 \"all allow\"")),
        "{w:?}"
    );
    assert!(
        !w.iter().any(|l| l.contains("rule #1 \"web allow\"")),
        "{w:?}"
    );
}

/// The definition: for a client, deciding with scoped rules is deciding over
/// the catalog of the rules that apply to it (and only those).
#[test]
fn deciding_for_a_client_is_deciding_over_its_own_catalog() {
    let p = scoped();
    let targets = [
        "update.example.com:443",
        "update.example.com:8443",
        "update.example.com:80",
        "a.cdn.example.com:443",
        "a.cdn.example.com:80",
        "other.example.com:443",
        "192.0.2.9:443",
        "192.0.2.9:80",
        "unknown.test:443",
        "http://update.example.com:8443/x",
    ];
    for (ip, user) in [
        ("10.0.1.7", None),
        ("10.0.2.7", None),
        ("10.9.9.9", None),
        ("10.0.1.7", Some("mailgw")),
    ] {
        let groups = p.groups_of(ip.parse().unwrap(), user);
        let own: Vec<(usize, RuleSpec)> = p
            .rules()
            .iter()
            .enumerate()
            .filter(|(i, _)| groups.admits(p.masks[*i]))
            .map(|(i, r)| {
                let mut r = r.clone();
                r.clients.clear();
                (i, r)
            })
            .collect();
        let reference = Policy::compile(
            own.iter().map(|(_, r)| r.clone()).collect(),
            DefaultAction::Deny,
            false,
        );
        for input in targets {
            let (t, m) = target(input);
            let got = p.decide_for(&t, &m, groups);
            let mut want = reference.decide(&t, &m);
            want.rule = want.rule.map(|j| own[j].0);
            assert_eq!(got, want, "{ip} {user:?} {input}");
        }
    }
}
