//! Test support: the proxy in-process on port 0 with an in-memory audit
//! sink, and real loopback origins (HTTP, TLS with certificates made at test
//! time, raw TCP).
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use egress_proxy::audit::{AuditSink, AuditWriter, MemorySink, Record, Tee};
use egress_proxy::config::{ConfigSource, Settings};
use egress_proxy::{Handle, Proxy};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long tests wait for a record or an answer before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Install the ring crypto provider once for every rustls user in tests.
pub fn crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A proxy running in-process.
pub struct TestProxy {
    pub addr: SocketAddr,
    /// The admin listener (/healthz, /readyz, /metrics, /api/*).
    pub admin: SocketAddr,
    pub audit: MemorySink,
    pub handle: Handle,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    writer: Option<AuditWriter>,
}

/// Write `config` and `catalog` into a temp dir and load them as the proxy would.
pub fn load(config: &str, catalog: &str) -> (Settings, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("egress-proxy.toml");
    std::fs::write(&cfg, config).expect("write config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    let settings = Settings::from_toml(ConfigSource::File(cfg), config, Vec::new())
        .unwrap_or_else(|e| panic!("test config must load:\n{e}"));
    (settings, dir)
}

/// A client for the admin listener (never through a proxy).
pub fn admin_client() -> reqwest::Client {
    crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .expect("client")
}

/// One catalog rule named `name` for `hosts` on `port` with `action`, plus
/// `extra` keys (e.g. `sni = "require"`).
pub fn rule(name: &str, hosts: &[&str], port: u16, action: &str, extra: &str) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| format!("\"{h}\"")).collect();
    format!(
        "[[rule]]\nname = \"{name}\"\nhosts = [{}]\nports = [{port}]\naction = \"{action}\"\n{extra}\n\n",
        hosts.join(", ")
    )
}

/// A config for tests: loopback clients, the given static DNS names mapped
/// to 127.0.0.1, loopback allowed as a private range, plus `extra` TOML
/// lines appended to the sections (written as full `[section]` blocks).
pub fn config(names: &[&str], extra: &str) -> String {
    let statics: Vec<String> = names
        .iter()
        .map(|n| format!("\"{n}\" = [\"127.0.0.1\"]"))
        .collect();
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n\n\
         [clients]\nallow = [\"127.0.0.0/8\", \"::1/128\"]\n\n\
         [dns]\nstatic = {{ {} }}\nallow_private = [\"127.0.0.0/8\"]\n\n\
         [policy]\ncatalog = \"catalog.toml\"\n\n{extra}\n",
        statics.join(", ")
    )
}

impl TestProxy {
    /// Start with a config and catalog text.
    pub async fn start(config: &str, catalog: &str) -> TestProxy {
        let (settings, dir) = load(config, catalog);
        TestProxy::start_settings(settings, dir).await
    }

    /// Start with loaded settings.
    pub async fn start_settings(settings: Settings, dir: tempfile::TempDir) -> TestProxy {
        TestProxy::start_with_sinks(settings, dir, Vec::new()).await
    }

    /// Start with loaded settings; records go to `sinks` (a file, say)
    /// and then to the in-memory sink.
    pub async fn start_with_sinks(
        settings: Settings,
        dir: tempfile::TempDir,
        mut sinks: Vec<Box<dyn AuditSink>>,
    ) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let audit = MemorySink::new();
        let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin = admin_listener.local_addr().expect("admin addr");
        sinks.push(Box::new(audit.clone()));
        let (log, writer, metrics) =
            egress_proxy::start_audit(Box::new(Tee(sinks))).expect("audit writer");
        let proxy = Proxy::new(vec![listener], settings, log, metrics)
            .expect("proxy")
            .with_admin(admin_listener);
        let handle = proxy.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            proxy
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestProxy {
            addr,
            admin,
            audit,
            handle,
            dir,
            stop: Some(stop),
            task: Some(task),
            writer: Some(writer),
        }
    }

    /// The proxy URL for HTTP clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A reqwest client using this proxy for http:// and https://.
    pub fn client(&self) -> reqwest::Client {
        crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.url()).expect("proxy url"))
            .timeout(WAIT)
            .build()
            .expect("client")
    }

    /// The value of the metric `name` (with its labels, e.g.
    /// `egress_upstream_routes_total{route="direct"}`) from the admin
    /// listener.
    pub async fn metric(&self, name: &str) -> u64 {
        let mut s = TcpStream::connect(self.admin).await.expect("admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("read metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
            .trim()
            .parse()
            .expect("a number")
    }

    /// Wait for `n` records and return them.
    pub async fn records(&self, n: usize) -> Vec<Record> {
        let got = self.audit.wait_for(WAIT, |r| r.len() >= n).await;
        assert!(
            got.len() >= n,
            "expected {n} audit records, got {}: {got:#?}",
            got.len()
        );
        got
    }

    /// Wait for exactly `n` records, then make sure no more arrive shortly.
    pub async fn exactly(&self, n: usize) -> Vec<Record> {
        let got = self.records(n).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        let now = self.audit.records();
        assert_eq!(now.len(), n, "expected exactly {n} records: {now:#?}");
        got
    }

    /// Wait for a record with `reason` and return the first one.
    pub async fn record_with(&self, reason: egress_proxy::audit::Reason) -> Record {
        let recs = self
            .audit
            .wait_for(WAIT, |r| r.iter().any(|x| x.reason == Some(reason)))
            .await;
        recs.into_iter()
            .find(|x| x.reason == Some(reason))
            .unwrap_or_else(|| {
                panic!(
                    "no record with reason {reason:?}: {:#?}",
                    self.audit.records()
                )
            })
    }

    /// The one record of a test whose proxy saw one transaction.
    pub async fn only_record(&self) -> Record {
        self.exactly(1).await.remove(0)
    }

    /// Stop the proxy (drain) and flush the audit writer.
    pub async fn stop(mut self) -> Vec<Record> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
        self.audit.records()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // The writer thread ends when the proxy's handles are gone.
        drop(self.writer.take());
    }
}

/// What an origin saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// An HTTP/1.1 origin on loopback. Paths:
/// `/bytes/N` streams N bytes (content-length), `/chunked/N` streams N bytes
/// chunked, `/echo` answers with the request body, anything else "hello".
pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl HttpOrigin {
    pub async fn start() -> HttpOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| origin_reply(req, Arc::clone(&seen)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HttpOrigin { addr, seen }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn origin_reply(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<OriginBody>, Infallible> {
    let (path, body) = record_seen(req, &seen).await;
    let resp = if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        Response::builder()
            .header("content-length", n)
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "must-not-reach-the-client")
            .header("keep-alive", "timeout=5")
            .body(stream_body(n))
    } else if let Some(n) = path.strip_prefix("/chunked/") {
        let n: usize = n.parse().unwrap_or(0);
        Response::builder().body(stream_body(n))
    } else if path == "/echo" {
        Response::builder().body(Full::new(body).boxed())
    } else {
        Response::builder()
            .header("content-type", "text/plain")
            .body(Full::new(Bytes::from_static(b"hello")).boxed())
    };
    Ok(resp.expect("response"))
}

/// Read `req` whole and note it in `seen`; returns its path and body.
async fn record_seen(req: Request<Incoming>, seen: &Mutex<Vec<Seen>>) -> (String, Bytes) {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.lock().expect("seen").push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body_len: body.len(),
    });
    (parts.uri.path().to_string(), body)
}

/// A body of `n` bytes in 64 KiB frames, generated as it is read.
pub fn stream_body(n: usize) -> OriginBody {
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let frames = (0..n.div_ceil(64 * 1024)).map(move |i| {
        let len = (n - i * 64 * 1024).min(64 * 1024);
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    StreamBody::new(futures_lite_stream(frames)).boxed()
}

fn futures_lite_stream<I: Iterator + Unpin>(it: I) -> IterStream<I> {
    IterStream(it)
}

/// A minimal iterator-backed stream (avoids another dev-dependency).
pub struct IterStream<I>(I);

impl<I: Iterator + Unpin> futures_core::Stream for IterStream<I> {
    type Item = I::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<I::Item>> {
        std::task::Poll::Ready(self.0.next())
    }
}

/// A raw TCP origin that runs `f` on each accepted connection.
pub async fn tcp_origin<F, Fut>(f: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let f = Arc::new(f);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let f = Arc::clone(&f);
            tokio::spawn(async move { f(s).await });
        }
    });
    addr
}

/// A TCP echo origin.
pub async fn echo_origin() -> SocketAddr {
    tcp_origin(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// A certificate and key for `names`, self-signed, made now.
pub struct TestCert {
    pub cert_der: rustls::pki_types::CertificateDer<'static>,
    pub key_der: rustls::pki_types::PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

pub fn self_signed(names: &[&str]) -> TestCert {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    TestCert {
        cert_der: ck.cert.der().clone(),
        key_der: rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        cert_pem: ck.cert.pem(),
        key_pem: ck.signing_key.serialize_pem(),
    }
}

/// The ClientHello a rustls client sends first for `name`.
pub fn client_hello(name: &str) -> Vec<u8> {
    crypto();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

/// A self-signed certificate for `names` and a TLS acceptor presenting it.
pub fn tls_acceptor(names: &[&str]) -> (TestCert, tokio_rustls::TlsAcceptor) {
    crypto();
    let cert = self_signed(names);
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert_der.clone()], cert.key_der.clone_key())
        .expect("server config");
    (cert, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A DNS server on loopback UDP. Each query gets its question back with
/// what `answer` says for its type: `Err(rcode)` (3 is NXDOMAIN),
/// `Ok(None)` no record, `Ok(Some(ip))` one A record with TTL 0.
pub async fn dns_server<F>(answer: F) -> SocketAddr
where
    F: Fn(u16) -> Result<Option<[u8; 4]>, u8> + Send + 'static,
{
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind dns");
    let addr = sock.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            if n < 12 {
                continue;
            }
            // Skip the question's name (labels up to the root), then type and class.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += 1 + usize::from(buf[i]);
            }
            i += 1 + 4;
            if i > n {
                continue;
            }
            let qtype = u16::from_be_bytes([buf[i - 4], buf[i - 3]]);
            let mut out = buf[..i].to_vec();
            out[2] = 0x81; // QR, RD
            out[6..12].fill(0); // no answers, authorities or additionals yet
            match answer(qtype) {
                Err(rcode) => out[3] = 0x80 | rcode, // RA, the error
                Ok(None) => out[3] = 0x80,
                Ok(Some(ip)) => {
                    out[3] = 0x80;
                    out[7] = 1; // one answer: the question's name, A, IN, TTL 0
                    out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
                    out.extend_from_slice(&ip);
                }
            }
            let _ = sock.send_to(&out, peer).await;
        }
    });
    addr
}

/// A TLS origin written by hand, for a test that needs to count its
/// connections or answer in ways hyper never would: `serve` gets each
/// accepted connection after its handshake, numbered from 1, and closes it
/// when done.
pub struct CountingOrigin {
    pub addr: SocketAddr,
    pub cert: TestCert,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    /// Its accept loop: aborted, the origin takes no more connections.
    pub listener: tokio::task::AbortHandle,
}

/// A connection of a [`CountingOrigin`].
pub type OriginTls = tokio_rustls::server::TlsStream<TcpStream>;

impl CountingOrigin {
    /// Listen on loopback with a self-signed certificate for `names`.
    pub async fn start<F, Fut>(names: &[&str], serve: F) -> CountingOrigin
    where
        F: Fn(OriginTls, usize) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let (cert, acceptor) = tls_acceptor(names);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (acc, clo) = (Arc::clone(&accepted), Arc::clone(&closed));
        let serve = Arc::new(serve);
        let listener = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (acc, clo, serve) = (Arc::clone(&acc), Arc::clone(&clo), Arc::clone(&serve));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let n = acc.fetch_add(1, Ordering::SeqCst) + 1;
                    serve(tls, n).await;
                    clo.fetch_add(1, Ordering::SeqCst);
                });
            }
        })
        .abort_handle();
        CountingOrigin {
            addr,
            cert,
            accepted,
            closed,
            listener,
        }
    }

    /// Connections that completed a handshake.
    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connections `serve` is done with.
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Wait until `n` of its connections have closed.
    pub async fn wait_closed(&self, n: usize) {
        let closed = async {
            while self.closed() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(WAIT, closed)
            .await
            .unwrap_or_else(|_| panic!("{n} connections closed: {} did", self.closed()));
    }
}

/// What a TLS origin saw: the SNI of each handshake, and each request.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub cert: TestCert,
    pub snis: Arc<Mutex<Vec<Option<String>>>>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl TlsOrigin {
    /// A TLS origin for `name` that answers each connection's HTTP/1.1 requests with "tls hello".
    pub async fn start(name: &str) -> TlsOrigin {
        TlsOrigin::start_for(&[name]).await
    }

    /// Like [`TlsOrigin::start`], with a certificate naming all of `names`.
    pub async fn start_for(names: &[&str]) -> TlsOrigin {
        let (cert, acceptor) = tls_acceptor(names);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let snis = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (snis2, seen2) = (Arc::clone(&snis), Arc::clone(&seen));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let snis = Arc::clone(&snis2);
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    snis.lock().expect("snis").push(sni);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            record_seen(req, &seen).await;
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                b"tls hello",
                            ))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsOrigin {
            addr,
            cert,
            snis,
            seen,
        }
    }

    /// The requests received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// A rustls client config that trusts this origin's certificate.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.cert_der.clone()).expect("root");
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

/// Open a raw connection to the proxy, send `head`, and read until the
/// proxy closes or `WAIT` passes. Returns everything read.
pub async fn raw(proxy: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Send a CONNECT and read the response head; returns (status, stream).
pub async fn connect(proxy: SocketAddr, authority: &str) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, s)
}

/// CONNECT to `authority`; panics unless the proxy answers 200.
pub async fn open_tunnel(proxy: SocketAddr, authority: &str) -> TcpStream {
    let (status, s) = connect(proxy, authority).await;
    assert_eq!(status, 200, "CONNECT {authority} must be answered 200");
    s
}

/// The byte at `i` of the test stream.
pub fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Send `total` pattern bytes through an echo tunnel (then half-close) and
/// check that every one comes back unchanged.
pub async fn echo_through(s: TcpStream, total: usize) {
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let block: Vec<u8> = (0..251 * 256).map(pattern).collect();
        let mut left = total;
        while left > 0 {
            let n = left.min(block.len());
            wr.write_all(&block[..n]).await.expect("write");
            left -= n;
        }
        wr.shutdown().await.expect("shutdown");
    });
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let first_bad = buf[..n]
                        .iter()
                        .enumerate()
                        .find(|&(i, &b)| b != pattern(got + i));
                    assert!(first_bad.is_none(), "byte {} changed", got);
                    got += n;
                }
            }
        }
    })
    .await
    .expect("the transfer finishes");
    writer.await.expect("writer");
    assert_eq!(got, total, "every byte comes back");
}

/// Write `head` then `body_len` bytes of body from a task while reading
/// the answer here; returns what was read before the close or an error.
/// The client never half-closes: it keeps its side open until it has read.
pub async fn send_with_body_while_reading(
    proxy: SocketAddr,
    head: Vec<u8>,
    body_len: usize,
) -> Vec<u8> {
    let s = TcpStream::connect(proxy).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        if wr.write_all(&head).await.is_err() {
            return;
        }
        let chunk = vec![b'b'; 16 * 1024];
        let mut left = body_len;
        while left > 0 {
            let n = left.min(chunk.len());
            if wr.write_all(&chunk[..n]).await.is_err() {
                return;
            }
            left -= n;
        }
        // Keep the write half open (dropping it would half-close the
        // connection) until the reader is done and aborts this task.
        std::future::pending::<()>().await;
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let _ = tokio::time::timeout(WAIT, async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    writer.abort();
    out
}

/// Read an HTTP response head byte by byte (leaves the rest unread).
pub async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
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

// === added for http_forward.rs and refusals.rs ===

/// Everything [`config`] writes, with each part open to change: static
/// names mapped to any address, `allow_private` only when listed, the
/// client ACL, and lines added inside `[server]`, `[dns]` and `[policy]`
/// (which [`config`] already opens, so `extra` cannot add to them).
#[derive(Default)]
pub struct ConfigOpts<'a> {
    /// `dns.static` entries: (name, address).
    pub statics: &'a [(&'a str, &'a str)],
    /// `dns.allow_private` CIDRs (none unless listed).
    pub allow_private: &'a [&'a str],
    /// `clients.allow`; empty means loopback (`127.0.0.0/8`, `::1/128`).
    pub clients: &'a [&'a str],
    /// Lines added inside `[server]`.
    pub server: &'a str,
    /// Lines added inside `[dns]`.
    pub dns: &'a str,
    /// Lines added inside `[policy]`.
    pub policy: &'a str,
    /// Further full `[section]` blocks.
    pub extra: &'a str,
}

/// A config built from [`ConfigOpts`].
pub fn config_with(o: &ConfigOpts<'_>) -> String {
    let quoted = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let statics: Vec<String> = o
        .statics
        .iter()
        .map(|(n, ip)| format!("\"{n}\" = [\"{ip}\"]"))
        .collect();
    let clients = if o.clients.is_empty() {
        quoted(&["127.0.0.0/8", "::1/128"])
    } else {
        quoted(o.clients)
    };
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"2s\"\n{}\n\n\
         [clients]\nallow = [{clients}]\n\n\
         [dns]\nstatic = {{ {} }}\nallow_private = [{}]\n{}\n\n\
         [policy]\ncatalog = \"catalog.toml\"\n{}\n\n{}\n",
        o.server,
        statics.join(", "),
        quoted(o.allow_private),
        o.dns,
        o.policy,
        o.extra,
    )
}

/// A response read off a raw socket.
#[derive(Clone, Debug, Default)]
pub struct RawResponse {
    pub status: u16,
    /// The head as received, up to and including the blank line.
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

fn parse_head(head: &str) -> (u16, Vec<(String, String)>) {
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers)
}

/// Parse one complete response (the bytes up to the close): the head, then
/// the body by content-length, chunked framing, or up to the end.
pub fn parse_response(raw: &[u8]) -> RawResponse {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return RawResponse {
            head: String::from_utf8_lossy(raw).into_owned(),
            ..RawResponse::default()
        };
    };
    let head = String::from_utf8_lossy(&raw[..end + 4]).into_owned();
    let (status, headers) = parse_head(&head);
    let mut resp = RawResponse {
        status,
        head,
        headers,
        body: Vec::new(),
    };
    let rest = &raw[end + 4..];
    resp.body = if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        rest[..n.min(rest.len())].to_vec()
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    resp
}

/// Decode a chunked body (no trailers kept); stops at the last chunk or
/// at the end of the input.
pub fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or("").trim().to_string();
        let Ok(size) = usize::from_str_radix(&size_text, 16) else {
            break;
        };
        raw = &raw[eol + 2..];
        if size == 0 {
            break;
        }
        let take = size.min(raw.len());
        out.extend_from_slice(&raw[..take]);
        raw = &raw[(take + 2).min(raw.len())..];
    }
    out
}

/// Read exactly one response with a content-length body (or none) off a
/// kept-alive stream, leaving the connection open; bounded by `WAIT`.
pub async fn read_response(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> RawResponse {
    let head = read_head(s).await;
    let (status, headers) = parse_head(&head);
    let mut resp = RawResponse {
        status,
        head,
        headers,
        body: Vec::new(),
    };
    let n = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; n];
    match tokio::time::timeout(WAIT, s.read_exact(&mut body)).await {
        Ok(Ok(_)) => resp.body = body,
        _ => panic!("response body of {n} bytes did not arrive: {}", resp.head),
    }
    resp
}

/// Like [`raw`], but returns the bytes (read until the proxy closes, an
/// error such as a reset, or `WAIT`).
pub async fn raw_bytes(proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let s = TcpStream::connect(proxy).await.expect("connect");
    exchange(s, bytes).await
}

/// [`raw_bytes`] from the local address `src` (any of 127.0.0.0/8 works on
/// loopback): a second client host in tests.
pub async fn raw_bytes_from(src: std::net::IpAddr, proxy: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(src, 0)).expect("bind source");
    let s = socket.connect(proxy).await.expect("connect");
    exchange(s, bytes).await
}

async fn exchange(mut s: TcpStream, bytes: &[u8]) -> Vec<u8> {
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let _ = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}

impl TestProxy {
    /// Like [`TestProxy::client`] with another overall time-out (for long
    /// transfers).
    pub fn client_with_timeout(&self, timeout: Duration) -> reqwest::Client {
        crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.url()).expect("proxy url"))
            .timeout(timeout)
            .build()
            .expect("client")
    }
}

// === added for abuse.rs, upstreams.rs and tests/storm.rs ===

/// A stream that keeps a copy of every byte read from it.
pub struct Tap {
    inner: TcpStream,
    log: Arc<Mutex<Vec<u8>>>,
}

impl tokio::io::AsyncRead for Tap {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = polled {
            this.log
                .lock()
                .expect("tap log")
                .extend_from_slice(&buf.filled()[before..]);
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Tap {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// An HTTP/1.1 origin with [`HttpOrigin`]'s answers that also keeps every
/// byte it receives and counts the connections it accepts: a test can say
/// "nothing else arrived", not only "no other request was parsed".
pub struct TapOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    pub bytes: Arc<Mutex<Vec<u8>>>,
    pub accepts: Arc<std::sync::atomic::AtomicUsize>,
}

impl TapOrigin {
    pub async fn start() -> TapOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let accepts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (seen2, bytes2, accepts2) =
            (Arc::clone(&seen), Arc::clone(&bytes), Arc::clone(&accepts));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                accepts2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = Arc::clone(&seen2);
                let tap = Tap {
                    inner: stream,
                    log: Arc::clone(&bytes2),
                };
                tokio::spawn(async move {
                    let svc = service_fn(move |req| origin_reply(req, Arc::clone(&seen)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tap), svc)
                        .await;
                });
            }
        });
        TapOrigin {
            addr,
            seen,
            bytes,
            accepts,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Every byte received so far, on every connection.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().expect("bytes").clone()
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// No connection, no byte, no request.
    pub fn assert_untouched(&self, what: &str) {
        assert_eq!(self.accepts(), 0, "{what}: the origin was connected to");
        assert!(
            self.bytes().is_empty(),
            "{what}: the origin received {:?}",
            String::from_utf8_lossy(&self.bytes())
        );
        assert!(
            self.seen().is_empty(),
            "{what}: the origin saw {:?}",
            self.seen()
        );
    }
}

/// Read a request (or response) head off a raw stream, up to and including
/// the blank line; `None` on EOF or an error first.
pub async fn read_head_raw(s: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Close `stream` with a TCP reset (SO_LINGER 0) instead of a FIN.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Read until EOF or an error (a reset), bounded by `WAIT`. Returns the
/// bytes and whether the end was a clean EOF (`Some(true)`), an error
/// (`Some(false)`) or the time limit (`None`).
pub async fn read_until_close(s: &mut TcpStream) -> (Vec<u8>, Option<bool>) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return true,
                Err(_) => return false,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok();
    (out, ended)
}
