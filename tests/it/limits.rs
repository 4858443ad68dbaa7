//! Time-outs, caps and rate limits (issue 7): slowloris, oversized heads,
//! the per-client and global connection caps, per-client request and tunnel
//! rates, per-rule rates, per-rule methods, and bounded rate-limit state.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason};
use egress_proxy::limits::RateLimits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const UPDATE: &str = "repo.clearswift.net";
const KSN: &str = "ksn1.kaspersky-labs.com";

/// An allow rule for the update server on the HTTP origin's port, and an
/// allow rule (spliced: no CA) for KSN on the echo origin's port.
fn catalog(http_port: u16, echo_port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"{UPDATE}\"]\nports = [{http_port}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"Kaspersky KSN\"\nhosts = [\"{KSN}\"]\nports = [{echo_port}]\naction = \"allow\"\n"
    )
}

/// A GET for the update server, asking the proxy to close afterwards.
fn get_close(port: u16) -> Vec<u8> {
    format!("GET http://{UPDATE}:{port}/ HTTP/1.1\r\nHost: {UPDATE}:{port}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// A connection kept alive after one answered GET (it holds its permits).
async fn keep_alive(proxy: SocketAddr, port: u16) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(
        format!("GET http://{UPDATE}:{port}/ HTTP/1.1\r\nHost: {UPDATE}:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 200, "kept-alive GET: {}", r.head);
    s
}

/// An established spliced tunnel to the echo origin (one round trip done).
async fn tunnel(proxy: SocketAddr, echo_port: u16) -> TcpStream {
    let (status, mut s) = connect(proxy, &format!("{KSN}:{echo_port}")).await;
    assert_eq!(status, 200, "CONNECT");
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&b, b"ping");
    s
}

/// A refusal read off a fresh raw connection.
async fn refused(proxy: SocketAddr, request: &[u8]) -> RawResponse {
    parse_response(&raw_bytes(proxy, request).await)
}

/// Retry `request` on fresh connections until it gets `status` (bounded by `WAIT`).
async fn eventually(proxy: SocketAddr, request: &[u8], status: u16) -> RawResponse {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = refused(proxy, request).await;
        if r.status == status || tokio::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_refusal(r: &RawResponse, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{}{}", r.head, r.body_text());
    assert_eq!(r.header("x-egress-error"), Some(reason), "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(
        r.body_text().contains(reason),
        "body names the reason: {}",
        r.body_text()
    );
}

// === header time-out and size ===

#[tokio::test]
async fn slowloris_is_closed_by_the_header_timeout_with_a_timeout_record() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE], "[limits]\nheader_read_timeout = \"1s\"\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let me = s.local_addr().expect("local addr");
    // A head that never ends, one byte every 200 ms (slower than 1 s for the whole head).
    let head = format!(
        "GET http://{UPDATE}:{}/ HTTP/1.1\r\nHost: {UPDATE}\r\nX-Slow: {}",
        origin.port(),
        "a".repeat(200)
    );
    let (closed, sent) = drip_until_closed(&mut s, head.as_bytes()).await;
    assert!(
        closed,
        "the proxy must close a head still incomplete after 1 s (sent {sent} bytes)"
    );
    assert!(sent < head.len(), "closed before the drip ran out");

    let recs = proxy.records(1).await;
    let r = recs
        .iter()
        .find(|r| r.client == me)
        .unwrap_or_else(|| panic!("a record for the slow client {me}: {recs:#?}"));
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!(r.decision, Decided::Deny);
    assert!(origin.seen().is_empty(), "nothing reaches the origin");
}

/// Drip `head` one byte every 200 ms until the proxy closes (bounded by
/// `WAIT`); returns whether it closed and how many bytes went out.
async fn drip_until_closed(s: &mut TcpStream, head: &[u8]) -> (bool, usize) {
    let mut sent = 0usize;
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            tokio::select! {
                r = s.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return true },
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    if sent < head.len() {
                        if s.write_all(&head[sent..=sent]).await.is_err() {
                            return true;
                        }
                        sent += 1;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    (closed, sent)
}

/// A slow second head on a kept-alive connection is a head time-out too
/// (DESIGN.md: the record is written from the connection error, `timeout`),
/// not a quiet keep-alive idle close.
#[tokio::test]
async fn slowloris_after_a_first_request_is_recorded_too() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE], "[limits]\nheader_read_timeout = \"1s\"\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let mut s = keep_alive(proxy.addr, origin.port()).await;
    let me = s.local_addr().expect("local addr");
    proxy.records(1).await;
    let head = format!(
        "GET http://{UPDATE}:{}/ HTTP/1.1\r\nHost: {UPDATE}\r\nX-Slow: {}",
        origin.port(),
        "a".repeat(200)
    );
    let (closed, sent) = drip_until_closed(&mut s, head.as_bytes()).await;
    assert!(
        closed,
        "the proxy must close a stalled second head (sent {sent} bytes)"
    );
    let recs = proxy
        .audit
        .wait_for(WAIT, |r| {
            r.iter().any(|x| x.reason == Some(Reason::Timeout))
        })
        .await;
    assert!(
        recs.iter()
            .any(|r| r.client == me && r.reason == Some(Reason::Timeout)),
        "a timeout record for the partial second head from {me}: {recs:#?}"
    );
    assert_eq!(
        origin.seen().len(),
        1,
        "only the first request reached the origin"
    );
}

#[tokio::test]
async fn a_one_mib_head_gets_431_and_the_proxy_still_serves() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let proxy =
        TestProxy::start(&config(&[UPDATE], ""), &catalog(origin.port(), echo.port())).await;

    let mut req = format!(
        "GET http://{UPDATE}:{}/ HTTP/1.1\r\nHost: {UPDATE}\r\nX-Big: ",
        origin.port()
    )
    .into_bytes();
    req.extend(std::iter::repeat_n(b'a', 1024 * 1024));
    req.extend_from_slice(b"\r\n\r\n");
    // Written from a task (the proxy stops reading), the answer read here.
    let got = send_with_body_while_reading(proxy.addr, req, 0).await;
    let r = parse_response(&got);
    assert_eq!(
        r.status, 431,
        "a 1 MiB head is refused with 431: {:?}",
        r.head
    );

    let rec = proxy.record_with(Reason::HeaderTooLarge).await;
    assert_eq!(rec.status, Some(431));
    assert_eq!(rec.decision, Decided::Deny);
    assert!(
        origin.seen().is_empty(),
        "the oversized request never reaches the origin"
    );

    // Still healthy.
    let url = format!("http://{UPDATE}:{}/after", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello");
}

#[tokio::test]
async fn a_request_line_over_64_kib_is_recorded_with_the_414_hyper_sends() {
    // Only reachable with the head limit raised past hyper's URI limit.
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let proxy = TestProxy::start(
        &config(&[UPDATE], "[limits]\nmax_header_bytes = 131072\n"),
        &catalog(origin.port(), echo.port()),
    )
    .await;
    let mut req = format!("GET http://{UPDATE}:{}/", origin.port()).into_bytes();
    req.extend(std::iter::repeat_n(b'a', 70_000));
    req.extend_from_slice(format!(" HTTP/1.1\r\nHost: {UPDATE}\r\n\r\n").as_bytes());
    let r = parse_response(&raw_bytes(proxy.addr, &req).await);
    assert_eq!(r.status, 414, "{:?}", r.head);
    let rec = proxy.only_record().await;
    assert_eq!(rec.status, Some(414), "the record says what the client got");
    assert_eq!(rec.reason, Some(Reason::HeaderTooLarge));
    assert_eq!(rec.decision, Decided::Deny);
    assert!(origin.seen().is_empty());
}

// === connection caps ===

#[tokio::test]
async fn per_client_cap_refuses_a_third_kept_alive_connection_with_503() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE], "[limits]\nper_client_connections = 2\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let a = keep_alive(proxy.addr, origin.port()).await;
    let b = keep_alive(proxy.addr, origin.port()).await;
    let r = refused(proxy.addr, &get_close(origin.port())).await;
    assert_refusal(&r, 503, "connection_limit");
    let rec = proxy.record_with(Reason::ConnectionLimit).await;
    assert_eq!(rec.status, Some(503));
    assert_eq!(rec.client.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!(
        r.body_text().contains(&rec.id_string()),
        "body names the record id"
    );
    assert_eq!(
        origin.seen().len(),
        2,
        "the refused request never reaches the origin"
    );

    // Another address is not affected by this client's cap.
    let other = reqwest_from(&proxy, [127, 0, 0, 2]);
    let url = format!("http://{UPDATE}:{}/other", origin.port());
    assert_eq!(other.get(&url).send().await.expect("send").status(), 200);

    // The slot comes back when a connection closes.
    drop(a);
    let r = eventually(proxy.addr, &get_close(origin.port()), 200).await;
    assert_eq!(
        r.status, 200,
        "a slot is released when a connection closes: {}",
        r.head
    );
    drop(b);
}

#[tokio::test]
async fn per_client_cap_counts_open_tunnels() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE, KSN], "[limits]\nper_client_connections = 2\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let mut t1 = tunnel(proxy.addr, echo.port()).await;
    let t2 = tunnel(proxy.addr, echo.port()).await;
    let r = refused(proxy.addr, &get_close(origin.port())).await;
    assert_refusal(&r, 503, "connection_limit");
    let recs = proxy
        .audit
        .wait_for(WAIT, |r| {
            r.iter().any(|x| x.reason == Some(Reason::ConnectionLimit))
        })
        .await;
    assert!(
        recs.iter()
            .any(|x| x.reason == Some(Reason::ConnectionLimit) && x.status == Some(503)),
        "a connection_limit record: {recs:#?}"
    );
    // The tunnels are untouched by the refusal.
    t1.write_all(b"pong").await.expect("write");
    let mut b = [0u8; 4];
    tokio::time::timeout(WAIT, t1.read_exact(&mut b))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&b, b"pong");
    drop(t1);
    let r = eventually(proxy.addr, &get_close(origin.port()), 200).await;
    assert_eq!(
        r.status, 200,
        "a slot is released when a tunnel closes: {}",
        r.head
    );
    drop(t2);
}

#[tokio::test]
async fn global_cap_refuses_a_third_connection_with_503() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let statics = [(UPDATE, "127.0.0.1"), (KSN, "127.0.0.1")];
    let cfg = config_with(&ConfigOpts {
        statics: &statics,
        allow_private: &["127.0.0.0/8"],
        server: "max_connections = 2",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let a = keep_alive(proxy.addr, origin.port()).await;
    let t = tunnel(proxy.addr, echo.port()).await;
    // From another address too: the global cap is not per client.
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from(([127, 0, 0, 3], 0)))
        .expect("bind 127.0.0.3");
    let mut c = s.connect(proxy.addr).await.expect("connect");
    c.write_all(&get_close(origin.port())).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await;
    let r = parse_response(&out);
    assert_refusal(&r, 503, "connection_limit");
    let rec = proxy.record_with(Reason::ConnectionLimit).await;
    assert_eq!(rec.status, Some(503));
    assert_eq!(rec.client.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    assert_eq!(
        origin.seen().len(),
        1,
        "the refused request never reaches the origin"
    );

    drop(t);
    let r = eventually(proxy.addr, &get_close(origin.port()), 200).await;
    assert_eq!(
        r.status, 200,
        "a permit is released when a tunnel closes: {}",
        r.head
    );
    drop(a);
}

// === rate limits ===

/// A reqwest client through `proxy` from a chosen loopback source address.
fn reqwest_from(proxy: &TestProxy, ip: [u8; 4]) -> reqwest::Client {
    crypto();
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy url"))
        .local_address(IpAddr::from(ip))
        .timeout(WAIT)
        .build()
        .expect("client")
}

fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "429 carries Retry-After in whole seconds: {:?}",
                resp.headers()
            )
        })
}

#[tokio::test]
async fn per_client_request_rate_answers_429_with_retry_after_then_recovers() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE], "[rates]\nper_client_requests = \"2/s\"\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;
    let client = proxy.client();
    let url = format!("http://{UPDATE}:{}/", origin.port());

    for i in 0..2 {
        let resp = client.get(&url).send().await.expect("send");
        assert_eq!(resp.status(), 200, "request {i} is within the burst");
    }
    let resp = client.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 429, "the third quick request is over 2/s");
    assert_eq!(resp.headers()["x-egress-error"], "rate_limited");
    let wait = retry_after(&resp);
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    drop(resp);
    let rec = proxy.record_with(Reason::RateLimited).await;
    assert_eq!(rec.status, Some(429));
    assert_eq!(rec.decision, Decided::Deny);
    assert_eq!(rec.method.as_ref().map(|m| m.as_str()), Some("GET"));
    assert_eq!(
        origin.seen().len(),
        2,
        "the limited request never reaches the origin"
    );

    // Another client address has its own allowance.
    let other = reqwest_from(&proxy, [127, 0, 0, 2]);
    assert_eq!(other.get(&url).send().await.expect("send").status(), 200);

    // After the window, the first client is served again.
    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    let resp = client.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200, "served again after Retry-After");

    // The proxy's keyed state is swept once idle.
    assert!(proxy.handle.rate_limit_keys() >= 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    proxy.handle.sweep_rate_limits();
    assert_eq!(proxy.handle.rate_limit_keys(), 0, "idle keys are swept");
}

#[tokio::test]
async fn per_client_tunnel_rate_answers_429_to_connect_only() {
    let origin = HttpOrigin::start().await;
    let echo = echo_origin().await;
    let cfg = config(&[UPDATE, KSN], "[rates]\nper_client_tunnels = \"1/s\"\n");
    let proxy = TestProxy::start(&cfg, &catalog(origin.port(), echo.port())).await;

    let t = tunnel(proxy.addr, echo.port()).await;
    let authority = format!("{KSN}:{}", echo.port());
    let connect_req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let r = refused(proxy.addr, connect_req.as_bytes()).await;
    assert_refusal(&r, 429, "rate_limited");
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("Retry-After: {}", r.head));
    assert!(wait >= 1, "Retry-After {wait}");
    let rec = proxy.record_with(Reason::RateLimited).await;
    assert_eq!(rec.status, Some(429));
    assert_eq!(rec.method.as_ref().map(|m| m.as_str()), Some("CONNECT"));

    // Plain requests are not tunnels.
    let url = format!("http://{UPDATE}:{}/", origin.port());
    assert_eq!(
        proxy
            .client()
            .get(&url)
            .send()
            .await
            .expect("send")
            .status(),
        200
    );

    tokio::time::sleep(Duration::from_secs(wait) + Duration::from_millis(100)).await;
    let again = tunnel(proxy.addr, echo.port()).await;
    drop((t, again));
}

#[tokio::test]
async fn per_rule_rate_caps_all_clients_together() {
    let origin = HttpOrigin::start().await;
    let cat = format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"{UPDATE}\"]\nports = [{p}]\naction = \"allow\"\nrate = \"2/s\"\n\n\
         [[rule]]\nname = \"RSS Feed\"\nhosts = [\"www.clearswift.com\"]\nports = [{p}]\naction = \"allow\"\n",
        p = origin.port()
    );
    let proxy = TestProxy::start(&config(&[UPDATE, "www.clearswift.com"], ""), &cat).await;
    let url = format!("http://{UPDATE}:{}/", origin.port());

    // Three different client addresses: the rule's rate is shared.
    let mut statuses = Vec::new();
    for ip in [[127, 0, 0, 2], [127, 0, 0, 3], [127, 0, 0, 4]] {
        let resp = reqwest_from(&proxy, ip)
            .get(&url)
            .send()
            .await
            .expect("send");
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert_eq!(resp.headers()["x-egress-error"], "rate_limited");
            assert!(retry_after(&resp) >= 1);
        }
    }
    assert_eq!(
        statuses,
        [200, 200, 429],
        "rate = \"2/s\" on the rule, across clients"
    );
    let rec = proxy.record_with(Reason::RateLimited).await;
    assert_eq!(rec.status, Some(429));
    assert_eq!(rec.rule.as_deref(), Some("Clearswift Update Server"));
    assert_eq!(rec.client.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)));

    // Another rule is not limited.
    let rss = format!("http://www.clearswift.com:{}/", origin.port());
    for _ in 0..3 {
        assert_eq!(
            proxy
                .client()
                .get(&rss)
                .send()
                .await
                .expect("send")
                .status(),
            200
        );
    }
}

// === per-rule methods ===

#[tokio::test]
async fn methods_on_a_rule_refuse_post_with_method_not_allowed() {
    let origin = HttpOrigin::start().await;
    let cat = format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"{UPDATE}\"]\nports = [{}]\naction = \"allow\"\nmethods = [\"GET\", \"HEAD\"]\n",
        origin.port()
    );
    let proxy = TestProxy::start(&config(&[UPDATE], ""), &cat).await;
    let client = proxy.client();
    let url = format!("http://{UPDATE}:{}/echo", origin.port());

    let resp = client
        .post(&url)
        .body("exfiltrated")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-egress-error"], "method_not_allowed");
    let recs = proxy.records(1).await;
    let r = &recs[0];
    assert_eq!(r.reason, Some(Reason::MethodNotAllowed));
    assert_eq!(r.status, Some(403));
    assert_eq!(r.decision, Decided::Deny);
    assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("POST"));
    assert_eq!(r.rule.as_deref(), Some("Clearswift Update Server"));
    assert!(
        origin.seen().is_empty(),
        "the POST never reaches the origin"
    );

    let resp = client.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200, "GET passes");
    let resp = client.head(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200, "HEAD passes");
    let seen: Vec<String> = origin.seen().into_iter().map(|s| s.method).collect();
    assert_eq!(seen, ["GET", "HEAD"]);

    // Without inspection a tunnel would carry any method past the limit.
    let (status, _s) = connect(proxy.addr, &format!("{UPDATE}:{}", origin.port())).await;
    assert_eq!(status, 403, "CONNECT to a rule limited to GET/HEAD (no CA)");
    let recs = proxy.records(4).await;
    assert_eq!(recs[3].reason, Some(Reason::MethodNotAllowed));
    assert_eq!(recs[3].method.as_ref().map(|m| m.as_str()), Some("CONNECT"));
}

// === bounded rate-limit state ===

#[tokio::test]
async fn rate_limit_state_is_bounded_after_100k_distinct_clients() {
    let (settings, _dir) = load(
        &config(&[], "[rates]\nper_client_requests = \"1000/s\"\n"),
        &catalog(8080, 8443),
    );
    let rates = RateLimits::new(&settings);
    const N: u32 = 100_000;
    for round in 0..2 {
        for i in 0..N {
            let ip = if i % 2 == 0 {
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
            } else {
                IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)))
            };
            assert!(rates.request(ip).is_ok(), "first request of {ip} passes");
        }
        assert_eq!(
            rates.keys(),
            N as usize,
            "round {round}: one key per client"
        );
        // Past the time the quota needs to refill, every key is idle.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        rates.sweep();
        assert_eq!(rates.keys(), 0, "round {round}: idle keys are dropped");
    }
}
