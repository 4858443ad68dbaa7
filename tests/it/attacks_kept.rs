//! Attacks on upstream connections kept across inspected tunnels (commit
//! 6058434), as hostile clients (and misbehaving origins) would try them.
//! The question each test asks: can one tunnel's data, response,
//! authentication or routing reach another tunnel through a kept
//! connection? Each test either guards an attack the proxy withstands, or
//! (ignored, `finding: ...`) shows one it does not.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use egress_proxy::audit::{Decided, Reason, Record};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::inspect::{inspecting_config_with, start_in, HOST};
use crate::support::*;

// ---------------------------------------------------------------- a scripted origin

/// A TLS origin written by hand whose answers a test picks by path, some of
/// them wrong on purpose. Every answer that is not a deliberate oddity is
/// an echo, `{conn} {METHOD} {path} {body bytes}`, so a client can tell
/// whose request an answer belongs to and which connection carried it.
///
/// With `read_bodies` false it is a "CL.0" origin: it never reads a request
/// body, so a body is read as the next request (a real class of origin
/// bugs, and what an origin answering early and then not draining does).
///
/// Paths (the query is ignored for the choice, kept in the echo):
/// - `/early`: answered at once, before the body is read (then read, when
///   `read_bodies`);
/// - `/slow`: answered after 1.5 s;
/// - `/drop`: the request read, then the connection closed, no answer;
/// - `/then-close`: the echo, then 200 ms later the connection closed;
/// - `/extra`: the echo and a second, unasked-for response in one write;
/// - `/extra-late`: the echo, then 300 ms later an unasked-for response;
/// - `/head-body`: a head with `content-length: 6` and a body, even to HEAD;
/// - `/1xx`: `100 Continue` and `103 Early Hints`, then the echo;
/// - `/204`, `/304`: that status with `content-length: 6` and 6 bytes;
/// - `/eof`: the echo without a length, ended by closing;
/// - `/close`: the echo with `connection: close`, then closed;
/// - `/101`: `101 Switching Protocols`, then it goes on reading requests;
/// - `/big`: 8 MiB (more than the sockets on the way buffer);
/// - `/hdr/<hex>`: the echo with the header line `<hex>` decoded.
struct Evil {
    origin: CountingOrigin,
    /// (connection, request head, body bytes read) of each request.
    seen: Arc<Mutex<Vec<(usize, String, usize)>>>,
}

impl std::ops::Deref for Evil {
    type Target = CountingOrigin;

    fn deref(&self) -> &CountingOrigin {
        &self.origin
    }
}

impl Evil {
    async fn start(read_bodies: bool) -> Evil {
        Evil::start_for(&[HOST], read_bodies).await
    }

    async fn start_for(names: &[&str], read_bodies: bool) -> Evil {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let see = Arc::clone(&seen);
        let origin = CountingOrigin::start(names, move |mut tls, n| {
            let see = Arc::clone(&see);
            async move {
                evil_serve(&mut tls, n, read_bodies, &see).await;
                let _ = tls.shutdown().await;
            }
        })
        .await;
        Evil { origin, seen }
    }

    fn seen(&self) -> Vec<(usize, String, usize)> {
        self.seen.lock().expect("seen").clone()
    }
}

/// Bytes buffered from one origin connection, read on demand.
struct Reader<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
    /// The trailer lines of the last chunked body.
    trailers: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Reader<'_, S> {
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match self.s.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(k) => {
                self.buf.extend_from_slice(&chunk[..k]);
                true
            }
        }
    }

    async fn until(&mut self, pat: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(pat.len()).position(|w| w == pat) {
                let out: Vec<u8> = self.buf.drain(..end + pat.len()).collect();
                return Some(out);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn exactly(&mut self, n: usize) -> Option<()> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        self.buf.drain(..n);
        Some(())
    }

    /// A request body as its head frames it; its length.
    async fn body(&mut self, head: &str) -> Option<usize> {
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            let mut total = 0;
            loop {
                let line = self.until(b"\r\n").await?;
                let text = String::from_utf8_lossy(&line);
                let size = text.trim().split(';').next().unwrap_or("");
                let size = usize::from_str_radix(size, 16).ok()?;
                if size == 0 {
                    // Trailers, then the blank line.
                    loop {
                        let line = self.until(b"\r\n").await?;
                        if line.len() == 2 {
                            return Some(total);
                        }
                        self.trailers.extend_from_slice(&line);
                    }
                }
                self.exactly(size + 2).await?;
                total += size;
            }
        }
        let n = header("content-length").and_then(|v| v.parse().ok())?;
        self.exactly(n).await?;
        Some(n)
    }
}

async fn evil_serve<S>(
    s: &mut S,
    n: usize,
    read_bodies: bool,
    seen: &Mutex<Vec<(usize, String, usize)>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut r = Reader {
        s,
        buf: Vec::new(),
        trailers: Vec::new(),
    };
    let mut served = 0usize;
    loop {
        let Some(head) = r.until(b"\r\n\r\n").await else {
            return;
        };
        served += 1;
        let head = String::from_utf8_lossy(&head).into_owned();
        let line = head.lines().next().unwrap_or("").to_string();
        let mut words = line.split(' ');
        let method = words.next().unwrap_or("").to_string();
        let path = words.next().unwrap_or("/").to_string();
        let route = path.split('?').next().unwrap_or("/").to_string();
        let mut body_len = 0;
        if read_bodies && route != "/early" {
            match r.body(&head).await {
                Some(k) => body_len = k,
                None if head.to_ascii_lowercase().contains("content-length")
                    || head.to_ascii_lowercase().contains("transfer-encoding") =>
                {
                    return;
                }
                None => {}
            }
        }
        let mut record = head.clone();
        if !r.trailers.is_empty() {
            record.push_str("trailers:\r\n");
            record.push_str(&String::from_utf8_lossy(&std::mem::take(&mut r.trailers)));
        }
        seen.lock().expect("seen").push((n, record, body_len));
        let echo = format!("{n} {method} {path} {body_len}");
        // Lenient: any case of HEAD (methods are case-sensitive).
        let head_only = method.eq_ignore_ascii_case("HEAD");
        let ok = |extra: &str| {
            let body = if head_only { "" } else { echo.as_str() };
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                echo.len()
            )
        };
        let poison = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON";
        let out: String = match route.as_str() {
            "/early" => {
                let resp = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly";
                if r.s.write_all(resp.as_bytes()).await.is_err() || r.s.flush().await.is_err() {
                    return;
                }
                if read_bodies && r.body(&head).await.is_none() {
                    return;
                }
                continue;
            }
            "/slow" => {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                ok("")
            }
            "/drop" => return,
            // The race of a kept connection: the origin closes it just as
            // the next request arrives (read, never answered).
            "/drop-if-kept" if served > 1 => return,
            "/then-close" => {
                let _ = r.s.write_all(ok("").as_bytes()).await;
                let _ = r.s.flush().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                return;
            }
            "/extra" => ok("") + poison,
            "/extra-late" => {
                if r.s.write_all(ok("").as_bytes()).await.is_err() || r.s.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                poison.to_string()
            }
            "/head-body" => "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON".to_string(),
            "/1xx" => {
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
                    .to_string()
                    + &ok("")
            }
            "/204" => "HTTP/1.1 204 No Content\r\ncontent-length: 6\r\n\r\nPOISON".to_string(),
            "/304" => "HTTP/1.1 304 Not Modified\r\ncontent-length: 6\r\n\r\nPOISON".to_string(),
            "/eof" => {
                let _ = r
                    .s
                    .write_all(format!("HTTP/1.1 200 OK\r\n\r\n{echo}").as_bytes())
                    .await;
                return;
            }
            "/close" => {
                let _ = r.s.write_all(ok("connection: close\r\n").as_bytes()).await;
                return;
            }
            "/101" => {
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
                    .to_string()
            }
            "/big" => {
                let body = "b".repeat(8 * 1024 * 1024);
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
            }
            _ => match route.strip_prefix("/hdr/") {
                Some(hex) => {
                    let bytes: Vec<u8> = (0..hex.len() / 2)
                        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
                        .collect();
                    ok(&format!("{}\r\n", String::from_utf8_lossy(&bytes)))
                }
                None => ok(""),
            },
        };
        if r.s.write_all(out.as_bytes()).await.is_err() || r.s.flush().await.is_err() {
            return;
        }
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- the proxy and its clients

async fn proxy_for(origin: &Evil, limits: &str) -> TestProxy {
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config_with(dir.path(), &origin.cert.cert_pem, "", origin.port(), limits);
    start_in(dir, &cfg, &catalog).await
}

fn tunnels(recs: &[Record]) -> usize {
    recs.iter().filter(|r| r.url.is_none()).count()
}

fn inner(recs: &[Record]) -> Vec<&Record> {
    recs.iter().filter(|r| r.url.is_some()).collect()
}

/// The rustls client config of a client trusting only the proxy's CA.
fn ca_tls(proxy: &TestProxy) -> Arc<rustls::ClientConfig> {
    let mut tls = crate::leaves::proxy_ca_config(proxy);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

/// An inspected tunnel opened by hand (CONNECT `authority`, TLS with SNI
/// `HOST` trusting our CA): the client writes what it likes inside.
async fn tunnel_to(proxy: &TestProxy, authority: &str) -> Tls {
    let s = open_tunnel(proxy.addr, authority).await;
    tokio_rustls::TlsConnector::from(ca_tls(proxy))
        .connect(HOST.try_into().expect("name"), s)
        .await
        .expect("handshake with our leaf")
}

async fn tunnel(proxy: &TestProxy, origin: &Evil) -> Tls {
    tunnel_to(proxy, &format!("{HOST}:{}", origin.port())).await
}

fn get(p: u16, path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n")
}

/// Close a hand-made tunnel and wait for its record (so its upstream
/// connection went back to the pool, if it could).
async fn end(proxy: &TestProxy, s: Tls, before: usize) {
    drop(s);
    proxy.audit.wait_for(WAIT, |r| tunnels(r) > before).await;
}

/// A separate client, a tunnel of its own: one GET of `path` there,
/// answered; the tunnel ended. Returns (status, body).
async fn next_client(proxy: &TestProxy, origin: &Evil, path: &str) -> (u16, String) {
    let before = tunnels(&proxy.audit.records());
    let mut s = tunnel(proxy, origin).await;
    s.write_all(get(origin.port(), path).as_bytes())
        .await
        .expect("write");
    let resp = tokio::time::timeout(WAIT, read_response(&mut s))
        .await
        .expect("an answer");
    end(proxy, s, before).await;
    (resp.status, resp.body_text())
}

/// The echo an answer must be for a client's own `GET path`.
fn own_echo(body: &str, path: &str) -> bool {
    body.split_once(' ')
        .is_some_and(|(_, rest)| rest == format!("GET {path} 0"))
}

/// Every record names the origin as its upstream and is an inspect one
/// (the tunnels') or carries a status.
fn records_sane(recs: &[Record], origin: &Evil) {
    for r in recs {
        assert_eq!(
            r.upstream,
            Some(origin.addr),
            "upstream on every record: {r:#?}"
        );
        assert!(r.status.is_some(), "{r:#?}");
    }
}

// ---------------------------------------------------------------- 1. desync between tunnels

/// Two requests pipelined in one write, both answered in order; the next
/// client's tunnel gets the kept connection and its own answer.
#[tokio::test]
async fn pipelined_requests_do_not_leave_an_answer_for_the_next_tunnel() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all((get(p, "/who?a1") + &get(p, "/who?a2")).as_bytes())
        .await
        .expect("write");
    let a1 = read_response(&mut s).await;
    let a2 = read_response(&mut s).await;
    assert!(own_echo(&a1.body_text(), "/who?a1"), "{}", a1.body_text());
    assert!(own_echo(&a2.body_text(), "/who?a2"), "{}", a2.body_text());
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert_eq!(
        body, "1 GET /who?b 0",
        "the kept connection, its own answer"
    );
    assert_eq!(origin.accepted(), 1);
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 1);
    let recs = proxy.audit.records();
    assert_eq!(recs.len(), 5, "2 tunnels, 3 requests: {recs:#?}");
    records_sane(&recs, &origin);
}

/// A request body the client abandons half-way (a `Content-Length` larger
/// than what it sends, then gone): the origin is still waiting for the
/// rest, so the connection must not carry the next client's request (it
/// would be read as the first one's body).
#[tokio::test]
async fn a_body_abandoned_half_way_does_not_hand_its_connection_on() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all(
        format!(
            "POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 100\r\n\r\n{}",
            "x".repeat(40)
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.flush().await.expect("flush");
    // Wait until the origin has the head (and what there is of the body).
    tokio::time::sleep(Duration::from_millis(300)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(own_echo(&body, "/who?b"), "{body}");
    assert_eq!(body, "2 GET /who?b 0", "a new connection");
    let recs = proxy.audit.records();
    let post = recs
        .iter()
        .find(|r| r.method.as_ref().is_some_and(|m| m == "POST"))
        .unwrap_or_else(|| panic!("a record for the abandoned POST: {recs:#?}"));
    assert_eq!(post.reason, Some(Reason::ClientClosed), "{post:#?}");
    assert_eq!(recs.len(), 4, "{recs:#?}");
}

/// The same with a chunked body cut in the middle of a chunk.
#[tokio::test]
async fn a_chunked_body_cut_mid_chunk_does_not_hand_its_connection_on() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all(
        format!(
            "POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n40\r\n{}",
            "y".repeat(20)
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert_eq!(body, "2 GET /who?b 0", "a new connection, its own answer");
    // The origin never saw the cut request complete.
    assert!(
        origin
            .seen()
            .iter()
            .all(|(_, line, _)| !line.starts_with("POST")),
        "{:?}",
        origin.seen()
    );
}

/// An origin that answers before reading the body while the body is still
/// on its way (a large upload): the connection stays with its tunnel.
#[tokio::test]
async fn an_answer_before_a_large_body_was_sent_stays_with_its_tunnel() {
    let origin = Evil::start(false).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    let body_len = 4 * 1024 * 1024;
    s.write_all(
        format!("POST /early HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: {body_len}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    // Send a little, read the early answer, then send the rest (which the
    // CL.0 origin reads as requests), then leave.
    s.write_all(&vec![b'z'; 1024]).await.expect("write");
    let early = read_response(&mut s).await;
    assert_eq!(early.body_text(), "early");
    let rest = vec![b'z'; body_len - 1024];
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&rest)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert_eq!(body, "2 GET /who?b 0", "a new connection, its own answer");
}

/// Found by this review, fixed: an origin that does not read a request
/// body (a "CL.0" origin: it answers and reads the body as the next
/// request; an origin answering an `Expect: 100-continue` request with a
/// final status and then not draining does the same) got a small body in
/// the same write as the head, so its answer came after the body was all
/// sent and the connection was not pinned. The body is a request of the
/// client's making; with its answer slow (here 1.5 s), the connection was
/// back in the pool before the answer, and the next client's request on it
/// got the smuggled request's answer. Now any request with a body pins its
/// connection to its tunnel (no sharing after an upload).
#[tokio::test]
async fn a_request_smuggled_in_a_body_does_not_answer_the_next_client() {
    let origin = Evil::start(false).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    let smuggled = format!("GET /slow?smuggled-by-a HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n");
    s.write_all(
        format!(
            "POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let a = read_response(&mut s).await;
    assert_eq!(a.status, 200);
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(
        own_echo(&body, "/who?b"),
        "the next client got another client's answer: {body:?}"
    );
}

/// The same smuggling through `Expect: 100-continue`: the client sends the
/// body at once; an origin answering the head with a final status would
/// read the body as a request. Withstood only as far as the CL.0 case is.
#[tokio::test]
async fn a_request_smuggled_behind_expect_continue_does_not_answer_the_next_client() {
    let origin = Evil::start(false).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    let smuggled = format!("GET /slow?smuggled-by-a HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n");
    s.write_all(
        format!(
            "POST /early HTTP/1.1\r\nHost: {HOST}:{p}\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{smuggled}",
            smuggled.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut a = read_response(&mut s).await;
    if a.status == 100 {
        a = read_response(&mut s).await;
    }
    assert_eq!(a.status, 200);
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(
        own_echo(&body, "/who?b"),
        "the next client got another client's answer: {body:?}"
    );
}

/// `Expect: 100-continue` with an honest origin: the interim answer and the
/// final one go to the client; the next client is answered its own.
#[tokio::test]
async fn expect_continue_leaves_nothing_for_the_next_tunnel() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all(
        format!("POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let cont = read_head(&mut s).await;
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    s.write_all(b"hello").await.expect("body");
    let a = read_response(&mut s).await;
    assert_eq!(a.body_text(), "1 POST /who?a 5");
    end(&proxy, s, 0).await;
    // Reused or not (a connection that carried a body may be kept from
    // sharing), the answer is the next client's own.
    let (_, body) = next_client(&proxy, &origin, "/who?b").await;
    assert!(own_echo(&body, "/who?b"), "{body}");
}

/// Oddities of the origin's answers, one tunnel each, the next client's
/// request after it: always its own answer; reused only when the answer
/// left the connection clean.
async fn after_answer(path: &str, method: &str) -> (Evil, TestProxy, String) {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    // Let the rest of the answer (and anything after it) arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    end(&proxy, s, 0).await;
    if path == "/extra-late" {
        // The unasked-for answer comes while the connection idles.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200, "{path}: {body}");
    assert!(
        own_echo(&body, "/who?b"),
        "{path}: the next client got {body:?}"
    );
    (origin, proxy, head)
}

#[tokio::test]
async fn extra_bytes_after_an_answer_never_reach_the_next_tunnel() {
    let (origin, _proxy, _) = after_answer("/extra", "GET").await;
    assert_eq!(origin.accepted(), 2, "not kept: bytes nobody asked for");
}

#[tokio::test]
async fn an_unasked_for_answer_while_kept_closes_the_connection() {
    let (origin, _proxy, _) = after_answer("/extra-late", "GET").await;
    assert_eq!(origin.accepted(), 2, "closed when the extra answer came");
}

#[tokio::test]
async fn a_head_answer_with_a_length_keeps_the_connection_in_step() {
    let (origin, proxy, head) = after_answer("/who?a", "HEAD").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.accepted(), 1, "reused: a HEAD answer has no body");
    records_sane(&proxy.audit.records(), &origin);
}

#[tokio::test]
async fn a_body_sent_to_head_never_reaches_the_next_tunnel() {
    let (origin, _proxy, _) = after_answer("/head-body", "HEAD").await;
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn interim_answers_stay_with_their_request() {
    let (origin, _proxy, head) = after_answer("/1xx", "GET").await;
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "interim answers not relayed as final: {head}"
    );
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test]
async fn a_204_with_a_body_never_reaches_the_next_tunnel() {
    let (origin, _proxy, head) = after_answer("/204", "GET").await;
    assert!(head.starts_with("HTTP/1.1 204"), "{head}");
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_304_with_a_body_never_reaches_the_next_tunnel() {
    let (origin, _proxy, head) = after_answer("/304", "GET").await;
    assert!(head.starts_with("HTTP/1.1 304"), "{head}");
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_close_delimited_answer_is_not_kept() {
    let (origin, _proxy, head) = after_answer("/eof", "GET").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn connection_close_from_the_origin_is_not_kept() {
    let (origin, _proxy, _) = after_answer("/close", "GET").await;
    assert_eq!(origin.accepted(), 2);
}

#[tokio::test]
async fn a_switch_of_protocols_from_the_origin_is_not_kept() {
    let (origin, _proxy, _) = after_answer("/101", "GET").await;
    assert_eq!(origin.accepted(), 2, "the connection is no longer HTTP");
}

/// The client reads the head of a large answer and leaves: the next
/// client never gets the rest of it.
#[tokio::test]
async fn a_client_leaving_between_head_and_body_leaves_nothing_behind() {
    let (origin, _proxy, head) = after_answer("/big", "GET").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.accepted(), 2);
}

/// A request in flight when the client leaves (the origin slow to answer):
/// its answer, when it comes, must not be the next client's.
#[tokio::test]
async fn a_tunnel_leaving_with_a_request_in_flight_does_not_hand_on_its_answer() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let mut s = tunnel(&proxy, &origin).await;
    let p = origin.port();
    s.write_all(get(p, "/slow?a").as_bytes())
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert_eq!(body, "2 GET /who?b 0");
}

// ---------------------------------------------------------------- 2. pinning

/// One tunnel sends `req` (its own request bytes) and reads the answer;
/// returns the answer's body. The tunnel ended.
async fn one_raw(proxy: &TestProxy, origin: &Evil, req: &str) -> RawResponse {
    let before = tunnels(&proxy.audit.records());
    let mut s = tunnel(proxy, origin).await;
    s.write_all(req.as_bytes()).await.expect("write");
    let resp = tokio::time::timeout(WAIT, read_response(&mut s))
        .await
        .expect("an answer");
    end(proxy, s, before).await;
    resp
}

fn conn_of(body: &str) -> usize {
    body.split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an echo: {body:?}"))
}

/// Every spelling of a connection-bound challenge that reaches the client
/// pins the connection: the next client never gets it.
#[tokio::test]
async fn connection_bound_challenges_pin_in_every_spelling() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let challenges = [
        "WWW-Authenticate: ntlm",
        "www-authenticate:    NTLM   ",
        "WWW-Authenticate: NEGOTIATE",
        "WWW-Authenticate: Negotiate YIIBhgYGKwYBBQUCoIIBejCCAXY=",
        "WWW-Authenticate: Basic realm=\"x\", NTLM",
        "WWW-Authenticate: Basic realm=\"x\",Negotiate",
        "WWW-Authenticate: Basic realm=\"x\",\tnegotiate",
        "WWW-Authenticate: Basic realm=\"x\"\r\nWWW-Authenticate: NTLM",
        "Proxy-Authenticate: NTLM",
        "WWW-Authenticate: NTLM TlRMTVNTUAACAAAADAAMADgAAAAFgomi",
    ];
    for c in challenges {
        let resp = one_raw(&proxy, &origin, &get(p, &format!("/hdr/{}", hex(c)))).await;
        assert_eq!(resp.status, 200, "{c}");
        let pinned = conn_of(&resp.body_text());
        let (_, next) = next_client(&proxy, &origin, "/who?b").await;
        assert_ne!(conn_of(&next), pinned, "{c:?} did not pin its connection");
    }
}

/// And every spelling of a connection-bound login a client sends.
#[tokio::test]
async fn connection_bound_logins_pin_in_every_spelling() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let logins = [
        "authorization: ntlm TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
        "Authorization:NTLM\tTlRMTVNTUAABAAAAB4IIog==",
        "Authorization:    Negotiate YIIBhgYGKwYBBQUCoIIBejCCAXY=",
        "AUTHORIZATION: negotiate",
        "Authorization: Basic eDp5\r\nAuthorization: NTLM TlRMTVNTUAABAAAA",
    ];
    for l in logins {
        let req = format!("GET /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\n{l}\r\n\r\n");
        let resp = one_raw(&proxy, &origin, &req).await;
        assert_eq!(resp.status, 200, "{l}");
        let pinned = conn_of(&resp.body_text());
        let (_, next) = next_client(&proxy, &origin, "/who?b").await;
        assert_ne!(conn_of(&next), pinned, "{l:?} did not pin its connection");
    }
}

/// `Proxy-Authorization` inside a tunnel (a login meant for the proxy) is
/// not sent on, so it needs no pinning; nor does a login on a request the
/// proxy refuses (never sent): the next client reuses the connection, and
/// the origin never saw either login.
#[tokio::test]
async fn logins_that_never_reach_the_origin_do_not_matter() {
    let origin = Evil::start(true).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        "methods = [\"GET\", \"HEAD\"]\n",
        origin.port(),
        "",
    );
    let proxy = start_in(dir, &cfg, &catalog).await;
    let p = origin.port();
    let req = format!(
        "GET /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nProxy-Authorization: NTLM TlRMTVNTUAABAAAA\r\n\r\n\
         POST /who?refused HTTP/1.1\r\nHost: {HOST}:{p}\r\nAuthorization: NTLM TlRMTVNTUAABAAAA\r\ncontent-length: 0\r\n\r\n"
    );
    let before = tunnels(&proxy.audit.records());
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(req.as_bytes()).await.expect("write");
    let a = read_response(&mut s).await;
    assert_eq!(a.body_text(), "1 GET /who?a 0");
    let refused = read_response(&mut s).await;
    assert_eq!(refused.status, 403, "{}", refused.head);
    end(&proxy, s, before).await;
    assert_eq!(
        next_client(&proxy, &origin, "/who?b").await.1,
        "1 GET /who?b 0"
    );
    let seen = origin.seen();
    assert_eq!(seen.len(), 2, "the refused POST never went: {seen:?}");
    assert!(
        seen.iter()
            .all(|(_, head, _)| !head.to_ascii_lowercase().contains("ntlm")),
        "{seen:?}"
    );
}

// ---------------------------------------------------------------- 3. keys

/// An inspected tunnel to `authority` whose TLS names `server_name`.
async fn tunnel_named(proxy: &TestProxy, authority: &str, server_name: &str) -> Tls {
    let s = open_tunnel(proxy.addr, authority).await;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).expect("name");
    tokio_rustls::TlsConnector::from(ca_tls(proxy))
        .connect(name, s)
        .await
        .expect("handshake with our leaf")
}

/// One GET through a tunnel to `authority` (TLS name `server_name`, the
/// `Host` the tunnel's); the answer's body.
async fn get_via(proxy: &TestProxy, authority: &str, server_name: &str, path: &str) -> String {
    let before = tunnels(&proxy.audit.records());
    let mut s = tunnel_named(proxy, authority, server_name).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 200, "{}{}", resp.head, resp.body_text());
    end(proxy, s, before).await;
    resp.body_text()
}

/// The same host on two ports (two origins), one rule: each port's tunnels
/// keep to their own origin's connection.
#[tokio::test]
async fn the_same_host_on_another_port_never_gets_the_connection() {
    let one = Evil::start(true).await;
    let two = Evil::start_for(&[HOST], true).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, _) = inspecting_config_with(dir.path(), &one.cert.cert_pem, "", one.port(), "");
    // Both origins' certificates trusted; one rule for both ports.
    let both = format!("{}{}", one.cert.cert_pem, two.cert.cert_pem);
    std::fs::write(dir.path().join("origin.pem"), both).expect("roots");
    let catalog = rule("both", &[HOST], one.port(), "allow", "").replace(
        &format!("ports = [{}]", one.port()),
        &format!("ports = [{}, {}]", one.port(), two.port()),
    );
    let proxy = start_in(dir, &cfg, &catalog).await;
    for _ in 0..2 {
        for o in [&one, &two] {
            let a = format!("{HOST}:{}", o.port());
            let body = get_via(&proxy, &a, HOST, "/who").await;
            assert_eq!(body, "1 GET /who 0");
        }
    }
    assert_eq!((one.accepted(), two.accepted()), (1, 1));
    assert_eq!(one.seen().len(), 2);
    assert_eq!(two.seen().len(), 2);
}

/// Spellings of one name (case, one trailing dot) are one target once
/// normalised: they share, and the shared connection answers each.
#[tokio::test]
async fn spellings_of_one_name_share_one_connection() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let spellings = [
        format!("{HOST}:{p}"),
        format!("{}:{p}", HOST.to_ascii_uppercase()),
        format!("{HOST}.:{p}"),
    ];
    for a in &spellings {
        let before = tunnels(&proxy.audit.records());
        let mut s = tunnel_named(&proxy, a, HOST).await;
        s.write_all(get(p, "/who").as_bytes()).await.expect("write");
        let resp = read_response(&mut s).await;
        assert_eq!(resp.body_text(), "1 GET /who 0", "{a}");
        end(&proxy, s, before).await;
    }
    assert_eq!(origin.accepted(), 1);
    // The origin always got the normalised name.
    for (_, head, _) in origin.seen() {
        assert!(head.contains(&format!("host: {HOST}:{p}")), "{head}");
    }
}

/// A rule admitting the host by name and its address as an IP literal:
/// the name's connection (verified for the name) never carries a tunnel to
/// the literal (verified for the address), nor the reverse.
#[tokio::test]
async fn a_name_and_its_address_never_share() {
    let origin = Evil::start_for(&[HOST, "127.0.0.1"], true).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) = inspecting_config_with(
        dir.path(),
        &origin.cert.cert_pem,
        "addresses = [\"127.0.0.1/32\"]\n",
        origin.port(),
        "",
    );
    let proxy = start_in(dir, &cfg, &catalog).await;
    let p = origin.port();
    let by_name = format!("{HOST}:{p}");
    let by_ip = format!("127.0.0.1:{p}");
    assert_eq!(
        get_via(&proxy, &by_name, HOST, "/who").await,
        "1 GET /who 0"
    );
    assert_eq!(
        get_via(&proxy, &by_ip, "127.0.0.1", "/who").await,
        "2 GET /who 0"
    );
    assert_eq!(
        get_via(&proxy, &by_name, HOST, "/who").await,
        "1 GET /who 0"
    );
    assert_eq!(
        get_via(&proxy, &by_ip, "127.0.0.1", "/who").await,
        "2 GET /who 0"
    );
    assert_eq!(origin.accepted(), 2);
}

/// A reload that takes the host out of the catalog: the CONNECT is refused
/// before any kept connection is looked at (and no request reaches the
/// origin); put back, the host gets a new connection, never the one kept
/// under the old rules. A tunnel that outlived the reload keeps its own
/// connection to its end (decided under its own rules) and hands it to no
/// tunnel of the new ones.
#[tokio::test]
async fn a_reload_that_removes_the_host_refuses_before_any_kept_connection() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let path = proxy.dir.path().join("egress-proxy.toml");
    let catalog = proxy.dir.path().join("catalog.toml");
    let allowed = std::fs::read_to_string(&catalog).expect("catalog");
    // A tunnel kept open across the reload, its connection idle.
    let mut old = tunnel(&proxy, &origin).await;
    old.write_all(get(p, "/who?old").as_bytes())
        .await
        .expect("write");
    assert_eq!(
        read_response(&mut old).await.body_text(),
        "1 GET /who?old 0"
    );
    // And a kept connection from another tunnel.
    assert_eq!(
        next_client(&proxy, &origin, "/who?kept").await.1,
        "2 GET /who?kept 0"
    );
    std::fs::write(&catalog, "").expect("empty catalog");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");
    let (status, _) = connect(proxy.addr, &format!("{HOST}:{p}")).await;
    assert_eq!(status, 403, "refused by the new rules");
    // The old tunnel goes on under its own rules, then ends.
    old.write_all(get(p, "/who?old2").as_bytes())
        .await
        .expect("write");
    assert_eq!(
        read_response(&mut old).await.body_text(),
        "1 GET /who?old2 0"
    );
    let before = tunnels(&proxy.audit.records());
    end(&proxy, old, before).await;
    std::fs::write(&catalog, allowed).expect("catalog back");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");
    let (status, body) = next_client(&proxy, &origin, "/who?new").await;
    assert_eq!(status, 200);
    assert_eq!(
        body, "3 GET /who?new 0",
        "a new connection under the new rules"
    );
    origin.wait_closed(2).await;
    let seen: Vec<String> = origin
        .seen()
        .into_iter()
        .map(|(n, h, _)| format!("{n} {}", h.lines().next().unwrap_or("")))
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
}

// ---------------------------------------------------------------- 4. the retry

/// A POST on a kept connection that the origin closes after reading it
/// (no answer): sent once, never again on a new connection; one record,
/// 502, with the upstream it went to.
#[tokio::test]
async fn a_request_the_origin_read_is_never_sent_again() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    let req = format!("POST /drop HTTP/1.1\r\nHost: {HOST}:{p}\r\ncontent-length: 5\r\n\r\nhello");
    let resp = one_raw(&proxy, &origin, &req).await;
    assert_eq!(resp.status, 502, "{}", resp.head);
    let posts: Vec<_> = origin
        .seen()
        .into_iter()
        .filter(|(_, h, _)| h.starts_with("POST"))
        .collect();
    assert_eq!(posts.len(), 1, "sent once: {posts:?}");
    assert_eq!(origin.accepted(), 1, "no new connection for it");
    let recs = proxy.audit.records();
    let post: Vec<&Record> = recs
        .iter()
        .filter(|r| r.method.as_ref().is_some_and(|m| m == "POST"))
        .collect();
    assert_eq!(post.len(), 1, "{recs:#?}");
    assert_eq!(post[0].status, Some(502));
    assert_eq!(post[0].reason, Some(Reason::UpstreamReset));
    assert_eq!(post[0].upstream, Some(origin.addr));
    assert_eq!(post[0].decision, Decided::Inspect);
}

/// The race every pool has: the origin closes a kept connection just as a
/// GET goes out on it (it read it, never answered). A GET is safe to send
/// again: it goes once more on a new connection, vetted again, and the
/// client gets its answer; one record.
#[tokio::test]
async fn a_get_caught_by_the_origin_closing_its_kept_connection_goes_again_once() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    let (status, body) = next_client(&proxy, &origin, "/drop-if-kept").await;
    assert_eq!(status, 200);
    assert_eq!(
        body, "2 GET /drop-if-kept 0",
        "answered on a new connection"
    );
    let gets: Vec<usize> = origin
        .seen()
        .into_iter()
        .filter(|(_, h, _)| h.starts_with("GET /drop-if-kept"))
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(gets, [1, 2], "read on the kept one, then sent once more");
    let recs = proxy.audit.records();
    let inner: Vec<&Record> = recs
        .iter()
        .filter(|r| r.url.as_deref().is_some_and(|u| u.contains("drop-if-kept")))
        .collect();
    assert_eq!(inner.len(), 1, "{recs:#?}");
    assert_eq!(inner[0].status, Some(200));
    assert_eq!(inner[0].upstream, Some(origin.addr));
}

/// The same race inside one tunnel: its connection idled between two
/// requests (longer than the 100 ms after which the proxy keeps a copy of a
/// safe request) and the origin closes it as the second goes out.
#[tokio::test]
async fn a_get_caught_by_the_origin_closing_an_idle_tunnels_connection_goes_again() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/who").as_bytes()).await.expect("write");
    assert_eq!(read_response(&mut s).await.body_text(), "1 GET /who 0");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(get(p, "/drop-if-kept").as_bytes())
        .await
        .expect("write");
    let second = read_response(&mut s).await;
    assert_eq!(second.status, 200, "{}", second.head);
    assert_eq!(second.body_text(), "2 GET /drop-if-kept 0");
    end(&proxy, s, 0).await;
}

/// Sent again at most once: an origin that drops the GET on the new
/// connection too gets it twice, and the client a 502 with one record.
#[tokio::test]
async fn a_get_dropped_again_on_the_new_connection_is_one_502() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    let (status, _) = next_client(&proxy, &origin, "/drop").await;
    assert_eq!(status, 502);
    let drops: Vec<usize> = origin
        .seen()
        .into_iter()
        .filter(|(_, h, _)| h.starts_with("GET /drop"))
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(
        drops,
        [1, 2],
        "once on the kept connection, once on a new one"
    );
    let recs = proxy.audit.records();
    let inner: Vec<&Record> = recs
        .iter()
        .filter(|r| r.url.as_deref().is_some_and(|u| u.ends_with("/drop")))
        .collect();
    assert_eq!(inner.len(), 1, "{recs:#?}");
    assert_eq!(inner[0].status, Some(502));
    assert_eq!(inner[0].reason, Some(Reason::UpstreamReset));
}

/// A GET on a connection the tunnel dialled itself (its first request) is
/// not sent again: only a connection that idled can be caught closing.
#[tokio::test]
async fn a_get_on_a_fresh_connection_is_not_sent_again() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let (status, _) = next_client(&proxy, &origin, "/drop").await;
    assert_eq!(status, 502);
    assert_eq!(origin.accepted(), 1);
    assert_eq!(origin.seen().len(), 1);
}

// ---------------------------------------------------------------- 5. bounds

/// More tunnels at once than a key may keep: when they end, 64 stay, the
/// rest close; later tunnels reuse the kept ones.
#[tokio::test]
async fn no_more_than_64_connections_are_kept_for_one_target() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let n = 70;
    let mut open = Vec::new();
    for _ in 0..n {
        let mut s = tunnel(&proxy, &origin).await;
        s.write_all(get(p, "/slow").as_bytes())
            .await
            .expect("write");
        open.push(s);
    }
    for s in &mut open {
        assert_eq!(read_response(s).await.status, 200);
    }
    assert_eq!(origin.accepted(), n, "one connection each");
    drop(open);
    proxy.audit.wait_for(WAIT, |r| tunnels(r) == n).await;
    origin.wait_closed(n - 64).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(origin.closed(), n - 64);
    let (_, body) = next_client(&proxy, &origin, "/who").await;
    assert!(conn_of(&body) <= n, "{body}");
    assert_eq!(origin.accepted(), n);
}

/// Graceful shutdown does not wait for kept connections (they are not
/// tunnels): with a long grace, it ends well before it.
#[tokio::test]
async fn shutdown_does_not_wait_for_kept_connections() {
    let origin = Evil::start(true).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config_with(dir.path(), &origin.cert.cert_pem, "", origin.port(), "");
    let cfg = cfg.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"30s\"");
    let proxy = start_in(dir, &cfg, &catalog).await;
    assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    assert_eq!(origin.closed(), 0, "kept");
    let started = std::time::Instant::now();
    let recs = proxy.stop().await;
    assert!(
        started.elapsed() < WAIT,
        "the drain waited for an idle kept connection"
    );
    assert_eq!(recs.len(), 2);
}

/// A time-out so short that nothing is fresh enough to hand out to a
/// tunnel 20 ms later: each dials its own, and the janitor (every 100 ms at
/// the shortest) closes what was kept.
#[tokio::test]
async fn a_one_millisecond_idle_time_out_hands_nothing_on_and_closes_all() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "[limits]\nupstream_idle_timeout = \"1ms\"\n").await;
    for n in 1..=3 {
        let (_, body) = next_client(&proxy, &origin, "/who").await;
        assert_eq!(body, format!("{n} GET /who 0"));
        // Past the time-out (a tunnel coming within it may have it).
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    origin.wait_closed(3).await;
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 0);
}

// ---------------------------------------------------------------- 6. records and metrics

/// Each inspected tunnel counts once in the routes metric, whether it
/// dialled or took a kept connection (as a spliced tunnel does).
#[tokio::test]
async fn an_inspected_tunnel_counts_once_as_a_direct_route() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    for _ in 0..2 {
        assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    }
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 1);
    assert_eq!(
        proxy
            .metric("egress_upstream_routes_total{route=\"direct\"}")
            .await,
        2,
        "one per tunnel"
    );
    let recs = proxy.audit.records();
    assert_eq!(recs.len(), 4, "{recs:#?}");
    records_sane(&recs, &origin);
    assert_eq!(inner(&recs).len(), 2);
}

/// A kept connection the origin closed, and the origin gone since: the
/// request's one retry (a new dial) fails; the client is told, and the
/// request has one record.
#[tokio::test]
async fn a_retry_that_cannot_dial_is_one_refusal_with_one_record() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/then-close").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.status, 200);
    origin.wait_closed(1).await;
    origin.listener.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(get(p, "/who?after").as_bytes())
        .await
        .expect("write");
    let resp = read_response(&mut s).await;
    assert!(resp.status >= 500, "{}", resp.head);
    end(&proxy, s, 0).await;
    let recs = proxy.audit.records();
    assert_eq!(recs.len(), 3, "{recs:#?}");
    let after: Vec<&Record> = recs
        .iter()
        .filter(|r| r.url.as_deref().is_some_and(|u| u.ends_with("/who?after")))
        .collect();
    assert_eq!(after.len(), 1, "{recs:#?}");
    assert_eq!(after[0].status, Some(resp.status));
    assert!(after[0].reason.is_some(), "{:#?}", after[0]);
    assert_eq!(origin.seen().len(), 1);
}

/// An HTTP/1.0 request inside a tunnel (no keep-alive upstream for it):
/// the next client gets its own answer.
#[tokio::test]
async fn an_http_1_0_request_leaves_nothing_for_the_next_tunnel() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(format!("GET /who?a HTTP/1.0\r\nHost: {HOST}:{p}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let a = read_response(&mut s).await;
    assert_eq!(a.body_text(), "1 GET /who?a 0");
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(own_echo(&body, "/who?b"), "{body}");
}

/// `Content-Length` then `Transfer-Encoding: chunked` with a request
/// hidden in the chunked body past the length: whatever the proxy makes of
/// it, the origin (reading bodies as framed) never sees the hidden request,
/// and the next client gets its own answer.
#[tokio::test]
async fn a_length_and_chunked_body_smuggles_nothing() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let hidden = format!("GET /who?hidden HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n");
    let chunk = format!("hello{hidden}");
    let req = format!(
        "POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(req.as_bytes()).await.expect("write");
    let a = read_response(&mut s).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(
        own_echo(&body, "/who?b"),
        "{body} (first answer {})",
        a.head
    );
    let seen = origin.seen();
    assert!(
        seen.iter().all(|(_, h, _)| !h.contains("hidden")),
        "{seen:?}"
    );
    // hyper lets chunked win and drops the length: the whole body went up
    // as the POST's, re-chunked.
    assert_eq!(seen[0].2, chunk.len(), "{seen:?}");
}

/// Requests pipelined and the client gone at once, before any answer:
/// whatever was in flight, the next client gets its own answer.
#[tokio::test]
async fn pipelined_requests_and_a_client_gone_at_once_leave_nothing_behind() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    let burst: String = (0..8).map(|i| get(p, &format!("/who?a{i}"))).collect();
    s.write_all(burst.as_bytes()).await.expect("write");
    s.flush().await.expect("flush");
    end(&proxy, s, 0).await;
    for _ in 0..3 {
        let (status, body) = next_client(&proxy, &origin, "/who?b").await;
        assert_eq!(status, 200);
        assert!(own_echo(&body, "/who?b"), "{body}");
    }
}

/// A client's `Connection: close` ends its tunnel after the answer; the
/// upstream connection (clean) goes on to the next client.
#[tokio::test]
async fn a_clients_connection_close_is_its_own() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let req = format!("GET /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nConnection: close\r\n\r\n");
    let a = one_raw(&proxy, &origin, &req).await;
    assert_eq!(a.body_text(), "1 GET /who?a 0");
    assert!(
        origin.seen()[0]
            .1
            .to_ascii_lowercase()
            .find("connection: close")
            .is_none(),
        "hop-by-hop, not sent on"
    );
    assert_eq!(
        next_client(&proxy, &origin, "/who?b").await.1,
        "1 GET /who?b 0"
    );
}

/// A tunnel that took a kept connection and was then refused at its hello
/// (SNI for another name): the connection is not handed on half-used, the
/// next client gets its own answer, and the refused tunnel's record names
/// the upstream it had.
#[tokio::test]
async fn a_tunnel_refused_at_its_hello_after_taking_a_kept_connection() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    assert_eq!(next_client(&proxy, &origin, "/who").await.1, "1 GET /who 0");
    let s = open_tunnel(proxy.addr, &format!("{HOST}:{p}")).await;
    let name = rustls::pki_types::ServerName::try_from("www.example.com").expect("name");
    let refused = tokio_rustls::TlsConnector::from(ca_tls(&proxy))
        .connect(name, s)
        .await;
    assert!(refused.is_err(), "SNI for another name is refused");
    proxy.audit.wait_for(WAIT, |r| tunnels(r) == 2).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert_eq!(
        body, "1 GET /who?b 0",
        "the kept connection the refused tunnel never used went back"
    );
    assert_eq!(origin.accepted(), 1);
    let recs = proxy.audit.records();
    let sni = recs
        .iter()
        .find(|r| r.reason == Some(Reason::SniMismatch))
        .unwrap_or_else(|| panic!("{recs:#?}"));
    assert_eq!(sni.upstream, Some(origin.addr));
    assert_eq!(sni.decision, Decided::Deny);
}

/// An answer slower than `response_timeout`: the client is told 504 (and
/// its tunnel closes), and the late answer, when it comes, never reaches
/// the next client.
#[tokio::test]
async fn a_late_answer_after_a_504_reaches_no_one() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "[limits]\nresponse_timeout = \"500ms\"\n").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/slow?a").as_bytes())
        .await
        .expect("write");
    let timed_out = read_response(&mut s).await;
    assert_eq!(timed_out.status, 504, "{}", timed_out.head);
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(own_echo(&body, "/who?b"), "{body}");
    assert_ne!(
        conn_of(&body),
        1,
        "the timed-out connection is not handed on"
    );
    // And after the late answer's time.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, body) = next_client(&proxy, &origin, "/who?c").await;
    assert!(own_echo(&body, "/who?c"), "{body}");
    let recs = proxy.audit.records();
    let slow: Vec<&Record> = recs
        .iter()
        .filter(|r| r.url.as_deref().is_some_and(|u| u.ends_with("/slow?a")))
        .collect();
    assert_eq!(slow.len(), 1, "{recs:#?}");
    assert_eq!(slow[0].reason, Some(Reason::Timeout));
}

/// A DNS server on loopback UDP: A queries get `127.0.0.1` (TTL 0) until
/// `switch` is set, then `10.9.9.9` (private, not allowed); other queries
/// an empty answer. Counts the A queries.
async fn switching_dns(
    switch: Arc<std::sync::atomic::AtomicBool>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let queries = Arc::new(AtomicUsize::new(0));
    let q2 = Arc::clone(&queries);
    let addr = dns_server(move |qtype| {
        if qtype != 1 {
            return Ok(None);
        }
        q2.fetch_add(1, Ordering::SeqCst);
        Ok(Some(if switch.load(Ordering::SeqCst) {
            [10, 9, 9, 9]
        } else {
            [127, 0, 0, 1]
        }))
    })
    .await;
    (addr, queries)
}

/// The retry's new dial resolves and vets again: the name now resolving to
/// a private address, the request is refused `private_address` and nothing
/// is dialled; one record.
#[tokio::test]
async fn a_retry_resolves_and_vets_again() {
    let origin = Evil::start(true).await;
    let switch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (dns, queries) = switching_dns(Arc::clone(&switch)).await;
    let dir = tempfile::tempdir().expect("dir");
    egress_proxy::tls::ca::generate(&dir.path().join("certs"), false).expect("ca generate");
    std::fs::write(dir.path().join("origin.pem"), &origin.cert.cert_pem).expect("origin pem");
    let cfg = config_with(&ConfigOpts {
        allow_private: &["127.0.0.0/8"],
        dns: &format!("nameservers = [\"{dns}\"]"),
        extra: "[tls]\nca_cert = \"certs/ca.pem\"\nca_key = \"certs/ca.key\"\nextra_roots = [\"origin.pem\"]\n",
        ..ConfigOpts::default()
    });
    let catalog = rule("lookups", &[HOST], origin.port(), "allow", "");
    let proxy = start_in(dir, &cfg, &catalog).await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/then-close").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.status, 200);
    origin.wait_closed(1).await;
    let asked = queries.load(Ordering::SeqCst);
    assert!(asked >= 1);
    switch.store(true, Ordering::SeqCst);
    s.write_all(get(p, "/who?after").as_bytes())
        .await
        .expect("write");
    let resp = read_response(&mut s).await;
    assert_eq!(resp.status, 403, "{}", resp.head);
    assert_eq!(resp.header("x-egress-error"), Some("private_address"));
    end(&proxy, s, 0).await;
    assert!(queries.load(Ordering::SeqCst) > asked, "resolved again");
    assert_eq!(origin.accepted(), 1, "nothing dialled");
    assert_eq!(origin.seen().len(), 1);
    let recs = proxy.audit.records();
    let after: Vec<&Record> = recs
        .iter()
        .filter(|r| r.url.as_deref().is_some_and(|u| u.ends_with("/who?after")))
        .collect();
    assert_eq!(after.len(), 1, "{recs:#?}");
    assert_eq!(after[0].reason, Some(Reason::PrivateAddress));
    assert_eq!(recs.len(), 3, "{recs:#?}");
}

/// A client trusting only the proxy's CA, from the local address `src`.
fn client_from(proxy: &TestProxy, src: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).expect("proxy"))
        .use_preconfigured_tls((*ca_tls(proxy)).clone())
        .local_address(src.parse::<std::net::IpAddr>().expect("ip"))
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// The same host under two rules, one presenting a client certificate
/// (for one client group), one not: the connection made with the
/// certificate (the origin let it in) never carries a tunnel of the rule
/// without one, which the origin must keep refusing.
#[tokio::test]
async fn a_connection_made_with_a_rules_client_certificate_serves_only_that_rule() {
    let host = "applianceupdate.clearswift.com";
    let (client_ca, leaf, leaf_key) = crate::inspect::client_ca_and_leaf();
    let (addr, origin_cert) = crate::inspect::mtls_origin(host, &client_ca).await;
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("c.pem"), leaf.pem()).expect("cert");
    std::fs::write(dir.path().join("c.key"), leaf_key.serialize_pem()).expect("key");
    egress_proxy::tls::ca::generate(&dir.path().join("certs"), false).expect("ca");
    std::fs::write(dir.path().join("origin.pem"), &origin_cert.cert_pem).expect("origin pem");
    let cfg = config(
        &[host],
        "[tls]\nca_cert = \"certs/ca.pem\"\nca_key = \"certs/ca.key\"\nextra_roots = [\"origin.pem\"]\n\n\
         [clients.groups]\nlicensed = [\"127.0.0.2/32\"]\n",
    );
    let catalog = rule(
        "licensed",
        &[host],
        addr.port(),
        "allow",
        "clients = [\"licensed\"]\nclient_cert = { cert = \"c.pem\", key = \"c.key\" }",
    ) + &rule("everyone", &[host], addr.port(), "allow", "");
    let proxy = start_in(dir, &cfg, &catalog).await;
    let url = format!("https://{host}:{}/validate", addr.port());
    for (src, want) in [
        ("127.0.0.2", 200),
        ("127.0.0.1", 502),
        ("127.0.0.2", 200),
        ("127.0.0.1", 502),
    ] {
        let before = tunnels(&proxy.audit.records());
        let client = client_from(&proxy, src);
        let resp = client.get(&url).send().await.expect("answer");
        assert_eq!(resp.status(), want, "from {src}");
        drop(client);
        proxy.audit.wait_for(WAIT, |r| tunnels(r) > before).await;
    }
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 1);
}

/// A tunnel still open when the drain's grace runs out (hard shutdown)
/// does not put its connection in the pool on the way out: the origin sees
/// it close at once, though the proxy's state (and pool) lives on in a
/// handle.
#[tokio::test]
async fn a_tunnel_cut_by_a_hard_shutdown_keeps_nothing() {
    let origin = Evil::start(true).await;
    let dir = tempfile::tempdir().expect("dir");
    let (cfg, catalog) =
        inspecting_config_with(dir.path(), &origin.cert.cert_pem, "", origin.port(), "");
    let cfg = cfg.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"300ms\"");
    let proxy = start_in(dir, &cfg, &catalog).await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/who").as_bytes()).await.expect("write");
    assert_eq!(read_response(&mut s).await.body_text(), "1 GET /who 0");
    let handle = proxy.handle.clone();
    let audit = proxy.audit.clone();
    proxy.stop().await;
    let recs = audit.wait_for(WAIT, |r| tunnels(r) == 1).await;
    let t = recs
        .iter()
        .find(|r| r.url.is_none())
        .unwrap_or_else(|| panic!("the tunnel's record: {recs:#?}"));
    assert_eq!(t.reason, Some(Reason::Shutdown), "{t:#?}");
    // The default idle time-out (30 s) would keep it well past this.
    origin.wait_closed(1).await;
    drop((handle, s));
}

/// A parent proxy written by hand: answers each `CONNECT` 200 and relays
/// to `origin`; counts the CONNECTs.
async fn relaying_parent(origin: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connects = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&connects);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let c2 = Arc::clone(&c2);
            tokio::spawn(async move {
                let head = read_head(&mut s).await;
                if !head.starts_with("CONNECT ") {
                    return;
                }
                c2.fetch_add(1, Ordering::SeqCst);
                let Ok(mut up) = TcpStream::connect(origin).await else {
                    return;
                };
                if s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
            });
        }
    });
    (addr, connects)
}

/// Through a parent, each inspected tunnel has its own upstream connection
/// (none kept, none reused) and counts once as a `parent` route.
#[tokio::test]
async fn tunnels_through_a_parent_keep_nothing_and_count_once() {
    let origin = Evil::start(true).await;
    let (parent, connects) = relaying_parent(origin.addr).await;
    let proxy = proxy_for(
        &origin,
        &format!("[upstream]\nparent = \"http://{parent}\"\n"),
    )
    .await;
    for n in 1..=3 {
        let (status, body) = next_client(&proxy, &origin, "/who").await;
        assert_eq!(status, 200);
        assert_eq!(body, format!("{n} GET /who 0"));
    }
    assert_eq!(connects.load(Ordering::SeqCst), 3);
    assert_eq!(proxy.metric("egress_tls_upstream_reused_total").await, 0);
    assert_eq!(
        proxy
            .metric("egress_upstream_routes_total{route=\"parent\"}")
            .await,
        3,
        "one per tunnel"
    );
    assert_eq!(
        proxy
            .metric("egress_upstream_routes_total{route=\"direct\"}")
            .await,
        0
    );
    origin.wait_closed(3).await;
}

/// A connection-bound login in a request's trailers (declared with
/// `Trailer`): if it reaches the origin, it must pin like one in the head
/// (`note_auth` reads heads only). Today trailers are not sent on at all
/// (`Trailer` is stripped as hop-by-hop, and hyper sends only declared
/// trailer fields).
#[tokio::test]
async fn a_login_in_trailers_never_reaches_the_origin_unpinned() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let req = format!(
        "POST /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\nTransfer-Encoding: chunked\r\nTrailer: Authorization\r\nTE: trailers\r\n\r\n\
         5\r\nhello\r\n0\r\nAuthorization: NTLM TlRMTVNTUAADAAAA\r\n\r\n"
    );
    let a = one_raw(&proxy, &origin, &req).await;
    assert_eq!(a.status, 200, "{}", a.head);
    let first = conn_of(&a.body_text());
    let (_, next) = next_client(&proxy, &origin, "/who?b").await;
    let seen = origin.seen();
    let reached = seen[0].1.to_ascii_lowercase().contains("ntlm");
    assert!(
        !reached || conn_of(&next) != first,
        "the trailer login reached the origin and the connection went on: {seen:?}"
    );
}

/// `head` in lower case is not HEAD to hyper (it waits for the body the
/// length announces) but is to a lenient origin (which sends none): the
/// connection is out of step, so it must not go on. The client gets the
/// head, waits, leaves; the next client gets its own answer.
#[tokio::test]
async fn a_lower_case_head_out_of_step_is_not_handed_on() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(format!("head /who?a HTTP/1.1\r\nHost: {HOST}:{p}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(own_echo(&body, "/who?b"), "{body}");
    assert_eq!(origin.accepted(), 2, "the out-of-step connection closed");
}

/// A tunnel that ends after a reload, while another tunnel of the old rules
/// still holds them: its connection could only go to the old rules' pool,
/// which no new tunnel looks in; it closes at once rather than idling there
/// until the idle time-out (30 s by default).
#[tokio::test]
async fn a_tunnel_ending_after_a_reload_closes_its_connection() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let path = proxy.dir.path().join("egress-proxy.toml");
    // Holds the old rules for the whole test (and connection 1).
    let holder = tunnel(&proxy, &origin).await;
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/who?old").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.body_text(), "2 GET /who?old 0");
    egress_proxy::reload::reload(&proxy.handle, Some(&path), Vec::new).expect("reload");
    end(&proxy, s, 0).await;
    // Well before the holder's idle tunnel ends (the head time-out, 10 s),
    // which frees the old rules and their pool.
    let closed = async {
        while origin.closed() < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(3), closed)
            .await
            .is_ok(),
        "the connection idles in a pool no tunnel looks in"
    );
    let (_, body) = next_client(&proxy, &origin, "/who?new").await;
    assert_eq!(body, "3 GET /who?new 0");
    drop(holder);
}

/// The client half-closes (TLS `close_notify`) right behind its request:
/// whether or not it still gets its answer, the next client gets its own.
#[tokio::test]
async fn a_half_close_behind_a_request_leaves_nothing_behind() {
    let origin = Evil::start(true).await;
    let proxy = proxy_for(&origin, "").await;
    let p = origin.port();
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(get(p, "/slow?a").as_bytes())
        .await
        .expect("write");
    s.shutdown().await.expect("close_notify");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(
        text.is_empty() || text.ends_with("GET /slow?a 0"),
        "its own answer or none: {text}"
    );
    end(&proxy, s, 0).await;
    let (status, body) = next_client(&proxy, &origin, "/who?b").await;
    assert_eq!(status, 200);
    assert!(own_echo(&body, "/who?b"), "{body}");
}
