//! What a plain-HTTP or CONNECT record says when the transaction ends
//! early or oddly: `bytes_up` is what went upstream whoever ended it
//! (client gone, upstream reset), every request read whole leaves a record
//! naming the upstream it dialled, the `url` is the request-target as
//! forwarded, and a body on a method the rule allows only without one is
//! refused before any dial.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::refusals::{assert_refusal, Want};
use crate::support::*;

const HOST: &str = "up.test";
const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A proxy allowing `up.test` on `port`, with `extra` rule keys.
async fn proxy_for(port: u16, extra: &str) -> TestProxy {
    TestProxy::start(
        &config(&[HOST], ""),
        &rule("up", &[HOST], port, "allow", extra),
    )
    .await
}

/// What a raw origin saw of one request: its request line and the body
/// bytes it read.
#[derive(Clone, Debug)]
struct Got {
    line: String,
    body: usize,
}

/// How the raw origin behaves once it has read the head.
#[derive(Clone, Copy)]
enum Then {
    /// Read the whole body, wait, then answer 200.
    AnswerAfter(Duration),
    /// Read this many body bytes, then reset the connection.
    ResetAfter(usize),
    /// Answer 200 at once, then wait and read the whole body.
    AnswerFirst(Duration),
}

/// A raw HTTP/1.1 origin that reads one request per connection and keeps
/// what it saw, keyed by nothing: tests look it up by request line.
async fn raw_origin(then: Then) -> (SocketAddr, Arc<Mutex<Vec<Got>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let addr = tcp_origin(move |mut s| {
        let seen = Arc::clone(&seen2);
        async move {
            let Some(head) = read_head_raw(&mut s).await else {
                return;
            };
            let line = head.lines().next().unwrap_or("").to_string();
            let len = content_length(&head);
            let limit = match then {
                Then::AnswerAfter(_) => len,
                Then::ResetAfter(n) => n.min(len),
                Then::AnswerFirst(delay) => {
                    let _ = s.write_all(OK).await;
                    tokio::time::sleep(delay).await;
                    len
                }
            };
            let body = read_up_to(&mut s, limit).await;
            seen.lock().unwrap().push(Got { line, body });
            match then {
                Then::AnswerAfter(delay) => {
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(OK).await;
                    let _ = s.read(&mut [0u8; 1]).await;
                }
                Then::ResetAfter(_) => reset(s),
                Then::AnswerFirst(_) => {
                    let _ = s.read(&mut [0u8; 1]).await;
                }
            }
        }
    })
    .await;
    (addr, seen)
}

fn content_length(head: &str) -> usize {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Read up to `n` bytes, stopping early at EOF or an error.
async fn read_up_to(s: &mut TcpStream, n: usize) -> usize {
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < n {
        let want = (n - got).min(buf.len());
        match tokio::time::timeout(WAIT, s.read(&mut buf[..want])).await {
            Ok(Ok(k)) if k > 0 => got += k,
            _ => break,
        }
    }
    got
}

/// Write `bytes` to the proxy on a fresh connection and close at once,
/// without reading anything.
async fn send_and_close(proxy: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    drop(s);
}

fn post(port: u16, path: &str, body_len: usize) -> Vec<u8> {
    let mut req = format!(
        "POST http://{HOST}:{port}{path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {body_len}\r\n\r\n"
    )
    .into_bytes();
    req.resize(req.len() + body_len, b'u');
    req
}

/// Wait until `f` holds, or fail after `WAIT`.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === 1. bytes_up on every path ===

#[tokio::test]
async fn upload_then_close_before_the_answer_counts_every_byte() {
    const MIB: usize = 1 << 20;
    let (origin, seen) = raw_origin(Then::AnswerAfter(Duration::from_millis(500))).await;
    let proxy = proxy_for(origin.port(), "").await;
    send_and_close(proxy.addr, &post(origin.port(), "/upload", MIB)).await;

    let r = proxy.only_record().await;
    let got = seen.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "the origin saw the upload: {got:?}");
    assert_eq!(got[0].body, MIB, "the origin read the whole body");
    assert_eq!(r.bytes_up, MIB as u64, "the record counts it: {r:#?}");
    assert_eq!(r.reason, Some(Reason::ClientClosed), "{r:#?}");
    assert_eq!(r.upstream, Some(origin), "{r:#?}");
}

#[tokio::test]
async fn upload_still_going_when_the_answer_ends_is_counted_whole() {
    // More than loopback's socket buffers hold, so that most of it is
    // still to go when the answer has been sent.
    const BODY: usize = 32 << 20;
    let (origin, seen) = raw_origin(Then::AnswerFirst(Duration::from_millis(300))).await;
    let proxy = proxy_for(origin.port(), "").await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(&post(origin.port(), "/early", BODY))
        .await
        .expect("write");
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200, "{}", resp.head);

    let r = proxy.only_record().await;
    until("the origin read the body", || {
        !seen.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(seen.lock().unwrap()[0].body, BODY, "the origin read it all");
    assert_eq!(r.bytes_up, BODY as u64, "the record counts it all: {r:#?}");
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(r.status, Some(200), "{r:#?}");
}

#[tokio::test]
async fn small_uploads_each_closed_at_once_are_each_counted() {
    const N: usize = 40;
    let (origin, seen) = raw_origin(Then::AnswerAfter(Duration::ZERO)).await;
    let proxy = proxy_for(origin.port(), "").await;
    for i in 0..N {
        let req = post(origin.port(), &format!("/p{i}"), 1000 + i);
        send_and_close(proxy.addr, &req).await;
    }
    let recs = proxy.records(N).await;
    assert_eq!(recs.len(), N, "one record per request");
    // Let the origin finish reading what the proxy sent.
    until("the origin read every upload", || {
        seen.lock().unwrap().len() == N
    })
    .await;
    let read: HashMap<String, usize> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|g| (g.line.split(' ').nth(1).unwrap_or("").to_string(), g.body))
        .collect();
    for r in &recs {
        let url = r.url.clone().unwrap_or_default();
        let path = url.rsplit_once('/').map(|(_, p)| format!("/{p}")).unwrap();
        let origin_read = read.get(&path).copied().unwrap_or(0);
        assert_eq!(
            r.bytes_up, origin_read as u64,
            "bytes_up is what the origin read for {url}: {r:#?}"
        );
        assert!(r.bytes_up > 0, "an upload never looks empty: {r:#?}");
    }
}

#[tokio::test]
async fn upstream_reset_mid_upload_keeps_what_was_sent() {
    const SENT: usize = 4 << 20;
    const READ: usize = 256 * 1024;
    let (origin, seen) = raw_origin(Then::ResetAfter(READ)).await;
    let proxy = proxy_for(origin.port(), "").await;
    let head = format!(
        "POST http://{HOST}:{}/up HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {SENT}\r\n\r\n",
        origin.port()
    );
    let out = send_with_body_while_reading(proxy.addr, head.into_bytes(), SENT).await;
    let resp = parse_response(&out);
    assert_eq!(resp.status, 502, "{}", resp.head);
    assert_eq!(resp.header("x-egress-error"), Some("upstream_reset"));

    let r = proxy.record_with(Reason::UpstreamReset).await;
    assert_eq!(
        seen.lock().unwrap()[0].body,
        READ,
        "the origin read its part"
    );
    assert!(
        r.bytes_up >= READ as u64 && r.bytes_up <= SENT as u64,
        "bytes_up counts at least what the origin read: {r:#?}"
    );
    assert_eq!(r.status, Some(502), "{r:#?}");
    assert_eq!(r.upstream, Some(origin), "{r:#?}");
}

// === 2. bodies on methods that take none ===

const GET_HEAD: &str = "methods = [\"GET\", \"HEAD\"]";

fn body_refused() -> Want {
    Want::deny(403, Reason::BodyNotAllowed).rule("up")
}

#[tokio::test]
async fn get_with_a_body_is_refused_before_any_dial() {
    for method in ["GET", "HEAD"] {
        let origin = TapOrigin::start().await;
        let proxy = proxy_for(origin.port(), GET_HEAD).await;
        let head = format!(
            "{method} http://{HOST}:{}/ HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 10000\r\n\r\n",
            origin.port()
        );
        let out = send_with_body_while_reading(proxy.addr, head.into_bytes(), 10_000).await;
        let resp = parse_response(&out);
        let r = if method == "HEAD" {
            // A HEAD answer has no body to name the id in.
            assert_eq!(resp.status, 403, "{}", resp.head);
            assert_eq!(resp.header("x-egress-error"), Some("body_not_allowed"));
            let r = proxy.only_record().await;
            assert_eq!(r.reason, Some(Reason::BodyNotAllowed), "{r:#?}");
            assert_eq!(r.status, Some(403), "{r:#?}");
            r
        } else {
            assert_refusal(&proxy, &resp, &body_refused()).await
        };
        assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some(method));
        origin.assert_untouched(&format!("{method} with a body"));
    }
}

#[tokio::test]
async fn chunked_get_is_refused_before_any_dial() {
    let origin = TapOrigin::start().await;
    let proxy = proxy_for(origin.port(), GET_HEAD).await;
    let req = format!(
        "GET http://{HOST}:{}/ HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        origin.port()
    );
    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    assert_refusal(&proxy, &resp, &body_refused()).await;
    origin.assert_untouched("a chunked GET");
}

#[tokio::test]
async fn get_with_content_length_zero_is_forwarded() {
    let origin = TapOrigin::start().await;
    let proxy = proxy_for(origin.port(), GET_HEAD).await;
    let req = format!(
        "GET http://{HOST}:{}/ HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        origin.port()
    );
    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(origin.seen().len(), 1);
    let r = proxy.only_record().await;
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(r.decision, Decided::Allow);
}

#[tokio::test]
async fn get_with_a_body_on_a_rule_without_methods_is_forwarded() {
    let origin = TapOrigin::start().await;
    let proxy = proxy_for(origin.port(), "").await;
    let req = format!(
        "GET http://{HOST}:{}/ HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        origin.port()
    );
    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    assert_eq!(resp.status, 200, "{}", resp.head);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, 5, "the body went upstream");
    let r = proxy.only_record().await;
    assert_eq!(r.bytes_up, 5, "{r:#?}");
    assert_eq!(r.reason, None, "{r:#?}");
}

// === 3. the request-target as forwarded ===

#[tokio::test]
async fn fragment_is_never_sent_and_an_empty_path_is_slash() {
    let cases = [("#frag", "/"), ("?q#f", "/?q"), ("/x#f", "/x")];
    for (suffix, sent) in cases {
        let (origin, seen) = raw_origin(Then::AnswerAfter(Duration::ZERO)).await;
        let proxy = proxy_for(origin.port(), "").await;
        let authority = format!("{HOST}:{}", origin.port());
        let req = format!(
            "GET http://{authority}{suffix} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
        );
        let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
        assert_eq!(resp.status, 200, "{suffix}: {}", resp.head);
        let line = seen.lock().unwrap()[0].line.clone();
        assert_eq!(
            line,
            format!("GET {sent} HTTP/1.1"),
            "{suffix}: sent upstream"
        );
        let r = proxy.only_record().await;
        assert_eq!(
            r.url.as_deref(),
            Some(format!("http://{authority}{sent}").as_str()),
            "{suffix}: the record shows what was sent"
        );
    }
}

// === 4. every request read whole leaves a record ===

#[tokio::test]
async fn get_then_close_always_leaves_a_record() {
    const N: usize = 100;
    let origin = HttpOrigin::start().await;
    let proxy = proxy_for(origin.port(), "").await;
    for i in 0..N {
        let req = format!(
            "GET http://{HOST}:{}/g{i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n",
            origin.port()
        );
        send_and_close(proxy.addr, req.as_bytes()).await;
    }
    let recs = proxy.exactly(N).await;
    for r in &recs {
        assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("GET"));
        assert!(r.url.is_some(), "{r:#?}");
        assert_eq!(r.decision, Decided::Allow, "{r:#?}");
        assert_eq!(
            r.upstream,
            Some(origin.addr),
            "the dial is recorded: {r:#?}"
        );
    }
}

#[tokio::test]
async fn connect_then_close_always_leaves_a_record_naming_the_upstream() {
    const N: usize = 100;
    let accepts = Arc::new(AtomicUsize::new(0));
    let accepts2 = Arc::clone(&accepts);
    let origin = tcp_origin(move |mut s| {
        accepts2.fetch_add(1, Ordering::SeqCst);
        async move {
            let _ = read_until_close(&mut s).await;
        }
    })
    .await;
    let proxy = proxy_for(origin.port(), "").await;
    let authority = format!("{HOST}:{}", origin.port());
    for _ in 0..N {
        let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        send_and_close(proxy.addr, req.as_bytes()).await;
    }
    let recs: Vec<Record> = proxy.exactly(N).await;
    until("the origin accepted every dial", || {
        accepts.load(Ordering::SeqCst) == N
    })
    .await;
    for r in &recs {
        assert_eq!(r.upstream, Some(origin), "the dial is recorded: {r:#?}");
        assert_eq!(r.status, Some(200), "what was answered: {r:#?}");
    }
}
