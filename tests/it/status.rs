//! What was denied: the status page's JSON API after real traffic (summary,
//! denials and their bound, explain, suggest), the page itself and its
//! guards, and the `suggest` and `replay` commands on recorded audit logs
//! (`tests/fixtures/audit/`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde_json::Value;

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn catalog(port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\"]\nports = [{port}]\naction = \"allow\"\n"
    )
}

async fn get(
    admin: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String, reqwest::header::HeaderMap) {
    let mut req = admin_client().get(format!("http://{admin}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("admin request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, resp.text().await.expect("body"), headers)
}

async fn get_json(admin: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body, headers) = get(admin, path, None).await;
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "{path}: {body}"
    );
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// GET `path` until `pred` holds (the status is fed on the audit writer's
/// thread, after the in-memory sink the tests wait on).
async fn poll(admin: SocketAddr, path: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = get_json(admin, path).await;
        assert_eq!(status, 200, "{path}: {v}");
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{path} never got there: {v:#}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

fn hosts(denials: &Value) -> Vec<String> {
    denials["denials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["target"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn summary_and_denials_after_real_traffic() {
    let origin = HttpOrigin::start().await;
    let port = origin.port();
    let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &catalog(port)).await;
    let client = proxy.client();

    let r = client
        .get(format!("http://repo.clearswift.net:{port}/bytes/1000"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 1000);
    let r = client
        .get(format!("http://ksn2.kaspersky-labs.com:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .get("http://repo.clearswift.net:8080/mirrorlist")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (status, _) = connect(proxy.addr, "ksn2.kaspersky-labs.com:443").await;
    assert_eq!(status, 403);
    proxy.records(4).await;

    let s = poll(proxy.admin, "/api/summary", |v| {
        v["totals"]["transactions"] == 4
    })
    .await;
    let d = &s["totals"]["decisions"];
    assert_eq!(d["allow"]["transactions"], 1, "{s:#}");
    assert!(d["allow"]["bytes_down"].as_u64().unwrap() >= 1000, "{s:#}");
    assert_eq!(d["deny"]["transactions"], 3, "{s:#}");
    assert_eq!(d["bypass"]["transactions"], 0, "{s:#}");
    assert_eq!(d["report"]["transactions"], 0, "{s:#}");
    let rules = s["totals"]["rules"].as_array().unwrap();
    let by_rule = |name: Value| {
        rules
            .iter()
            .find(|r| r["rule"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    assert_eq!(by_rule(Value::Null)["transactions"], 3, "{s:#}");
    assert_eq!(
        by_rule("Clearswift Update Server".into())["transactions"],
        1,
        "{s:#}"
    );
    assert_eq!(s["recent"]["transactions"], 4, "{s:#}");
    assert_eq!(s["recent"]["minutes"], 15);
    let minutes = s["recent"]["per_minute"].as_array().unwrap();
    assert_eq!(minutes.len(), 15);
    assert_eq!(
        minutes
            .iter()
            .map(|m| m["denied"].as_u64().unwrap())
            .sum::<u64>(),
        3
    );
    assert!(s["uptime_s"].is_u64());
    let settings = proxy.handle.settings();
    assert_eq!(s["catalog"]["rules"], 1);
    assert_eq!(
        s["catalog"]["hash"],
        format!("{:016x}", settings.policy.hash())
    );
    assert_eq!(s["catalog"]["default"], "deny");
    assert_eq!(s["catalog"]["inspection"], false);
    assert_eq!(s["catalog"]["last_reload"], Value::Null);
    assert_eq!(s["denials"]["distinct"], 3);
    assert_eq!(s["denials"]["kept"], 1000);

    // Most recently seen first.
    let d = poll(proxy.admin, "/api/denials", |v| v["distinct"] == 3).await;
    assert_eq!(
        hosts(&d),
        [
            "ksn2.kaspersky-labs.com:443".to_string(),
            "repo.clearswift.net:8080".into(),
            format!("ksn2.kaspersky-labs.com:{port}")
        ],
        "{d:#}"
    );
    let first = &d["denials"][0];
    assert_eq!(first["host"], "ksn2.kaspersky-labs.com");
    assert_eq!(first["port"], 443);
    assert_eq!(first["reason"], "not_in_catalog");
    assert_eq!(first["decision"], "deny");
    assert_eq!(first["method"], "CONNECT");
    assert_eq!(first["count"], 1);
    assert!(
        first["last_client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{d:#}"
    );
    assert_eq!(d["denials"][1]["reason"], "port_not_allowed");
    assert_eq!(d["evictions"], 0);

    // Seen again: counted, and back on top.
    let r = client
        .get(format!("http://ksn2.kaspersky-labs.com:{port}/again"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let d = poll(proxy.admin, "/api/denials", |v| {
        v["denials"][0]["count"] == 2
    })
    .await;
    let top = &d["denials"][0];
    assert_eq!(top["target"], format!("ksn2.kaspersky-labs.com:{port}"));
    assert_eq!(top["method"], "GET");
    assert_eq!(
        top["clients"],
        serde_json::json!([{"client": "127.0.0.1", "count": 2}])
    );
    assert!(top["first_seen"].as_str().unwrap() <= top["last_seen"].as_str().unwrap());
    assert_eq!(d["distinct"], 3);
}

#[tokio::test]
async fn denial_table_keeps_denials_kept_and_counts_evictions() {
    let proxy = TestProxy::start(&config(&[], "[status]\ndenials_kept = 3\n"), &catalog(80)).await;
    let client = proxy.client();
    for i in 1..=5 {
        let r = client
            .get(format!("http://h{i}.example.net/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    proxy.records(5).await;
    let d = poll(proxy.admin, "/api/denials", |v| v["evictions"] == 2).await;
    assert_eq!(d["kept"], 3, "{d:#}");
    assert_eq!(d["distinct"], 3, "{d:#}");
    assert_eq!(
        hosts(&d),
        [
            "h5.example.net:80",
            "h4.example.net:80",
            "h3.example.net:80"
        ],
        "{d:#}"
    );
    let (_, s) = get_json(proxy.admin, "/api/summary").await;
    assert_eq!(
        s["denials"],
        serde_json::json!({"kept": 3, "distinct": 3, "evictions": 2})
    );
    // Everything is still counted in the totals.
    assert_eq!(s["totals"]["decisions"]["deny"]["transactions"], 5);

    // A host seen again is kept over an older one.
    let r = client.get("http://h3.example.net/").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let r = client.get("http://h6.example.net/").send().await.unwrap();
    assert_eq!(r.status(), 403);
    let d = poll(proxy.admin, "/api/denials", |v| v["evictions"] == 3).await;
    assert_eq!(
        hosts(&d),
        [
            "h6.example.net:80",
            "h3.example.net:80",
            "h5.example.net:80"
        ],
        "{d:#}"
    );
}

#[tokio::test]
async fn report_mode_misses_are_listed_and_suggested() {
    let origin = HttpOrigin::start().await;
    let port = origin.port();
    let cfg = config_with(&ConfigOpts {
        statics: &[("telemetry.example.com", "127.0.0.1")],
        allow_private: &["127.0.0.0/8"],
        policy: "default = \"report\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(80)).await;
    let r = proxy
        .client()
        .get(format!("http://telemetry.example.com:{port}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    proxy.records(1).await;
    let d = poll(proxy.admin, "/api/denials", |v| v["distinct"] == 1).await;
    let e = &d["denials"][0];
    assert_eq!(
        e["target"],
        format!("telemetry.example.com:{port}"),
        "{d:#}"
    );
    assert_eq!(e["decision"], "report", "{d:#}");
    assert_eq!(e["reason"], Value::Null, "{d:#}");
    let (_, s) = get_json(proxy.admin, "/api/summary").await;
    assert_eq!(s["totals"]["decisions"]["report"]["transactions"], 1);
    assert_eq!(s["catalog"]["default"], "report");
    let (_, toml, _) = get(proxy.admin, "/api/suggest", None).await;
    assert!(
        toml.contains("\"telemetry.example.com\", # 1 reported"),
        "{toml}"
    );
}

#[tokio::test]
async fn explain_runs_the_policy_in_force() {
    let proxy = TestProxy::start(&config(&[], ""), &catalog(80)).await;
    let (status, v) = get_json(
        proxy.admin,
        "/api/explain?target=http%3A%2F%2Frepo.clearswift.net%2Fpub%2Frepomd.xml",
    )
    .await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["rule"], "Clearswift Update Server");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["normalised"], "repo.clearswift.net:80");
    assert_eq!(v["reason"], Value::Null);
    assert!(v["why"].as_str().unwrap().contains("allows it"), "{v:#}");

    let (status, v) = get_json(proxy.admin, "/api/explain?target=REPO.clearswift.net.:443").await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["method"], "CONNECT");
    assert_eq!(v["reason"], "port_not_allowed");
    assert_eq!(v["rule"], Value::Null);
    assert_eq!(v["losers"][0]["rule"], "Clearswift Update Server");
    assert!(
        v["losers"][0]["why"]
            .as_str()
            .unwrap()
            .contains("not this port"),
        "{v:#}"
    );

    let (status, v) = get_json(
        proxy.admin,
        "/api/explain?target=ksn2.kaspersky-labs.com:443",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["reason"], "not_in_catalog");

    let (status, v) = get_json(proxy.admin, "/api/explain").await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("target"), "{v:#}");
    let (status, v) = get_json(
        proxy.admin,
        "/api/explain?target=ftp://repo.clearswift.net/",
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        v["error"].as_str().unwrap().starts_with("bad_request"),
        "{v:#}"
    );
}

#[tokio::test]
async fn explain_api_takes_an_https_url_as_its_connect() {
    let proxy = TestProxy::start(&config(&[], ""), &catalog(80)).await;
    let (status, v) = get_json(
        proxy.admin,
        "/api/explain?target=https%3A%2F%2Frepo.clearswift.net%2Fpub%2Frepomd.xml",
    )
    .await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["method"], "CONNECT");
    assert_eq!(v["normalised"], "repo.clearswift.net:443");
    assert!(
        v["note"]
            .as_str()
            .unwrap()
            .contains("the gateway sends CONNECT repo.clearswift.net:443"),
        "{v:#}"
    );
    let (status, v) = get_json(proxy.admin, "/api/explain?target=repo.clearswift.net:443").await;
    assert_eq!(status, 200, "{v:#}");
    assert_eq!(v["note"], Value::Null);
}

#[tokio::test]
async fn suggest_api_and_reload_state() {
    let proxy = TestProxy::start(&config(&[], ""), &catalog(80)).await;
    let (status, _) = connect(proxy.addr, "ksn2.kaspersky-labs.com:443").await;
    assert_eq!(status, 403);
    let (status, _) = connect(proxy.addr, "10.1.2.3:443").await;
    assert_eq!(status, 403);
    poll(proxy.admin, "/api/denials", |v| v["distinct"] == 2).await;

    let (status, toml, headers) = get(proxy.admin, "/api/suggest", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "text/plain; charset=utf-8"
    );
    assert!(
        toml.contains("\"ksn2.kaspersky-labs.com\", # 1 denied"),
        "{toml}"
    );
    assert!(toml.contains("#     \"10.1.2.3/32\""), "{toml}");
    let specs = egress_proxy::config::parse_catalog("suggestion", &toml, Path::new("."))
        .expect("the suggestion parses");
    assert_eq!(specs.len(), 1, "{toml}");
    assert_eq!(specs[0].hosts, ["ksn2.kaspersky-labs.com"]);

    // Take the suggestion and reload: it is no longer offered.
    let cfg = proxy.dir.path().join("egress-proxy.toml");
    let catalog_path = proxy.dir.path().join("catalog.toml");
    std::fs::write(&catalog_path, format!("{}\n{toml}", catalog(80))).unwrap();
    egress_proxy::reload::reload(&proxy.handle, Some(&cfg), Vec::new).expect("reload");
    let (_, toml, _) = get(proxy.admin, "/api/suggest", None).await;
    assert!(!toml.contains("ksn2.kaspersky-labs.com"), "{toml}");
    assert!(toml.contains("10.1.2.3/32"), "{toml}");
    let (_, s) = get_json(proxy.admin, "/api/summary").await;
    assert_eq!(s["catalog"]["rules"], 2, "{s:#}");
    assert_eq!(s["catalog"]["last_reload"]["ok"], true, "{s:#}");

    // A reload that fails validation is shown, and the old catalog stays.
    std::fs::write(&catalog_path, "[[rule]]\nname = \"broken\"\n").unwrap();
    assert!(egress_proxy::reload::reload(&proxy.handle, Some(&cfg), Vec::new).is_err());
    let (_, s) = get_json(proxy.admin, "/api/summary").await;
    assert_eq!(s["catalog"]["last_reload"]["ok"], false, "{s:#}");
    assert_eq!(
        s["catalog"]["reloads"],
        serde_json::json!({"ok": 1, "failed": 1})
    );
    assert_eq!(s["catalog"]["rules"], 2);
}

#[tokio::test]
async fn page_is_self_contained_and_guarded() {
    let proxy = TestProxy::start(&config(&[], ""), &catalog(80)).await;
    let (status, body, headers) = get(proxy.admin, "/", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").unwrap(),
        "text/html; charset=utf-8"
    );
    let csp = headers
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    for id in [
        "denials-body",
        "explain-form",
        "suggestion",
        "uptime",
        "decisions-body",
        "rules-body",
    ] {
        assert!(body.contains(&format!("id=\"{id}\"")), "page lacks #{id}");
    }
    // No external assets: nothing is loaded from anywhere but the admin listener.
    for bad in [
        "src=\"http",
        "href=\"http",
        "src=\"//",
        "href=\"//",
        "@import",
        "url(http",
    ] {
        assert!(!body.contains(bad), "page loads an external asset ({bad})");
    }

    // DNS-rebinding guard: a page served under another name cannot read the API.
    let raw_get = |host: &'static str| {
        let admin = proxy.admin;
        async move {
            let req =
                format!("GET /api/denials HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            parse_response(&raw_bytes(admin, req.as_bytes()).await)
        }
    };
    assert_eq!(raw_get("rebind.attacker.example:9090").await.status, 403);
    assert_eq!(raw_get("localhost:9090").await.status, 200);
    assert_eq!(raw_get("127.0.0.1").await.status, 200);
    assert_eq!(raw_get("[::1]:9090").await.status, 200);
    // /metrics too (tests/it/admin.rs covers the Host rules).
    let req = "GET /metrics HTTP/1.1\r\nHost: prometheus.internal\r\nConnection: close\r\n\r\n";
    assert_eq!(
        parse_response(&raw_bytes(proxy.admin, req.as_bytes()).await).status,
        403
    );
}

#[tokio::test]
async fn status_paths_need_the_admin_token() {
    let cfg = config_with(&ConfigOpts {
        server: "admin_token = \"s3cret\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(80)).await;
    for path in [
        "/",
        "/api/summary",
        "/api/denials",
        "/api/explain?target=a.example:443",
        "/api/suggest",
    ] {
        let (status, _, _) = get(proxy.admin, path, None).await;
        assert_eq!(status, 401, "{path}");
        let (status, _, _) = get(proxy.admin, path, Some("wrong")).await;
        assert_eq!(status, 401, "{path}");
        let (status, body, _) = get(proxy.admin, path, Some("s3cret")).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // With a token, any Host name is fine (the token is the guard).
    let req = "GET /api/summary HTTP/1.1\r\nHost: proxy1.corp.example:9090\r\nAuthorization: Bearer s3cret\r\nConnection: close\r\n\r\n";
    assert_eq!(
        parse_response(&raw_bytes(proxy.admin, req.as_bytes()).await).status,
        200
    );
}

/// One raw request to the admin listener (`extra`: header lines, each
/// ending in CRLF), the parsed response.
async fn admin_raw(
    admin: SocketAddr,
    method: &str,
    path: &str,
    extra: &str,
    body: &str,
) -> RawResponse {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    parse_response(&raw_bytes(admin, req.as_bytes()).await)
}

#[tokio::test]
async fn a_browser_signs_in_with_the_token_and_out_again() {
    let cfg = config_with(&ConfigOpts {
        server: "admin_token = \"s3cret t&k\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(80)).await;
    let form = "application/x-www-form-urlencoded";

    // `/` without a session: the sign-in form, and nothing of the page.
    let r = admin_raw(proxy.admin, "GET", "/", "", "").await;
    assert_eq!(r.status, 401);
    let page = r.body_text();
    assert!(page.contains("action=\"/signin\""), "{page}");
    assert!(page.contains("type=\"password\""), "{page}");
    assert!(
        !page.contains("api/summary"),
        "no status page before sign-in"
    );
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("form-action 'self'"));

    // A wrong token: refused, no cookie.
    for wrong in [
        "token=s3cret",
        "token=",
        "tok=s3cret+t%26k",
        "token=s3cret+t%26kk",
    ] {
        let r = admin_raw(
            proxy.admin,
            "POST",
            "/signin",
            &format!("Content-Type: {form}\r\n"),
            wrong,
        )
        .await;
        assert_eq!(r.status, 401, "{wrong}");
        assert!(r.header("set-cookie").is_none(), "{wrong}");
        assert!(r.body_text().contains("not the admin token"), "{wrong}");
    }

    // The right token: a session cookie, HttpOnly, SameSite=Strict, not
    // Secure (the admin listener is plain HTTP), holding no token.
    let r = admin_raw(
        proxy.admin,
        "POST",
        "/signin",
        &format!("Content-Type: {form}\r\n"),
        "token=s3cret+t%26k",
    )
    .await;
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/"));
    let set = r
        .header("set-cookie")
        .expect("a session cookie")
        .to_string();
    assert!(set.starts_with("egress_admin_session="), "{set}");
    assert!(set.contains("; HttpOnly"), "{set}");
    assert!(set.contains("; SameSite=Strict"), "{set}");
    assert!(set.contains("; Path=/"), "{set}");
    assert!(!set.contains("Secure"), "{set}");
    assert!(!set.contains("s3cret"), "{set}");
    let cookie = set.split(';').next().unwrap().to_string();
    let with_cookie = format!("Cookie: other=1; {cookie}\r\n");

    // The cookie opens the API and the page.
    let r = admin_raw(proxy.admin, "GET", "/api/summary", &with_cookie, "").await;
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(serde_json::from_slice::<Value>(&r.body).is_ok());
    let r = admin_raw(proxy.admin, "GET", "/", &with_cookie, "").await;
    assert_eq!(r.status, 200);
    let page = r.body_text();
    assert!(page.contains("api/summary"), "the status page");
    assert!(
        page.contains("action=\"/signout\""),
        "with a sign-out button"
    );
    // So does the bearer header, still.
    let (status, _, _) = get(proxy.admin, "/api/summary", Some("s3cret t&k")).await;
    assert_eq!(status, 200);
    // A forged cookie does not.
    let forged = format!("Cookie: {}x\r\n", cookie);
    let r = admin_raw(proxy.admin, "GET", "/api/summary", &forged, "").await;
    assert_eq!(r.status, 401);
    // The Host guard still applies: two Host headers are refused.
    let r = admin_raw(
        proxy.admin,
        "GET",
        "/api/summary",
        &format!("{with_cookie}Host: other.example\r\n"),
        "",
    )
    .await;
    assert_eq!(r.status, 400);

    // Sign-out clears the cookie and ends the session on the server.
    let r = admin_raw(proxy.admin, "POST", "/signout", &with_cookie, "").await;
    assert_eq!(r.status, 303);
    let cleared = r.header("set-cookie").expect("a clearing cookie");
    assert!(cleared.starts_with("egress_admin_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    let r = admin_raw(proxy.admin, "GET", "/api/summary", &with_cookie, "").await;
    assert_eq!(r.status, 401, "the old cookie no longer works");
    let r = admin_raw(proxy.admin, "GET", "/", &with_cookie, "").await;
    assert_eq!(r.status, 401);
    assert!(r.body_text().contains("action=\"/signin\""));
}

#[tokio::test]
async fn without_a_token_there_is_no_sign_in() {
    let proxy = TestProxy::start(&config_with(&ConfigOpts::default()), &catalog(80)).await;
    let r = admin_raw(proxy.admin, "GET", "/", "", "").await;
    assert_eq!(r.status, 200);
    assert!(
        !r.body_text().contains("/signout"),
        "no sign-out button without a token"
    );
    let r = admin_raw(proxy.admin, "POST", "/signin", "", "token=x").await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").is_none());
}

// === the commands, on recorded audit logs ===

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/audit")
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

fn run(args: &[&str]) -> Run {
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .current_dir(cwd.path())
        .env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("EGRESS_PROXY__") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("run egress-proxy");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn fx(name: &str) -> String {
    fixtures().join(name).display().to_string()
}

#[test]
fn suggest_prints_catalog_rules_for_what_was_denied() {
    let r = run(&["suggest", "--audit", &fx("gateway.jsonl")]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stderr.contains("1 line skipped") && r.stderr.contains("gateway.jsonl:21"),
        "{}",
        r.show()
    );
    let specs = egress_proxy::config::parse_catalog("suggestion", &r.stdout, Path::new("."))
        .unwrap_or_else(|e| panic!("not a catalog: {e:?}\n{}", r.show()));
    let rules: Vec<(String, Vec<String>, u16)> = specs
        .iter()
        .map(|s| (s.name.clone(), s.hosts.clone(), s.ports[0].lo))
        .collect();
    let want = |name: &str, hosts: &[&str], port: u16| {
        (
            name.to_string(),
            hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
            port,
        )
    };
    assert_eq!(
        rules,
        [
            want(
                "suggested: kaspersky-labs.com port 443",
                &["ksn2.kaspersky-labs.com", "ksn-old.kaspersky-labs.com"],
                443
            ),
            want(
                "suggested: kaspersky.com port 443",
                &[
                    "ksn-file.geoksn.kaspersky.com",
                    "ksn-stat.geoksn.kaspersky.com",
                    "ksn-url.geoksn.kaspersky.com"
                ],
                443
            ),
            want(
                "suggested: clearswift.co.uk port 80",
                &["downloads.clearswift.co.uk"],
                80
            ),
            want(
                "suggested: clearswift.net port 8080",
                &["repo.clearswift.net"],
                8080
            ),
        ],
        "{}",
        r.show()
    );
    assert!(specs
        .iter()
        .all(|s| s.action == egress_proxy::policy::Action::Allow && s.ports.len() == 1));
    let out = &r.stdout;
    // Counts, clients, first and last seen.
    assert!(
        out.contains("# kaspersky-labs.com, port 443: 4 denied (not_in_catalog 4), 2 hosts"),
        "{out}"
    );
    assert!(
        out.contains("# clients: 10.20.0.11 (3), 10.20.0.12 (1)"),
        "{out}"
    );
    assert!(
        out.contains("# first seen 2025-06-01T08:02:11Z, last seen 2025-06-02T09:05:41Z"),
        "{out}"
    );
    assert!(
        out.contains("\"ksn2.kaspersky-labs.com\", # 3 denied, last 2025-06-02T09:05:41Z"),
        "{out}"
    );
    // Never a wildcard, but a hint once three hosts under one domain were seen.
    assert!(
        !out.lines().any(|l| !l.starts_with('#') && l.contains('*')),
        "{out}"
    );
    assert!(
        out.contains("hosts = [\"*.kaspersky.com\"] covers them"),
        "{out}"
    );
    assert!(!out.contains("*.kaspersky-labs.com"), "{out}");
    // An IP literal: a commented-out rule with addresses.
    assert!(
        out.contains("# addresses = [\n#     \"203.0.113.45/32\", # 1 denied"),
        "{out}"
    );
    assert!(
        out.contains("port_not_allowed: the catalog lists this host on other ports"),
        "{out}"
    );
    // Refusals a rule would not fix are not suggested.
    for host in [
        "cls.sophosxl.net",
        "applianceupdate.clearswift.com",
        "query-api",
        "rh.repo",
    ] {
        assert!(!out.contains(host), "{host} suggested:\n{out}");
    }
}

#[test]
fn suggest_since_and_report_mode() {
    let r = run(&[
        "suggest",
        "--audit",
        &fx("gateway.jsonl"),
        "--since",
        "2025-06-02T00:00:00Z",
    ]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(!r.stdout.contains("ksn-old"), "{}", r.show());
    assert!(
        r.stdout.contains("\"ksn2.kaspersky-labs.com\", # 3 denied"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout.contains("since 2025-06-02T00:00:00Z"),
        "{}",
        r.show()
    );

    // The log is from 2025: nothing in the last hour.
    let r = run(&["suggest", "--audit", &fx("gateway.jsonl"), "--since", "1h"]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stdout.contains("# No denied destinations"),
        "{}",
        r.show()
    );

    let r = run(&["suggest", "--audit", &fx("report-mode.jsonl")]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stdout
            .contains("# sophos.com, port 443: 2 reported (report 2), 1 host"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout.contains("\"telemetry.sophos.com\", # 2 reported"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout
            .contains("(2 of them let through by policy.default = \"report\")"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout
            .contains("# clients: 10.20.0.11 (1), 10.20.0.13 (1)"),
        "{}",
        r.show()
    );
    assert!(!r.stdout.contains("cls.sophosxl.net"), "{}", r.show());
}

#[test]
fn suggest_bad_input_exits_1() {
    let r = run(&[
        "suggest",
        "--audit",
        &fx("gateway.jsonl"),
        "--since",
        "yesterday-ish",
    ]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(r.stderr.contains("--since"), "{}", r.show());
    let r = run(&["suggest", "--audit", &fx("no-such.jsonl")]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(r.stderr.contains("cannot read"), "{}", r.show());
    // A file with no audit record at all is bad input.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.log");
    std::fs::write(&junk, "hello\nworld\n").unwrap();
    let r = run(&["suggest", "--audit", junk.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(r.stderr.contains("no audit records"), "{}", r.show());
    assert!(
        r.stderr
            .contains("neither a JSON record nor a Squid line: 2"),
        "{}",
        r.show()
    );
    // A glob that matches nothing.
    let glob = dir.path().join("nothing*.log");
    let r = run(&["suggest", "--audit", glob.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(r.stderr.contains("no file matches"), "{}", r.show());
}

#[test]
fn suggest_reads_globs_gzip_and_squid_lines() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    // Rotated JSON logs, the older one compressed, and a Squid log.
    let json = std::fs::read_to_string(fx("gateway.jsonl")).unwrap();
    let (older, newer) = json.split_at(json.len() / 2);
    let (older, newer) = match older.rfind('\n') {
        Some(i) => (&json[..=i], &json[i + 1..]),
        None => (older, newer),
    };
    std::fs::write(dir.path().join("audit.log"), newer).unwrap();
    let gz = std::fs::File::create(dir.path().join("audit.log.1.gz")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(gz, flate2::Compression::fast());
    enc.write_all(older.as_bytes()).unwrap();
    enc.finish().unwrap();
    let squid = dir.path().join("access.log");
    std::fs::write(
        &squid,
        "1717318801.114     87 10.20.0.11 TCP_MISS/200 3921 GET http://repo.clearswift.net/ - HIER_DIRECT/185.155.104.80 -\n\
         1717318802.000      0 10.20.0.12 TCP_DENIED/403 0 CONNECT d1a.cloudfront.net:443 - HIER_NONE/- -\n\
         1717318803.000      0 10.20.0.12 TCP_DENIED/407 0 CONNECT auth.example.com:443 - HIER_NONE/- -\n",
    )
    .unwrap();
    let whole = run(&["suggest", "--audit", &fx("gateway.jsonl")]);
    let glob = dir.path().join("audit.log*");
    let r = run(&["suggest", "--audit", glob.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(r.stderr.contains("read 2 files"), "{}", r.show());
    // The same rules as from the one uncompressed file.
    let rules = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(rules(&r.stdout), rules(&whole.stdout), "{}", r.show());

    let r = run(&["suggest", "--audit", squid.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stderr.contains("3 records (3 Squid lines)"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout
            .contains("TCP_DENIED/403 (Squid line, reason not logged) 1"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout.contains("\"d1a.cloudfront.net\", # 1 denied"),
        "{}",
        r.show()
    );
    assert!(!r.stdout.contains("auth.example.com"), "{}", r.show());
    assert!(!r.stdout.contains("repo.clearswift.net"), "{}", r.show());
}

fn replay(catalog: &str) -> Run {
    run(&[
        "replay",
        "--config",
        &fx("egress-proxy.toml"),
        "--audit",
        &fx("gateway.jsonl"),
        "--catalog",
        catalog,
    ])
}

#[test]
fn replay_under_the_recording_catalog_changes_nothing() {
    let r = replay(&fx("catalog.toml"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    assert!(
        r.stdout
            .contains("records: 23; re-decided: 19; unchanged: 19"),
        "{}",
        r.show()
    );
    assert!(
        r.stdout
            .contains("4 (bad_request 1, client_not_allowed 1, private_address 1, sni_mismatch 1)"),
        "{}",
        r.show()
    );
    assert!(r.stdout.contains("no changes"), "{}", r.show());
    assert!(
        r.stdout.contains("result: nothing would be newly denied"),
        "{}",
        r.show()
    );
    assert!(
        r.stderr.contains("1 line skipped") && r.stderr.contains("gateway.jsonl:21"),
        "{}",
        r.show()
    );
}

#[test]
fn replay_reads_repeated_audit_files_and_squid_lines() {
    // The same log twice, and a Squid line the recording catalog explains.
    let dir = tempfile::tempdir().unwrap();
    let squid = dir.path().join("access.log");
    std::fs::write(
        &squid,
        "1748855040.000      0 10.20.0.11 TCP_TUNNEL/200 10 CONNECT query-api.eu1.apc.avira.com:443 - HIER_DIRECT/52.28.144.19 -\n",
    )
    .unwrap();
    let r = run(&[
        "replay",
        "--config",
        &fx("egress-proxy.toml"),
        "--audit",
        &fx("gateway.jsonl"),
        "--audit",
        &fx("gateway.jsonl"),
        "--audit",
        squid.to_str().unwrap(),
        "--catalog",
        &fx("catalog-drops.toml"),
    ]);
    assert_eq!(r.code, Some(3), "{}", r.show());
    assert!(
        r.stdout.contains("records: 47; re-decided: 39"),
        "{}",
        r.show()
    );
    assert!(
        r.stderr.contains("read 3 files: 47 records (1 Squid line)"),
        "{}",
        r.show()
    );
    // The Squid line was a bypass under "Avira APC Cloud lookup", as the JSON ones.
    assert!(
        r.stdout
            .contains("bypass \"Avira APC Cloud lookup\" -> deny not_in_catalog: 7"),
        "{}",
        r.show()
    );
}

#[test]
fn replay_of_a_catalog_that_only_adds_exits_0() {
    let r = replay(&fx("catalog-adds.toml"));
    assert_eq!(r.code, Some(0), "{}", r.show());
    let out = &r.stdout;
    assert!(
        out.contains("newly allowed: 6 transactions (4 destinations)"),
        "{}",
        r.show()
    );
    assert!(
        out.contains("deny not_in_catalog -> bypass \"Kaspersky KSN lookup\": 6"),
        "{}",
        r.show()
    );
    assert!(out.contains("ksn2.kaspersky-labs.com:443"), "{}", r.show());
    assert!(
        out.contains("\"Kaspersky KSN lookup\": 1 -> 7"),
        "{}",
        r.show()
    );
    assert!(!out.contains("newly denied:"), "{}", r.show());
    // Recorded before the vendor's change, and still not in the catalog.
    assert!(!out.contains("ksn-old"), "{}", r.show());
}

#[test]
fn replay_of_a_catalog_that_takes_away_exits_3() {
    let r = replay(&fx("catalog-drops.toml"));
    assert_eq!(r.code, Some(3), "{}", r.show());
    let out = &r.stdout;
    assert!(
        out.contains("newly denied: 3 transactions (1 destination)"),
        "{}",
        r.show()
    );
    assert!(
        out.contains("bypass \"Avira APC Cloud lookup\" -> deny not_in_catalog: 3"),
        "{}",
        r.show()
    );
    assert!(
        out.contains("query-api.eu1.apc.avira.com:443"),
        "{}",
        r.show()
    );
    assert!(out.contains("allow -> bypass"), "{}", r.show());
    assert!(
        out.contains("allow \"Sophos Cloud Lookups\" -> bypass \"Sophos Cloud Lookups\": 1"),
        "{}",
        r.show()
    );
    assert!(out.contains("bypass -> allow"), "{}", r.show());
    assert!(
        out.contains("\"Avira APC Cloud lookup\": 3 -> 0"),
        "{}",
        r.show()
    );
    assert!(
        out.contains("result: 3 transactions would be newly denied (exit status 3)"),
        "{}",
        r.show()
    );
}

#[test]
fn replay_bad_input_exits_1() {
    let r = replay(&fx("bad-catalog.toml"));
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(
        r.stderr.contains("invalid catalog") && r.stderr.contains("ports"),
        "{}",
        r.show()
    );
    let r = replay(&fx("no-such-catalog.toml"));
    assert_eq!(r.code, Some(1), "{}", r.show());
    let r = run(&[
        "replay",
        "--config",
        &fx("egress-proxy.toml"),
        "--audit",
        &fx("no-such.jsonl"),
        "--catalog",
        &fx("catalog.toml"),
    ]);
    assert_eq!(r.code, Some(1), "{}", r.show());
    assert!(r.stderr.contains("cannot read"), "{}", r.show());
}

#[test]
fn suggestion_pasted_into_the_catalog_replays_clean() {
    let suggestion = run(&["suggest", "--audit", &fx("gateway.jsonl")]);
    assert_eq!(suggestion.code, Some(0));
    let dir = tempfile::tempdir().unwrap();
    let old = std::fs::read_to_string(fixtures().join("catalog.toml")).unwrap();
    let new = dir.path().join("catalog.toml");
    std::fs::write(&new, format!("{old}\n{}", suggestion.stdout)).unwrap();
    let r = replay(new.to_str().unwrap());
    assert_eq!(r.code, Some(0), "{}", r.show());
    // 4 kaspersky-labs.com, 3 kaspersky.com, 1 clearswift.co.uk, 1 on port 8080;
    // the IP literal stays denied (its rule is commented out).
    assert!(
        r.stdout
            .contains("newly allowed: 9 transactions (7 destinations)"),
        "{}",
        r.show()
    );
    assert!(!r.stdout.contains("203.0.113.45"), "{}", r.show());
}
