//! Broken upstreams and vanishing clients: a reset or a close in the middle
//! of a response, a response shorter or longer than its Content-Length, an
//! upstream that accepts and never answers (or stalls half-way), garbage
//! instead of a response, and clients that vanish mid-tunnel or mid-body.
//!
//! Each: the right status where one can still be sent (a truncated response
//! is never padded into a clean 200), exactly one record with the right
//! reason and byte counts, upstream sockets closed, and the proxy keeps
//! serving. NXDOMAIN, a resolver that never answers and a refused connection
//! are in `refusals.rs` (HTTP) and `connect.rs` (CONNECT).
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const REPO: &str = "repo.clearswift.net";
const RULE: &str = "Clearswift updates";
const GOOD: &str = "good.clearswift.net";
const GOOD_RULE: &str = "a healthy origin";

/// A raw origin and what happened to its connections.
struct Raw {
    addr: SocketAddr,
    /// Connections accepted.
    accepts: Arc<AtomicUsize>,
    /// Connections that saw EOF or an error from the proxy's side.
    closed: Arc<AtomicUsize>,
}

impl Raw {
    /// Run `f` on each connection; counts accepts, and counts a close once
    /// `f` returns `true` ("the proxy closed this connection").
    async fn start<F, Fut>(f: F) -> Raw
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let accepts = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (Arc::clone(&accepts), Arc::clone(&closed));
        let f = Arc::new(f);
        let addr = tcp_origin(move |s| {
            a.fetch_add(1, Ordering::SeqCst);
            let (f, c) = (Arc::clone(&f), Arc::clone(&c));
            async move {
                if f(s).await {
                    c.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .await;
        Raw {
            addr,
            accepts,
            closed,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Wait until `n` connections were closed by the proxy.
    async fn closed_by_proxy(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.closed.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the proxy did not close its upstream connection ({} of {n})",
                self.closed.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Read from `s` until EOF or an error; true when it came (bounded by `WAIT`).
async fn until_eof(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// A proxy allowing `repo.clearswift.net` on `port` and a healthy origin
/// (for "the proxy keeps serving") as `good.clearswift.net`; `extra`
/// sections appended to the config.
struct Bench {
    proxy: TestProxy,
    good: HttpOrigin,
}

impl Bench {
    /// A raw client connection that has sent `GET path` for `port`.
    async fn send_get(&self, port: u16, path: &str) -> TcpStream {
        let mut s = TcpStream::connect(self.proxy.addr).await.expect("connect");
        s.write_all(get(port, path).as_bytes())
            .await
            .expect("write");
        s
    }

    async fn start(port: u16, extra: &str) -> Bench {
        let good = HttpOrigin::start().await;
        let catalog = format!(
            "[[rule]]\nname = \"{RULE}\"\nhosts = [\"{REPO}\"]\nports = [{port}]\naction = \"allow\"\n\n\
             [[rule]]\nname = \"{GOOD_RULE}\"\nhosts = [\"{GOOD}\"]\nports = [{}]\naction = \"allow\"\n",
            good.port()
        );
        let proxy = TestProxy::start(&config(&[REPO, GOOD], extra), &catalog).await;
        Bench { proxy, good }
    }

    /// A normal request through the proxy works and is the `n`th record.
    async fn still_serves(&self, what: &str, n: usize) {
        let url = format!("http://{GOOD}:{}/after", self.good.port());
        let resp = self.proxy.client().get(&url).send().await.expect("send");
        assert_eq!(resp.status(), 200, "{what}");
        assert_eq!(resp.text().await.expect("body"), "hello", "{what}");
        let recs = self.proxy.exactly(n).await;
        let last = &recs[n - 1];
        assert_eq!(
            (last.status, last.reason, last.rule.as_deref()),
            (Some(200), None, Some(GOOD_RULE)),
            "{what}: {last:#?}"
        );
    }

    /// Every task of the proxy (client connections, upstream connections,
    /// tunnels) has ended.
    async fn idle(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.proxy.handle.open_connections() > 0 {
            assert!(
                Instant::now() < deadline,
                "{what}: {} proxy tasks still open",
                self.proxy.handle.open_connections()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A kept-alive GET for `path` on `repo.clearswift.net:port`.
fn get(port: u16, path: &str) -> String {
    format!("GET http://{REPO}:{port}{path} HTTP/1.1\r\nHost: {REPO}:{port}\r\n\r\n")
}

fn assert_record(r: &Record, what: &str, status: u16, reason: Option<Reason>, up: u64, down: u64) {
    assert_eq!(
        (r.status, r.reason, r.decision, r.rule.as_deref()),
        (Some(status), reason, Decided::Allow, Some(RULE)),
        "{what}: {r:#?}"
    );
    assert_eq!((r.bytes_up, r.bytes_down), (up, down), "{what}: {r:#?}");
}

/// The head of a response with `Content-Length: len`.
fn head(len: usize) -> String {
    format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Type: application/octet-stream\r\n\r\n")
}

// ================================================================ truncated responses

/// An origin that answers with a head promising 100000 bytes, sends 1000,
/// waits until they are surely relayed, then resets the connection.
async fn resetting_origin() -> Raw {
    Raw::start(|mut s| async move {
        if read_head_raw(&mut s).await.is_none() {
            return false;
        }
        let _ = s.write_all(head(100_000).as_bytes()).await;
        let _ = s.write_all(&[b'a'; 1000]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        reset(s);
        false
    })
    .await
}

#[tokio::test]
async fn a_reset_in_the_middle_of_a_response_is_never_padded_into_a_clean_200() {
    let origin = resetting_origin().await;
    let b = Bench::start(origin.port(), "").await;

    // A raw client: the head (200, the upstream's length) and the 1000
    // bytes, then the connection ends short of the promised length.
    let mut s = b.send_get(origin.port(), "/reset").await;
    let (out, ended) = read_until_close(&mut s).await;
    assert!(ended.is_some(), "the proxy ended the client connection");
    let resp = parse_response(&out);
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(
        resp.header("content-length"),
        Some("100000"),
        "{}",
        resp.head
    );
    assert_eq!(resp.body.len(), 1000, "only what the upstream sent arrives");
    assert!(resp.body.iter().all(|&c| c == b'a'));
    let recs = b.proxy.exactly(1).await;
    assert_record(&recs[0], "raw", 200, Some(Reason::UpstreamReset), 0, 1000);
    assert_eq!(recs[0].upstream, Some(origin.addr), "{:#?}", recs[0]);

    // reqwest: the body read fails; it never sees a complete response.
    let url = format!("http://{REPO}:{}/reset", origin.port());
    let resp = b
        .proxy
        .client()
        .get(&url)
        .send()
        .await
        .expect("head arrives");
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await;
    assert!(
        body.is_err(),
        "a truncated body must fail, got {:?} bytes",
        body.map(|b| b.len())
    );
    let recs = b.proxy.exactly(2).await;
    assert_record(
        &recs[1],
        "reqwest",
        200,
        Some(Reason::UpstreamReset),
        0,
        1000,
    );

    b.still_serves("after a reset", 3).await;
    b.idle("after a reset").await;
}

/// The origin closes cleanly (FIN) after 5000 of 10000 promised bytes.
#[tokio::test]
async fn a_response_shorter_than_its_content_length_fails_the_client() {
    let origin = Raw::start(|mut s| async move {
        if read_head_raw(&mut s).await.is_none() {
            return false;
        }
        let _ = s.write_all(head(10_000).as_bytes()).await;
        let _ = s.write_all(&[b'b'; 5000]).await;
        let _ = s.shutdown().await;
        until_eof(&mut s).await
    })
    .await;
    let b = Bench::start(origin.port(), "").await;

    let url = format!("http://{REPO}:{}/short", origin.port());
    let resp = b
        .proxy
        .client()
        .get(&url)
        .send()
        .await
        .expect("head arrives");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.content_length(), Some(10_000));
    let body = resp.bytes().await;
    assert!(
        body.is_err(),
        "a short body must fail, got {:?} bytes",
        body.map(|b| b.len())
    );
    let recs = b.proxy.exactly(1).await;
    assert_record(
        &recs[0],
        "reqwest",
        200,
        Some(Reason::UpstreamReset),
        0,
        5000,
    );

    let mut s = b.send_get(origin.port(), "/short").await;
    let (out, ended) = read_until_close(&mut s).await;
    assert!(ended.is_some(), "the proxy ended the client connection");
    let resp = parse_response(&out);
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(
        resp.body.len(),
        5000,
        "closed before the promised 10000 bytes"
    );
    let recs = b.proxy.exactly(2).await;
    assert_record(&recs[1], "raw", 200, Some(Reason::UpstreamReset), 0, 5000);

    origin.closed_by_proxy(2).await;
    b.still_serves("after a short body", 3).await;
    b.idle("after a short body").await;
}

/// The origin closes (or resets) before any response head: 502
/// `upstream_reset`; garbage instead of a head is the same.
#[tokio::test]
async fn an_upstream_that_fails_before_the_head_gets_502() {
    for (what, answer) in [
        ("close", None),
        ("reset", Some(&b""[..])),
        ("not HTTP", Some(&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..])),
        (
            "a bad status line",
            Some(&b"HTTP/1.1 two hundred OK\r\n\r\n"[..]),
        ),
        (
            "a bad content-length",
            Some(&b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello"[..]),
        ),
    ] {
        let origin = Raw::start(move |mut s| async move {
            if read_head_raw(&mut s).await.is_none() {
                return false;
            }
            match answer {
                None => {
                    let _ = s.shutdown().await;
                    until_eof(&mut s).await
                }
                Some(b"") => {
                    reset(s);
                    false
                }
                Some(bytes) => {
                    let _ = s.write_all(bytes).await;
                    until_eof(&mut s).await
                }
            }
        })
        .await;
        let b = Bench::start(origin.port(), "").await;
        let mut s = b.send_get(origin.port(), "/").await;
        let (out, ended) = read_until_close(&mut s).await;
        assert!(ended.is_some(), "{what}: closed after the refusal");
        let resp = parse_response(&out);
        assert_eq!(resp.status, 502, "{what}: {}", resp.head);
        assert_eq!(
            resp.header("x-egress-error"),
            Some("upstream_reset"),
            "{what}: {}",
            resp.head
        );
        let recs = b.proxy.exactly(1).await;
        assert_record(&recs[0], what, 502, Some(Reason::UpstreamReset), 0, 0);
        assert_eq!(
            recs[0].upstream,
            Some(origin.addr),
            "{what}: {:#?}",
            recs[0]
        );
        let dialled = origin.accepts.load(Ordering::SeqCst);
        assert_eq!(dialled, 1, "{what}: dialled once, no retry");
        b.still_serves(what, 2).await;
        b.idle(what).await;
    }
}

// ================================================================ too long

/// What the long origin answered, per connection, in order.
type Answers = Arc<Mutex<Vec<(usize, String)>>>;

/// An origin that answers `/long` with `hello` plus, past its
/// Content-Length, a whole second response (`smuggled`), sent `delay` after
/// the body (or with it); anything else with `genuine`.
async fn long_origin(delay: Option<Duration>) -> (Raw, Answers) {
    let answers: Answers = Arc::default();
    let conn_ids = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&answers);
    let raw = Raw::start(move |mut s| {
        let answers = Arc::clone(&a);
        let conn = conn_ids.fetch_add(1, Ordering::SeqCst);
        async move {
            while let Some(h) = read_head_raw(&mut s).await {
                let path = h.split(' ').nth(1).unwrap_or("").to_string();
                answers.lock().expect("answers").push((conn, path.clone()));
                let extra = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled";
                let ok = if path == "/long" {
                    match delay {
                        None => {
                            s.write_all(format!("{}hello{extra}", head(5)).as_bytes())
                                .await
                        }
                        Some(d) => {
                            let _ = s.write_all(format!("{}hello", head(5)).as_bytes()).await;
                            tokio::time::sleep(d).await;
                            s.write_all(extra.as_bytes()).await
                        }
                    }
                } else {
                    s.write_all(format!("{}genuine", head(7)).as_bytes()).await
                };
                if ok.is_err() {
                    return true;
                }
            }
            true
        }
    })
    .await;
    (raw, answers)
}

/// Bytes past the Content-Length never reach the client, as part of the
/// body or as a second response: the next request on the same client
/// connection gets the origin's real answer (or a clean close).
#[tokio::test]
async fn a_response_longer_than_its_content_length_never_leaks_the_excess() {
    for delay in [None, Some(Duration::from_millis(100))] {
        let what = format!("excess sent {delay:?} after the body");
        let (origin, answers) = long_origin(delay).await;
        let b = Bench::start(origin.port(), "").await;
        let mut s = b.send_get(origin.port(), "/long").await;
        let first = read_response(&mut s).await;
        assert_eq!(
            (first.status, first.body_text().as_str()),
            (200, "hello"),
            "{what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;

        s.write_all(get(origin.port(), "/next").as_bytes())
            .await
            .expect("write");
        let (rest, ended) = read_until_close_or_quiet(&mut s).await;
        let text = String::from_utf8_lossy(&rest).into_owned();
        assert!(
            !text.contains("smuggled"),
            "{what}: the excess reached the client: {text}"
        );
        if rest.is_empty() {
            assert!(ended, "{what}: neither an answer nor a close");
        } else {
            let second = parse_response(&rest);
            assert_eq!(
                (second.status, second.body_text().as_str()),
                (200, "genuine"),
                "{what}: {text}"
            );
        }
        let recs = b.proxy.records(1).await;
        assert_record(&recs[0], &what, 200, None, 0, 5);
        if !rest.is_empty() {
            let recs = b.proxy.exactly(2).await;
            assert_record(&recs[1], &what, 200, None, 0, 7);
            let answers = answers.lock().expect("answers").clone();
            assert_eq!(answers.len(), 2, "{what}: {answers:?}");
            assert_ne!(
                answers[0].0, answers[1].0,
                "{what}: the poisoned connection was reused: {answers:?}"
            );
        }
        let n = b.proxy.audit.records().len();
        b.still_serves(&what, n + 1).await;
    }
}

/// Read what arrives until the peer closes (true) or nothing more comes for
/// a second (false).
async fn read_until_close_or_quiet(s: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

// ================================================================ silent upstreams

/// An origin that reads the request and never answers; counts a close when
/// the proxy hangs up.
async fn silent_origin() -> Raw {
    Raw::start(|mut s| async move { until_eof(&mut s).await }).await
}

#[tokio::test]
async fn an_upstream_that_never_answers_gets_504_after_the_response_timeout() {
    let origin = silent_origin().await;
    let b = Bench::start(origin.port(), "[limits]\nresponse_timeout = \"1s\"\n").await;
    let started = Instant::now();
    let mut s = b.send_get(origin.port(), "/silent").await;
    let (out, ended) = read_until_close(&mut s).await;
    let took = started.elapsed();
    assert!(ended.is_some(), "closed after the refusal");
    let resp = parse_response(&out);
    assert_eq!(resp.status, 504, "{}", resp.head);
    assert_eq!(
        resp.header("x-egress-error"),
        Some("timeout"),
        "{}",
        resp.head
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let recs = b.proxy.exactly(1).await;
    assert_record(&recs[0], "silent", 504, Some(Reason::Timeout), 0, 0);
    assert_eq!(recs[0].upstream, Some(origin.addr), "{:#?}", recs[0]);
    origin.closed_by_proxy(1).await;
    b.still_serves("after a silent upstream", 2).await;
    b.idle("after a silent upstream").await;
}

/// The upstream sends a head and part of the body, then stalls; the client
/// gives up. The record says `client_closed` with the bytes relayed, and
/// the proxy hangs up on the upstream too.
#[tokio::test]
async fn a_client_that_gives_up_on_a_stalled_body_frees_the_upstream() {
    let origin = Raw::start(|mut s| async move {
        if read_head_raw(&mut s).await.is_none() {
            return false;
        }
        let _ = s.write_all(head(100_000).as_bytes()).await;
        let _ = s.write_all(&[b'c'; 1000]).await;
        until_eof(&mut s).await
    })
    .await;
    let b = Bench::start(origin.port(), "").await;
    let mut s = b.send_get(origin.port(), "/stall").await;
    let h = read_head(&mut s).await;
    assert!(h.starts_with("HTTP/1.1 200 "), "{h}");
    let mut body = [0u8; 1000];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("in time")
        .expect("body");
    drop(s);
    let recs = b.proxy.exactly(1).await;
    assert_record(
        &recs[0],
        "stalled",
        200,
        Some(Reason::ClientClosed),
        0,
        1000,
    );
    origin.closed_by_proxy(1).await;
    b.still_serves("after a stalled body", 2).await;
    b.idle("after a stalled body").await;
}

// ================================================================ vanishing clients

/// A CONNECT to `repo.clearswift.net:port` answered 200.
async fn tunnel(proxy: &TestProxy, port: u16) -> TcpStream {
    let (status, s) = connect(proxy.addr, &format!("{REPO}:{port}")).await;
    assert_eq!(status, 200);
    s
}

async fn echo_100(s: &mut TcpStream) {
    s.write_all(&[b'e'; 100]).await.expect("write");
    let mut back = [0u8; 100];
    tokio::time::timeout(WAIT, s.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("echo");
}

#[tokio::test]
async fn a_client_that_vanishes_mid_tunnel() {
    let origin = Raw::start(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        true
    })
    .await;
    let b = Bench::start(origin.port(), "").await;

    // A clean close (FIN): the tunnel ends cleanly, counts exact.
    let mut s = tunnel(&b.proxy, origin.port()).await;
    echo_100(&mut s).await;
    drop(s);
    let recs = b.proxy.exactly(1).await;
    assert_record(&recs[0], "FIN", 200, None, 100, 100);
    origin.closed_by_proxy(1).await;

    // A reset (the client host died): `client_closed`, counts exact.
    let mut s = tunnel(&b.proxy, origin.port()).await;
    echo_100(&mut s).await;
    reset(s);
    let recs = b.proxy.exactly(2).await;
    assert_record(&recs[1], "RST", 200, Some(Reason::ClientClosed), 100, 100);
    origin.closed_by_proxy(2).await;

    b.still_serves("after vanishing tunnel clients", 3).await;
    b.idle("after vanishing tunnel clients").await;
}

/// The upstream streams without pause; the client reads a little and resets.
#[tokio::test]
async fn a_client_that_vanishes_while_the_tunnel_streams_down() {
    let origin = Raw::start(|mut s| async move {
        let chunk = vec![b'f'; 64 * 1024];
        loop {
            if s.write_all(&chunk).await.is_err() {
                return true;
            }
        }
    })
    .await;
    let b = Bench::start(origin.port(), "").await;
    let mut s = tunnel(&b.proxy, origin.port()).await;
    let mut got = vec![0u8; 256 * 1024];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("in time")
        .expect("read");
    reset(s);
    let recs = b.proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(
        (r.status, r.reason),
        (Some(200), Some(Reason::ClientClosed)),
        "{r:#?}"
    );
    assert_eq!(r.bytes_up, 0, "{r:#?}");
    assert!(r.bytes_down >= 256 * 1024, "{r:#?}");
    origin.closed_by_proxy(1).await;
    b.still_serves("after a vanished streaming client", 2).await;
    b.idle("after a vanished streaming client").await;
}

/// The upstream resets mid-tunnel: `upstream_reset`, counts exact, and the
/// client's connection is closed.
#[tokio::test]
async fn an_upstream_that_resets_mid_tunnel() {
    let origin = Raw::start(|mut s| async move {
        let mut buf = [0u8; 100];
        if s.read_exact(&mut buf).await.is_ok() {
            let _ = s.write_all(&buf).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        reset(s);
        false
    })
    .await;
    let b = Bench::start(origin.port(), "").await;
    let mut s = tunnel(&b.proxy, origin.port()).await;
    echo_100(&mut s).await;
    assert!(until_eof(&mut s).await, "the client's side is closed");
    let recs = b.proxy.exactly(1).await;
    assert_record(
        &recs[0],
        "upstream RST",
        200,
        Some(Reason::UpstreamReset),
        100,
        100,
    );
    b.still_serves("after an upstream reset", 2).await;
    b.idle("after an upstream reset").await;
}

/// Wait until `n` body bytes (past the first head) reached `origin`.
async fn body_at_origin(origin: &TapOrigin, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let bytes = origin.bytes();
        let body = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(0, |at| bytes.len() - at - 4);
        if body >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{body} of {n} body bytes reached the origin"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A POST announcing 1 MiB whose client sends 100 KiB and then closes
/// (FIN) or resets: the upstream request is aborted and never completes at
/// the origin, one `client_closed` record keeps the 100 KiB that went up,
/// and the proxy keeps serving.
#[tokio::test]

async fn a_client_that_vanishes_mid_body() {
    for rst in [false, true] {
        let what = if rst { "reset" } else { "close" };
        let origin = TapOrigin::start().await;
        let b = Bench::start(origin.port(), "").await;
        let mut s = TcpStream::connect(b.proxy.addr).await.expect("connect");
        let head = format!(
            "POST http://{REPO}:{0}/echo HTTP/1.1\r\nHost: {REPO}:{0}\r\nContent-Length: {1}\r\n\r\n",
            origin.port(),
            1024 * 1024
        );
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(&vec![b'u'; 100 * 1024]).await.expect("write");
        // Let the 100 KiB travel to the origin before vanishing.
        body_at_origin(&origin, 100 * 1024).await;
        if rst {
            reset(s);
        } else {
            drop(s);
        }
        let recs = b.proxy.exactly(1).await;
        let r = &recs[0];
        assert_eq!(
            (r.reason, r.decision, r.rule.as_deref()),
            (Some(Reason::ClientClosed), Decided::Allow, Some(RULE)),
            "{what}: {r:#?}"
        );
        assert_eq!(
            (r.bytes_up, r.bytes_down),
            (100 * 1024, 0),
            "{what}: {r:#?}"
        );
        // No complete request reached the origin.
        assert!(
            origin.seen().iter().all(|s| s.body_len < 1024 * 1024),
            "{what}: {:?}",
            origin.seen()
        );
        b.still_serves(what, 2).await;
        b.idle(what).await;
    }
}
