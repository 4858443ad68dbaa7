//! Plain HTTP forwarding through the proxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

fn catalog(port: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\", \"rh.repo.clearswift.net\"]\nports = [{port}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"RSS Feed\"\nhosts = [\"www.clearswift.com\"]\nports = [{port}]\naction = \"allow\"\n"
    )
}

#[tokio::test]
async fn get_is_forwarded_with_one_record() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://repo.clearswift.net:{}/hello?x=1", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello");
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("GET"));
    assert_eq!(r.host.as_deref(), Some("repo.clearswift.net"));
    assert_eq!(r.port, Some(origin.port()));
    assert_eq!(r.url.as_deref(), Some(url.as_str()));
    assert_eq!(r.decision, Decided::Allow);
    assert_eq!(r.rule.as_deref(), Some("Clearswift Update Server"));
    assert_eq!(r.reason, None);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.bytes_down, 5);
    assert_eq!(r.upstream, Some(origin.addr));
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/hello?x=1", "origin-form upstream");
    assert_eq!(
        seen[0].header("host"),
        Some(format!("repo.clearswift.net:{}", origin.port()).as_str())
    );
}

#[tokio::test]
async fn not_in_catalog_is_refused_with_403_reason_header_body_and_record() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "example.com"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://example.com:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-egress-error"], "not_in_catalog");
    assert_eq!(resp.headers()["connection"], "close");
    let body = resp.text().await.expect("body");
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert!(body.contains("not_in_catalog"), "{body}");
    assert!(
        body.contains(&r.id_string()),
        "body names the record id: {body}"
    );
    assert_eq!(r.decision, Decided::Deny);
    assert_eq!(r.reason, Some(Reason::NotInCatalog));
    assert_eq!(r.status, Some(403));
    assert!(
        origin.seen().is_empty(),
        "origin never sees a refused request"
    );
}

// === helpers ===

/// This process's resident set size in KiB (the proxy runs in-process).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

/// The memory-measuring tests run one at a time, so one does not count
/// the other's buffers.
static BIG_TRANSFER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BIG: usize = 48 * 1024 * 1024;
const MIB: u64 = 1024;
/// Growth allowed while 48 MiB pass through: well below the body size.
const RSS_GROWTH_MAX_KIB: u64 = 24 * MIB;

/// A request body of `n` bytes generated as it is sent, sampling this
/// process's RSS every MiB into `peak`.
struct UploadStream {
    left: usize,
    sent: usize,
    chunk: bytes::Bytes,
    peak: Arc<AtomicU64>,
}

impl futures_core::Stream for UploadStream {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.left == 0 {
            self.peak.fetch_max(rss_kib(), Ordering::Relaxed);
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(self.chunk.len());
        self.left -= n;
        self.sent += n;
        if self.sent % (1024 * 1024) == 0 {
            self.peak.fetch_max(rss_kib(), Ordering::Relaxed);
        }
        std::task::Poll::Ready(Some(Ok(self.chunk.slice(..n))))
    }
}

/// An origin that counts request body bytes as they stream in (never
/// holding the body) and answers with the count as text.
struct SinkOrigin {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    requests: Arc<AtomicUsize>,
}

async fn sink_origin() -> SinkOrigin {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = listener.local_addr().expect("addr");
    let received = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (r2, q2) = (Arc::clone(&received), Arc::clone(&requests));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (r, q) = (Arc::clone(&r2), Arc::clone(&q2));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (r, q) = (Arc::clone(&r), Arc::clone(&q));
                    async move {
                        q.fetch_add(1, Ordering::Relaxed);
                        let mut body = req.into_body();
                        let mut n = 0u64;
                        while let Some(frame) = body.frame().await {
                            if let Some(d) = frame.ok().and_then(|f| f.into_data().ok()) {
                                n += d.len() as u64;
                            }
                        }
                        r.fetch_add(n, Ordering::Relaxed);
                        Ok::<_, Infallible>(Response::new(Full::new(bytes::Bytes::from(
                            n.to_string(),
                        ))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    SinkOrigin {
        addr,
        received,
        requests,
    }
}

/// A raw HTTP request through the proxy, with `Connection: close`, read to
/// the end and parsed.
async fn raw_get(proxy: &TestProxy, url: &str, headers: &str) -> RawResponse {
    let req = format!("GET {url} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n");
    parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await)
}

fn catalog_wildcard_free(port_a: u16, port_b: u16) -> String {
    format!(
        "[[rule]]\nname = \"Clearswift Update Server\"\nhosts = [\"repo.clearswift.net\"]\nports = [{port_a}]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"RSS Feed\"\nhosts = [\"www.clearswift.com\"]\nports = [{port_b}]\naction = \"allow\"\n"
    )
}

// === large bodies stream ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_48_mib_streams_down_with_flat_memory() {
    let _one = BIG_TRANSFER.lock().await;
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let client = proxy.client_with_timeout(Duration::from_secs(120));
    // Warm up: the first transaction allocates the pools and buffers that stay.
    let warm = client
        .get(format!(
            "http://repo.clearswift.net:{}/bytes/65536",
            origin.port()
        ))
        .send()
        .await
        .expect("warm-up");
    assert_eq!(warm.bytes().await.expect("warm-up body").len(), 65536);
    let before = rss_kib();

    let url = format!("http://repo.clearswift.net:{}/bytes/{BIG}", origin.port());
    let mut resp = client.get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let (mut got, mut next_sample, mut peak) = (0usize, 0usize, before);
    while let Some(chunk) = resp.chunk().await.expect("body chunk") {
        assert!(
            chunk.iter().all(|&b| b == b'x'),
            "body bytes pass unchanged"
        );
        got += chunk.len();
        if got >= next_sample {
            peak = peak.max(rss_kib());
            next_sample += 1024 * 1024;
        }
    }
    peak = peak.max(rss_kib());
    assert_eq!(got, BIG, "client got every byte");
    let growth = peak.saturating_sub(before);
    assert!(
        growth < RSS_GROWTH_MAX_KIB,
        "RSS grew by {growth} KiB while {BIG} bytes streamed down (before {before} KiB, peak {peak} KiB)"
    );

    let recs = proxy.exactly(2).await;
    let r = recs
        .iter()
        .find(|r| r.url.as_deref() == Some(url.as_str()))
        .expect("record of the big GET");
    assert_eq!(r.decision, Decided::Allow);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.reason, None);
    assert_eq!(r.bytes_down, BIG as u64);
    assert_eq!(r.bytes_up, 0);
    assert_eq!(origin.seen().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_48_mib_streams_up_with_flat_memory() {
    let _one = BIG_TRANSFER.lock().await;
    let origin = sink_origin().await;
    let port = origin.addr.port();
    let proxy = TestProxy::start(&config(&["repo.clearswift.net"], ""), &catalog(port)).await;
    let client = proxy.client_with_timeout(Duration::from_secs(120));
    let url = format!("http://repo.clearswift.net:{port}/upload");
    let warm = client
        .post(&url)
        .body(vec![b'y'; 65536])
        .send()
        .await
        .expect("warm-up");
    assert_eq!(warm.text().await.expect("warm-up body"), "65536");
    let before = rss_kib();

    let peak = Arc::new(AtomicU64::new(before));
    let upload = UploadStream {
        left: BIG,
        sent: 0,
        chunk: bytes::Bytes::from(vec![b'y'; 64 * 1024]),
        peak: Arc::clone(&peak),
    };
    let resp = client
        .post(&url)
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.expect("body"),
        BIG.to_string(),
        "origin counted every byte"
    );
    let peak = peak.load(Ordering::Relaxed).max(rss_kib());
    let growth = peak.saturating_sub(before);
    assert!(
        growth < RSS_GROWTH_MAX_KIB,
        "RSS grew by {growth} KiB while {BIG} bytes streamed up (before {before} KiB, peak {peak} KiB)"
    );
    assert_eq!(
        origin.received.load(Ordering::Relaxed),
        (BIG + 65536) as u64
    );
    assert_eq!(origin.requests.load(Ordering::Relaxed), 2);

    let recs = proxy.exactly(2).await;
    let r = recs
        .iter()
        .find(|r| r.bytes_up > 65536)
        .expect("record of the big POST");
    assert_eq!(r.method.as_ref().map(|m| m.as_str()), Some("POST"));
    assert_eq!(r.decision, Decided::Allow);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.reason, None);
    assert_eq!(r.bytes_up, BIG as u64);
    assert_eq!(r.bytes_down, BIG.to_string().len() as u64);
}

// === response framing ===

#[tokio::test]
async fn chunked_response_is_relayed_whole() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let n = 300_000;
    let url = format!("http://repo.clearswift.net:{}/chunked/{n}", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.expect("body").len(), n);

    // The same on the wire: chunked framing to the client, decoded intact.
    let url2 = format!("http://repo.clearswift.net:{}/chunked/1000", origin.port());
    let raw = raw_get(&proxy, &url2, "").await;
    assert_eq!(raw.status, 200, "{}", raw.head);
    assert_eq!(
        raw.header("transfer-encoding"),
        Some("chunked"),
        "{}",
        raw.head
    );
    assert_eq!(raw.body, vec![b'x'; 1000]);

    let recs = proxy.exactly(2).await;
    let big = recs
        .iter()
        .find(|r| r.url.as_deref() == Some(url.as_str()))
        .expect("record");
    assert_eq!(big.bytes_down, n as u64);
    assert_eq!(big.status, Some(200));
    assert_eq!(big.reason, None);
    let small = recs
        .iter()
        .find(|r| r.url.as_deref() == Some(url2.as_str()))
        .expect("record");
    assert_eq!(small.bytes_down, 1000);
    assert_eq!(small.reason, None);
}

#[tokio::test]
async fn close_delimited_response_is_relayed_whole() {
    const N: usize = 100_000;
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let heads2 = Arc::clone(&heads);
    let addr = tcp_origin(move |mut s| {
        let heads = Arc::clone(&heads2);
        async move {
            let head = read_request_head(&mut s).await;
            heads.lock().unwrap().push(head);
            let mut out = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            out.extend(std::iter::repeat_n(b'z', N));
            let _ = s.write_all(&out).await;
            let _ = s.shutdown().await;
        }
    })
    .await;
    let proxy =
        TestProxy::start(&config(&["repo.clearswift.net"], ""), &catalog(addr.port())).await;
    let url = format!("http://repo.clearswift.net:{}/eof", addr.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.expect("body");
    assert_eq!(body.len(), N);
    assert!(body.iter().all(|&b| b == b'z'));
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].status, Some(200));
    assert_eq!(
        recs[0].reason, None,
        "a close-delimited body is a clean end"
    );
    assert_eq!(recs[0].bytes_down, N as u64);
    let heads = heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 1);
    assert!(
        heads[0].starts_with("GET /eof HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
}

/// Read a request head off a raw origin socket (bounded by `WAIT`).
async fn read_request_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut b)).await {
            Ok(Ok(1)) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

// === headers ===

#[tokio::test]
async fn hop_by_hop_request_headers_never_reach_the_origin() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://repo.clearswift.net:{}/hop", origin.port());
    let req = format!(
        "GET {url} HTTP/1.1\r\nHost: repo.clearswift.net:{}\r\n\
         Connection: close, X-Named\r\nX-Named: secret\r\n\
         Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic dTpw\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: websocket\r\n\
         X-End-To-End: kept\r\n\r\n",
        origin.port()
    );
    // Control: sent straight to the origin (origin-form), every one of
    // these headers is seen there, so their absence below is the proxy's doing.
    let direct = req.replacen(&url, "/hop", 1);
    let control = parse_response(&raw_bytes(origin.addr, direct.as_bytes()).await);
    assert_eq!(control.status, 200, "{}", control.head);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    for h in [
        "connection",
        "x-named",
        "proxy-connection",
        "proxy-authorization",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert!(
            seen[0].header(h).is_some(),
            "control: origin records {h}: {:?}",
            seen[0].headers
        );
    }
    origin.seen.lock().unwrap().clear();

    let resp = parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await);
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body_text(), "hello");
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    for h in [
        "connection",
        "x-named",
        "proxy-connection",
        "proxy-authorization",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ] {
        assert_eq!(
            seen[0].header(h),
            None,
            "{h} must not reach the origin: {:?}",
            seen[0].headers
        );
    }
    assert_eq!(
        seen[0].header("x-end-to-end"),
        Some("kept"),
        "end-to-end headers pass"
    );
    proxy.exactly(1).await;
}

#[tokio::test]
async fn hop_by_hop_response_headers_never_reach_the_client() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    // Control: straight from the origin, the hop-by-hop headers are there.
    let direct = b"GET /bytes/10 HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n";
    let control = parse_response(&raw_bytes(origin.addr, direct).await);
    assert!(
        control.header("x-hop").is_some() && control.header("keep-alive").is_some(),
        "{}",
        control.head
    );

    let url = format!("http://repo.clearswift.net:{}/bytes/10", origin.port());
    let resp = raw_get(&proxy, &url, "").await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.body, vec![b'x'; 10]);
    assert_eq!(resp.header("content-length"), Some("10"), "{}", resp.head);
    assert_eq!(resp.header("x-hop"), None, "{}", resp.head);
    assert_eq!(resp.header("keep-alive"), None, "{}", resp.head);
    for v in resp.headers_named("connection") {
        let v = v.to_ascii_lowercase();
        assert!(
            !v.contains("x-hop") && !v.contains("keep-alive"),
            "{}",
            resp.head
        );
    }
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].bytes_down, 10);
}

#[tokio::test]
async fn no_via_and_no_x_forwarded_for_by_default() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://repo.clearswift.net:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("via").is_none(), "{:?}", resp.headers());
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    for h in ["via", "x-forwarded-for", "forwarded"] {
        assert_eq!(seen[0].header(h), None, "{h}: {:?}", seen[0].headers);
    }
}

#[tokio::test]
async fn via_is_added_both_ways_when_configured() {
    let origin = HttpOrigin::start().await;
    let cfg = config_with(&ConfigOpts {
        statics: &[("repo.clearswift.net", "127.0.0.1")],
        allow_private: &["127.0.0.0/8"],
        server: "via = true",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(origin.port())).await;
    let url = format!("http://repo.clearswift.net:{}/", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    let via = resp
        .headers()
        .get("via")
        .map(|v| v.to_str().unwrap().to_string());
    assert!(
        via.as_deref().is_some_and(|v| v.contains("egress-proxy")),
        "response Via: {via:?}"
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0]
            .header("via")
            .is_some_and(|v| v.contains("egress-proxy")),
        "request Via: {:?}",
        seen[0].headers
    );
    assert_eq!(
        seen[0].header("x-forwarded-for"),
        None,
        "never X-Forwarded-For"
    );
}

#[tokio::test]
async fn host_header_is_rewritten_from_the_normalised_uri() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net"], ""),
        &catalog(origin.port()),
    )
    .await;
    let port = origin.port();
    // A client Host without the port, and a URI host in mixed case.
    let a = raw_get(
        &proxy,
        &format!("http://repo.clearswift.net:{port}/a"),
        "Host: repo.clearswift.net\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.head);
    let b = raw_get(
        &proxy,
        &format!("http://REPO.ClearSwift.NET:{port}/b"),
        "Host: REPO.ClearSwift.NET\r\n",
    )
    .await;
    assert_eq!(b.status, 200, "{}", b.head);
    let seen = origin.seen();
    assert_eq!(seen.len(), 2);
    let want = format!("repo.clearswift.net:{port}");
    for s in &seen {
        assert_eq!(s.header("host"), Some(want.as_str()), "{s:?}");
        assert_eq!(
            s.headers.iter().filter(|(n, _)| n == "host").count(),
            1,
            "one Host: {s:?}"
        );
    }
    let recs = proxy.exactly(2).await;
    assert!(recs
        .iter()
        .all(|r| r.host.as_deref() == Some("repo.clearswift.net")));
}

#[tokio::test]
async fn spoofed_host_header_to_allowed_uri_goes_to_the_uri_host() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "evil.example"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://repo.clearswift.net:{}/x", origin.port());
    let resp = raw_get(&proxy, &url, "Host: evil.example\r\n").await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    let seen = origin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("host"),
        Some(format!("repo.clearswift.net:{}", origin.port()).as_str())
    );
    let recs = proxy.exactly(1).await;
    assert_eq!(recs[0].host.as_deref(), Some("repo.clearswift.net"));
    assert_eq!(recs[0].decision, Decided::Allow);
}

#[tokio::test]
async fn allowed_host_header_cannot_open_a_non_catalogued_uri() {
    let origin = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "example.com"], ""),
        &catalog(origin.port()),
    )
    .await;
    let url = format!("http://example.com:{}/", origin.port());
    let host = format!("Host: repo.clearswift.net:{}\r\n", origin.port());
    let resp = raw_get(&proxy, &url, &host).await;
    assert_eq!(resp.status, 403, "{}", resp.head);
    assert_eq!(resp.header("x-egress-error"), Some("not_in_catalog"));
    assert_eq!(resp.header("connection"), Some("close"));
    let recs = proxy.exactly(1).await;
    let body = resp.body_text();
    assert!(
        body.contains("not_in_catalog") && body.contains(&recs[0].id_string()),
        "{body}"
    );
    assert_eq!(recs[0].decision, Decided::Deny);
    assert_eq!(recs[0].reason, Some(Reason::NotInCatalog));
    assert_eq!(recs[0].status, Some(403));
    assert_eq!(recs[0].rule, None);
    assert_eq!(recs[0].host.as_deref(), Some("example.com"));
    assert!(origin.seen().is_empty(), "origin never sees it");
}

// === connections and modes ===

#[tokio::test]
async fn two_allowed_hosts_on_one_keep_alive_connection() {
    let a = HttpOrigin::start().await;
    let b = HttpOrigin::start().await;
    let proxy = TestProxy::start(
        &config(&["repo.clearswift.net", "www.clearswift.com"], ""),
        &catalog_wildcard_free(a.port(), b.port()),
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let first = format!(
        "GET http://repo.clearswift.net:{0}/one HTTP/1.1\r\nHost: repo.clearswift.net:{0}\r\n\r\n",
        a.port()
    );
    s.write_all(first.as_bytes()).await.expect("write");
    let r1 = read_response(&mut s).await;
    assert_eq!(r1.status, 200, "{}", r1.head);
    assert_eq!(r1.body, b"hello");
    let second = format!(
        "GET http://www.clearswift.com:{0}/two HTTP/1.1\r\nHost: www.clearswift.com:{0}\r\n\r\n",
        b.port()
    );
    s.write_all(second.as_bytes())
        .await
        .expect("write on the same connection");
    let r2 = read_response(&mut s).await;
    assert_eq!(r2.status, 200, "{}", r2.head);
    assert_eq!(r2.body, b"hello");

    let (sa, sb) = (a.seen(), b.seen());
    assert_eq!(sa.len(), 1, "first origin: one request");
    assert_eq!(sb.len(), 1, "second origin: one request");
    assert_eq!(sa[0].uri, "/one");
    assert_eq!(sb[0].uri, "/two");
    let recs = proxy.exactly(2).await;
    assert_eq!(recs[0].client, recs[1].client, "one client connection");
    let rules: Vec<_> = recs.iter().map(|r| r.rule.as_deref()).collect();
    assert!(
        rules.contains(&Some("Clearswift Update Server")) && rules.contains(&Some("RSS Feed")),
        "{rules:?}"
    );
    assert!(recs
        .iter()
        .all(|r| r.status == Some(200) && r.reason.is_none()));
}

#[tokio::test]
async fn report_mode_forwards_a_miss_and_records_report() {
    let origin = HttpOrigin::start().await;
    let cfg = config_with(&ConfigOpts {
        statics: &[
            ("repo.clearswift.net", "127.0.0.1"),
            ("example.com", "127.0.0.1"),
        ],
        allow_private: &["127.0.0.0/8"],
        policy: "default = \"report\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &catalog(origin.port())).await;
    let url = format!("http://example.com:{}/report", origin.port());
    let resp = proxy.client().get(&url).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.expect("body"), "hello");
    assert_eq!(origin.seen().len(), 1);
    let recs = proxy.exactly(1).await;
    let r = &recs[0];
    assert_eq!(r.decision, Decided::Report);
    // `reason` is absent on a clean success (DESIGN.md, audit record);
    // `decision: "report"` is what marks the policy miss that was let through.
    assert_eq!(r.reason, None);
    assert_eq!(r.status, Some(200));
    assert_eq!(r.rule, None);
    assert_eq!(r.host.as_deref(), Some("example.com"));
    assert_eq!(r.bytes_down, 5);
}
