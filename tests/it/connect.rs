//! CONNECT tunnels: the splice (bytes both ways, half-close, exact counts,
//! server-speaks-first, idle time-out), TLS end to end through a spliced
//! tunnel, the SNI/ECH check on the client's first bytes (fronting in one
//! piece, in 5-byte TCP writes and in several TLS records; upper-case SNI;
//! `require`; `off`; malformed hellos; ECH), and the refusals a CONNECT can
//! meet before its `200`.
//!
//! Each test runs its own proxy, so its records are its own.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use egress_proxy::audit::{Decided, Reason, Record};
use egress_proxy::proxy::peek::{
    tls_alert, ALERT_ACCESS_DENIED, ALERT_DECODE_ERROR, ALERT_UNRECOGNIZED_NAME,
    EXT_ENCRYPTED_CLIENT_HELLO,
};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::support::*;

// ---------------------------------------------------------------- names

const KSN: &str = "ksn1.kaspersky-labs.com";
const KSN_RULE: &str = "Kaspersky KSN lookup";
const APC: &str = "query-api.eu1.apc.avira.com";
const APC_RULE: &str = "Avira APC cloud lookup";
const CLEARSWIFT: &str = "applianceupdate.clearswift.com";
const CLEARSWIFT_RULE: &str = "Clearswift appliance update";
const SOPHOS: &str = "cls.sophosxl.net";
const SOPHOS_RULE: &str = "Sophos live protection";
/// A name no rule lists: what a fronting client puts in its SNI.
const FRONT: &str = "www.example.com";

/// Names the test configs map to 127.0.0.1.
const NAMES: &[&str] = &[KSN, APC, CLEARSWIFT, SOPHOS];

// ---------------------------------------------------------------- proxy helpers

/// The KSN look-up as the shipped catalog has it (bypass), on `port`.
fn ksn(port: u16, extra: &str) -> String {
    rule(KSN_RULE, &[KSN], port, "bypass", extra)
}

/// A proxy with the usual test config (catalog names on 127.0.0.1,
/// loopback allowed) plus `extra` sections.
async fn proxy_with(catalog: &str, extra: &str) -> TestProxy {
    TestProxy::start(&config(NAMES, extra), catalog).await
}

async fn start_proxy(catalog: &str) -> TestProxy {
    proxy_with(catalog, "").await
}

/// CONNECT to `host:port`; panics unless the proxy answers 200.
async fn open(proxy: &TestProxy, host: &str, port: u16) -> TcpStream {
    let s = open_tunnel(proxy.addr, &format!("{host}:{port}")).await;
    s.set_nodelay(true).expect("nodelay");
    s
}

/// The fields every tunnel record has.
fn assert_tunnel(r: &Record, host: &str, port: u16, decision: Decided, rule: Option<&str>) {
    assert_eq!(
        r.method.as_ref().map(http::Method::as_str),
        Some("CONNECT"),
        "{r:#?}"
    );
    assert_eq!(r.status, Some(200), "a tunnel keeps status 200: {r:#?}");
    assert_eq!(r.host.as_deref(), Some(host), "{r:#?}");
    assert_eq!(r.port, Some(port), "{r:#?}");
    assert_eq!(r.decision, decision, "{r:#?}");
    assert_eq!(r.rule.as_deref(), rule, "{r:#?}");
    assert!(r.url.is_none(), "a tunnel has no url: {r:#?}");
}

/// A tunnel refused inside (after the 200): decision deny, the reason, status 200.
fn assert_refused_inside(r: &Record, reason: Reason, sni: Option<&str>) {
    assert_eq!(r.status, Some(200), "{r:#?}");
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.reason, Some(reason), "{r:#?}");
    assert_eq!(r.sni.as_deref(), sni, "{r:#?}");
    assert_eq!(r.bytes_up, 0, "nothing was forwarded upstream: {r:#?}");
    assert!(
        r.upstream.is_some(),
        "the upstream was dialled before the 200: {r:#?}"
    );
}

// ---------------------------------------------------------------- stream helpers

/// Read exactly `n` bytes within `WAIT`.
async fn read_n<S: AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes did not arrive"))
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// Read until EOF or an error (a reset); panics if neither comes within `WAIT`.
async fn read_to_close<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the tunnel must be closed");
    out
}

/// True when nothing arrives on `s` for `quiet` and it is still open.
async fn stays_quiet(s: &mut TcpStream, quiet: Duration) -> bool {
    let mut b = [0u8; 1];
    tokio::time::timeout(quiet, s.peek(&mut b)).await.is_err()
}

/// Write `bytes` in pieces of `size`, flushing and pausing between them so
/// each piece leaves as its own TCP segment.
async fn write_split<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8], size: usize) {
    for piece in bytes.chunks(size) {
        s.write_all(piece).await.expect("write piece");
        s.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------- origins

/// What a raw TCP origin does with a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Echo every byte; close after the client's EOF.
    Echo,
    /// Echo every byte; after the client's EOF write `TRAILER`, then close.
    EchoThenTrailer,
    /// Read and keep everything, write nothing.
    Sink,
    /// Write `BANNER`, then echo; close after the client's EOF.
    BannerFirst,
    /// Write `BYE` and half-close at once, then read and keep everything.
    ByeFirst,
}

const TRAILER: &[u8] = b"origin says goodbye\n";
const BANNER: &[u8] = b"220 ksn ready\r\n";
const BYE: &[u8] = b"bye";

/// A raw TCP origin that keeps every byte it received and counts its
/// connections, so a test can say "the origin saw nothing".
struct Recorder {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<u8>>>,
    accepts: Arc<AtomicUsize>,
    /// Set once a connection read EOF (or failed).
    eof: Arc<AtomicBool>,
}

impl Recorder {
    async fn start(mode: Mode) -> Recorder {
        let got = Arc::new(Mutex::new(Vec::new()));
        let accepts = Arc::new(AtomicUsize::new(0));
        let eof = Arc::new(AtomicBool::new(false));
        let (g, a, e) = (Arc::clone(&got), Arc::clone(&accepts), Arc::clone(&eof));
        let addr = tcp_origin(move |mut s: TcpStream| {
            let (got, eof) = (Arc::clone(&g), Arc::clone(&e));
            a.fetch_add(1, Ordering::SeqCst);
            async move {
                let echo = matches!(mode, Mode::Echo | Mode::EchoThenTrailer | Mode::BannerFirst);
                if mode == Mode::BannerFirst {
                    let _ = s.write_all(BANNER).await;
                }
                if mode == Mode::ByeFirst {
                    let _ = s.write_all(BYE).await;
                    let _ = s.shutdown().await;
                }
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got.lock().expect("got").extend_from_slice(&buf[..n]);
                            if echo && s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                eof.store(true, Ordering::SeqCst);
                if mode == Mode::EchoThenTrailer {
                    let _ = s.write_all(TRAILER).await;
                }
                let _ = s.shutdown().await;
            }
        })
        .await;
        Recorder {
            addr,
            got,
            accepts,
            eof,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn got(&self) -> Vec<u8> {
        self.got.lock().expect("got").clone()
    }

    /// Wait until the proxy closed its side, then say what arrived.
    async fn got_after_close(&self) -> Vec<u8> {
        eventually("the origin sees the proxy close", || {
            self.eof.load(Ordering::SeqCst)
        })
        .await;
        self.got()
    }

    /// The proxy dialled (it does, before the 200) and closed without
    /// forwarding a single byte.
    async fn assert_saw_nothing(&self) {
        let got = self.got_after_close().await;
        assert!(
            got.is_empty(),
            "the origin received {} bytes: {got:02x?}",
            got.len()
        );
    }
}

/// A TLS origin whose certificate names all of `names` (for `sni = "off"`,
/// where the client asks for a name the CONNECT did not), answering
/// HTTP/1.1 with "tls hello" like [`TlsOrigin::start`].
async fn tls_origin_for(names: &[&str]) -> TlsOrigin {
    TlsOrigin::start_for(names).await
}

fn snis(origin: &TlsOrigin) -> Vec<Option<String>> {
    origin.snis.lock().expect("snis").clone()
}

// ---------------------------------------------------------------- TLS helpers

/// A client config that trusts nothing (for hellos that never get an answer).
fn untrusting() -> ClientConfig {
    crypto();
    ClientConfig::builder()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

fn server_name(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).expect("server name")
}

/// A rustls client connection to `name` and the ClientHello records it sends first.
fn client_hello(config: ClientConfig, name: &str) -> (ClientConnection, Vec<u8>) {
    crypto();
    let mut conn =
        ClientConnection::new(Arc::new(config), server_name(name)).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    (conn, out)
}

/// The ClientHello bytes a rustls client sends for `name`.
fn hello_for(name: &str) -> Vec<u8> {
    client_hello(untrusting(), name).1
}

/// Drive the rest of a handshake whose ClientHello the test already sent
/// itself (split or re-framed), then send close_notify.
async fn finish_handshake(conn: &mut ClientConnection, s: &mut TcpStream) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out).expect("write_tls");
            s.write_all(&out).await.expect("write handshake");
        }
        if !conn.is_handshaking() {
            break;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the origin's handshake flight did not arrive")
            .expect("read handshake");
        assert!(n > 0, "the tunnel closed during the handshake");
        conn.read_tls(&mut &buf[..n]).expect("read_tls");
        conn.process_new_packets()
            .expect("the handshake must succeed");
    }
}

/// TLS over a CONNECTed stream with tokio-rustls.
async fn tls_over(
    s: TcpStream,
    config: ClientConfig,
    name: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = TlsConnector::from(Arc::new(config));
    tokio::time::timeout(WAIT, connector.connect(server_name(name), s))
        .await
        .expect("the TLS handshake neither finished nor failed")
}

/// One HTTP/1.1 request over an established TLS stream; returns the whole
/// answer (the origin closes after it).
async fn https_get(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, host: &str) -> String {
    tls.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write request");
    String::from_utf8_lossy(&read_to_close(tls).await).into_owned()
}

// --- ClientHello surgery (as in src/proxy/peek/tests.rs) ---

/// The handshake message (header included) carried by a run of handshake records.
fn handshake_message(mut records: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    while !records.is_empty() {
        assert_eq!(records[0], 0x16);
        let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
        message.extend_from_slice(&records[5..5 + len]);
        records = &records[5 + len..];
    }
    message
}

/// Frame a handshake message into records whose payload sizes cycle through `sizes`.
fn frame(message: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, 16384).min(rest.len()));
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(chunk.len()).expect("record").to_be_bytes());
        out.extend_from_slice(chunk);
        rest = tail;
    }
    out
}

/// The same hello re-framed into records of 7, 40 and 100 payload bytes.
fn reframed(records: &[u8]) -> Vec<u8> {
    let out = frame(&handshake_message(records), &[7, 40, 100]);
    assert!(
        out.len() > records.len() + 5 * 3,
        "the hello must span several records"
    );
    out
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// A ClientHello message taken apart: the body before the extension block,
/// and the extensions in order.
fn split_hello(message: &[u8]) -> (Vec<u8>, Vec<(u16, Vec<u8>)>) {
    assert_eq!(message[0], 1, "a ClientHello");
    let body = &message[4..];
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]); // session id
    at += 2 + u16_at(body, at); // cipher suites
    at += 1 + usize::from(body[at]); // compression methods
    let head = body[..at].to_vec();
    let block_len = u16_at(body, at);
    at += 2;
    assert_eq!(at + block_len, body.len());
    let mut extensions = Vec::new();
    while at < body.len() {
        let typ = u16::try_from(u16_at(body, at)).expect("u16");
        let len = u16_at(body, at + 2);
        extensions.push((typ, body[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    (head, extensions)
}

/// Rebuild a handshake message (header included), fixing every length.
fn build_hello(head: &[u8], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (typ, data) in extensions {
        block.extend_from_slice(&typ.to_be_bytes());
        block.extend_from_slice(&u16::try_from(data.len()).expect("ext").to_be_bytes());
        block.extend_from_slice(data);
    }
    let mut body = head.to_vec();
    body.extend_from_slice(&u16::try_from(block.len()).expect("block").to_be_bytes());
    body.extend_from_slice(&block);
    let mut message = vec![1];
    message.extend_from_slice(&u32::try_from(body.len()).expect("body").to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// A real rustls hello for KSN with its extension list edited, as one record.
fn edited_hello(edit: impl FnOnce(&mut Vec<(u16, Vec<u8>)>)) -> Vec<u8> {
    let (head, mut extensions) = split_hello(&handshake_message(&hello_for(KSN)));
    edit(&mut extensions);
    let message = build_hello(&head, &extensions);
    frame(&message, &[message.len()])
}

/// A real hello whose `server_name` extension names `name` exactly.
fn hello_with_sni(name: &str) -> Vec<u8> {
    edited_hello(|exts| {
        let mut list = vec![0u8];
        list.extend_from_slice(&u16::try_from(name.len()).expect("name").to_be_bytes());
        list.extend_from_slice(name.as_bytes());
        let mut data = u16::try_from(list.len())
            .expect("list")
            .to_be_bytes()
            .to_vec();
        data.extend_from_slice(&list);
        exts.iter_mut()
            .find(|(typ, _)| *typ == 0)
            .expect("server_name")
            .1 = data;
    })
}

/// A real hello for KSN carrying an (outer) ECH extension.
fn hello_with_ech() -> Vec<u8> {
    edited_hello(|exts| {
        // type outer(0), cipher suite, config id, enc, payload: opaque to the peek.
        let mut ech = vec![0, 0x00, 0x01, 0x00, 0x01, 0x2a, 0x00, 0x04, 1, 2, 3, 4];
        ech.extend_from_slice(&[0x00, 0x08, 9, 9, 9, 9, 9, 9, 9, 9]);
        exts.insert(0, (EXT_ENCRYPTED_CLIENT_HELLO, ech));
    })
}

/// Send `bytes` through a fresh tunnel to an echo origin and check they
/// come back (and reached the origin) byte for byte; the tunnel is then
/// closed by the client. Returns the record.
async fn assert_passes_exactly(catalog_extra: &str, bytes: &[u8], piece: usize) -> Record {
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = start_proxy(&ksn(origin.port(), catalog_extra)).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    write_split(&mut s, bytes, piece).await;
    let echoed = read_n(&mut s, bytes.len()).await;
    assert!(echoed == bytes, "the bytes came back changed");
    s.shutdown().await.expect("shutdown");
    assert!(read_to_close(&mut s).await.is_empty());
    assert!(
        origin.got_after_close().await == bytes,
        "the origin must see the client's exact bytes"
    );
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.port(), Decided::Bypass, Some(KSN_RULE));
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(r.bytes_up, bytes.len() as u64, "{r:#?}");
    assert_eq!(r.bytes_down, bytes.len() as u64, "{r:#?}");
    r
}

/// Send `bytes` (in pieces of `piece`) through a fresh KSN tunnel with rule
/// keys `catalog_extra`; expect the tunnel refused inside with `reason`, the
/// client to get exactly the TLS alert `alert` (or just a close), and the
/// origin to see nothing. Returns the record.
async fn assert_refused(
    catalog_extra: &str,
    action: &str,
    bytes: &[u8],
    piece: usize,
    reason: Reason,
    alert: Option<u8>,
) -> Record {
    let origin = Recorder::start(Mode::Sink).await;
    let catalog = rule(KSN_RULE, &[KSN], origin.port(), action, catalog_extra);
    let proxy = start_proxy(&catalog).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    write_split(&mut s, bytes, piece).await;
    let answer = read_to_close(&mut s).await;
    match alert {
        Some(code) => assert_eq!(
            answer,
            tls_alert(code),
            "the client gets one fatal alert, then the close"
        ),
        None => assert!(
            answer.is_empty(),
            "the client gets a bare close: {answer:02x?}"
        ),
    }
    origin.assert_saw_nothing().await;
    assert_eq!(origin.accepts.load(Ordering::SeqCst), 1);
    let r = proxy.only_record().await;
    assert_eq!(r.rule.as_deref(), Some(KSN_RULE), "{r:#?}");
    assert_eq!(r.host.as_deref(), Some(KSN), "{r:#?}");
    assert_eq!(r.upstream, Some(origin.addr), "{r:#?}");
    assert_eq!(r.reason, Some(reason), "{r:#?}");
    assert_eq!(r.status, Some(200), "{r:#?}");
    assert_eq!(r.decision, Decided::Deny, "{r:#?}");
    assert_eq!(r.bytes_up, 0, "{r:#?}");
    r
}

// ================================================================ splice

#[tokio::test]
async fn non_tls_protocol_both_ways_with_half_close_and_exact_counts() {
    for (action, decided) in [("bypass", Decided::Bypass), ("allow", Decided::Allow)] {
        let origin = Recorder::start(Mode::EchoThenTrailer).await;
        let catalog = rule(APC_RULE, &[APC], origin.port(), action, "");
        let proxy = start_proxy(&catalog).await;
        let mut s = open(&proxy, APC, origin.port()).await;

        // A proprietary, non-TLS protocol: spliced under match-if-tls.
        s.write_all(b"APC1 lookup 0123456789abcdef\n")
            .await
            .unwrap();
        assert_eq!(read_n(&mut s, 29).await, b"APC1 lookup 0123456789abcdef\n");
        s.write_all(b"second").await.unwrap();
        assert_eq!(read_n(&mut s, 6).await, b"second");
        // The client is done sending: the origin sees EOF, and what it
        // still writes afterwards reaches the client.
        s.shutdown().await.unwrap();
        eventually("the origin sees the client's EOF", || {
            origin.eof.load(Ordering::SeqCst)
        })
        .await;
        assert_eq!(
            read_to_close(&mut s).await,
            TRAILER,
            "the origin's bytes after the half-close"
        );
        assert_eq!(origin.got(), b"APC1 lookup 0123456789abcdef\nsecond");

        let r = proxy.only_record().await;
        assert_tunnel(&r, APC, origin.port(), decided, Some(APC_RULE));
        assert_eq!(r.upstream, Some(origin.addr), "{r:#?}");
        assert_eq!(r.reason, None, "a clean close has no reason: {r:#?}");
        assert_eq!(r.bytes_up, 35, "{r:#?}");
        assert_eq!(r.bytes_down, 35 + TRAILER.len() as u64, "{r:#?}");
        assert_eq!(r.sni, None, "{r:#?}");
        assert!(!r.ech, "{r:#?}");
    }
}

#[tokio::test]
async fn many_mib_both_ways_are_counted_exactly() {
    // Enough to fill the socket buffers both ways, so the relay has to wait
    // for a slow side (its backlog path) and still count every byte.
    const TOTAL: usize = 24 * 1024 * 1024 + 17;
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let s = open(&proxy, KSN, origin.port()).await;
    // Every byte comes back unchanged, and as many as were sent.
    echo_through(s, TOTAL).await;
    let r = proxy.only_record().await;
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(
        (r.bytes_up, r.bytes_down),
        (TOTAL as u64, TOTAL as u64),
        "{r:#?}"
    );
    assert_eq!(origin.got().len(), TOTAL);
}

#[tokio::test]
async fn origin_half_close_still_lets_the_client_send() {
    let origin = Recorder::start(Mode::ByeFirst).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    // The origin said "bye" and shut its side: the client sees EOF...
    assert_eq!(read_to_close(&mut s).await, BYE);
    // ...and can still send, which reaches the origin.
    s.write_all(b"late words").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(origin.got_after_close().await, b"late words");
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.port(), Decided::Bypass, Some(KSN_RULE));
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (10, BYE.len() as u64), "{r:#?}");
}

#[tokio::test]
async fn server_speaks_first_through_a_match_if_tls_tunnel() {
    let origin = Recorder::start(Mode::BannerFirst).await;
    let proxy = start_proxy(&ksn(origin.port(), "sni = \"match-if-tls\"")).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    // The banner arrives although the client has sent nothing: the peek
    // never holds back upstream-to-client bytes.
    assert_eq!(read_n(&mut s, BANNER.len()).await, BANNER);
    assert!(origin.got().is_empty());
    s.write_all(b"QUIT\r\n").await.unwrap();
    assert_eq!(read_n(&mut s, 6).await, b"QUIT\r\n");
    s.shutdown().await.unwrap();
    assert!(read_to_close(&mut s).await.is_empty());
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.port(), Decided::Bypass, Some(KSN_RULE));
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(
        (r.bytes_up, r.bytes_down),
        (6, (BANNER.len() + 6) as u64),
        "{r:#?}"
    );
}

#[tokio::test]
async fn a_silent_client_forwards_nothing_until_it_writes() {
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    // The tunnel stays open and nothing is forwarded...
    assert!(
        stays_quiet(&mut s, Duration::from_millis(400)).await,
        "the tunnel must stay open"
    );
    assert_eq!(
        origin.accepts.load(Ordering::SeqCst),
        1,
        "dialled before the 200"
    );
    assert!(origin.got().is_empty());
    assert!(
        proxy.audit.records().is_empty(),
        "no record while the tunnel is open"
    );
    // ...until the client writes.
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, b"ping");
    assert_eq!(origin.got(), b"ping");
    drop(s);
    let r = proxy.only_record().await;
    assert_eq!((r.bytes_up, r.bytes_down), (4, 4), "{r:#?}");
}

#[tokio::test]
async fn connect_head_and_first_bytes_in_one_write() {
    // The client's first bytes arrive with the CONNECT head (hyper reads
    // them past the head): they are checked and replayed like the rest.
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let hello = hello_for(KSN);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut wire = format!(
        "CONNECT {KSN}:{0} HTTP/1.1\r\nHost: {KSN}:{0}\r\n\r\n",
        origin.port()
    )
    .into_bytes();
    wire.extend_from_slice(&hello);
    s.write_all(&wire).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        read_n(&mut s, hello.len()).await == hello,
        "echoed hello differs"
    );
    s.shutdown().await.unwrap();
    assert!(read_to_close(&mut s).await.is_empty());
    let r = proxy.only_record().await;
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
    assert_eq!(r.reason, None, "{r:#?}");
    assert_eq!(r.bytes_up, hello.len() as u64, "{r:#?}");

    // The same with a fronted hello: refused.
    let origin = Recorder::start(Mode::Sink).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut wire = format!(
        "CONNECT {KSN}:{0} HTTP/1.1\r\nHost: {KSN}:{0}\r\n\r\n",
        origin.port()
    )
    .into_bytes();
    wire.extend_from_slice(&hello_for(FRONT));
    s.write_all(&wire).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        read_to_close(&mut s).await,
        tls_alert(ALERT_UNRECOGNIZED_NAME)
    );
    origin.assert_saw_nothing().await;
    let r = proxy.only_record().await;
    assert_refused_inside(&r, Reason::SniMismatch, Some(FRONT));
}

// ================================================================ TLS end to end

#[tokio::test]
async fn tls_end_to_end_through_a_bypass_tunnel() {
    let origin = TlsOrigin::start(KSN).await;
    let proxy = start_proxy(&ksn(origin.addr.port(), "")).await;
    let s = open(&proxy, KSN, origin.addr.port()).await;
    // The client trusts only the origin's self-signed certificate: the
    // handshake succeeds only if the proxy did not interpose its own.
    let mut tls = tls_over(s, origin.client_config(), KSN)
        .await
        .expect("handshake through the tunnel");
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("peer certificates")
        .to_vec();
    assert_eq!(
        peer,
        vec![origin.cert.cert_der.clone()],
        "the client sees the origin's own certificate"
    );
    let answer = https_get(&mut tls, KSN).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("tls hello"), "{answer}");
    drop(tls);
    assert_eq!(
        snis(&origin),
        vec![Some(KSN.to_string())],
        "the origin sees the client's own SNI"
    );

    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.addr.port(), Decided::Bypass, Some(KSN_RULE));
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
    assert!(!r.ech, "{r:#?}");
    assert_eq!(r.upstream, Some(origin.addr), "{r:#?}");
    assert!(
        r.bytes_up > 200 && r.bytes_down > 200,
        "a handshake each way: {r:#?}"
    );
}

#[tokio::test]
async fn tls_end_to_end_with_reqwest() {
    let origin = TlsOrigin::start(CLEARSWIFT).await;
    let proxy = start_proxy(&rule(
        CLEARSWIFT_RULE,
        &[CLEARSWIFT],
        origin.addr.port(),
        "allow",
        "",
    ))
    .await;
    crypto();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).unwrap())
        .use_preconfigured_tls(origin.client_config())
        .timeout(WAIT)
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://{CLEARSWIFT}:{}/", origin.addr.port()))
        .send()
        .await
        .expect("https through the proxy");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "tls hello");
    drop(client);
    assert_eq!(snis(&origin), vec![Some(CLEARSWIFT.to_string())]);
    let r = proxy.only_record().await;
    // `allow` without a CA is spliced like bypass, and still SNI-checked.
    assert_tunnel(
        &r,
        CLEARSWIFT,
        origin.addr.port(),
        Decided::Allow,
        Some(CLEARSWIFT_RULE),
    );
    assert_eq!(r.sni.as_deref(), Some(CLEARSWIFT), "{r:#?}");
    assert_eq!(r.upstream, Some(origin.addr), "{r:#?}");
}

#[tokio::test]
async fn split_and_reframed_hello_completes_a_real_handshake() {
    // Byte-exact replay: the origin completes the handshake whose hello the
    // proxy reassembled from 5-byte writes and from several TLS records
    // (the transcript covers the handshake message, not its framing).
    for reframe in [false, true] {
        let origin = TlsOrigin::start(KSN).await;
        let proxy = start_proxy(&ksn(origin.addr.port(), "")).await;
        let mut s = open(&proxy, KSN, origin.addr.port()).await;
        let (mut conn, hello) = client_hello(origin.client_config(), KSN);
        let wire = if reframe { reframed(&hello) } else { hello };
        write_split(&mut s, &wire, 5).await;
        finish_handshake(&mut conn, &mut s).await;
        eventually("the origin completes the handshake", || {
            !snis(&origin).is_empty()
        })
        .await;
        assert_eq!(snis(&origin), vec![Some(KSN.to_string())]);
        drop(s);
        let r = proxy.only_record().await;
        assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
        assert_eq!(r.decision, Decided::Bypass, "{r:#?}");
    }
}

#[tokio::test]
async fn correct_hello_split_and_reframed_is_replayed_byte_exact() {
    let hello = hello_for(KSN);
    assert_passes_exactly("", &hello, hello.len()).await;
    assert_passes_exactly("", &hello, 5).await;
    assert_passes_exactly("", &reframed(&hello), hello.len() + 64).await;
    let r = assert_passes_exactly("", &reframed(&hello), 5).await;
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
}

// ================================================================ SNI check

#[tokio::test]
async fn fronted_hello_never_reaches_a_tls_origin() {
    let origin = TlsOrigin::start(KSN).await;
    let proxy = start_proxy(&ksn(origin.addr.port(), "")).await;
    let s = open(&proxy, KSN, origin.addr.port()).await;
    let err = tls_over(s, untrusting(), FRONT)
        .await
        .expect_err("a fronted handshake must fail");
    assert!(
        format!("{err}").contains("UnrecognisedName")
            || format!("{err:?}").contains("UnrecognisedName"),
        "the client reports the proxy's unrecognized_name alert: {err:?}"
    );
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.addr.port(), Decided::Deny, Some(KSN_RULE));
    assert_refused_inside(&r, Reason::SniMismatch, Some(FRONT));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(snis(&origin).is_empty(), "the origin accepted no handshake");
}

#[tokio::test]
async fn fronted_hello_refused_in_one_piece_in_5_byte_writes_and_in_records() {
    let hello = hello_for(FRONT);
    for action in ["bypass", "allow"] {
        for (wire, piece) in [
            (hello.clone(), hello.len()),
            (hello.clone(), 5),
            (reframed(&hello), hello.len() + 64),
            (reframed(&hello), 5),
        ] {
            let r = assert_refused(
                "",
                action,
                &wire,
                piece,
                Reason::SniMismatch,
                Some(ALERT_UNRECOGNIZED_NAME),
            )
            .await;
            assert_eq!(r.sni.as_deref(), Some(FRONT), "{r:#?}");
        }
    }
}

#[tokio::test]
async fn sni_of_another_allowed_host_is_still_a_mismatch() {
    // Both names are catalogued, but the SNI must be the CONNECT host.
    let r = assert_refused(
        "",
        "bypass",
        &hello_for(APC),
        1 << 16,
        Reason::SniMismatch,
        Some(ALERT_UNRECOGNIZED_NAME),
    )
    .await;
    assert_eq!(r.sni.as_deref(), Some(APC));
    // An IP-address SNI for a CONNECT to a name is no match either.
    let r = assert_refused(
        "",
        "bypass",
        &hello_with_sni("127.0.0.1"),
        1 << 16,
        Reason::SniMismatch,
        Some(ALERT_UNRECOGNIZED_NAME),
    )
    .await;
    assert_eq!(r.sni.as_deref(), Some("127.0.0.1"));
}

#[tokio::test]
async fn upper_case_and_trailing_dot_sni_match() {
    for sni in ["KSN1.Kaspersky-Labs.COM", "ksn1.kaspersky-labs.com."] {
        let hello = hello_with_sni(sni);
        let r = assert_passes_exactly("", &hello, hello.len()).await;
        assert_eq!(
            r.sni.as_deref(),
            Some(sni),
            "the SNI is recorded as sent: {r:#?}"
        );
        let r = assert_passes_exactly("", &reframed(&hello), 5).await;
        assert_eq!(r.sni.as_deref(), Some(sni), "{r:#?}");
    }
}

#[tokio::test]
async fn require_refuses_non_tls() {
    let r = assert_refused(
        "sni = \"require\"",
        "bypass",
        b"APC1 lookup\n",
        64,
        Reason::SniRequired,
        None,
    )
    .await;
    assert_eq!(r.sni, None);
}

#[tokio::test]
async fn require_refuses_a_hello_without_sni() {
    let mut config = untrusting();
    config.enable_sni = false;
    let (_, hello) = client_hello(config, KSN);
    let r = assert_refused(
        "sni = \"require\"",
        "bypass",
        &hello,
        hello.len(),
        Reason::SniRequired,
        Some(ALERT_UNRECOGNIZED_NAME),
    )
    .await;
    assert_eq!(r.sni, None);
    // Under `require` a matching hello still passes.
    let hello = hello_for(KSN);
    assert_passes_exactly("sni = \"require\"", &hello, 5).await;
}

#[tokio::test]
async fn match_if_tls_passes_a_hello_without_sni() {
    let origin = TlsOrigin::start(KSN).await;
    let proxy = start_proxy(&ksn(origin.addr.port(), "")).await;
    let s = open(&proxy, KSN, origin.addr.port()).await;
    let mut config = origin.client_config();
    config.enable_sni = false;
    let mut tls = tls_over(s, config, KSN)
        .await
        .expect("a hello without SNI passes under match-if-tls");
    assert!(https_get(&mut tls, KSN).await.ends_with("tls hello"));
    drop(tls);
    assert_eq!(snis(&origin), vec![None]);
    let r = proxy.only_record().await;
    assert_eq!(r.sni, None, "{r:#?}");
    assert_eq!(r.decision, Decided::Bypass, "{r:#?}");
}

#[tokio::test]
async fn sni_off_splices_a_mismatch() {
    let origin = tls_origin_for(&[KSN, FRONT]).await;
    let proxy = start_proxy(&ksn(origin.addr.port(), "sni = \"off\"")).await;
    let s = open(&proxy, KSN, origin.addr.port()).await;
    let mut tls = tls_over(s, origin.client_config(), FRONT)
        .await
        .expect("`off` never looks");
    assert!(https_get(&mut tls, FRONT).await.ends_with("tls hello"));
    drop(tls);
    assert_eq!(
        snis(&origin),
        vec![Some(FRONT.to_string())],
        "the origin sees the other SNI"
    );
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.addr.port(), Decided::Bypass, Some(KSN_RULE));
    assert_ne!(r.reason, Some(Reason::SniMismatch), "{r:#?}");
}

#[tokio::test]
async fn malformed_hello_is_refused() {
    let garbage: &[u8] = &[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00];
    let r = assert_refused(
        "",
        "bypass",
        garbage,
        64,
        Reason::BadRequest,
        Some(ALERT_DECODE_ERROR),
    )
    .await;
    assert_eq!(r.sni, None);
    // Starts like TLS, then another record type before the hello is complete.
    let hello = hello_for(KSN);
    let mut smuggled = hello[..20].to_vec();
    smuggled[3..5].copy_from_slice(&15u16.to_be_bytes());
    smuggled.extend_from_slice(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
    assert_refused(
        "",
        "bypass",
        &smuggled,
        64,
        Reason::BadRequest,
        Some(ALERT_DECODE_ERROR),
    )
    .await;
}

#[tokio::test]
async fn hello_with_ech_is_recorded_and_passed() {
    let hello = hello_with_ech();
    let r = assert_passes_exactly("", &hello, 5).await;
    assert!(r.ech, "{r:#?}");
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
}

#[tokio::test]
async fn hello_with_ech_is_refused_under_ech_deny() {
    let hello = hello_with_ech();
    let r = assert_refused(
        "ech = \"deny\"",
        "bypass",
        &hello,
        5,
        Reason::EchDenied,
        Some(ALERT_ACCESS_DENIED),
    )
    .await;
    assert!(r.ech, "{r:#?}");
    assert_eq!(r.sni.as_deref(), Some(KSN), "{r:#?}");
    // A hello without ECH still passes under `ech = "deny"`.
    let r = assert_passes_exactly("ech = \"deny\"", &hello_for(KSN), 5).await;
    assert!(!r.ech, "{r:#?}");
}

#[tokio::test]
async fn a_stalled_hello_is_refused_after_the_hello_time_out() {
    let origin = Recorder::start(Mode::Sink).await;
    let proxy = proxy_with(
        &ksn(origin.port(), ""),
        "[limits]\nheader_read_timeout = \"1s\"\n",
    )
    .await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    let hello = hello_for(KSN);
    let started = Instant::now();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    read_to_close(&mut s).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    origin.assert_saw_nothing().await;
    let r = proxy.only_record().await;
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!(r.status, Some(200), "{r:#?}");
    assert_eq!(r.bytes_up, 0, "{r:#?}");
}

// ================================================================ before the 200

/// The raw answer to a CONNECT the proxy refuses (it closes after it).
async fn refused_connect(proxy: &TestProxy, authority: &str) -> RawResponse {
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    parse_response(&raw_bytes(proxy.addr, req.as_bytes()).await)
}

fn assert_refusal_head(resp: &RawResponse, status: u16, reason: Reason) {
    assert_eq!(resp.status, status, "{}{}", resp.head, resp.body_text());
    assert_eq!(
        resp.header("x-egress-error"),
        Some(reason.as_str()),
        "{}",
        resp.head
    );
    assert!(
        resp.body_text().contains(reason.as_str()),
        "{}",
        resp.body_text()
    );
}

#[tokio::test]
async fn upstream_refused_is_502_before_the_200() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let proxy = start_proxy(&ksn(port, "")).await;
    let resp = refused_connect(&proxy, &format!("{KSN}:{port}")).await;
    assert_refusal_head(&resp, 502, Reason::UpstreamConnectFailed);
    let r = proxy.only_record().await;
    assert_eq!(r.status, Some(502), "{r:#?}");
    assert_eq!(r.reason, Some(Reason::UpstreamConnectFailed), "{r:#?}");
    // An upstream failure keeps the policy's decision.
    assert_eq!(r.decision, Decided::Bypass, "{r:#?}");
    assert_eq!(r.rule.as_deref(), Some(KSN_RULE), "{r:#?}");
    assert_eq!(
        (r.host.as_deref(), r.port),
        (Some(KSN), Some(port)),
        "{r:#?}"
    );
    assert_eq!(r.upstream, None, "{r:#?}");
}

#[tokio::test]
async fn a_name_on_a_private_address_is_refused_without_allow_private() {
    let origin = Recorder::start(Mode::Echo).await;
    let cfg = config_with(&ConfigOpts {
        statics: &[(KSN, "127.0.0.1")],
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &ksn(origin.port(), "")).await;
    let resp = refused_connect(&proxy, &format!("{KSN}:{}", origin.port())).await;
    assert_refusal_head(&resp, 403, Reason::PrivateAddress);
    let r = proxy.only_record().await;
    assert_eq!(
        (r.status, r.reason, r.decision),
        (Some(403), Some(Reason::PrivateAddress), Decided::Deny),
        "{r:#?}"
    );
    assert_eq!(origin.accepts.load(Ordering::SeqCst), 0, "never dialled");
}

#[tokio::test]
async fn an_ip_literal_admitted_by_addresses_records_the_sni_without_comparing() {
    let origin = TlsOrigin::start(KSN).await;
    let port = origin.addr.port();
    let catalog = format!(
        "[[rule]]\nname = \"KSN by address\"\naddresses = [\"127.0.0.1/32\"]\nports = [{port}]\naction = \"bypass\"\n"
    );
    let proxy = start_proxy(&catalog).await;
    let s = open(&proxy, "127.0.0.1", port).await;
    let mut tls = tls_over(s, origin.client_config(), KSN)
        .await
        .expect("handshake");
    assert!(https_get(&mut tls, KSN).await.ends_with("tls hello"));
    drop(tls);
    assert_eq!(snis(&origin), vec![Some(KSN.to_string())]);
    let r = proxy.only_record().await;
    assert_tunnel(
        &r,
        "127.0.0.1",
        port,
        Decided::Bypass,
        Some("KSN by address"),
    );
    assert_eq!(
        r.sni.as_deref(),
        Some(KSN),
        "recorded, not compared: {r:#?}"
    );
    assert_ne!(r.reason, Some(Reason::SniMismatch), "{r:#?}");
}

#[tokio::test]
async fn a_port_not_in_the_rule_is_refused() {
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = start_proxy(&ksn(origin.port(), "")).await;
    let other = if origin.port() == 443 { 8443 } else { 443 };
    let resp = refused_connect(&proxy, &format!("{KSN}:{other}")).await;
    assert_refusal_head(&resp, 403, Reason::PortNotAllowed);
    let r = proxy.only_record().await;
    assert_eq!(
        (r.status, r.reason, r.decision),
        (Some(403), Some(Reason::PortNotAllowed), Decided::Deny),
        "{r:#?}"
    );
    assert_eq!(r.port, Some(other), "{r:#?}");
    assert_eq!(origin.accepts.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn report_default_lets_an_uncatalogued_connect_through() {
    let origin = Recorder::start(Mode::Echo).await;
    let unlisted = "telemetry.unlisted.example.net";
    let cfg = config_with(&ConfigOpts {
        statics: &[(unlisted, "127.0.0.1"), (KSN, "127.0.0.1")],
        allow_private: &["127.0.0.0/8"],
        policy: "default = \"report\"",
        ..ConfigOpts::default()
    });
    let proxy = TestProxy::start(&cfg, &ksn(443, "")).await;
    let mut s = open(&proxy, unlisted, origin.port()).await;
    s.write_all(b"ping").await.unwrap();
    assert_eq!(read_n(&mut s, 4).await, b"ping");
    s.shutdown().await.unwrap();
    assert!(read_to_close(&mut s).await.is_empty());
    let r = proxy.only_record().await;
    assert_tunnel(&r, unlisted, origin.port(), Decided::Report, None);
    assert_eq!((r.bytes_up, r.bytes_down), (4, 4), "{r:#?}");
    assert_eq!(r.upstream, Some(origin.addr), "{r:#?}");

    // A report pass is still SNI-checked.
    let origin = Recorder::start(Mode::Sink).await;
    let proxy = TestProxy::start(&cfg, &ksn(443, "")).await;
    let mut s = open(&proxy, unlisted, origin.port()).await;
    s.write_all(&hello_for(FRONT)).await.unwrap();
    assert_eq!(
        read_to_close(&mut s).await,
        tls_alert(ALERT_UNRECOGNIZED_NAME)
    );
    origin.assert_saw_nothing().await;
    let r = proxy.only_record().await;
    assert_refused_inside(&r, Reason::SniMismatch, Some(FRONT));
}

// ================================================================ idle time-out

const ONE_SECOND_IDLE: &str = "[limits]\ntunnel_idle_timeout = \"1s\"\n";

#[tokio::test]
async fn an_idle_tunnel_is_closed_with_reason_timeout() {
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = proxy_with(
        &rule(SOPHOS_RULE, &[SOPHOS], origin.port(), "bypass", ""),
        ONE_SECOND_IDLE,
    )
    .await;
    let mut s = open(&proxy, SOPHOS, origin.port()).await;
    // Traffic keeps it open past the time-out...
    for _ in 0..6 {
        s.write_all(b"tick").await.unwrap();
        assert_eq!(read_n(&mut s, 4).await, b"tick");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // ...and then it idles out.
    let idle_from = Instant::now();
    assert!(read_to_close(&mut s).await.is_empty());
    let idled = idle_from.elapsed();
    assert!(
        idled >= Duration::from_millis(600),
        "closed after {idled:?}"
    );
    let r = proxy.only_record().await;
    assert_tunnel(
        &r,
        SOPHOS,
        origin.port(),
        Decided::Bypass,
        Some(SOPHOS_RULE),
    );
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (24, 24), "{r:#?}");
    assert!(r.duration_ms >= 2500, "{r:#?}");
}

#[tokio::test]
async fn a_tunnel_whose_client_never_writes_idles_out() {
    let origin = Recorder::start(Mode::Echo).await;
    let proxy = proxy_with(&ksn(origin.port(), ""), ONE_SECOND_IDLE).await;
    let mut s = open(&proxy, KSN, origin.port()).await;
    let started = Instant::now();
    assert!(read_to_close(&mut s).await.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        started.elapsed()
    );
    origin.assert_saw_nothing().await;
    let r = proxy.only_record().await;
    assert_tunnel(&r, KSN, origin.port(), Decided::Bypass, Some(KSN_RULE));
    assert_eq!(r.reason, Some(Reason::Timeout), "{r:#?}");
    assert_eq!((r.bytes_up, r.bytes_down), (0, 0), "{r:#?}");
}

// ================================================================ strict SNI

/// RFC 6066 allows only an ASCII host name in the SNI: a spelling that only
/// WHATWG/UTS-46 mapping would equate (percent-encoded, full-width) is a
/// mismatch, even though it "normalises" to the CONNECT host.
#[tokio::test]
async fn sni_spelt_unlike_a_dns_name_is_refused() {
    for sni in [
        "ksn1%2ekaspersky-labs.com",
        "\u{ff4b}\u{ff53}\u{ff4e}\u{ff11}.kaspersky-labs.com",
    ] {
        let r = assert_refused(
            "sni = \"require\"",
            "bypass",
            &hello_with_sni(sni),
            1 << 16,
            Reason::SniMismatch,
            Some(ALERT_UNRECOGNIZED_NAME),
        )
        .await;
        assert_eq!(r.sni.as_deref(), Some(sni));
    }
}
