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
async fn an_admin_token_guards_everything_but_healthz() {
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

    assert_eq!(send(c.get(url("/readyz"))).await.status, 401);
    let a = send(
        c.get(url("/readyz"))
            .header("authorization", "Bearer s3cret"),
    )
    .await;
    assert_eq!(a.status, 200);

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
