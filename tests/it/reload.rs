//! Reloads in-process (`reload::reload`, as SIGHUP runs it): what a reload
//! may change live, and what it must keep until a restart.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use egress_proxy::audit::{Decided, Reason};

use crate::inspect::{client_trusting_ca, inspecting_config, start_in};
use crate::support::*;

const HOST: &str = "cls.sophosxl.net";

/// Rewrite the proxy's config file and reload it as SIGHUP would.
fn reload_config(proxy: &TestProxy, cfg: &str) {
    let path = proxy.dir.path().join("egress-proxy.toml");
    std::fs::write(&path, cfg).expect("config");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");
}

/// The catalog of [`inspecting_config`], with `methods = ["GET"]` on the rule.
fn get_only(catalog: &str) -> String {
    format!("{catalog}methods = [\"GET\"]\n")
}

#[tokio::test]
async fn a_ca_added_by_reload_does_not_admit_a_connect_to_a_get_only_rule() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (inspecting, catalog) =
        inspecting_config(dir.path(), &origin.cert.cert_pem, "", origin.addr.port());
    let plain = config(&[HOST], "");
    let proxy = start_in(dir, &plain, &get_only(&catalog)).await;
    let authority = format!("{HOST}:{}", origin.addr.port());
    let (before, _) = connect(proxy.addr, &authority).await;
    assert_eq!(
        before, 403,
        "without a CA a tunnel to a GET-only rule is refused"
    );

    reload_config(&proxy, &inspecting);
    assert!(
        !proxy.handle.settings().policy.inspection_enabled(),
        "the CA needs a restart: inspection stays off"
    );
    let (after, _) = connect(proxy.addr, &authority).await;
    assert_eq!(after, 403, "still refused after the reload");
    let recs = proxy.exactly(2).await;
    for r in &recs {
        assert_eq!(r.reason, Some(Reason::MethodNotAllowed), "{r:#?}");
        assert_eq!(r.decision, Decided::Deny);
    }
    assert!(
        origin.snis.lock().expect("snis").is_empty(),
        "never spliced"
    );
}

#[tokio::test]
async fn a_ca_removed_by_reload_keeps_inspecting() {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (inspecting, catalog) =
        inspecting_config(dir.path(), &origin.cert.cert_pem, "", origin.addr.port());
    let proxy = start_in(dir, &inspecting, &get_only(&catalog)).await;
    // The same config without its [tls] CA lines.
    let plain: String = inspecting
        .lines()
        .filter(|l| !l.starts_with("ca_"))
        .map(|l| format!("{l}\n"))
        .collect();
    reload_config(&proxy, &plain);
    assert!(proxy.handle.settings().policy.inspection_enabled());

    let client = client_trusting_ca(&proxy);
    let url = format!("https://{HOST}:{}/item", origin.addr.port());
    let resp = client.delete(&url).send().await.expect("inspected request");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-egress-error"], "method_not_allowed");
    drop(client);
    let recs = proxy.records(2).await;
    let inner = recs.iter().find(|r| r.url.is_some()).expect("inner record");
    assert_eq!(inner.reason, Some(Reason::MethodNotAllowed), "{inner:#?}");
    let tunnel = recs
        .iter()
        .find(|r| r.url.is_none())
        .expect("tunnel record");
    assert_eq!(tunnel.decision, Decided::Inspect, "{tunnel:#?}");
}

/// Generous: never reached by the test's requests.
const ROOMY: &str = "repo.clearswift.net";
/// One transaction an hour.
const TIGHT: &str = "ksn1.kaspersky-labs.com";

/// The two rules, each with its own `rate`, in either order.
fn rated_rules(port: u16, roomy_first: bool) -> String {
    let roomy = rule("roomy", &[ROOMY], port, "allow", "rate = \"100000/s\"");
    let tight = rule("tight", &[TIGHT], port, "allow", "rate = \"1/h\"");
    if roomy_first {
        roomy + &tight
    } else {
        tight + &roomy
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_reloads_that_reorder_rules_are_limited_by_their_own_rule() {
    let origin = HttpOrigin::start().await;
    let cfg = config(&[ROOMY, TIGHT], "");
    let proxy = TestProxy::start(&cfg, &rated_rules(origin.port(), true)).await;
    let orders = [
        load(&cfg, &rated_rules(origin.port(), false)).0,
        load(&cfg, &rated_rules(origin.port(), true)).0,
    ];
    // Reload as fast as possible, swapping the order, until the requests end.
    let done = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (handle, done) = (proxy.handle.clone(), Arc::clone(&done));
        tokio::task::spawn_blocking(move || {
            let mut n = 0usize;
            while !done.load(Ordering::Relaxed) {
                handle.reload(orders[n % 2].clone()).expect("reload");
                n += 1;
            }
            n
        })
    };
    // The race needs a request to straddle a swap (twice in one snapshot,
    // to spend the tight rule's one token): many requests make it likely.
    const TASKS: usize = 8;
    const EACH: usize = 500;
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        // Mostly the roomy rule; one task also spends the tight rule's token.
        let host = if i == 0 { TIGHT } else { ROOMY };
        let (client, url) = (proxy.client(), format!("http://{host}:{}/", origin.port()));
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                client.get(&url).send().await.expect("answer");
            }
        }));
    }
    for t in tasks {
        t.await.expect("requests");
    }
    done.store(true, Ordering::Relaxed);
    let reloads = reloader.await.expect("reloader");
    assert!(reloads > 10, "reloads ran alongside: {reloads}");
    let recs = proxy.records(TASKS * EACH).await;
    for r in recs
        .iter()
        .filter(|r| r.reason == Some(Reason::RateLimited))
    {
        assert_eq!(
            r.rule.as_deref(),
            Some("tight"),
            "limited by another rule: {r:#?}"
        );
    }
    let roomy = recs.iter().filter(|r| r.rule.as_deref() == Some("roomy"));
    assert_eq!(
        roomy.filter(|r| r.status == Some(200)).count(),
        (TASKS - 1) * EACH
    );
}

/// The log's diff names each added, changed and removed rule once; with
/// two rules of one name, the first of each catalog is the one compared.
#[test]
fn the_diff_names_added_changed_and_removed_rules() {
    let cfg = config(&[], "");
    let (old, _d1) = load(
        &cfg,
        &format!(
            "{}{}{}{}",
            rule("kept", &["a.example"], 443, "allow", ""),
            rule("changed", &["b.example"], 443, "allow", ""),
            rule("gone", &["c.example"], 443, "allow", ""),
            rule("twice", &["d.example"], 443, "allow", ""),
        ),
    );
    let (new, _d2) = load(
        &cfg,
        &format!(
            "{}{}{}{}{}",
            rule("kept", &["a.example"], 443, "allow", ""),
            rule("changed", &["b.example"], 8443, "allow", ""),
            rule("twice", &["d.example"], 443, "allow", ""),
            rule("twice", &["e.example"], 443, "allow", ""),
            rule("new", &["f.example"], 443, "allow", ""),
        ),
    );
    assert_eq!(
        egress_proxy::reload::diff(&old, &new),
        [
            "rule changed: \"changed\"",
            // The second "twice" is compared with the first of the old catalog.
            "rule changed: \"twice\"",
            "rule added: \"new\"",
            "rule removed: \"gone\"",
        ]
    );
}

/// A catalog of `n` rules of distinct names and hosts.
fn many_rules(n: usize) -> String {
    (0..n)
        .map(|i| {
            rule(
                &format!("r{i}"),
                &[&format!("h{i}.example")],
                443,
                "allow",
                "",
            )
        })
        .collect()
}

/// The reload SIGHUP runs does its work on a thread of its own: the
/// runtime (here one thread, as a pinned proxy has) keeps serving meanwhile,
/// where a reload run on it stalled every connection until done.
#[tokio::test(flavor = "current_thread")]
async fn a_reload_in_the_background_leaves_the_runtime_running() {
    let proxy = TestProxy::start(&config(&[], ""), &many_rules(10)).await;
    let path = proxy.dir.path().join("egress-proxy.toml");
    std::fs::write(proxy.dir.path().join("catalog.toml"), many_rules(20_000)).expect("catalog");
    let ticks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = {
        let ticks = Arc::clone(&ticks);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = std::time::Instant::now();
    egress_proxy::reload::reload_in_background(&proxy.handle, Some(&path), Vec::new)
        .await
        .expect("reload");
    let took = started.elapsed();
    let during = ticks.load(Ordering::Relaxed);
    ticker.abort();
    assert_eq!(proxy.handle.settings().policy.rules().len(), 20_000);
    assert!(
        during >= 3,
        "the runtime ticked {during} times during a reload of {took:?}"
    );
}
