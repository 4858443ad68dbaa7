//! Inside an inspected tunnel, the same wall as outside: the inner request
//! must name the tunnel's host (one `Host`, no other authority), and is
//! admitted, refused and recorded as its plain-HTTP twin would be (rates,
//! head size, body on a body-less method, user and upstream in the record,
//! hyper's own refusals), and a client that speaks only HTTP/2 is told why.
use std::sync::Arc;

use egress_proxy::audit::{Decided, Reason, Record};
use rustls::pki_types::pem::PemObject;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::inspect::{inspecting_config_with, start_in, HOST};
use crate::support::*;

/// A proxy inspecting `HOST` on a fresh TLS origin's port, with `rule`
/// lines added to its rule and `extra` config sections.
async fn setup(rule: &str, extra: &str) -> (TestProxy, TlsOrigin) {
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        rule,
        origin.addr.port(),
        extra,
    );
    (start_in(dir, &cfg, &catalog).await, origin)
}

/// TLS to the proxy trusting only its CA, offering `alpn`.
fn tls_config(proxy: &TestProxy, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    crypto();
    let ca =
        rustls::pki_types::CertificateDer::from_pem_file(proxy.dir.path().join("certs/ca.pem"))
            .expect("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("root");
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(tls)
}

/// CONNECT `HOST:port` (with `extra` header lines) and terminate TLS with
/// the proxy's leaf.
async fn tunnel_with(proxy: &TestProxy, port: u16, extra: &str) -> TlsStream<TcpStream> {
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let head = format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}\r\n");
    s.write_all(head.as_bytes()).await.expect("write");
    let answer = read_head(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio_rustls::TlsConnector::from(tls_config(proxy, &[b"http/1.1"]))
        .connect(HOST.try_into().expect("name"), s)
        .await
        .expect("handshake with the proxy's leaf")
}

async fn tunnel(proxy: &TestProxy, port: u16) -> TlsStream<TcpStream> {
    tunnel_with(proxy, port, "").await
}

/// Send `request` on `s` and read one response.
async fn ask(s: &mut TlsStream<TcpStream>, request: &str) -> RawResponse {
    s.write_all(request.as_bytes()).await.expect("write");
    read_response(s).await
}

/// A refusal as DESIGN.md has it: status, reason header, close, record id.
fn assert_refused(resp: &RawResponse, status: u16, reason: &str, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", resp.head);
    assert_eq!(resp.header("x-egress-error"), Some(reason), "{what}");
    assert_eq!(resp.header("connection"), Some("close"), "{what}");
    assert!(
        resp.body_text().contains("id: "),
        "{what}: {}",
        resp.body_text()
    );
}

fn inner_with(recs: &[Record], reason: Reason) -> Vec<&Record> {
    recs.iter()
        .filter(|r| r.method.as_ref().is_some_and(|m| m != "CONNECT") && r.reason == Some(reason))
        .collect()
}

#[tokio::test]
async fn an_inner_request_must_name_the_tunnel_host_and_only_it() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let me = format!("{HOST}:{port}");
    let cases = [
        (
            "Host differs, origin-form",
            "GET /abs HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_string(),
        ),
        (
            "URL right, Host wrong",
            format!("GET https://{me}/abs HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
        ),
        (
            "URL wrong, Host right",
            format!("GET https://evil.test/abs HTTP/1.1\r\nHost: {me}\r\n\r\n"),
        ),
        (
            "two Host headers",
            format!("GET /abs HTTP/1.1\r\nHost: {me}\r\nHost: evil.test\r\n\r\n"),
        ),
        (
            "no port means 443, not the tunnel's port",
            format!("GET /abs HTTP/1.1\r\nHost: {HOST}\r\n\r\n"),
        ),
    ];
    for (what, request) in &cases {
        let mut s = tunnel(&proxy, port).await;
        let resp = ask(&mut s, request).await;
        assert_refused(&resp, 403, "host_mismatch", what);
    }
    let recs = proxy
        .audit
        .wait_for(WAIT, |r| {
            inner_with(r, Reason::HostMismatch).len() >= cases.len()
        })
        .await;
    let refused = inner_with(&recs, Reason::HostMismatch);
    assert_eq!(refused.len(), cases.len(), "one record each: {recs:#?}");
    for r in refused {
        assert_eq!((r.status, r.decision), (Some(403), Decided::Deny));
        assert_eq!(r.url.as_deref(), Some(format!("https://{me}/abs").as_str()));
    }
    assert!(
        origin.seen().is_empty(),
        "the origin saw {:?}",
        origin.seen()
    );
}

#[tokio::test]
async fn accepted_spellings_reach_the_origin_with_the_proxys_own_host() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let me = format!("{HOST}:{port}");
    let upper = format!("{}:{port}", HOST.to_ascii_uppercase());
    let dotted = format!("{HOST}.:{port}");
    let requests = [
        format!("GET /x HTTP/1.1\r\nHost: {upper}\r\n\r\n"),
        format!("GET /x HTTP/1.1\r\nHost: {dotted}\r\n\r\n"),
        format!("GET https://{dotted}/x HTTP/1.1\r\nHost: {upper}\r\n\r\n"),
    ];
    let mut s = tunnel(&proxy, port).await;
    for request in &requests {
        let resp = ask(&mut s, request).await;
        assert_eq!(resp.status, 200, "{request}: {}", resp.head);
    }
    let seen = origin.seen();
    assert_eq!(seen.len(), requests.len());
    for req in &seen {
        let hosts: Vec<&str> = req
            .headers
            .iter()
            .filter(|(n, _)| n == "host")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(hosts, [me.as_str()], "the proxy writes Host itself");
        assert_eq!(req.uri, "/x", "origin-form upstream");
    }
    drop(s);
    let recs = proxy.records(requests.len() + 1).await;
    let urls: Vec<_> = recs.iter().filter_map(|r| r.url.clone()).collect();
    assert_eq!(urls, vec![format!("https://{me}/x"); requests.len()]);
}

#[tokio::test]
async fn host_is_checked_on_a_rule_with_a_client_certificate() {
    let leaf = rcgen::generate_simple_self_signed(vec!["gateway.example".to_string()])
        .expect("client cert");
    let rule = "client_cert = { cert = \"client.pem\", key = \"client.key\" }\n";
    let origin = TlsOrigin::start(HOST).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("client.pem"), leaf.cert.pem()).expect("cert");
    std::fs::write(
        dir.path().join("client.key"),
        leaf.signing_key.serialize_pem(),
    )
    .expect("key");
    let (cfg, catalog) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        rule,
        origin.addr.port(),
        "",
    );
    let proxy = start_in(dir, &cfg, &catalog).await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let request = format!("GET https://{HOST}:{port}/licence HTTP/1.1\r\nHost: evil.test\r\n\r\n");
    let resp = ask(&mut s, &request).await;
    assert_refused(&resp, 403, "host_mismatch", "fronting with our certificate");
    proxy.record_with(Reason::HostMismatch).await;
    assert!(
        origin.seen().is_empty(),
        "the origin saw {:?}",
        origin.seen()
    );
}

#[tokio::test]
async fn inner_requests_count_against_the_client_and_rule_rates() {
    for (rule, extra) in [
        ("", "[rates]\nper_client_requests = \"3/m\"\n"),
        ("rate = \"3/m\"\n", ""),
    ] {
        let (proxy, origin) = setup(rule, extra).await;
        let port = origin.addr.port();
        let mut s = tunnel(&proxy, port).await;
        let get = format!("GET /r HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n");
        // The CONNECT was the first of three; two inner requests pass.
        for _ in 0..2 {
            assert_eq!(ask(&mut s, &get).await.status, 200, "{rule}{extra}");
        }
        let resp = ask(&mut s, &get).await;
        assert_refused(&resp, 429, "rate_limited", &format!("{rule}{extra}"));
        assert!(resp.header("retry-after").is_some(), "{}", resp.head);
        let r = proxy.record_with(Reason::RateLimited).await;
        assert_eq!((r.status, r.decision), (Some(429), Decided::Deny));
        assert_eq!(
            r.url.as_deref(),
            Some(format!("https://{HOST}:{port}/r").as_str())
        );
        assert_eq!(origin.seen().len(), 2, "{rule}{extra}");
    }
}

#[tokio::test]
async fn an_oversized_inner_head_is_header_too_large() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let big = "a".repeat(200 * 1024);
    let request = format!("GET /big HTTP/1.1\r\nHost: {HOST}:{port}\r\nX-Big: {big}\r\n\r\n");
    let resp = ask(&mut s, &request).await;
    assert_eq!(resp.status, 431, "{}", resp.head);
    let r = proxy.record_with(Reason::HeaderTooLarge).await;
    assert_eq!(r.status, Some(431));
    assert_eq!(r.host.as_deref(), Some(HOST));
    drop(s);
    let recs = proxy.records(2).await;
    assert!(
        recs.iter()
            .any(|r| r.method.as_ref().is_some_and(|m| m == "CONNECT")
                && r.reason == Some(Reason::HeaderTooLarge)),
        "the tunnel record says why it ended: {recs:#?}"
    );
    assert!(
        origin.seen().is_empty(),
        "the origin saw {:?}",
        origin.seen()
    );
}

#[tokio::test]
async fn inner_records_carry_the_user_and_the_upstream() {
    use base64::Engine;
    let phc = egress_proxy::auth::hash_password("pw").expect("hash");
    let auth = format!("[auth]\nusers = {{ gateway = '{phc}' }}\n");
    let (proxy, origin) = setup("", &auth).await;
    let port = origin.addr.port();
    let basic = base64::engine::general_purpose::STANDARD.encode("gateway:pw");
    let mut s = tunnel_with(
        &proxy,
        port,
        &format!("Proxy-Authorization: Basic {basic}\r\n"),
    )
    .await;
    let resp = ask(
        &mut s,
        &format!("GET /u HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
    )
    .await;
    assert_eq!(resp.status, 200);
    let recs = proxy.records(1).await;
    let r = &recs[0];
    assert!(r.url.is_some(), "{r:#?}");
    assert_eq!(r.user.as_deref(), Some("gateway"));
    assert_eq!(r.upstream, Some(origin.addr));
}

#[tokio::test]
async fn an_inner_head_hyper_refuses_is_recorded_as_bad_request() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let request = format!(
        "POST /te HTTP/1.1\r\nHost: {HOST}:{port}\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello"
    );
    let resp = ask(&mut s, &request).await;
    assert_eq!(resp.status, 400, "{}", resp.head);
    drop(s);
    let recs = proxy
        .audit
        .wait_for(WAIT, |r| {
            r.iter()
                .filter(|x| x.reason == Some(Reason::BadRequest))
                .count()
                >= 2
        })
        .await;
    let bad: Vec<_> = recs
        .iter()
        .filter(|r| r.reason == Some(Reason::BadRequest))
        .collect();
    assert_eq!(bad.len(), 2, "the inner record and the tunnel's: {recs:#?}");
    assert!(bad
        .iter()
        .any(|r| r.status == Some(400) && r.host.as_deref() == Some(HOST)));
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_malformed_chunked_inner_body_is_bad_request() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let request = format!(
        "POST /c HTTP/1.1\r\nHost: {HOST}:{port}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
    );
    let resp = ask(&mut s, &request).await;
    assert_refused(&resp, 400, "bad_request", "bad chunk");
    let r = proxy.record_with(Reason::BadRequest).await;
    assert_eq!(r.status, Some(400));
    assert!(r.url.is_some(), "{r:#?}");
}

#[tokio::test]
async fn a_body_on_get_is_refused_on_a_rule_with_methods() {
    let (proxy, origin) = setup("methods = [\"GET\", \"HEAD\"]\n", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let request =
        format!("GET /b HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 5\r\n\r\nhello");
    let resp = ask(&mut s, &request).await;
    assert_refused(&resp, 403, "body_not_allowed", "GET with a body");
    let r = proxy.record_with(Reason::BodyNotAllowed).await;
    assert_eq!((r.status, r.decision), (Some(403), Decided::Deny));
    assert!(
        origin.seen().is_empty(),
        "the origin saw {:?}",
        origin.seen()
    );
}

#[tokio::test]
async fn bytes_up_counts_what_went_upstream_when_the_client_vanishes() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let head =
        format!("POST /up HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: 100000\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("head");
    s.write_all(&[b'u'; 40_000])
        .await
        .expect("part of the body");
    s.flush().await.expect("flush");
    // Let the part reach the upstream before the client vanishes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(s);
    let r = proxy.record_with(Reason::ClientClosed).await;
    assert!(r.url.is_some(), "the inner record: {r:#?}");
    assert!(
        r.bytes_up > 0 && r.bytes_up <= 40_000,
        "bytes_up {} counts the part sent",
        r.bytes_up
    );
}

#[tokio::test]
async fn a_fragment_is_never_sent_nor_recorded() {
    let (proxy, origin) = setup("", "").await;
    let port = origin.addr.port();
    let mut s = tunnel(&proxy, port).await;
    let resp = ask(
        &mut s,
        &format!("GET /f?q=1#secret HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n"),
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(origin.seen()[0].uri, "/f?q=1");
    drop(s);
    let recs = proxy.records(1).await;
    assert_eq!(
        recs[0].url.as_deref(),
        Some(format!("https://{HOST}:{port}/f?q=1").as_str())
    );
}

#[tokio::test]
async fn a_client_offering_only_h2_is_told_and_recorded_alpn_unsupported() {
    let (proxy, origin) = setup("", "").await;
    let (status, s) = connect(proxy.addr, &format!("{HOST}:{}", origin.addr.port())).await;
    assert_eq!(status, 200);
    let err = tokio_rustls::TlsConnector::from(tls_config(&proxy, &[b"h2"]))
        .connect(HOST.try_into().expect("name"), s)
        .await
        .expect_err("no protocol in common");
    assert!(
        err.to_string().contains("NoApplicationProtocol"),
        "a no_application_protocol alert: {err}"
    );
    let r = proxy.record_with(Reason::AlpnUnsupported).await;
    assert_eq!((r.status, r.decision), (Some(200), Decided::Deny));
    assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("CONNECT"));
    assert!(origin.seen().is_empty());
}
