//! Policy micro benchmarks (DESIGN.md "Budgets": a decision costs under a
//! microsecond, whatever the catalog's size).
//!
//! `Policy::decide` on the shipped catalog and on a generated 10,000-rule
//! catalog (exact names and wildcards; hits and misses), plus the target
//! parsing in front of it, and a 10,000-rule catalog scoped to 20 client
//! groups (`clients`). Run with `cargo bench --bench policy`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic on bad setup

#[path = "support/catalog.rs"]
mod catalog;

use std::path::Path;
use std::sync::LazyLock;

use divan::{black_box, Bencher};
use egress_proxy::config::{parse_catalog, DefaultAction, BUILTIN_CATALOG};
use egress_proxy::policy::{ClientGroup, ClientGroups, GroupSet, Policy};
use egress_proxy::target::{self, Target};
use http::Method;

use catalog::generated_catalog;

fn main() {
    divan::main();
}

/// Rules in the generated catalog.
const GENERATED_RULES: usize = 10_000;

fn compile(name: &str, text: &str) -> Policy {
    let specs = parse_catalog(name, text, Path::new("."))
        .unwrap_or_else(|e| panic!("{name} must load: {e:?}"));
    Policy::compile(specs, DefaultAction::Deny, false)
}

static SHIPPED: LazyLock<Policy> = LazyLock::new(|| compile("catalog.toml", BUILTIN_CATALOG));

static GENERATED_TEXT: LazyLock<String> = LazyLock::new(|| generated_catalog(GENERATED_RULES));

static GENERATED: LazyLock<Policy> = LazyLock::new(|| {
    let policy = compile("generated.toml", &GENERATED_TEXT);
    assert_eq!(policy.rules().len(), GENERATED_RULES);
    policy
});

/// The same shape as [`GENERATED`] with as many rules as the shipped catalog:
/// separates the cost of the catalog's size from that of its shape (the
/// shipped catalog has no wildcards).
static GENERATED_SMALL: LazyLock<Policy> =
    LazyLock::new(|| compile("small.toml", &generated_catalog(12)));

/// Client groups in the scoped catalog: `g{k}` is `10.{k}.0.0/16`.
const GROUPS: usize = 20;

/// `n` rules of the generated shape, three in four scoped to one of
/// [`GROUPS`] groups (`g{i % 20}`), the rest for every client; the last 20
/// are one exact name scoped to each group in turn (20 candidates under one
/// name, filtered by the client's groups).
fn scoped_catalog(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n - GROUPS {
        let host = if i % 2 == 0 {
            format!("api{i}.svc{}.example{}.com", i / 10, i / 100)
        } else {
            format!("*.zone{i}.example{}.com", i / 100)
        };
        let action = if i % 4 < 2 { "allow" } else { "bypass" };
        let clients = if i % 4 == 3 {
            String::new()
        } else {
            format!("clients = [\"g{}\"]\n", i % GROUPS)
        };
        text.push_str(&format!(
            "[[rule]]\nname = \"scoped {i}\"\nhosts = [\"{host}\"]\nports = [443]\naction = \"{action}\"\n{clients}\n"
        ));
    }
    for k in 0..GROUPS {
        text.push_str(&format!(
            "[[rule]]\nname = \"shared {k}\"\nhosts = [\"shared.example.com\"]\nports = [443]\naction = \"allow\"\nclients = [\"g{k}\"]\n\n"
        ));
    }
    text
}

static SCOPED: LazyLock<Policy> = LazyLock::new(|| {
    let groups = (0..GROUPS)
        .map(|k| ClientGroup {
            name: format!("g{k}"),
            cidrs: vec![format!("10.{k}.0.0/16").parse().unwrap()],
            users: Vec::new(),
        })
        .collect();
    let specs = parse_catalog(
        "scoped.toml",
        &scoped_catalog(GENERATED_RULES),
        Path::new("."),
    )
    .unwrap_or_else(|e| panic!("scoped catalog must load: {e:?}"));
    let policy = Policy::compile_with(
        specs,
        DefaultAction::Deny,
        false,
        std::sync::Arc::new(ClientGroups::new(groups)),
    );
    assert_eq!(policy.rules().len(), GENERATED_RULES);
    policy
});

/// The groups of the client at `ip` in [`SCOPED`].
fn groups_of(ip: &str) -> GroupSet {
    SCOPED.groups_of(ip.parse().unwrap(), None)
}

fn bench_scoped(bencher: Bencher, client: &str, input: &str, permitted: bool) {
    let policy: &Policy = &SCOPED;
    let t = authority(input);
    let groups = groups_of(client);
    assert_eq!(
        policy
            .decide_for(&t, &Method::CONNECT, groups)
            .verdict
            .is_permitted(),
        permitted,
        "{client} {input}"
    );
    bencher.bench(|| {
        policy.decide_for(
            black_box(&t),
            black_box(&Method::CONNECT),
            black_box(groups),
        )
    });
}

fn authority(s: &str) -> Target {
    target::parse_authority(s).expect("bench target")
}

fn bench_decide(bencher: Bencher, policy: &'static LazyLock<Policy>, input: &str, permitted: bool) {
    let policy: &Policy = policy;
    let t = authority(input);
    assert_eq!(
        policy.decide(&t, &Method::CONNECT).verdict.is_permitted(),
        permitted,
        "{input}"
    );
    bencher.bench(|| policy.decide(black_box(&t), black_box(&Method::CONNECT)));
}

// === decide ===

#[divan::bench_group(sample_count = 1000)]
mod decide {
    use super::*;

    /// An exact catalogued host.
    #[divan::bench]
    fn shipped_hit(bencher: Bencher) {
        bench_decide(bencher, &SHIPPED, "ksn1.kaspersky-labs.com:443", true);
    }

    /// A name with 4 labels that no rule matches.
    #[divan::bench]
    fn shipped_miss(bencher: Bencher) {
        bench_decide(bencher, &SHIPPED, "cdn.assets.example.org:443", false);
    }

    /// An exact name among 10,000 rules.
    #[divan::bench]
    fn generated_10k_hit_exact(bencher: Bencher) {
        bench_decide(
            bencher,
            &GENERATED,
            "api5000.svc500.example50.com:443",
            true,
        );
    }

    /// A name under a wildcard among 10,000 rules.
    #[divan::bench]
    fn generated_10k_hit_wildcard(bencher: Bencher) {
        bench_decide(bencher, &GENERATED, "host.zone5001.example50.com:443", true);
    }

    /// A name with 4 labels that no rule matches among 10,000 rules.
    #[divan::bench]
    fn generated_10k_miss(bencher: Bencher) {
        bench_decide(bencher, &GENERATED, "cdn.assets.example.org:443", false);
    }

    /// A name under a wildcard among 12 rules of the generated shape.
    #[divan::bench]
    fn generated_12_hit_wildcard(bencher: Bencher) {
        bench_decide(
            bencher,
            &GENERATED_SMALL,
            "host.zone1.example0.com:443",
            true,
        );
    }

    /// An exact name among 12 rules of the generated shape.
    #[divan::bench]
    fn generated_12_hit_exact(bencher: Bencher) {
        bench_decide(
            bencher,
            &GENERATED_SMALL,
            "api10.svc1.example0.com:443",
            true,
        );
    }

    /// A 4-label miss among 12 rules of the generated shape.
    #[divan::bench]
    fn generated_12_miss(bencher: Bencher) {
        bench_decide(
            bencher,
            &GENERATED_SMALL,
            "cdn.assets.example.org:443",
            false,
        );
    }

    /// A near miss: a catalogued suffix, but no rule for this name.
    #[divan::bench]
    fn generated_10k_miss_near(bencher: Bencher) {
        bench_decide(bencher, &GENERATED, "www.svc500.example50.com:443", false);
    }

    /// 10,000 rules, 20 groups: an exact name scoped to the client's group.
    #[divan::bench]
    fn scoped_10k_hit_exact(bencher: Bencher) {
        bench_scoped(
            bencher,
            "10.0.0.9",
            "api5000.svc500.example50.com:443",
            true,
        );
    }

    /// A wildcard scoped to the client's group (`*.zone5001…` is `g1`).
    #[divan::bench]
    fn scoped_10k_hit_wildcard(bencher: Bencher) {
        bench_scoped(bencher, "10.1.0.9", "host.zone5001.example50.com:443", true);
    }

    /// An exact name only another group's rule names: `not_in_catalog`.
    #[divan::bench]
    fn scoped_10k_other_group(bencher: Bencher) {
        bench_scoped(
            bencher,
            "10.7.0.9",
            "api5000.svc500.example50.com:443",
            false,
        );
    }

    /// One name with 20 rules, one a group: the client's is the last.
    #[divan::bench]
    fn scoped_10k_hit_20_candidates(bencher: Bencher) {
        bench_scoped(bencher, "10.19.0.9", "shared.example.com:443", true);
    }

    /// A 4-label miss among the scoped rules.
    #[divan::bench]
    fn scoped_10k_miss(bencher: Bencher) {
        bench_scoped(bencher, "10.3.0.9", "cdn.assets.example.org:443", false);
    }

    /// What a request pays: the client's groups (20 CIDRs) and the decision.
    #[divan::bench]
    fn scoped_10k_resolve_and_decide(bencher: Bencher) {
        let policy: &Policy = &SCOPED;
        let t = authority("api5000.svc500.example50.com:443");
        let ip: std::net::IpAddr = "10.0.0.9".parse().unwrap();
        bencher.bench(|| {
            let groups = policy.groups_of(black_box(ip), None);
            policy.decide_for(black_box(&t), black_box(&Method::CONNECT), groups)
        });
    }
}

// === loading a large catalog (check, reload) ===

/// Slow (seconds each): one sample.
#[divan::bench_group(sample_count = 1, sample_size = 1)]
mod load_10k {
    use super::*;

    #[divan::bench]
    fn parse_catalog_10k() -> usize {
        let specs = parse_catalog("generated.toml", black_box(&GENERATED_TEXT), Path::new("."))
            .expect("generated catalog");
        specs.len()
    }

    #[divan::bench]
    fn shadowed_10k(bencher: Bencher) {
        let policy: &Policy = &GENERATED;
        bencher.bench(|| policy.shadowed().len());
    }
}
// === target parsing ===

#[divan::bench_group]
mod normalize_host {
    use super::*;

    #[divan::bench(args = [
        "ksn1.kaspersky-labs.com",
        "KSN1.Kaspersky-Labs.COM",
        "bücher.example",
        "0x7f.1",
    ])]
    fn spelling(raw: &str) -> target::Host {
        target::normalize_host(black_box(raw)).expect("bench host")
    }
}

#[divan::bench]
fn parse_authority() -> Target {
    target::parse_authority(black_box("ksn1.kaspersky-labs.com:443")).expect("bench target")
}
