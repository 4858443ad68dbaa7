//! One client connection: hyper's HTTP/1 server on the client socket (the
//! proxy's listener and an inspected tunnel's inner server are built
//! alike), the read counters that tell a slow head from an idle
//! connection, the close without a reset ([`linger`]), and the records of
//! heads hyper refused itself.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::accept::{client_of, refuse_raw, NotServed};
use super::pipeline::{internal_error, spawn_handle};
use super::{http, Shared};
use crate::audit::Decided;
use crate::config::Settings;
use crate::metrics::GaugeGuard;
use crate::reason::Reason;

/// Per client connection: the context each request handler sees.
pub struct ConnCtx {
    pub(super) shared: Arc<Shared>,
    pub(super) client: SocketAddr,
    /// The upstream connection kept alive for this client connection,
    /// keyed by the vetted address it goes to.
    pub(super) upstream: Mutex<Option<http::Pooled>>,
    /// What hyper has read, to tell a slow head from an idle connection.
    pub io: Arc<ConnIo>,
    /// The client's groups, resolved once for the connection's requests.
    pub(super) groups: super::groups::GroupCache,
    /// The connection's permits and gauge, held until the connection is
    /// gone, or taken by the tunnel it became ([`ConnCtx::take_held`]).
    held: Mutex<Option<Held>>,
}

impl ConnCtx {
    /// The connection's permits, for a tunnel to hold for its life: the
    /// tunnel then keeps nothing else of this context (an idle tunnel's
    /// memory is what its task holds).
    pub(super) fn take_held(&self) -> Option<Held> {
        self.held.lock().ok()?.take()
    }
}

pub(super) struct Held {
    _conn: OwnedSemaphorePermit,
    _client: crate::limits::ClientPermit,
    _open: GaugeGuard,
}

pub(super) async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    permit: OwnedSemaphorePermit,
) {
    let open = GaugeGuard::new(&shared.metrics.open_connections);
    let settings = shared.settings.load_full();
    let peer = match client_of(&mut stream, peer, &settings).await {
        Ok(client) => client,
        Err(NotServed::Refuse(who, reason)) => {
            refuse_raw(stream, who, &shared, reason).await;
            return;
        }
        Err(NotServed::Quiet) => return,
    };
    let Some(client_permit) = shared
        .client_conns
        .acquire(peer.ip(), settings.limits.per_client_connections)
    else {
        shared.metrics.connection_limit.inc();
        refuse_raw(stream, peer, &shared, Reason::ConnectionLimit).await;
        return;
    };
    let _ = stream.set_nodelay(true);
    let ctx = Arc::new(ConnCtx {
        shared: Arc::clone(&shared),
        client: peer,
        upstream: Mutex::new(None),
        io: Arc::default(),
        groups: super::groups::GroupCache::default(),
        held: Mutex::new(Some(Held {
            _conn: permit,
            _client: client_permit,
            _open: open,
        })),
    });
    let io = Arc::clone(&ctx.io);
    let svc = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        // A head is complete: what was read so far is not a partial head.
        ctx.io.mark_idle();
        let task = spawn_handle(ctx, req);
        async move { Ok::<_, Infallible>(task.await.unwrap_or_else(|_| internal_error())) }
    });
    let builder = server_builder(&settings);
    let client_io = ClientIo {
        inner: Some(stream),
        io: Arc::clone(&io),
    };
    let conn = builder
        .serve_connection(TokioIo::new(client_io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shared.drain.graceful.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = shared.drain.hard.cancelled() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        record_connection_error(&shared, peer, &e, io.partial());
    }
}

/// The HTTP/1 server for client requests, with the head limits and
/// time-outs of `[limits]`: the proxy's own listener and the inner server
/// of an inspected tunnel are built alike.
pub(crate) fn server_builder(settings: &Settings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.limits.header_read_timeout)
        .max_buf_size(settings.limits.max_header_bytes.max(8192))
        .max_header_size(settings.limits.max_header_bytes)
        // Like Squid's `half_closed_clients off`: a client that shuts its
        // write side is treated as gone, so a stalled upstream cannot keep
        // a vanished client's transaction open.
        .half_close(false)
        .keep_alive(true);
    builder
}

/// Bytes hyper has read from a client connection, and how many of them were
/// read when the connection was last idle (a head complete, or a request
/// body finished). More than that at a head time-out means a head was
/// started and never finished (slowloris), not an idle keep-alive close.
#[derive(Default)]
pub struct ConnIo {
    read: std::sync::atomic::AtomicU64,
    mark: std::sync::atomic::AtomicU64,
}

impl ConnIo {
    pub fn mark_idle(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.mark.store(self.read.load(Relaxed), Relaxed);
    }

    /// Count `n` bytes read (for a stream not wrapped in [`ClientIo`]: the
    /// plaintext of an inspected tunnel).
    pub fn add_read(&self, n: u64) {
        self.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn partial(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.read.load(Relaxed) > self.mark.load(Relaxed)
    }
}

/// The client socket as hyper sees it: counts what is read, and closes
/// without a reset when hyper drops it with input still unread (a head it
/// refused with 400/431 while the client was still sending): the answer
/// would otherwise be destroyed by the RST before the client reads it.
pub struct ClientIo {
    inner: Option<TcpStream>,
    io: Arc<ConnIo>,
}

impl ClientIo {
    /// The socket, for a tunnel after the upgrade.
    pub fn into_stream(mut self) -> Option<TcpStream> {
        self.inner.take()
    }

    fn stream(&mut self) -> std::io::Result<&mut TcpStream> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotConnected))
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        let Some(stream) = self.inner.take() else {
            return;
        };
        let mut probe = [0u8; 1];
        let unread = matches!(stream.try_read(&mut probe), Ok(n) if n > 0);
        if unread {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(linger(stream, None, 1 << 20));
            }
        }
    }
}

/// Close a client connection without a reset: write `last` (a raw
/// refusal) if any, stop writing, then read and discard what the client
/// still sends, up to `max` bytes and for 2 s at most, so that unread bytes
/// do not turn our close into an RST that would destroy the answer before
/// the client reads it.
pub(super) async fn linger(mut stream: TcpStream, last: Option<&[u8]>, max: usize) {
    let drain = async {
        if let Some(bytes) = last {
            stream.write_all(bytes).await?;
        }
        stream.shutdown().await?;
        // Small: a refusal made inside the connection task lingers there.
        let mut sink = [0u8; 1024];
        let mut total = 0usize;
        while total < max {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

impl tokio::io::AsyncRead for ClientIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Err(e) => return std::task::Poll::Ready(Err(e)),
        };
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.io
                .read
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

impl tokio::io::AsyncWrite for ClientIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(TcpStream::is_write_vectored)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_flush(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.stream() {
            Ok(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Err(e) => std::task::Poll::Ready(Err(e)),
        }
    }
}

/// Refusals hyper answered itself while parsing get their record here.
pub(super) fn record_connection_error(
    shared: &Shared,
    peer: SocketAddr,
    e: &hyper::Error,
    partial: bool,
) {
    let Some((reason, status)) = parse_refusal(e, partial) else {
        tracing::debug!(error = %e, client = %peer, "client connection ended");
        return;
    };
    let txn = shared.txn(peer);
    match status {
        Some(s) => txn.refuse(s, reason),
        None => {
            let mut txn = txn;
            txn.set_decision(Decided::Deny);
            txn.finish(None, Some(reason));
        }
    }
}

/// What a client connection's error says about the client: the reason and
/// the status hyper answered with (`None`: closed without one), or `None`
/// for an ordinary end (EOF, reset, an idle keep-alive time-out). `partial`:
/// a head had been started when the error came. Shared with the inner
/// server of an inspected tunnel.
pub(crate) fn parse_refusal(e: &hyper::Error, partial: bool) -> Option<(Reason, Option<u16>)> {
    let refusal = if e.is_parse_too_large() {
        // hyper answers 414 to a request line over 64 KiB (reachable when
        // `max_header_bytes` is raised past it), 431 to a long head; its
        // error has no predicate for the first, only this message.
        if e.to_string().contains("URI too long") {
            (Reason::HeaderTooLarge, Some(414))
        } else {
            (Reason::HeaderTooLarge, Some(431))
        }
    } else if e.is_parse() {
        (Reason::BadRequest, Some(400))
    } else if e.is_timeout() && partial {
        // A head started and never completed (slowloris); an idle
        // keep-alive connection closing at the same time-out is not a refusal.
        (Reason::Timeout, None)
    } else {
        return None;
    };
    Some(refusal)
}
