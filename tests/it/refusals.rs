//! Refusals: every reason of DESIGN.md's table that a plain HTTP or CONNECT
//! request can provoke on loopback, each checked end to end: the status, the
//! `X-Egress-Error` header, `Connection: close`, a body naming the reason and
//! the record id, exactly one audit record with the right decision, reason,
//! status and rule, and an origin that never saw the request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::support::*;

// === helpers ===

const UPDATE: &str = "Clearswift Update Server";

/// The usual catalog: repo.clearswift.net allowed on `port`.
fn repo_catalog(port: u16) -> String {
    rule(
        UPDATE,
        &["repo.clearswift.net", "rh.repo.clearswift.net"],
        port,
        "allow",
        "",
    )
}

/// What a refusal must look like.
pub(crate) struct Want {
    status: u16,
    reason: Reason,
    decision: Decided,
    rule: Option<&'static str>,
}

impl Want {
    /// A policy or client refusal: `deny`, no rule.
    pub(crate) fn deny(status: u16, reason: Reason) -> Want {
        Want {
            status,
            reason,
            decision: Decided::Deny,
            rule: None,
        }
    }

    pub(crate) fn rule(mut self, rule: &'static str) -> Want {
        self.rule = Some(rule);
        self
    }

    fn decision(mut self, d: Decided) -> Want {
        self.decision = d;
        self
    }
}

/// The record id a refusal body names (`id: <16 hex digits>`).
fn body_id(body: &str) -> Option<String> {
    let rest = &body[body.find("id: ")? + 4..];
    let id: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
    (id.len() == 16).then_some(id)
}

/// Assert a refusal made by the proxy (not by hyper's parser): status,
/// reason header, `Connection: close`, body naming the reason and the
/// record id, and that the record with that id is right and alone.
pub(crate) async fn assert_refusal(proxy: &TestProxy, resp: &RawResponse, want: &Want) -> Record {
    let reason = want.reason.as_str();
    assert_eq!(
        resp.status,
        want.status,
        "status; got:\n{}{}",
        resp.head,
        resp.body_text()
    );
    assert_eq!(
        resp.header("x-egress-error"),
        Some(reason),
        "reason header:\n{}",
        resp.head
    );
    assert_eq!(
        resp.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close"),
        "Connection: close:\n{}",
        resp.head
    );
    let body = resp.body_text();
    assert!(body.contains(reason), "body names the reason: {body:?}");
    let id = body_id(&body).unwrap_or_else(|| panic!("body names the record id: {body:?}"));
    let recs = proxy.exactly(1).await;
    let r = recs[0].clone();
    assert_eq!(r.id_string(), id, "the body's id is the record's");
    assert_record(&r, want);
    r
}

fn assert_record(r: &Record, want: &Want) {
    assert_eq!(r.decision, want.decision, "decision: {r:#?}");
    assert_eq!(r.reason, Some(want.reason), "reason: {r:#?}");
    assert_eq!(r.status, Some(want.status), "status: {r:#?}");
    assert_eq!(r.rule.as_deref(), want.rule, "rule: {r:#?}");
}

/// `GET url` through the proxy on a fresh connection, read to the close.
async fn get(proxy: &TestProxy, url: &str) -> RawResponse {
    let host = url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .unwrap_or("x");
    let req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await)
}

/// `GET url` for a request that should succeed, with `Connection: close`
/// so the read ends when the answer does.
async fn get_ok(proxy: &TestProxy, url: &str) -> RawResponse {
    let req = format!("GET {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await)
}

/// A config mapping each name to 127.0.0.1 with loopback allowed (as
/// `support::config`), lines added to `[server]`.
fn cfg_server(names: &[&str], server: &str) -> String {
    let statics: Vec<(&str, &str)> = names.iter().map(|n| (*n, "127.0.0.1")).collect();
    config_with(&ConfigOpts {
        statics: &statics,
        allow_private: &["127.0.0.0/8"],
        server,
        ..ConfigOpts::default()
    })
}

// === policy refusals ===

#[tokio::test]
async fn not_in_catalog() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "example.com"], ""),
        &repo_catalog(origin.port()),
    )
    .await;
    let resp = get(&proxy, &format!("http://example.com:{}/", origin.port())).await;
    let r = assert_refusal(&proxy, &resp, &Want::deny(403, Reason::NotInCatalog)).await;
    assert_eq!(r.host.as_deref(), Some("example.com"));
    assert_eq!(r.port, Some(origin.port()));
    origin.assert_untouched("not in catalog");
}

#[tokio::test]
async fn port_not_allowed() {
    let allowed = TapOrigin::start().await;
    let other = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &repo_catalog(allowed.port()),
    )
    .await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", other.port()),
    )
    .await;
    let r = assert_refusal(&proxy, &resp, &Want::deny(403, Reason::PortNotAllowed)).await;
    assert_eq!(r.port, Some(other.port()));
    other.assert_untouched("port not allowed");
    allowed.assert_untouched("port not allowed");
}

fn get_head_catalog(port: u16) -> String {
    rule(
        UPDATE,
        &["repo.clearswift.net"],
        port,
        "allow",
        "methods = [\"GET\", \"HEAD\"]",
    )
}

#[tokio::test]
async fn method_not_allowed_for_post() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &get_head_catalog(origin.port()),
    )
    .await;
    let req = format!(
        "POST http://repo.clearswift.net:{0}/upload HTTP/1.1\r\nHost: repo.clearswift.net:{0}\r\n\
         Content-Type: text/plain\r\nContent-Length: 6\r\n\r\nsecret",
        origin.port()
    );
    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    let want = Want::deny(403, Reason::MethodNotAllowed).rule(UPDATE);
    let r = assert_refusal(&proxy, &resp, &want).await;
    assert_eq!(r.method.as_ref().map(http::Method::as_str), Some("POST"));
    origin.assert_untouched("method not allowed for post");
}

#[tokio::test]
async fn method_not_allowed_for_get_rule_still_allows_get() {
    // The counterpart of the refusal above: the same rule lets GET through,
    // so the refusal is about the method and nothing else.
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &get_head_catalog(origin.port()),
    )
    .await;
    let resp = get_ok(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].decision, Decided::Allow);
    assert_eq!(recs[0].rule.as_deref(), Some(UPDATE));
}

#[tokio::test]
async fn method_not_allowed_for_connect_to_a_rule_with_methods() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &get_head_catalog(origin.port()),
    )
    .await;
    let authority = format!("repo.clearswift.net:{}", origin.port());
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    let want = Want::deny(403, Reason::MethodNotAllowed).rule(UPDATE);
    let r = assert_refusal(&proxy, &resp, &want).await;
    assert_eq!(r.method.as_ref().map(http::Method::as_str), Some("CONNECT"));
    assert_eq!(r.url, None, "a tunnel has no url");
    origin.assert_untouched("method not allowed for connect to a rule with methods");
}

#[tokio::test]
async fn deny_rule_carves_out_of_a_wildcard() {
    let origin = TapOrigin::start().await;
    let port = origin.port();
    let catalog = format!(
        "{}{}",
        rule(
            "Clearswift wildcard",
            &["*.clearswift.net"],
            port,
            "allow",
            ""
        ),
        rule("No repo", &["repo.clearswift.net"], port, "deny", "")
    );
    let names = ["repo.clearswift.net", "services1.clearswift.net"];
    // The wildcard itself lets a sibling through.
    let proxy = TestProxy::start(&config(&names, ""), &catalog).await;
    let ok = get_ok(&proxy, &format!("http://services1.clearswift.net:{port}/")).await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].rule.as_deref(), Some("Clearswift wildcard"));
    assert_eq!(origin.seen().len(), 1);

    let origin = TapOrigin::start().await;
    let catalog = catalog.replace(&format!("[{port}]"), &format!("[{}]", origin.port()));
    let proxy = TestProxy::start(&config(&names, ""), &catalog).await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    assert_refusal(
        &proxy,
        &resp,
        &Want::deny(403, Reason::DenyRule).rule("No repo"),
    )
    .await;
    origin.assert_untouched("deny rule carves out of a wildcard");
}

#[tokio::test]
async fn ip_literal_in_every_spelling() {
    let origin = TapOrigin::start().await;
    let port = origin.port();
    for host in [
        "127.0.0.1",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.1",
        "0x7F000001",
        "[::ffff:127.0.0.1]",
    ] {
        let proxy =
            TestProxy::start(&config(&["repo.clearswift.net"], ""), &repo_catalog(port)).await;
        let resp = get(&proxy, &format!("http://{host}:{port}/")).await;
        let r = assert_refusal(&proxy, &resp, &Want::deny(403, Reason::IpLiteral)).await;
        if !host.starts_with('[') {
            assert_eq!(
                r.host.as_deref(),
                Some("127.0.0.1"),
                "{host} is recorded normalised"
            );
        }
    }
    origin.assert_untouched("ip literal in every spelling");
}

#[tokio::test]
async fn ip_literal_is_refused_in_report_mode_too() {
    let origin = TapOrigin::start().await;
    let cfg = config_with(&ConfigOpts {
        allow_private: &["127.0.0.0/8"],
        policy: "default = \"report\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &repo_catalog(origin.port())).await;
    let resp = get(&proxy, &format!("http://127.0.0.1:{}/", origin.port())).await;
    assert_refusal(&proxy, &resp, &Want::deny(403, Reason::IpLiteral)).await;
    origin.assert_untouched("ip literal is refused in report mode too");
}

fn address_catalog(port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Loopback service\"\naddresses = [\"127.0.0.1/32\"]\nports = [{port}]\naction = \"allow\"\n"
    )
}

#[tokio::test]
async fn ip_literal_admitted_by_addresses_is_forwarded() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(&config(&[], ""), &address_catalog(origin.port())).await;
    let resp = get_ok(&proxy, &format!("http://127.0.0.1:{}/", origin.port())).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), "hello");
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].decision, Decided::Allow);
    assert_eq!(recs[0].rule.as_deref(), Some("Loopback service"));
    assert_eq!(recs[0].reason, None);
    assert_eq!(recs[0].upstream, Some(origin.addr));
    assert_eq!(origin.seen().len(), 1);
}

#[tokio::test]
async fn ip_literal_admitted_by_addresses_still_needs_allow_private() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config_with(&ConfigOpts::default()),
        &address_catalog(origin.port()),
    )
    .await;
    let resp = get(&proxy, &format!("http://127.0.0.1:{}/", origin.port())).await;
    let want = Want::deny(403, Reason::PrivateAddress).rule("Loopback service");
    assert_refusal(&proxy, &resp, &want).await;
    origin.assert_untouched("ip literal admitted by addresses still needs allow private");
}

#[tokio::test]
async fn private_address_behind_a_name() {
    let origin = TapOrigin::start().await;
    let port = origin.port();
    for (name, ip) in [
        ("repo.clearswift.net", "10.0.0.1"),
        ("repo.clearswift.net", "127.0.0.1"),
    ] {
        let cfg = config_with(&ConfigOpts {
            statics: &[(name, ip)],
            ..ConfigOpts::default()
        });
        let proxy = TestProxy::start(&cfg, &repo_catalog(port)).await;
        let resp = get(&proxy, &format!("http://{name}:{port}/")).await;
        let r = assert_refusal(
            &proxy,
            &resp,
            &Want::deny(403, Reason::PrivateAddress).rule(UPDATE),
        )
        .await;
        assert_eq!(r.upstream, None, "{ip}: nothing was dialed");
    }
    origin.assert_untouched("private address behind a name");
}

fn pinned_catalog(port: u16, ip: &str) -> String {
    rule(
        UPDATE,
        &["repo.clearswift.net"],
        port,
        "allow",
        &format!("ips = [\"{ip}\"]\npin = true"),
    )
}

#[tokio::test]
async fn pin_mismatch() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &pinned_catalog(origin.port(), "127.0.0.2"),
    )
    .await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    assert_refusal(
        &proxy,
        &resp,
        &Want::deny(403, Reason::PinMismatch).rule(UPDATE),
    )
    .await;
    origin.assert_untouched("pin mismatch");
}

#[tokio::test]
async fn pinned_rule_that_matches_is_forwarded() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &pinned_catalog(origin.port(), "127.0.0.1"),
    )
    .await;
    let resp = get_ok(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].decision, Decided::Allow);
    assert_eq!(recs[0].reason, None);
    assert_eq!(recs[0].upstream, Some(origin.addr));
    assert_eq!(origin.seen().len(), 1);
}

// === malformed requests ===

#[tokio::test]
async fn bad_request_targets() {
    let origin = TapOrigin::start().await;
    let p = origin.port();
    let cases = [
        ("https absolute URI", format!("GET https://repo.clearswift.net:{p}/ HTTP/1.1\r\nHost: repo.clearswift.net:{p}\r\n\r\n")),
        ("origin-form", format!("GET / HTTP/1.1\r\nHost: repo.clearswift.net:{p}\r\n\r\n")),
        ("asterisk-form", format!("OPTIONS * HTTP/1.1\r\nHost: repo.clearswift.net:{p}\r\n\r\n")),
        ("userinfo", format!("GET http://u:p@repo.clearswift.net:{p}/ HTTP/1.1\r\nHost: repo.clearswift.net:{p}\r\n\r\n")),
        ("empty host", format!("GET http://:{p}/ HTTP/1.1\r\nHost: repo.clearswift.net:{p}\r\n\r\n")),
        ("CONNECT without port", "CONNECT repo.clearswift.net HTTP/1.1\r\nHost: repo.clearswift.net\r\n\r\n".to_string()),
        ("port 0", "GET http://repo.clearswift.net:0/ HTTP/1.1\r\nHost: repo.clearswift.net\r\n\r\n".to_string()),
        ("port 70000", "GET http://repo.clearswift.net:70000/ HTTP/1.1\r\nHost: repo.clearswift.net\r\n\r\n".to_string()),
    ];
    for (what, req) in cases {
        let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &repo_catalog(p)).await;
        let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
        // All of these parse as HTTP; the proxy (not hyper) refuses the target.
        assert!(
            resp.header("x-egress-error").is_some(),
            "{what}: {}",
            resp.head
        );
        let r = assert_refusal(&proxy, &resp, &Want::deny(400, Reason::BadRequest)).await;
        assert!(r.host.is_none(), "{what}: no target recorded: {r:#?}");
    }
    origin.assert_untouched("bad request targets");
}

async fn header_too_large_with(size: usize) {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &repo_catalog(origin.port()),
    )
    .await;
    let big = "a".repeat(size);
    let req = format!(
        "GET http://repo.clearswift.net:{0}/ HTTP/1.1\r\nHost: repo.clearswift.net:{0}\r\nConnection: close\r\nX-Big: {big}\r\n\r\n",
        origin.port()
    );
    let raw = send_with_body_while_reading(proxy.addr, req.into_bytes(), 0).await;
    let resp = parse_response(&raw);
    assert_eq!(
        resp.status, 431,
        "{size} byte header (limit 65536):\n{}",
        resp.head
    );
    let recs = proxy.exactly(1).await;
    assert_record(&recs[0], &Want::deny(431, Reason::HeaderTooLarge));
    origin.assert_untouched("header too large with");
}

#[tokio::test]
async fn header_too_large() {
    // 100 KiB against `limits.max_header_bytes = 65536` (the default).
    header_too_large_with(100 * 1024).await;
}

#[tokio::test]
async fn header_just_over_the_limit() {
    // 70 KiB: a head hyper's adaptive read buffer once let through whole.
    header_too_large_with(70 * 1024).await;
}

#[tokio::test]
async fn header_far_too_large() {
    header_too_large_with(1024 * 1024).await;
}

// === connection-level refusals ===

fn refused_client_config() -> String {
    config_with(&ConfigOpts {
        statics: &[("repo.clearswift.net", "127.0.0.1")],
        allow_private: &["127.0.0.0/8"],
        clients: &["10.0.0.0/8"],
        ..ConfigOpts::default()
    })
}

#[tokio::test]
async fn client_not_allowed() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(&refused_client_config(), &repo_catalog(origin.port())).await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    let r = assert_refusal(&proxy, &resp, &Want::deny(403, Reason::ClientNotAllowed)).await;
    assert_eq!(r.client.ip().to_string(), "127.0.0.1");
    origin.assert_untouched("client not allowed");
}

#[tokio::test]
async fn client_not_allowed_answer_survives_a_large_request_body() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(&refused_client_config(), &repo_catalog(origin.port())).await;
    let len = 4 * 1024 * 1024;
    let head = format!(
        "POST http://repo.clearswift.net:{0}/ HTTP/1.1\r\nHost: repo.clearswift.net:{0}\r\nContent-Length: {len}\r\n\r\n",
        origin.port()
    );
    let raw = send_with_body_while_reading(proxy.addr, head.into_bytes(), len).await;
    let resp = parse_response(&raw);
    assert_refusal(&proxy, &resp, &Want::deny(403, Reason::ClientNotAllowed)).await;
    origin.assert_untouched("client not allowed answer survives a large request body");
}

#[tokio::test]
async fn policy_refusal_survives_a_large_request_body() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "example.com"], ""),
        &repo_catalog(origin.port()),
    )
    .await;
    let len = 4 * 1024 * 1024;
    let head = format!(
        "POST http://example.com:{0}/ HTTP/1.1\r\nHost: example.com:{0}\r\nContent-Length: {len}\r\n\r\n",
        origin.port()
    );
    let raw = send_with_body_while_reading(proxy.addr, head.into_bytes(), len).await;
    let resp = parse_response(&raw);
    assert_refusal(&proxy, &resp, &Want::deny(403, Reason::NotInCatalog)).await;
    origin.assert_untouched("policy refusal survives a large request body");
}

#[tokio::test]
async fn connection_limit() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &cfg_server(&["repo.clearswift.net"], "max_connections = 1"),
        &repo_catalog(origin.port()),
    )
    .await;
    // The first connection completes a request and stays open (keep-alive),
    // so it certainly holds the only permit.
    let mut held = TcpStream::connect(proxy.addr).await.expect("connect");
    let first = format!(
        "GET http://repo.clearswift.net:{0}/ HTTP/1.1\r\nHost: repo.clearswift.net:{0}\r\n\r\n",
        origin.port()
    );
    held.write_all(first.as_bytes()).await.expect("write");
    let ok = read_response(&mut held).await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    proxy.records(1).await;

    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/second", origin.port()),
    )
    .await;
    let reason = Reason::ConnectionLimit.as_str();
    assert_eq!(resp.status, 503, "{}", resp.head);
    assert_eq!(resp.header("x-egress-error"), Some(reason));
    assert_eq!(resp.header("connection"), Some("close"));
    let body = resp.body_text();
    let id = body_id(&body).unwrap_or_else(|| panic!("record id in body: {body:?}"));
    assert!(body.contains(reason), "{body}");
    let recs = proxy.exactly(2).await;
    let r = recs
        .iter()
        .find(|r| r.id_string() == id)
        .expect("the refusal's record");
    assert_record(r, &Want::deny(503, Reason::ConnectionLimit));
    assert_eq!(
        origin.seen().len(),
        1,
        "only the first request reached the origin"
    );
    drop(held);
}

// === upstream failures (the policy allowed; the record keeps `allow`) ===

/// A DNS server on loopback UDP that answers every query NXDOMAIN; counts
/// the queries.
async fn nxdomain_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let queries = Arc::new(AtomicUsize::new(0));
    let q2 = Arc::clone(&queries);
    let addr = dns_server(move |_| {
        q2.fetch_add(1, Ordering::SeqCst);
        Err(3)
    })
    .await;
    (addr, queries)
}

fn dns_config(server: SocketAddr) -> String {
    config_with(&ConfigOpts {
        allow_private: &["127.0.0.0/8"],
        dns: &format!("nameservers = [\"{server}\"]"),
        ..ConfigOpts::default()
    })
}

#[tokio::test]
async fn dns_nxdomain() {
    let origin = TapOrigin::start().await;
    let (dns, queries) = nxdomain_server().await;
    let proxy = TestProxy::start(&dns_config(dns), &repo_catalog(origin.port())).await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    let want = Want::deny(502, Reason::DnsFailure)
        .decision(Decided::Allow)
        .rule(UPDATE);
    assert_refusal(&proxy, &resp, &want).await;
    assert!(
        queries.load(Ordering::SeqCst) >= 1,
        "the configured resolver was asked"
    );
    origin.assert_untouched("dns nxdomain");
}

#[tokio::test]
async fn dns_resolver_that_never_answers() {
    let origin = TapOrigin::start().await;
    // A UDP socket that reads queries and never answers.
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
    let addr = udp.local_addr().expect("addr");
    let queries = Arc::new(AtomicUsize::new(0));
    let q2 = Arc::clone(&queries);
    let _silent = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while udp.recv_from(&mut buf).await.is_ok() {
            q2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let proxy = TestProxy::start(&dns_config(addr), &repo_catalog(origin.port())).await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", origin.port()),
    )
    .await;
    let want = Want::deny(504, Reason::DnsFailure)
        .decision(Decided::Allow)
        .rule(UPDATE);
    assert_refusal(&proxy, &resp, &want).await;
    assert!(
        queries.load(Ordering::SeqCst) >= 1,
        "the configured resolver was asked"
    );
    origin.assert_untouched("dns resolver that never answers");
}

#[tokio::test]
async fn upstream_connect_failed() {
    // A port with nothing listening: bind, note it, close.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &repo_catalog(port)).await;
    let resp = get(&proxy, &format!("http://repo.clearswift.net:{port}/")).await;
    let want = Want::deny(502, Reason::UpstreamConnectFailed)
        .decision(Decided::Allow)
        .rule(UPDATE);
    assert_refusal(&proxy, &resp, &want).await;
}

// === pipelining ===

#[tokio::test]
async fn pipelined_request_behind_a_refusal_is_never_forwarded() {
    let origin = TapOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "example.com"], ""),
        &repo_catalog(origin.port()),
    )
    .await;
    let req = format!(
        "GET http://example.com/ HTTP/1.1\r\nHost: x\r\n\r\n\
         GET http://repo.clearswift.net:{}/ HTTP/1.1\r\nHost: y\r\n\r\n",
        origin.port()
    );
    let raw = raw_bytes(proxy.addr, req.as_bytes()).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "exactly one response:\n{text}"
    );
    let resp = parse_response(&raw);
    let r = assert_refusal(&proxy, &resp, &Want::deny(403, Reason::NotInCatalog)).await;
    assert_eq!(r.host.as_deref(), Some("example.com"));
    assert_eq!(r.port, Some(80));
    origin.assert_untouched("pipelined request behind a refusal is never forwarded");
}

#[tokio::test]
async fn refused_connection_is_closed_by_the_proxy() {
    // raw_bytes reads until the close: make sure the close, not WAIT, ended
    // it, so the tests above really see `Connection: close` honoured.
    let proxy = TestProxy::start(&config(&["example.com"], ""), &repo_catalog(1)).await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        matches!(read, Ok(Ok(_))),
        "the proxy closes after a refusal: {read:?}"
    );
    assert_eq!(parse_response(&out).status, 403);
}

#[tokio::test]
async fn upstream_that_never_answers_times_out() {
    // `limits.response_timeout` (default 60 s) shortened for the test; the
    // origin reads the request head and then stays silent.
    let heads = Arc::new(AtomicUsize::new(0));
    let h2 = Arc::clone(&heads);
    let addr = tcp_origin(move |mut s| {
        let h = Arc::clone(&h2);
        async move {
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut b).await {
                    Ok(1) => head.push(b[0]),
                    _ => return,
                }
            }
            h.fetch_add(1, Ordering::SeqCst);
            // Hold the connection open, silent, until the proxy gives up.
            let _ = tokio::time::timeout(WAIT, s.read(&mut b)).await;
        }
    })
    .await;
    let cfg = config(
        &["repo.clearswift.net"],
        "[limits]\nresponse_timeout = \"1s\"\n",
    );
    let proxy = TestProxy::start(&cfg, &repo_catalog(addr.port())).await;
    let resp = get(
        &proxy,
        &format!("http://repo.clearswift.net:{}/", addr.port()),
    )
    .await;
    let want = Want::deny(504, Reason::Timeout)
        .decision(Decided::Allow)
        .rule(UPDATE);
    let r = assert_refusal(&proxy, &resp, &want).await;
    assert_eq!(r.upstream, Some(addr), "the vetted address was dialed");
    assert_eq!(
        heads.load(Ordering::SeqCst),
        1,
        "the origin got the request head"
    );
}
