#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The admin listener in-process: health, readiness, `/metrics` as
//! OpenMetrics and its counters and gauges under real traffic, the bearer
//! token, methods.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn catalog(web: u16, echo: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\"]\nports = [{web}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"Echo\"\nhosts = [\"echo.clearswift.net\"]\nports = [{echo}]\naction = \"bypass\"\n"
    )
}

const NAMES: [&str; 3] = ["repo.clearswift.net", "echo.clearswift.net", "example.com"];

fn with_token(config: &str) -> String {
    config.replacen("[server]\n", "[server]\nadmin_token = \"s3cret\"\n", 1)
}

pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) www_authenticate: Option<String>,
    pub(crate) body: String,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("admin request");
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header("content-type").unwrap_or_default();
    let www_authenticate = header("www-authenticate");
    let status = resp.status().as_u16();
    let body = resp.text().await.expect("body");
    Answer {
        status,
        content_type,
        www_authenticate,
        body,
    }
}

pub(crate) async fn get(admin: SocketAddr, path: &str) -> Answer {
    send(admin_client().get(format!("http://{admin}{path}"))).await
}

/// Samples of OpenMetrics text keyed by series as written (`name{labels}`),
/// after checking the shape of every line and the closing `# EOF`.
fn samples(text: &str) -> HashMap<String, f64> {
    assert!(text.ends_with("# EOF\n"), "no trailing # EOF:\n{text}");
    let mut out = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            assert!(
                rest == "EOF"
                    || ["HELP ", "TYPE ", "UNIT "]
                        .iter()
                        .any(|p| rest.starts_with(p)),
                "bad comment line: {line:?}"
            );
            continue;
        }
        // `name value` or `name{labels} value`; label values here never hold `} `.
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line: {line:?}"));
        let name = series.split('{').next().unwrap_or("");
        assert!(
            !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line:?}"
        );
        assert!(
            !series.contains('{') || (series.ends_with('}') && series.contains("=\"")),
            "bad labels: {line:?}"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line:?}"));
        out.insert(series.to_string(), v);
    }
    out
}

pub(crate) fn value(m: &HashMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

pub(crate) async fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    let a = get(admin, "/metrics").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.content_type, OPENMETRICS);
    samples(&a.body)
}

/// Poll `/metrics` until `pred` holds.
pub(crate) async fn metrics_until(
    admin: SocketAddr,
    what: &str,
    pred: impl Fn(&HashMap<String, f64>) -> bool,
) -> HashMap<String, f64> {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(admin).await;
        if pred(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never showed {what}: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn healthz_readyz_and_metrics_answer() {
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, 2)).await;
    let a = get(proxy.admin, "/healthz").await;
    assert_eq!(a.status, 200);
    let a = get(proxy.admin, "/readyz").await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = get(proxy.admin, "/metrics").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, OPENMETRICS);
    assert!(a.body.ends_with("# EOF\n"), "{}", a.body);
    let m = samples(&a.body);
    assert_eq!(value(&m, "egress_catalog_rules"), 2.0);
    assert_eq!(
        m.keys()
            .filter(|k| k.starts_with("egress_catalog_info{hash=\""))
            .count(),
        1,
        "{m:#?}"
    );
    let build = format!(
        "egress_build_info{{version=\"{}\",commit=\"{}\"}}",
        env!("CARGO_PKG_VERSION"),
        egress_proxy::COMMIT
    );
    assert_eq!(value(&m, &build), 1.0, "{}", a.body);
    for series in [
        "egress_open_connections",
        "egress_open_tunnels",
        "egress_audit_records_total",
        "egress_audit_queue",
        "egress_connection_limit_refusals_total",
        "egress_dns_lookup_seconds_count",
        "egress_upstream_connect_seconds_count",
    ] {
        assert!(m.contains_key(series), "{series} missing:\n{}", a.body);
    }
    assert_eq!(get(proxy.admin, "/nothing-here").await.status, 404);
}

#[tokio::test]
async fn the_admin_listener_is_not_the_proxy_port() {
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, 2)).await;
    let a = send(admin_client().get(format!("http://{}/metrics", proxy.addr))).await;
    assert_ne!(
        a.status, 200,
        "the proxy port never serves /metrics: {}",
        a.body
    );
    assert!(!a.body.contains("# EOF"), "{}", a.body);
}

#[tokio::test]
async fn metrics_move_with_denied_and_allowed_traffic() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(origin.port(), 2)).await;
    let m0 = metrics(proxy.admin).await;
    assert_eq!(value(&m0, "egress_audit_records_total"), 0.0);

    let client = proxy.client();
    let denied = client
        .get(format!("http://example.com:{}/", origin.port()))
        .send()
        .await
        .expect("send");
    assert_eq!(denied.status(), 403);
    let allowed = client
        .get(format!("http://repo.clearswift.net:{}/", origin.port()))
        .send()
        .await
        .expect("send");
    assert_eq!(allowed.status(), 200);
    assert_eq!(allowed.text().await.expect("body"), "hello");
    proxy.records(2).await;

    let deny = r#"egress_transactions_total{decision="deny",rule="",reason="not_in_catalog"}"#;
    let allow =
        r#"egress_transactions_total{decision="allow",rule="Clearswift Update Server",reason=""}"#;
    let m = metrics_until(proxy.admin, "both transactions", |m| {
        value(m, deny) >= 1.0
            && value(m, allow) >= 1.0
            && value(m, "egress_audit_records_total") >= 2.0
    })
    .await;
    assert_eq!(value(&m, deny), 1.0);
    assert_eq!(value(&m, allow), 1.0);
    assert_eq!(value(&m, "egress_audit_records_total"), 2.0);
    assert_eq!(
        value(
            &m,
            r#"egress_rule_down_bytes_total{rule="Clearswift Update Server"}"#
        ),
        5.0
    );
    assert!(
        value(&m, "egress_upstream_connect_seconds_count") >= 1.0,
        "{m:#?}"
    );
    // Names here come from `dns.static`: no DNS query, so nothing is timed.
    assert_eq!(value(&m, "egress_dns_lookup_seconds_count"), 0.0, "{m:#?}");
    assert!(
        m.keys()
            .all(|k| !k.contains("clearswift.net") && !k.contains("example.com")),
        "labels never carry raw hosts: {m:#?}"
    );
}

#[tokio::test]
async fn open_connection_and_tunnel_gauges_follow_clients() {
    let echo = echo_origin().await;
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, echo.port())).await;
    let m = metrics(proxy.admin).await;
    assert_eq!(value(&m, "egress_open_connections"), 0.0);
    assert_eq!(value(&m, "egress_open_tunnels"), 0.0);

    // An idle client connection.
    let idle = TcpStream::connect(proxy.addr).await.expect("connect");
    metrics_until(proxy.admin, "one open connection", |m| {
        value(m, "egress_open_connections") == 1.0
    })
    .await;

    // A tunnel: its connection stays counted while the tunnel is open.
    let (status, mut tunnel) =
        connect(proxy.addr, &format!("echo.clearswift.net:{}", echo.port())).await;
    assert_eq!(status, 200);
    tunnel.write_all(b"ping").await.expect("write");
    let m = metrics_until(proxy.admin, "the tunnel", |m| {
        value(m, "egress_open_tunnels") == 1.0
    })
    .await;
    assert_eq!(value(&m, "egress_open_connections"), 2.0);

    drop(tunnel);
    drop(idle);
    metrics_until(proxy.admin, "everything closed", |m| {
        value(m, "egress_open_connections") == 0.0 && value(m, "egress_open_tunnels") == 0.0
    })
    .await;
}

#[tokio::test]
async fn an_admin_token_guards_everything_but_the_probes() {
    let proxy = TestProxy::start(&with_token(&config(&NAMES, "")), &catalog(1, 2)).await;
    let url = |p: &str| format!("http://{}{p}", proxy.admin);
    let c = admin_client();

    let a = send(c.get(url("/metrics"))).await;
    assert_eq!(a.status, 401, "no token: {}", a.body);
    assert_eq!(a.www_authenticate.as_deref(), Some("Bearer"));
    assert!(!a.body.contains("egress_"), "no metrics leak: {}", a.body);

    let a = send(
        c.get(url("/metrics"))
            .header("authorization", "Bearer wrong"),
    )
    .await;
    assert_eq!(a.status, 401, "wrong token");
    let a = send(
        c.get(url("/metrics"))
            .header("authorization", "Bearer s3cre"),
    )
    .await;
    assert_eq!(a.status, 401, "a prefix of the token");
    let a = send(
        c.get(url("/metrics"))
            .header("authorization", "Bearer s3cret2"),
    )
    .await;
    assert_eq!(a.status, 401, "the token plus more");
    let a = send(c.get(url("/metrics")).header("authorization", "s3cret")).await;
    assert_eq!(a.status, 401, "the token without the Bearer scheme");

    let a = send(
        c.get(url("/metrics"))
            .header("authorization", "Bearer s3cret"),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, OPENMETRICS);
    assert!(a.body.ends_with("# EOF\n"));

    // The probes need no token (DESIGN.md): a load balancer's health check
    // reads only the status.
    assert_eq!(
        send(c.get(url("/readyz"))).await.status,
        200,
        "/readyz needs no token"
    );
    let a = send(
        c.get(url("/readyz"))
            .header("authorization", "Bearer wrong"),
    )
    .await;
    assert_eq!(a.status, 200, "/readyz ignores a wrong token");

    assert_eq!(
        send(c.get(url("/healthz"))).await.status,
        200,
        "/healthz needs no token"
    );
    let a = send(
        c.get(url("/healthz"))
            .header("authorization", "Bearer wrong"),
    )
    .await;
    assert_eq!(a.status, 200, "/healthz ignores a wrong token");
}

#[tokio::test]
async fn only_get_and_head_are_served() {
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, 2)).await;
    let c = admin_client();
    for path in ["/metrics", "/healthz", "/readyz"] {
        let a = send(c.post(format!("http://{}{path}", proxy.admin)).body("x")).await;
        assert_eq!(a.status, 405, "POST {path}");
        let a = send(c.delete(format!("http://{}{path}", proxy.admin))).await;
        assert_eq!(a.status, 405, "DELETE {path}");
    }
    let head = c
        .head(format!("http://{}/healthz", proxy.admin))
        .send()
        .await
        .expect("HEAD");
    assert_eq!(head.status(), 200);
}

// === the listener's own guards: Host, connection cap, idle time ===

fn with_server_keys(config: &str, keys: &str) -> String {
    config.replacen("[server]\n", &format!("[server]\n{keys}\n"), 1)
}

/// GET `target` on a raw connection with the given header lines; the status.
async fn raw_status(admin: SocketAddr, target: &str, headers: &str) -> u16 {
    let req = format!("GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
    parse_response(&raw_bytes(admin, req.as_bytes()).await).status
}

#[tokio::test]
async fn every_path_but_the_probes_needs_a_local_host() {
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, 2)).await;
    let port = proxy.admin.port();
    for host in [
        "evil.example".to_string(),
        "[::1].evil.example".into(),
        "127.0.0.1.evil.example".into(),
        "localhost.evil.example".into(),
        "127.0.0.1:9090x".into(),
        "localhost:".into(),
        "[::1]x".into(),
        "[::1".into(),
        "localhost.".into(),
        format!("127.0.0.1:{port}:{port}"),
        "127.0.0.1:99999".into(),
    ] {
        for path in ["/metrics", "/api/summary", "/", "/nothing-here"] {
            let status = raw_status(proxy.admin, path, &format!("Host: {host}\r\n")).await;
            assert_eq!(status, 403, "{path} with Host: {host}");
        }
    }
    // The probes answer any Host (a load balancer's checks name anything).
    for path in ["/healthz", "/readyz"] {
        let status = raw_status(proxy.admin, path, "Host: evil.example\r\n").await;
        assert_eq!(status, 200, "{path}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".into(),
        format!("LocalHost:{port}"),
        "127.0.0.1".into(),
        "[::1]".into(),
    ] {
        let status = raw_status(proxy.admin, "/metrics", &format!("Host: {host}\r\n")).await;
        assert_eq!(status, 200, "Host: {host}");
    }
    // An absolute-form target's authority counts as the Host.
    let status = raw_status(
        proxy.admin,
        "http://evil.example/metrics",
        "Host: 127.0.0.1\r\n",
    )
    .await;
    assert_eq!(status, 403, "absolute-form authority");
}

#[tokio::test]
async fn a_duplicate_or_missing_host_is_a_bad_request() {
    let proxy = TestProxy::start(&config(&NAMES, ""), &catalog(1, 2)).await;
    for headers in [
        "Host: 127.0.0.1\r\nHost: evil.example\r\n",
        "Host: evil.example\r\nHost: 127.0.0.1\r\n",
        "Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n",
        "",
    ] {
        let status = raw_status(proxy.admin, "/metrics", headers).await;
        assert_eq!(status, 400, "{headers:?}");
    }
    // Also with a token: two Hosts are malformed whoever sends them.
    let proxy = TestProxy::start(&with_token(&config(&NAMES, "")), &catalog(1, 2)).await;
    let auth = "Authorization: Bearer s3cret\r\n";
    let two = format!("Host: 127.0.0.1\r\nHost: evil.example\r\n{auth}");
    assert_eq!(raw_status(proxy.admin, "/metrics", &two).await, 400);
    let named = format!("Host: proxy1.corp.example\r\n{auth}");
    assert_eq!(
        raw_status(proxy.admin, "/metrics", &named).await,
        200,
        "with a token any one Host will do"
    );
    // The probes read nothing from the request: they still answer.
    let two = "Host: 127.0.0.1\r\nHost: evil.example\r\n";
    assert_eq!(raw_status(proxy.admin, "/healthz", two).await, 200);
}

/// A kept-alive admin connection that has had one answer (so it holds a slot).
async fn held_admin_connection(admin: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(admin).await.expect("connect");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.status, 200);
    s
}

#[tokio::test]
async fn admin_connections_are_capped() {
    const CAP: usize = 4;
    let cfg = with_server_keys(
        &config(&NAMES, ""),
        &format!("admin_max_connections = {CAP}"),
    );
    let proxy = TestProxy::start(&cfg, &catalog(1, 2)).await;
    let mut held = Vec::new();
    for _ in 0..CAP {
        held.push(held_admin_connection(proxy.admin).await);
    }
    for _ in 0..3 {
        let mut extra = TcpStream::connect(proxy.admin).await.expect("connect");
        let (bytes, ended) = read_until_close(&mut extra).await;
        assert_eq!(ended, Some(true), "an extra connection is closed");
        let r = parse_response(&bytes);
        assert_eq!(r.status, 503, "{}", r.head);
        assert_eq!(r.header("connection"), Some("close"));
    }
    // Closing one frees its slot.
    drop(held.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(proxy.admin).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (bytes, _) = read_until_close(&mut s).await;
        if parse_response(&bytes).status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The held ones still work.
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(read_response(s).await.status, 200);
    }
}

#[tokio::test]
async fn idle_admin_connections_are_closed() {
    let cfg = with_server_keys(&config(&NAMES, ""), "admin_idle_timeout = \"300ms\"");
    let proxy = TestProxy::start(&cfg, &catalog(1, 2)).await;
    // Silent from the start.
    let mut silent = TcpStream::connect(proxy.admin).await.expect("connect");
    let (_, ended) = read_until_close(&mut silent).await;
    assert!(ended.is_some(), "a connection that sends nothing is closed");
    // Idle after an answer (keep-alive).
    let mut kept = held_admin_connection(proxy.admin).await;
    let (rest, ended) = read_until_close(&mut kept).await;
    assert!(ended.is_some(), "an idle kept-alive connection is closed");
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 408"),
        "{rest:?}"
    );
}
