//! Rules scoped to client groups (`[clients.groups]`, rule `clients`): two
//! clients on loopback (127.0.0.1, and 127.0.0.2 in the `web` group), a
//! user group after proxy auth, the record's `client_group`, `explain
//! --client`, `/api/explain?client=`, and `check`'s warnings.
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use egress_proxy::audit::Reason;
use egress_proxy::auth::hash_password;

use crate::support::*;

const WEB_VENDOR: &str = "webvendor.example";
const MAIL_VENDOR: &str = "mailvendor.example";
const COMMON: &str = "common.example";
const WEB_CLIENT: &str = "127.0.0.2";

/// `web` is 127.0.0.2; `mail` is the proxy-auth user `mailgw`.
const GROUPS: &str = "[clients.groups]\nweb = [\"127.0.0.2/32\"]\n";

fn catalog(port: u16) -> String {
    rule(
        "web vendor",
        &[WEB_VENDOR],
        port,
        "allow",
        "clients = [\"web\"]",
    ) + &rule("everyone", &[COMMON], port, "allow", "")
}

fn get(host: &str, port: u16) -> String {
    format!(
        "GET http://{host}:{port}/ HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
    )
}

async fn from(src: &str, proxy: &TestProxy, host: &str, port: u16) -> RawResponse {
    let src: IpAddr = src.parse().expect("ip");
    parse_response(&raw_bytes_from(src, proxy.addr, get(host, port).as_bytes()).await)
}

#[tokio::test]
async fn a_scoped_rule_applies_only_to_its_clients() {
    let origin = HttpOrigin::start().await;
    let cfg = config(&[WEB_VENDOR, COMMON], GROUPS);
    let proxy = TestProxy::start(&cfg, &catalog(origin.port())).await;

    let web = from(WEB_CLIENT, &proxy, WEB_VENDOR, origin.port()).await;
    assert_eq!(web.status, 200, "{}", web.head);
    let rec = proxy.only_record().await;
    assert_eq!(rec.client.ip().to_string(), WEB_CLIENT);
    assert_eq!(rec.client_group.as_deref(), Some("web"));
    assert_eq!(rec.rule.as_deref(), Some("web vendor"));

    // Another client: the web group's rule is not in its catalog.
    let other = from("127.0.0.1", &proxy, WEB_VENDOR, origin.port()).await;
    assert_eq!(other.status, 403, "{}", other.head);
    assert_eq!(other.header("x-egress-error"), Some("not_in_catalog"));
    let rec = proxy.record_with(Reason::NotInCatalog).await;
    assert_eq!(rec.client_group, None);
    assert_eq!(rec.rule, None);

    // A rule without `clients` serves both.
    for src in ["127.0.0.1", WEB_CLIENT] {
        let r = from(src, &proxy, COMMON, origin.port()).await;
        assert_eq!(r.status, 200, "{src}: {}", r.head);
    }
    let recs = proxy.exactly(4).await;
    assert_eq!(origin.seen().len(), 3);
    let groups: Vec<Option<&str>> = recs[2..]
        .iter()
        .map(|r| r.client_group.as_deref())
        .collect();
    assert!(
        groups.contains(&Some("web")) && groups.contains(&None),
        "{groups:?}"
    );
}

#[tokio::test]
async fn a_user_group_applies_after_proxy_auth() {
    let origin = HttpOrigin::start().await;
    let phc = hash_password("pw").expect("hash");
    let extra = format!(
        "[auth]\nusers = {{ mailgw = '{phc}', other = '{phc}' }}\n\n[clients.groups]\nmail = [\"user:mailgw\"]\n"
    );
    let cfg = config(&[MAIL_VENDOR], &extra);
    let catalog = rule(
        "mail vendor",
        &[MAIL_VENDOR],
        origin.port(),
        "allow",
        "clients = [\"mail\"]",
    );
    let proxy = TestProxy::start(&cfg, &catalog).await;
    let url = format!("http://{MAIL_VENDOR}:{}/", origin.port());
    let as_user = |user: &str| {
        crypto();
        reqwest::Client::builder()
            .proxy(
                reqwest::Proxy::all(proxy.url())
                    .expect("proxy url")
                    .basic_auth(user, "pw"),
            )
            .timeout(WAIT)
            .build()
            .expect("client")
    };
    let ok = as_user("mailgw").get(&url).send().await.expect("send");
    assert_eq!(ok.status(), 200);
    let rec = proxy.only_record().await;
    assert_eq!(rec.user.as_deref(), Some("mailgw"));
    assert_eq!(rec.client_group.as_deref(), Some("mail"));

    let refused = as_user("other").get(&url).send().await.expect("send");
    assert_eq!(refused.status(), 403);
    let rec = proxy.record_with(Reason::NotInCatalog).await;
    assert_eq!(rec.user.as_deref(), Some("other"));
    assert_eq!(rec.client_group, None);
}

#[tokio::test]
async fn api_explain_decides_for_the_given_client() {
    let cfg = config(&[WEB_VENDOR], GROUPS);
    let proxy = TestProxy::start(&cfg, &catalog(8080)).await;
    let ask = |q: &str| {
        let url = format!(
            "http://{}/api/explain?target={WEB_VENDOR}:8080{q}",
            proxy.admin
        );
        async move {
            let r = admin_client().get(url).send().await.expect("send");
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&r.text().await.expect("body"))
                    .expect("json"),
            )
        }
    };
    let (status, web) = ask("&client=127.0.0.2").await;
    assert_eq!(status, 200, "{web}");
    assert_eq!(web["decision"], "allow", "{web}");
    assert_eq!(web["rule"], "web vendor", "{web}");
    assert_eq!(web["client_group"], "web", "{web}");

    let (_, other) = ask("&client=127.0.0.1").await;
    assert_eq!(other["decision"], "deny", "{other}");
    assert_eq!(other["reason"], "not_in_catalog", "{other}");
    assert!(other["client_group"].is_null(), "{other}");
    assert_eq!(other["losers"][0]["rule"], "web vendor", "{other}");

    let (status, bad) = ask("&client=not-an-ip").await;
    assert_eq!(status, 400, "{bad}");
}

fn write(dir: &Path, config: &str, catalog: &str) -> String {
    let cfg = dir.join("egress-proxy.toml");
    std::fs::write(&cfg, config).expect("config");
    std::fs::write(dir.join("catalog.toml"), catalog).expect("catalog");
    cfg.to_str().expect("utf-8").to_string()
}

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_egress-proxy"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run egress-proxy");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn explain_client_and_check_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = format!("{GROUPS}far = [\"10.9.0.0/16\"]\n");
    let cfg = write(dir.path(), &config(&[WEB_VENDOR], &groups), &catalog(8080));
    let target = format!("{WEB_VENDOR}:8080");

    let (code, out, err) = run(&["explain", "--config", &cfg, "--client", WEB_CLIENT, &target]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("client:   127.0.0.2 (groups: web)"), "{out}");
    assert!(out.contains("decision: allow"), "{out}");

    let (_, out, _) = run(&[
        "explain",
        "--config",
        &cfg,
        "--client",
        "127.0.0.1",
        &target,
    ]);
    assert!(
        out.contains("client:   127.0.0.1 (groups: (none))"),
        "{out}"
    );
    assert!(out.contains("reason:   not_in_catalog"), "{out}");
    assert!(
        out.contains(
            "also matched: \"web vendor\": its `clients` are groups this client is not in"
        ),
        "{out}"
    );

    let (code, out, err) = run(&["check", "--config", &cfg]);
    assert_eq!(code, Some(0), "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("clients.groups.far: 10.9.0.0/16 is outside clients.allow"),
        "{all}"
    );

    // An unknown group in a rule: an error naming the rule.
    let bad = rule("typo", &[WEB_VENDOR], 8080, "allow", "clients = [\"wbe\"]");
    let cfg = write(dir.path(), &config(&[WEB_VENDOR], GROUPS), &bad);
    let (code, out, err) = run(&["check", "--config", &cfg]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("rule #1 \"typo\": clients: unknown client group \"wbe\""),
        "{err}"
    );
}

#[tokio::test]
async fn a_reload_moves_a_client_between_groups() {
    let origin = HttpOrigin::start().await;
    let cfg = config(&[WEB_VENDOR, COMMON], GROUPS);
    let proxy = TestProxy::start(&cfg, &catalog(origin.port())).await;
    let before = from(WEB_CLIENT, &proxy, WEB_VENDOR, origin.port()).await;
    assert_eq!(before.status, 200, "{}", before.head);

    // The web group is now 127.0.0.3: 127.0.0.2 is in no group.
    let moved = config(
        &[WEB_VENDOR, COMMON],
        "[clients.groups]\nweb = [\"127.0.0.3/32\"]\n",
    );
    let path = proxy.dir.path().join("egress-proxy.toml");
    std::fs::write(&path, &moved).expect("config");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");

    let after = from(WEB_CLIENT, &proxy, WEB_VENDOR, origin.port()).await;
    assert_eq!(
        after.header("x-egress-error"),
        Some("not_in_catalog"),
        "{}",
        after.head
    );
    let moved_in = from("127.0.0.3", &proxy, WEB_VENDOR, origin.port()).await;
    assert_eq!(moved_in.status, 200, "{}", moved_in.head);
    let recs = proxy.exactly(3).await;
    let groups: Vec<Option<&str>> = recs.iter().map(|r| r.client_group.as_deref()).collect();
    assert_eq!(groups, [Some("web"), None, Some("web")]);
}
