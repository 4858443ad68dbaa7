//! TLS inspection of `allow` tunnels when a CA is configured: terminate the
//! client's TLS with a leaf minted for the CONNECT host, re-originate TLS to
//! the upstream (verified; with the rule's client certificate), and relay
//! HTTP/1.1 request by request, each with its own audit record.
//!
//! `bypass` rules never come here. The client must speak HTTP/1.1 (ALPN);
//! every inner request is admitted as a plain one and must name the CONNECT
//! host ([`relay`]).
pub mod ca;
pub mod client;
mod relay;

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use crate::config::Settings;
use crate::policy::Policy;
use crate::proxy::Shared;
use crate::reason::Reason;
use crate::target::{Host, Target};

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
    /// The proxy-auth user of the CONNECT, for the inner records.
    pub user: Option<Arc<str>>,
    /// The guards of the snapshot the CONNECT was decided under: `rule`
    /// indexes their per-rule limiters and upstream configurations.
    pub guards: Arc<crate::proxy::Guards>,
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
    let counted = Counted {
        inner: client,
        read: Arc::clone(&up),
        written: Arc::clone(&down),
    };
    let ended = inspect(&t, counted, upstream).await;
    InspectStats {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        sni: ended.sni,
        reason: ended.reason,
        denied: ended.denied,
    }
}

/// How the inspection ended, for the tunnel's record.
struct Ended {
    sni: Option<String>,
    reason: Option<Reason>,
    /// Refused inside the tunnel (the record's decision becomes `deny`).
    denied: bool,
}

impl Ended {
    fn failed(sni: Option<String>, reason: Reason) -> Self {
        Ended {
            sni,
            reason: Some(reason),
            denied: false,
        }
    }
}

/// The ClientHello, within the head time-out: not TLS is a refusal.
async fn read_hello<C>(t: &Inspected, client: C) -> Result<StartHandshake<C>, Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let hello = LazyConfigAcceptor::new(Acceptor::default(), client);
    match tokio::time::timeout(t.settings.limits.header_read_timeout, hello).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(Ended {
            denied: true,
            ..Ended::failed(None, Reason::BadRequest)
        }),
        Err(_) => Err(Ended::failed(None, Reason::Timeout)),
    }
}

/// Check the hello, terminate with our leaf, re-originate, then relay.
async fn inspect<C>(t: &Inspected, client: C, upstream: TcpStream) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &t.settings.limits;
    let start = match read_hello(t, client).await {
        Ok(s) => s,
        Err(ended) => return ended,
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    let refused = hello_refusal(&t.target, &start.client_hello());
    if refused == Some(Reason::SniMismatch) {
        return Ended {
            sni,
            reason: refused,
            denied: true,
        };
    }
    let server = match server_config(t) {
        Ok(c) => c,
        Err(r) => return Ended::failed(sni, r),
    };
    let handshake =
        |server| tokio::time::timeout(limits.header_read_timeout, start.into_stream(server));
    if refused.is_some() {
        // Complete the handshake so that rustls tells the client why (a
        // `no_application_protocol` alert); it cannot succeed.
        let _ = handshake(server).await;
        return Ended {
            sni,
            reason: refused,
            denied: true,
        };
    }
    // Re-originate first, so a failure can be told to the client over HTTP.
    let upstream_addr = upstream.peer_addr().ok();
    let upstream_tls = connect_upstream(t, upstream).await;
    let Ok(Ok(client_tls)) = handshake(server).await else {
        return Ended::failed(sni, Reason::ClientClosed);
    };
    let cx = relay::Tunnel {
        t,
        guards: Arc::clone(&t.guards),
        upstream: upstream_addr,
        io: Arc::default(),
    };
    let io = TokioIo::new(client_tls);
    let reason = match upstream_tls {
        Ok(tls) => relay::relay(&cx, io, tls).await,
        Err(reason) => relay::refuse_all(&cx, io, reason).await,
    };
    Ended {
        sni,
        reason,
        denied: false,
    }
}

/// Why a ClientHello is refused before any certificate is shown: an SNI
/// that is not the CONNECT host, or ALPN that offers only protocols other
/// than HTTP/1.1 (an HTTP/2-only client: inspected tunnels speak HTTP/1.1).
fn hello_refusal(target: &Target, hello: &ClientHello<'_>) -> Option<Reason> {
    if let (Some(sni), Host::Name(name)) = (hello.server_name(), &target.host) {
        if !crate::proxy::tunnel::sni_matches(sni, name) {
            return Some(Reason::SniMismatch);
        }
    }
    let others_only = hello
        .alpn()
        .is_some_and(|mut offered| !offered.any(|p| p == HTTP_11));
    others_only.then_some(Reason::AlpnUnsupported)
}

/// The one application protocol inspected tunnels speak.
const HTTP_11: &[u8] = b"http/1.1";

/// Our side of the client's TLS: a leaf for the CONNECT host from our CA.
fn server_config(t: &Inspected) -> Result<Arc<rustls::ServerConfig>, Reason> {
    let leaf = t
        .inspector
        .ca
        .leaf(&t.target.host.to_string())
        .map_err(|e| {
            tracing::error!(error = %e, "cannot mint a leaf certificate");
            Reason::UpstreamTls
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|_| Reason::UpstreamTls)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCert(leaf)));
    server.alpn_protocols = vec![HTTP_11.to_vec()];
    Ok(Arc::new(server))
}

/// TLS to the upstream: verified for the CONNECT host, with the rule's
/// client certificate when it has one.
async fn connect_upstream(
    t: &Inspected,
    upstream: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Reason> {
    let host = t.target.host.to_string();
    let name = match &t.target.host {
        Host::Ip(ip) => ServerName::IpAddress((*ip).into()),
        Host::Name(_) => ServerName::try_from(host.clone()).map_err(|_| Reason::UpstreamTls)?,
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

/// True when `e` comes from rustls (a refused certificate, a bad record).
pub(crate) fn is_tls_error(e: &hyper::Error) -> bool {
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
