//! Inspected tunnels (`allow` rules when a CA is configured): terminate the
//! client's TLS with a leaf minted for the CONNECT host, re-originate TLS to
//! the upstream (verified; with the rule's client certificate), and relay
//! HTTP/1.1 request by request, each with its own audit record.
//!
//! The upstream connection of a direct tunnel is kept, when it ends
//! reusable, for the next inspected tunnel to the same target under the same
//! rule ([`pool`]).
//!
//! `bypass` rules never come here. The client must speak HTTP/1.1 (ALPN);
//! every inner request is admitted as a plain one and must name the CONNECT
//! host ([`relay`]).
mod pool;
mod relay;

pub use pool::{Conn, Key, Pool};

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::server::{Acceptor, ClientHello};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake, TlsConnector};

use super::tunnel::TunnelStats;
use super::{Shared, Snapshot};
use crate::reason::Reason;
use crate::target::{Host, Target};
use crate::tls::{self, Inspector};

/// The tunnel being inspected.
pub struct Inspected {
    pub shared: Arc<Shared>,
    /// The snapshot the CONNECT was decided under, loaded once: every inner
    /// request is decided with its policy, and `rule` indexes its guards'
    /// per-rule limiters and upstream configurations.
    pub snapshot: Arc<Snapshot>,
    pub inspector: Arc<Inspector>,
    pub client: std::net::SocketAddr,
    pub target: Target,
    pub rule: Option<usize>,
    /// The proxy-auth user of the CONNECT, for the inner records.
    pub user: Option<Arc<str>>,
    /// The client's groups, resolved once for the tunnel's inner requests.
    pub groups: crate::proxy::groups::GroupCache,
    /// Where the upstream connection goes (the inner records' `upstream`):
    /// the vetted address, or the parent's. Not the socket's peer: through
    /// an `https://` parent the tunnel's socket is one end of a pair.
    pub upstream: Option<std::net::SocketAddr>,
    /// Set for a direct tunnel: its upstream connection may be kept under
    /// this key when the tunnel ends, and a kept one that the origin closed
    /// is replaced by dialling again.
    pub key: Option<Key>,
}

/// The upstream of an inspected tunnel when the client's TLS begins.
pub enum Upstream {
    /// Dialled for this tunnel: TLS is started on it.
    Dialled(TcpStream),
    /// Kept from an earlier tunnel: TLS and HTTP/1.1 are up.
    Kept(Conn),
}

impl Upstream {
    /// Where a kept connection goes.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Upstream::Dialled(_) => None,
            Upstream::Kept(c) => c.addr,
        }
    }
}

/// Terminate, re-originate, relay. `client` is the upgraded CONNECT stream.
pub async fn intercept<C>(t: Inspected, client: C, upstream: Upstream) -> TunnelStats
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
    TunnelStats {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        sni: ended.sni,
        ech: false,
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
    match tokio::time::timeout(t.snapshot.limits.header_read_timeout, hello).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(_)) => Err(Ended {
            denied: true,
            ..Ended::failed(None, Reason::BadRequest)
        }),
        Err(_) => Err(Ended::failed(None, Reason::Timeout)),
    }
}

/// Check the hello, terminate with our leaf, re-originate, then relay. A
/// kept upstream connection that a tunnel refused at its hello never used
/// goes back for the next tunnel.
async fn inspect<C>(t: &Inspected, client: C, upstream: Upstream) -> Ended
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &t.snapshot.limits;
    let start = match read_hello(t, client).await {
        Ok(s) => s,
        Err(ended) => return unused(t, upstream, ended).await,
    };
    let sni = start.client_hello().server_name().map(str::to_string);
    let refused = hello_refusal(&t.target, &start.client_hello());
    if refused == Some(Reason::SniMismatch) {
        let ended = Ended {
            sni,
            reason: refused,
            denied: true,
        };
        return unused(t, upstream, ended).await;
    }
    let server = match tls::server_config(&t.inspector.ca, &t.target.host.to_string()) {
        Ok(c) => c,
        Err(r) => return unused(t, upstream, Ended::failed(sni, r)).await,
    };
    let handshake =
        |server| tokio::time::timeout(limits.header_read_timeout, start.into_stream(server));
    if refused.is_some() {
        // Complete the handshake so that rustls tells the client why (a
        // `no_application_protocol` alert); it cannot succeed.
        let _ = handshake(server).await;
        let ended = Ended {
            sni,
            reason: refused,
            denied: true,
        };
        return unused(t, upstream, ended).await;
    }
    // Re-originate first, so a failure can be told to the client over HTTP.
    let upstream = match upstream {
        Upstream::Kept(conn) => Ok(conn),
        Upstream::Dialled(socket) => match connect_upstream(t, socket).await {
            Ok(tls) => Conn::open(tls, t.upstream).await,
            Err(r) => Err(r),
        },
    };
    let Ok(Ok(client_tls)) = handshake(server).await else {
        if let Ok(conn) = upstream {
            // Nothing was asked of it: the next tunnel may have it.
            keep(t, conn).await;
        }
        return Ended::failed(sni, Reason::ClientClosed);
    };
    let cx = relay::Tunnel {
        t,
        io: Arc::default(),
    };
    let io = TokioIo::new(client_tls);
    let reason = match upstream {
        Ok(conn) => relay::relay(&cx, io, conn).await,
        Err(reason) => relay::refuse_all(&cx, io, reason).await,
    };
    Ended {
        sni,
        reason,
        denied: false,
    }
}

/// The tunnel ended before its upstream was used: a kept connection goes
/// back (a dialled socket, with no TLS on it yet, closes).
async fn unused(t: &Inspected, upstream: Upstream, ended: Ended) -> Ended {
    if let Upstream::Kept(conn) = upstream {
        keep(t, conn).await;
    }
    ended
}

/// Keep a direct tunnel's upstream connection for the next tunnel, in the
/// pool of the settings in force: after a reload the tunnel's own snapshot
/// is one no new tunnel takes from, so the connection closes instead of
/// idling there for as long as another old tunnel holds that snapshot.
async fn keep(t: &Inspected, conn: Conn) {
    let Some(key) = &t.key else { return };
    if !Arc::ptr_eq(&t.shared.settings.load(), &t.snapshot) {
        return;
    }
    t.snapshot.guards.kept.keep(key.clone(), conn).await;
}

/// Why a ClientHello is refused before any certificate is shown: an SNI
/// that is not the CONNECT host, or ALPN that offers only protocols other
/// than HTTP/1.1 (an HTTP/2-only client: inspected tunnels speak HTTP/1.1).
fn hello_refusal(target: &Target, hello: &ClientHello<'_>) -> Option<Reason> {
    if let (Some(sni), Host::Name(name)) = (hello.server_name(), &target.host) {
        if !super::tunnel::sni_matches(sni, name) {
            return Some(Reason::SniMismatch);
        }
    }
    let others_only = hello
        .alpn()
        .is_some_and(|mut offered| !offered.any(|p| p == tls::HTTP_11));
    others_only.then_some(Reason::AlpnUnsupported)
}

/// A new upstream connection for a direct tunnel whose connection the origin
/// closed while idle: resolved, vetted and dialled again, as for a CONNECT.
async fn redial(t: &Inspected) -> Result<Conn, crate::proxy::error::Refusal> {
    use crate::proxy::error::Refusal;
    let rule = t.rule.and_then(|i| t.snapshot.policy.rule(i));
    let addrs = crate::proxy::dial_target(&t.shared, &t.snapshot, &t.target, rule).await?;
    let (socket, addr) = crate::proxy::dial(&t.shared, &addrs, &t.snapshot).await?;
    let tls = connect_upstream(t, socket).await.map_err(|r| {
        if r == Reason::Timeout {
            Refusal::with_status(r, http::StatusCode::GATEWAY_TIMEOUT)
        } else {
            Refusal::new(r)
        }
    })?;
    Conn::open(tls, Some(addr)).await.map_err(Refusal::new)
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
        t.snapshot.limits.connect_timeout,
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
