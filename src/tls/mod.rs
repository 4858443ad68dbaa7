//! TLS inspection of `allow` tunnels when a CA is configured: terminate the
//! client's TLS with a leaf minted for the CONNECT host, re-originate TLS to
//! the upstream (verified; with the rule's client certificate), and relay
//! HTTP/1.1 request by request, each with its own audit record.
//!
//! `bypass` rules never come here. Every inner request goes back through the
//! policy (its method) and must name the CONNECT host (`host_mismatch`).
pub mod ca;
pub mod client;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, TlsConnector};

use crate::audit::{Decided, Reason};
use crate::config::Settings;
use crate::policy::{Policy, Verdict};
use crate::proxy::body::{ProxyBody, RequestBody, ResponseBody, UpCount};
use crate::proxy::error::Refusal;
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::txn::Txn;
use crate::proxy::{refuse, Shared};
use crate::target::{self, Host, Target};

/// What inspection needs: the CA and the upstream client configurations.
pub struct Inspector {
    pub ca: Arc<ca::Ca>,
    pub upstreams: client::Upstreams,
}

/// The tunnel being inspected.
pub struct Inspected {
    pub shared: Arc<Shared>,
    pub settings: Arc<Settings>,
    pub policy: Arc<Policy>,
    pub inspector: Arc<Inspector>,
    pub client: std::net::SocketAddr,
    pub target: Target,
    pub rule: Option<usize>,
}

/// How an inspected tunnel ended.
pub struct InspectStats {
    pub up: u64,
    pub down: u64,
    pub sni: Option<String>,
    pub reason: Option<Reason>,
    pub denied: bool,
}

struct OneCert(Arc<CertifiedKey>);

impl std::fmt::Debug for OneCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OneCert")
    }
}

impl ResolvesServerCert for OneCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// Terminate, re-originate, relay. `client` is the upgraded CONNECT stream.
pub async fn intercept<C>(t: Inspected, client: C, upstream: TcpStream) -> InspectStats
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let mut stats = InspectStats {
        up: 0,
        down: 0,
        sni: None,
        reason: None,
        denied: false,
    };
    let counted = Counted {
        inner: client,
        read: Arc::clone(&up),
        written: Arc::clone(&down),
    };
    let limits = &t.settings.limits;
    let start = match tokio::time::timeout(
        limits.header_read_timeout,
        LazyConfigAcceptor::new(Acceptor::default(), counted),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return end(stats, &up, &down, Some(Reason::BadRequest), true),
        Err(_) => return end(stats, &up, &down, Some(Reason::Timeout), false),
    };
    let host = t.target.host.to_string();
    stats.sni = start.client_hello().server_name().map(str::to_string);
    if let (Some(sni), Host::Name(name)) = (&stats.sni, &t.target.host) {
        if !crate::proxy::tunnel::sni_matches(sni, name) {
            return end(stats, &up, &down, Some(Reason::SniMismatch), true);
        }
    }
    let leaf = match t.inspector.ca.leaf(&host) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot mint a leaf certificate");
            return end(stats, &up, &down, Some(Reason::UpstreamTls), false);
        }
    };
    let mut server = match rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    {
        Ok(b) => b
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(OneCert(leaf))),
        Err(_) => return end(stats, &up, &down, Some(Reason::UpstreamTls), false),
    };
    server.alpn_protocols = vec![b"http/1.1".to_vec()];

    // Re-originate first, so a failure can be told to the client over HTTP.
    let upstream_tls = connect_upstream(&t, &host, upstream).await;
    let client_tls = match tokio::time::timeout(
        limits.header_read_timeout,
        start.into_stream(Arc::new(server)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => return end(stats, &up, &down, Some(Reason::ClientClosed), false),
    };
    let io = TokioIo::new(client_tls);
    let reason = match upstream_tls {
        Ok(tls) => relay(&t, io, tls).await,
        Err(reason) => {
            refuse_all(&t, io, reason).await;
            Some(reason)
        }
    };
    end(stats, &up, &down, reason, false)
}

fn end(
    mut s: InspectStats,
    up: &AtomicU64,
    down: &AtomicU64,
    reason: Option<Reason>,
    denied: bool,
) -> InspectStats {
    s.up = up.load(Ordering::Relaxed);
    s.down = down.load(Ordering::Relaxed);
    s.reason = reason;
    s.denied = denied;
    s
}

async fn connect_upstream(
    t: &Inspected,
    host: &str,
    upstream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Reason> {
    let name = match &t.target.host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(_) => ServerName::try_from(host.to_string()).map_err(|_| Reason::UpstreamTls)?,
    };
    let connector = TlsConnector::from(t.inspector.upstreams.for_rule(t.rule));
    match tokio::time::timeout(
        t.settings.limits.connect_timeout,
        connector.connect(name, upstream),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            tracing::info!(error = %e, host, "upstream TLS failed");
            Err(Reason::UpstreamTls)
        }
        Err(_) => Err(Reason::Timeout),
    }
}

/// The upstream TLS failed: answer each request with the refusal.
async fn refuse_all<I>(t: &Inspected, io: TokioIo<I>, reason: Reason)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(|req: Request<Incoming>| {
        let mut txn = inner_txn(t, &req);
        txn.set_decision(Decided::Inspect);
        let status = if reason == Reason::Timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        let resp = refuse(txn, Refusal::with_status(reason, status), &t.settings);
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(t.settings.limits.header_read_timeout)
        .serve_connection(io, svc)
        .await;
}

fn inner_txn(t: &Inspected, req: &Request<Incoming>) -> Txn {
    let mut txn = t.shared.txn(t.client);
    txn.set_target(&t.target);
    txn.set_rule(t.rule.and_then(|i| t.policy.rule_name(i)));
    txn.set_decision(Decided::Inspect);
    let rec = txn.rec();
    rec.method = Some(req.method().clone());
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    rec.url = Some(match (&t.target.host, t.target.port) {
        (h, 443) => format!("https://{}{pq}", bracket(h)),
        (h, p) => format!("https://{}:{p}{pq}", bracket(h)),
    });
    txn
}

fn bracket(h: &Host) -> String {
    match h {
        Host::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        other => other.to_string(),
    }
}

/// Relay HTTP/1.1 between the terminated client and the upstream.
async fn relay<I>(
    t: &Inspected,
    io: TokioIo<I>,
    upstream: tokio_rustls::client::TlsStream<TcpStream>,
) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = match hyper::client::conn::http1::Builder::new()
        .handshake::<_, RequestBody>(TokioIo::new(upstream))
        .await
    {
        Ok(x) => x,
        Err(_) => return Some(Reason::UpstreamReset),
    };
    // The connection task learns why the upstream failed; a request that
    // fails with it asks here (TLS 1.3 reports a refused client
    // certificate only when the first response is read).
    let (failed_tx, failed_rx) = tokio::sync::watch::channel::<Option<bool>>(None);
    let conn_task = tokio::spawn(async move {
        let tls = conn.await.err().is_some_and(|e| is_tls_error(&e));
        let _ = failed_tx.send(Some(tls));
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let svc = service_fn(|req: Request<Incoming>| {
        let sender = Arc::clone(&sender);
        let failed = failed_rx.clone();
        async move { Ok::<_, std::convert::Infallible>(inner(t, req, sender, failed).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(t.settings.limits.header_read_timeout)
        .serve_connection(io, svc);
    let hard = t.shared.drain.hard.clone();
    let reason = tokio::select! {
        // Each inner request has its own record; the connection ending
        // (idle time-out, client gone) is not a refusal of the tunnel.
        r = served => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "inspected connection ended");
            }
            None
        }
        () = hard.cancelled() => Some(Reason::Shutdown),
    };
    conn_task.abort();
    reason
}

/// One inner request: check host and method, forward, record.
async fn inner(
    t: &Inspected,
    req: Request<Incoming>,
    sender: Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<RequestBody>>>,
    mut failed: tokio::sync::watch::Receiver<Option<bool>>,
) -> Response<ProxyBody> {
    let txn = inner_txn(t, &req);
    if !same_host(&t.target, &req) {
        return refuse(txn, Refusal::new(Reason::HostMismatch), &t.settings);
    }
    let d = t.policy.decide(&t.target, req.method());
    if d.verdict == Verdict::Deny {
        return refuse(
            txn,
            Refusal::new(d.reason.unwrap_or(Reason::DenyRule)),
            &t.settings,
        );
    }
    let (mut parts, body) = req.into_parts();
    let up = (!hyper::body::Body::is_end_stream(&body)).then(|| Arc::new(UpCount::default()));
    strip_hop_by_hop(&mut parts.headers);
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = http::Uri::from(pq);
    }
    let out = Request::from_parts(parts, RequestBody::new(body, up.clone()));
    let mut s = sender.lock().await;
    if s.ready().await.is_err() {
        drop(s);
        let reason = upstream_failure(false, &mut failed).await;
        return refuse(txn, Refusal::new(reason), &t.settings);
    }
    let sent = tokio::time::timeout(t.settings.limits.response_timeout, s.send_request(out)).await;
    drop(s);
    match sent {
        Ok(Ok(resp)) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let status = parts.status.as_u16();
            Response::from_parts(
                parts,
                ProxyBody::Streamed(Box::new(ResponseBody::new(body, txn, up, status))),
            )
        }
        Ok(Err(e)) => {
            let reason = upstream_failure(is_tls_error(&e), &mut failed).await;
            refuse(txn, Refusal::new(reason), &t.settings)
        }
        Err(_) => refuse(txn, Refusal::new(Reason::Timeout), &t.settings),
    }
}

/// `upstream_tls` when the request's error or the upstream connection's
/// own error is a TLS one, else `upstream_reset`.
async fn upstream_failure(
    tls: bool,
    failed: &mut tokio::sync::watch::Receiver<Option<bool>>,
) -> Reason {
    let from_conn = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        failed.wait_for(Option::is_some),
    )
    .await
    .ok()
    .and_then(|r| r.ok().and_then(|v| *v));
    if tls || from_conn == Some(true) {
        Reason::UpstreamTls
    } else {
        Reason::UpstreamReset
    }
}

fn is_tls_error(e: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The inner request must name the CONNECT host (and port, when it names one).
fn same_host(t: &Target, req: &Request<Incoming>) -> bool {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        });
    let Some(authority) = authority else {
        return false;
    };
    let parsed = match target::parse_authority(&authority) {
        Ok(x) => Ok(x),
        Err(_) => target::normalize_host(&authority).map(|host| Target { host, port: t.port }),
    };
    matches!(parsed, Ok(x) if x.host == t.host && x.port == t.port)
}

/// Counts plaintext bytes through the client side of an inspected tunnel.
struct Counted<C> {
    inner: C,
    read: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl<C: AsyncRead + Unpin> AsyncRead for Counted<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counted<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
