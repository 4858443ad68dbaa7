//! Reloads in-process (`reload::reload`, as SIGHUP runs it): what a reload
//! may change live, and what it must keep until a restart.
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
