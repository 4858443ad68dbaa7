//! The data path: the accept loop, the connection permit, the client ACL,
//! one hyper HTTP/1 connection per client, and the dispatch of each request
//! to [`http`] (absolute-form forwarding) or [`connect`] (tunnels).
//!
//! Every transaction gets exactly one audit record ([`txn::Txn`]); every
//! refusal goes through [`error::Refusal`]. Policy and settings are read once
//! per request from the current snapshot, so a reload never changes a
//! transaction half-way.
pub mod body;
pub mod connect;
pub mod error;
pub mod http;
pub mod peek;
pub mod pp;
pub mod tunnel;
pub mod txn;

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::audit::{AuditLog, Decided, IdGen};
use crate::auth::Auth;
use crate::config::Settings;
use crate::dns::Resolver;
use crate::limits::{ClientConns, RateLimits};
use crate::metrics::{GaugeGuard, Metrics};
use crate::policy::Verdict;
use crate::reason::Reason;
use crate::shutdown::Drain;
use crate::target::{self, Target};
use crate::tls::ca::Ca;
use crate::tls::client::{ClientTlsError, Upstreams};
use crate::tls::Inspector;
use body::ProxyBody;
use error::Refusal;
use txn::Txn;

/// State shared by every connection.
pub struct Shared {
    /// The current [`Snapshot`] (settings, policy and the guards built for
    /// them); swapped whole on reload. It derefs to [`Settings`], so
    /// `settings.load().server` reads as a plain settings value would.
    pub settings: ArcSwap<Snapshot>,
    pub resolver: Resolver,
    pub audit: AuditLog,
    pub ids: IdGen,
    pub drain: Drain,
    /// Connection permits (`server.max_connections`).
    pub conns: Arc<Semaphore>,
    /// Pipes for bulk tunnels to splice through.
    pub splicer: tunnel::Splicer,
    /// The inspection CA, loaded at start when `[tls]` sets one.
    pub ca: Option<Arc<Ca>>,
    /// Bounds the connections being answered with a refusal at once (each
    /// lingers briefly); past it, extra connections are closed at once.
    pub refusing: Arc<Semaphore>,
    /// Open connections per client address (`limits.per_client_connections`).
    pub client_conns: Arc<ClientConns>,
    pub metrics: Arc<Metrics>,
}

/// One reload's worth of state: the settings and the guards built for
/// them, swapped as one value. The guards' per-rule vectors
/// (`RateLimits::rule`, `Upstreams::for_rule`) are indexed by this
/// settings' rule indices, so a request loads the snapshot once and takes
/// both from it: a reload with reordered rules cannot pair an old index
/// with new vectors.
pub struct Snapshot {
    pub settings: Arc<Settings>,
    pub guards: Arc<Guards>,
}

impl std::ops::Deref for Snapshot {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// What guards the door, per settings snapshot.
pub struct Guards {
    pub rates: RateLimits,
    pub auth: Option<Arc<Auth>>,
    /// Set when a CA is configured: `allow` tunnels are inspected.
    pub inspector: Option<Arc<Inspector>>,
}

impl Guards {
    /// Build for `settings`; `ca` is the CA loaded at start (it needs a restart to change).
    ///
    /// # Errors
    /// A client certificate or extra roots file cannot be used.
    pub fn new(settings: &Settings, ca: Option<&Arc<Ca>>) -> Result<Self, ClientTlsError> {
        let inspector = match ca {
            Some(ca) if settings.tls.inspection_enabled() => Some(Arc::new(Inspector {
                ca: Arc::clone(ca),
                upstreams: Upstreams::new(settings)?,
            })),
            _ => None,
        };
        Ok(Guards {
            rates: RateLimits::new(settings),
            auth: Auth::new(&settings.auth).map(Arc::new),
            inspector,
        })
    }
}

impl Shared {
    /// A new transaction record for `client`.
    pub fn txn(&self, client: SocketAddr) -> Txn {
        Txn::new(
            self.audit.clone(),
            self.drain.hard.clone(),
            self.ids.next(),
            client,
        )
    }
}

/// The soft file-descriptor limit.
fn nofile() -> usize {
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(nofile).unwrap_or(usize::MAX)
}

/// How many splice pipes may be open at once: `server.splice_pipes`, or
/// when unset, derived from the file-descriptor limit
/// (see [`tunnel::pipe_budget`]).
pub fn pipe_cap(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| tunnel::pipe_budget(nofile()))
}

/// The connection cap: `server.max_connections`, or when 0, derived from
/// the file-descriptor limit (two descriptors a connection, some kept back,
/// and two for each splice pipe set aside).
pub fn connection_cap(configured: usize, pipes: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let reserved = pipes.saturating_mul(2).saturating_add(64);
    (nofile().saturating_sub(reserved) / 2).max(16)
}

/// Accept connections on `listener` until the drain begins.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let graceful = shared.drain.graceful.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = graceful.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            // Unmapped first: ACLs, limits and records see one spelling.
            Ok((stream, peer)) => (stream, unmapped(peer)),
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = Arc::clone(&shared.conns).try_acquire_owned().ok();
        let shared2 = Arc::clone(&shared);
        match permit {
            Some(permit) => {
                // Boxed: the connection future is kilobytes (hyper's
                // dispatcher and our service), and the task would otherwise
                // be moved whole several times on its way into the runtime.
                shared
                    .drain
                    .tracker
                    .spawn(Box::pin(connection(stream, peer, shared2, permit)));
            }
            None => {
                shared.metrics.connection_limit.inc();
                match Arc::clone(&shared.refusing).try_acquire_owned() {
                    Ok(r) => {
                        shared.drain.tracker.spawn(async move {
                            let _r = r;
                            refuse_raw(stream, peer, &shared2, Reason::ConnectionLimit).await;
                        });
                    }
                    Err(_) => {
                        // Flooded: record it and close without answering.
                        let txn = shared.txn(peer);
                        txn.refuse(503, Reason::ConnectionLimit);
                        drop(stream);
                    }
                }
            }
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:10.0.0.5`, as a
/// dual-stack listener or a PROXY header may give it) as plain IPv4, so
/// ACLs, rate-limit keys and records know one client by one address.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(addr, |v4| SocketAddr::from((v4, addr.port()))),
        IpAddr::V4(_) => addr,
    }
}

/// `ip` must be [`unmapped`] already.
fn client_allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    allow.iter().any(|n| n.contains(&ip))
}

/// Why a connection is not served: refused (as whom, why), or closed
/// quietly (nothing was asked, as hyper closes an idle connection).
enum NotServed {
    Refuse(SocketAddr, Reason),
    Quiet,
}

/// Who the client of a new connection is: its peer, or with
/// `server.proxy_protocol` and a peer in `proxy_protocol_from`, the address
/// the PROXY header carries. Both must be in `clients.allow`.
async fn client_of(
    stream: &mut TcpStream,
    peer: SocketAddr,
    settings: &Settings,
) -> Result<SocketAddr, NotServed> {
    if !client_allowed(&settings.clients, peer.ip()) {
        return Err(NotServed::Refuse(peer, Reason::ClientNotAllowed));
    }
    if !settings.server.proxy_protocol {
        return Ok(peer);
    }
    let timeout = settings.limits.header_read_timeout;
    if !client_allowed(&settings.server.proxy_protocol_from, peer.ip()) {
        // A client connecting directly. A PROXY header from it would be a
        // claim to be someone else: refused, and recorded as itself.
        return match pp::sniff(stream, timeout).await {
            Ok(false) => Ok(peer),
            Ok(true) => {
                tracing::warn!(client = %peer, "PROXY header from a peer outside server.proxy_protocol_from; refused");
                Err(NotServed::Refuse(peer, Reason::ClientNotAllowed))
            }
            Err(pp::PpError::Idle | pp::PpError::Closed) => Err(NotServed::Quiet),
            Err(_) => Err(NotServed::Refuse(peer, Reason::BadRequest)),
        };
    }
    // A trusted balancer: the header is required, and the address it
    // carries is the client for ACLs, limits and records.
    let client = match pp::read_header(stream, peer, timeout).await {
        Ok(client) => unmapped(client),
        Err(e) => {
            tracing::debug!(error = %e, client = %peer, "PROXY header refused");
            return Err(NotServed::Refuse(peer, Reason::BadRequest));
        }
    };
    if !client_allowed(&settings.clients, client.ip()) {
        return Err(NotServed::Refuse(client, Reason::ClientNotAllowed));
    }
    Ok(client)
}

/// Answer a refusal before hyper reads the request, then close without a
/// reset: stop writing, and read (and discard) what the client still sends
/// for a moment, so unread bytes do not turn our close into an RST that
/// would destroy the answer before the client reads it.
async fn refuse_raw(mut stream: TcpStream, peer: SocketAddr, shared: &Shared, reason: Reason) {
    let refusal = Refusal::new(reason);
    let txn = shared.txn(peer);
    let id = txn.id();
    txn.refuse(refusal.status.as_u16(), reason);
    let raw = refusal.raw(id);
    let linger = async {
        stream.write_all(&raw).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut total = 0usize;
        while total < 256 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => total += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
}

/// Per client connection: the context each request handler sees.
pub struct ConnCtx {
    shared: Arc<Shared>,
    client: SocketAddr,
    /// The upstream connection kept alive for this client connection,
    /// keyed by the vetted address it goes to.
    upstream: Mutex<Option<http::Pooled>>,
    /// What hyper has read, to tell a slow head from an idle connection.
    pub io: Arc<ConnIo>,
    /// The connection's permits and gauge, held until the connection and
    /// any tunnel it became are gone (a tunnel task keeps this context).
    _held: Held,
}

struct Held {
    _conn: OwnedSemaphorePermit,
    _client: crate::limits::ClientPermit,
    _open: GaugeGuard,
}

async fn connection(
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
        _held: Held {
            _conn: permit,
            _client: client_permit,
            _open: open,
        },
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
                rt.spawn(linger(stream));
            }
        }
    }
}

/// Stop writing, then read and discard what the client still sends, for a
/// bounded time and amount, before closing.
async fn linger(mut stream: TcpStream) {
    let drain = async {
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut total = 0usize;
        while total < 1 << 20 {
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
fn record_connection_error(shared: &Shared, peer: SocketAddr, e: &hyper::Error, partial: bool) {
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

/// Handle one request on its own task, started now.
///
/// Not in the service future: hyper drops that future, wherever it is, when
/// the client closes its connection (`half_close(false)`), and a request
/// read whole would then go unrecorded, or be recorded without the dial it
/// made. On its own task it is decided, dialled and recorded like any
/// other, and its answer is dropped (recorded `client_closed`, with the
/// status it would have had). Every step is bounded by a time-out; a hard
/// shutdown cuts it (recorded `shutdown`).
fn spawn_handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> tokio::task::JoinHandle<Response<ProxyBody>> {
    let shared = Arc::clone(&ctx.shared);
    let hard = shared.drain.hard.clone();
    let txn = shared.txn(ctx.client);
    shared.drain.tracker.spawn(async move {
        tokio::select! {
            resp = handle(ctx, txn, req) => resp,
            () = hard.cancelled() => Refusal::new(Reason::Shutdown).response(0, None),
        }
    })
}

/// A handler task that panicked (its record was written as it unwound).
fn internal_error() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = ::http::StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        ::http::header::CONNECTION,
        ::http::HeaderValue::from_static("close"),
    );
    resp
}

/// One request: check the head, parse the target, decide, then forward or
/// tunnel. Each step refuses by returning its [`Refusal`]; the refusal is
/// recorded and answered here, in one place.
async fn handle(ctx: Arc<ConnCtx>, mut txn: Txn, req: Request<Incoming>) -> Response<ProxyBody> {
    let shared = &ctx.shared;
    txn.rec().method = Some(req.method().clone());
    let is_connect = req.method() == Method::CONNECT;
    if !is_connect {
        // The URI as received until the target is parsed (a refusal of a
        // malformed one shows it); then what is forwarded.
        txn.rec().url = Some(truncate(req.uri().to_string(), 4096));
    }
    shared.audit.ready().await;
    // One load: the guards' per-rule vectors index this settings' rules.
    let snapshot = shared.settings.load_full();
    let (settings, guards) = (Arc::clone(&snapshot.settings), Arc::clone(&snapshot.guards));
    let step = admit(&ctx, &guards, &settings, &mut txn, &req).await;
    let (target, index) = match step.and_then(|()| decide(&settings, &guards, &mut txn, &req)) {
        Ok(t) => t,
        Err(r) => return refuse(txn, r, &settings),
    };
    if is_connect {
        connect::tunnel(&ctx, &settings, &guards, txn, req, target, index).await
    } else {
        let rule = index.and_then(|i| settings.policy.rule(i));
        http::forward(&ctx, &settings, txn, req, target, rule).await
    }
}

/// The checks before the target is looked at: head size, rates, proxy auth.
async fn admit(
    ctx: &ConnCtx,
    guards: &Guards,
    settings: &Settings,
    txn: &mut Txn,
    req: &Request<Incoming>,
) -> Result<(), Refusal> {
    // hyper bounds a head that arrives in pieces; one that arrives whole in
    // a single read can pass its buffer check, so measure it here too.
    if head_len(req) > settings.limits.max_header_bytes {
        return Err(Refusal::new(Reason::HeaderTooLarge));
    }
    // Rates first: a client over its rate gets 429 before any password is
    // verified, so guessing credentials is limited like everything else.
    let ip = ctx.client.ip();
    guards
        .rates
        .request(ip)
        .and_then(|()| {
            if req.method() == Method::CONNECT {
                guards.rates.tunnel(ip)
            } else {
                Ok(())
            }
        })
        .map_err(|l| Refusal::rate_limited(l.retry_after))?;
    if let Some(auth) = &guards.auth {
        let user = authenticate(auth, req).await.map_err(Refusal::new)?;
        txn.rec().user = Some(user);
    }
    Ok(())
}

/// Parse the target and apply the policy: the target and the index of the
/// matching rule, or the refusal.
fn decide(
    settings: &Settings,
    guards: &Guards,
    txn: &mut Txn,
    req: &Request<Incoming>,
) -> Result<(Target, Option<usize>), Refusal> {
    let client = txn.rec().client;
    let target = parse_target(req).map_err(|e| {
        tracing::debug!(error = %e, %client, "bad request target");
        Refusal::new(Reason::BadRequest)
    })?;
    txn.set_target(&target);
    if req.method() != Method::CONNECT {
        txn.rec().url = Some(truncate(http::forwarded_url(&target, req.uri()), 4096));
    }
    let policy = &settings.policy;
    let decision = policy.decide(&target, req.method());
    txn.set_rule(decision.rule.and_then(|i| policy.rule_name(i)));
    match decision.verdict {
        Verdict::Deny => {
            let reason = decision.reason.unwrap_or(Reason::NotInCatalog);
            return Err(Refusal::new(reason));
        }
        // Let through and recorded as `report`; like any clean success it
        // carries no reason (DESIGN.md), unless it ends abnormally.
        Verdict::Report => txn.set_decision(Decided::Report),
        Verdict::Allow => txn.set_decision(Decided::Allow),
        Verdict::Bypass => txn.set_decision(Decided::Bypass),
    }
    let rule = decision.rule.and_then(|i| policy.rule(i));
    if rule.is_some_and(|r| body_refused(r, req)) {
        // Before the rule's rate: a refused request takes no token.
        return Err(Refusal::new(Reason::BodyNotAllowed));
    }
    if let Some(Err(l)) = decision.rule.map(|i| guards.rates.rule(i)) {
        return Err(Refusal::rate_limited(l.retry_after));
    }
    Ok((target, decision.rule))
}

/// A body on a method the rule allows only without one (a `methods` rule's
/// GET or HEAD): any `Transfer-Encoding`, or a `Content-Length` above 0.
/// An update mirror allowed for downloads must not carry an upload.
///
/// Shared by every request path: plain HTTP here, inspected requests too.
pub fn body_refused<B: hyper::body::Body>(rule: &crate::policy::Rule, req: &Request<B>) -> bool {
    if rule.allows_body(req.method()) {
        return false;
    }
    req.headers()
        .contains_key(::http::header::TRANSFER_ENCODING)
        || !req.body().is_end_stream()
}

/// The target of a CONNECT (authority-form) or of a plain request
/// (absolute-form `http://`).
fn parse_target(req: &Request<Incoming>) -> Result<Target, target::TargetError> {
    let uri = req.uri();
    if req.method() != Method::CONNECT {
        return target::parse_absolute(uri);
    }
    if uri.scheme().is_some() {
        // `CONNECT http://host:port/` is not authority-form.
        return Err(target::TargetError::NotAuthority);
    }
    let bare = uri
        .path_and_query()
        .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
    match uri.authority() {
        Some(a) if bare => target::parse_authority(a.as_str()),
        _ => target::parse_authority(&uri.to_string()),
    }
}

/// The size of a request head as sent (request line and header lines).
pub(crate) fn head_len(req: &Request<Incoming>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Check `Proxy-Authorization` before any policy decision. Verified
/// credentials come from the cache; a miss is verified off the runtime.
async fn authenticate(auth: &Arc<Auth>, req: &Request<Incoming>) -> Result<Arc<str>, Reason> {
    let Some(value) = req.headers().get(hyper::header::PROXY_AUTHORIZATION) else {
        return Err(Reason::AuthRequired);
    };
    if let Some(user) = auth.cached(value.as_bytes()) {
        return Ok(user);
    }
    let Ok(_permit) = auth.verifying.acquire().await else {
        return Err(Reason::AuthFailed);
    };
    let auth2 = Arc::clone(auth);
    let value = value.as_bytes().to_vec();
    tokio::task::spawn_blocking(move || auth2.verify(&value))
        .await
        .unwrap_or(Err(Reason::AuthFailed))
}

/// Record and answer a refusal.
pub(crate) fn refuse(txn: Txn, refusal: Refusal, settings: &Settings) -> Response<ProxyBody> {
    let id = txn.id();
    txn.refuse(refusal.status.as_u16(), refusal.reason);
    refusal.response(id, Some(&settings.auth.realm))
}

pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Resolve and vet the target, then dial; refusals come back ready to send.
pub(crate) async fn dial_target(
    ctx: &ConnCtx,
    settings: &Settings,
    target: &Target,
    rule: Option<&crate::policy::Rule>,
) -> Result<Vec<SocketAddr>, Refusal> {
    let hist = &ctx.shared.metrics.dns_seconds;
    let vetted = crate::upstream::vetted_addrs(
        &ctx.shared.resolver,
        target,
        rule,
        &settings.dns.allow_private,
        |took| hist.observe(took.as_secs_f64()),
    )
    .await;
    vetted.map_err(|e| upstream_refusal(&e))
}

/// Dial vetted addresses, timing the connect.
pub(crate) async fn dial(
    ctx: &ConnCtx,
    addrs: &[SocketAddr],
    settings: &Settings,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let start = std::time::Instant::now();
    let dialed = crate::upstream::dial(addrs, settings.limits.connect_timeout).await;
    ctx.shared
        .metrics
        .connect_seconds
        .observe(start.elapsed().as_secs_f64());
    dialed.map_err(|e| upstream_refusal(&e))
}

pub(crate) fn upstream_refusal(e: &crate::upstream::UpstreamError) -> Refusal {
    let reason = e.reason();
    if e.is_timeout() {
        Refusal::with_status(reason, ::http::StatusCode::GATEWAY_TIMEOUT)
    } else {
        Refusal::new(reason)
    }
}
