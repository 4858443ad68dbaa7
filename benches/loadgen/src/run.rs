//! The client side: the seven scenarios and their report.
//!
//! Timed scenarios open their long-lived connections or tunnels first, then
//! every worker starts on the same signal and loops until the deadline. An
//! operation still in flight at the deadline is abandoned and not counted.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{sleep_until, timeout, timeout_at};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::args::{Run, Scenario};
use crate::hist::Hist;
use crate::http::{err, Conn};
use crate::report::{Report, V};

/// Connections being opened at once before a run, so listen backlogs do not overflow.
const SETUP_CONCURRENCY: usize = 256;
/// Give up on opening one connection or tunnel before the clock starts after this long.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed operation, so a refusing proxy is not hammered in a tight loop.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// idle-tunnels: how long one tunnel's liveness echo may take.
const ECHO_TIMEOUT: Duration = Duration::from_secs(10);

struct Ctx {
    /// Where TCP connections go: the proxy, or the target when direct.
    addr: SocketAddr,
    direct: bool,
    connect_req: Vec<u8>,
    get_req: Vec<u8>,
    msg: Vec<u8>,
    /// TLS scenarios: the client configuration and the name it asks for.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// TLS scenarios: the GET sent inside TLS (origin-form).
    tls_req: Vec<u8>,
}

impl Ctx {
    async fn dial(&self) -> io::Result<TcpStream> {
        let s = TcpStream::connect(self.addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// A tunnel to the target: CONNECT and a 2xx reply, or a plain connection when direct.
    async fn tunnel(&self) -> io::Result<TcpStream> {
        let s = self.dial().await?;
        if self.direct {
            return Ok(s);
        }
        let mut c = Conn::new(s);
        c.write_all(&self.connect_req).await?;
        let head = c
            .read_head()
            .await?
            .ok_or_else(|| err("proxy closed the connection before its CONNECT reply"))?;
        let code = head.status()?;
        if !(200..300).contains(&code) {
            return Err(err(format!("CONNECT answered {code}")));
        }
        // The echo origin speaks only when spoken to; the source origin's first
        // bytes may ride along with the reply and are dropped with the buffer.
        Ok(c.into_stream())
    }

    /// A tunnel (or a direct connection) with a completed TLS handshake in it
    /// (boxed: the TLS state is a kilobyte, the other links a few words).
    async fn tls_conn(&self) -> io::Result<Conn<Box<TlsStream<TcpStream>>>> {
        let (connector, name) = self.tls.as_ref().ok_or_else(|| err("no TLS client"))?;
        let s = self.tunnel().await?;
        let tls = connector.connect(name.clone(), s).await?;
        Ok(Conn::new(Box::new(tls)))
    }

    /// One round trip of the message through an echo tunnel.
    async fn ping(&self, s: &mut TcpStream, back: &mut [u8]) -> io::Result<()> {
        s.write_all(&self.msg).await?;
        s.read_exact(back).await?;
        if back != self.msg.as_slice() {
            return Err(err("echo came back different"));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Stats {
    hist: Option<Hist>,
    ok: u64,
    errors: u64,
    connects: u64,
    bytes: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            hist: Some(Hist::new()),
            ..Stats::default()
        }
    }

    fn error(&mut self, e: impl Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    /// An operation that started at t0 completed; count it if it did so in time.
    fn done(&mut self, t0: Instant, deadline: Instant) {
        let now = Instant::now();
        if now <= deadline {
            self.ok += 1;
            if let Some(h) = &mut self.hist {
                h.record((now - t0).as_nanos() as u64);
            }
        }
    }

    fn merge(&mut self, o: Stats) {
        self.ok += o.ok;
        self.errors += o.errors;
        self.connects += o.connects;
        self.bytes += o.bytes;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        match (&mut self.hist, o.hist) {
            (Some(a), Some(b)) => a.merge(&b),
            (None, b) => self.hist = b,
            _ => {}
        }
    }
}

pub async fn run(a: Run) -> Result<(), String> {
    let direct = a.proxy.is_none();
    let dial = a.proxy.as_deref().unwrap_or(&a.target);
    let addr = tokio::net::lookup_host(dial)
        .await
        .map_err(|e| format!("resolve {dial}: {e}"))?
        .next()
        .ok_or_else(|| format!("{dial} resolves to nothing"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{dial} is not a loopback address: the bench stays on this machine"
        ));
    }
    let t = &a.target;
    let request_target = if direct {
        a.path.clone()
    } else {
        format!("http://{t}{}", a.path)
    };
    let ctx = Arc::new(Ctx {
        addr,
        direct,
        connect_req: format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n").into_bytes(),
        get_req: format!(
            "GET {request_target} HTTP/1.1\r\nHost: {t}\r\nUser-Agent: loadgen\r\n\r\n"
        )
        .into_bytes(),
        msg: (0..a.size).map(|i| b'a' + (i % 26) as u8).collect(),
        tls: tls_client(&a)?,
        tls_req: tls_request(&a),
    });

    let mut r = Report::default();
    r.put("scenario", V::S(a.scenario.name().into()));
    r.put("label", V::S(a.label.clone()));
    r.put(
        "proxy",
        V::S(a.proxy.clone().unwrap_or_else(|| "direct".into())),
    );
    r.put("target", V::S(a.target.clone()));
    r.put("conns", V::U(a.conns as u64));
    r.put("duration_s", V::F(a.duration.as_secs_f64()));
    let st = match a.scenario {
        Scenario::IdleTunnels => idle_tunnels(&ctx, &a, &mut r).await?,
        sc => {
            let st = timed(&ctx, sc, a.conns, a.duration).await;
            let secs = a.duration.as_secs_f64();
            if sc == Scenario::ConnectBulk {
                r.put("bytes", V::U(st.bytes));
                r.put("gbit_s", V::F(st.bytes as f64 * 8.0 / secs / 1e9));
            } else {
                let unit = match sc {
                    Scenario::HttpForward | Scenario::TlsRr => "requests/s",
                    Scenario::ConnectRr => "round trips/s",
                    _ => "tunnels/s",
                };
                r.put("ok", V::U(st.ok));
                r.put("rate", V::F(st.ok as f64 / secs));
                r.put("unit", V::S(unit.into()));
                let us = |ns: Option<u64>| ns.map(|v| v as f64 / 1e3);
                if let Some(h) = &st.hist {
                    r.opt_f("mean_us", h.mean().map(|m| m / 1e3));
                    r.opt_f("p50_us", us(h.quantile(0.50)));
                    r.opt_f("p99_us", us(h.quantile(0.99)));
                    r.opt_f("p999_us", us(h.quantile(0.999)));
                    r.opt_f("max_us", us(h.max()));
                }
            }
            st
        }
    };
    r.put("errors", V::U(st.errors));
    r.put("connects", V::U(st.connects));
    r.put("first_error", st.first_error.map_or(V::Null, V::S));
    if a.json {
        println!("{}", r.json());
    } else {
        print!("{}", r.text());
    }
    Ok(())
}

/// The state a worker carries from one operation to the next.
enum Link {
    None,
    Http(Conn),
    Tunnel(TcpStream),
    Tls(Conn<Box<TlsStream<TcpStream>>>),
}

async fn timed(ctx: &Arc<Ctx>, sc: Scenario, conns: usize, dur: Duration) -> Stats {
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let ready = Arc::new(Semaphore::new(0));
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (ctx, mut go, ready, gate) = (
            Arc::clone(ctx),
            go_rx.clone(),
            Arc::clone(&ready),
            Arc::clone(&gate),
        );
        workers.spawn(async move {
            let mut st = Stats::new();
            let mut link = Link::None;
            if !matches!(sc, Scenario::ConnectRate | Scenario::TlsRate) {
                let permit = gate.acquire().await;
                match timeout(SETUP_TIMEOUT, open(&ctx, sc)).await {
                    Ok(Ok(l)) => link = l,
                    Ok(Err(e)) => st.error(format!("setup: {e}")),
                    Err(_) => st.error("setup: timed out"),
                }
                if !matches!(link, Link::None) {
                    st.connects += 1;
                }
                drop(permit);
            }
            ready.add_permits(1);
            let deadline = match go.wait_for(Option::is_some).await {
                Ok(d) => d.unwrap_or_else(Instant::now),
                Err(_) => return st,
            };
            work(&ctx, sc, link, deadline, &mut st).await;
            st
        });
    }
    // Everyone connected (or gave up): start the clock.
    if let Ok(p) = ready.acquire_many(conns as u32).await {
        p.forget();
    }
    let _ = go_tx.send(Some(Instant::now() + dur));
    let mut total = Stats::new();
    while let Some(res) = workers.join_next().await {
        match res {
            Ok(st) => total.merge(st),
            Err(e) => total.error(format!("worker: {e}")),
        }
    }
    total
}

async fn open(ctx: &Ctx, sc: Scenario) -> io::Result<Link> {
    Ok(match sc {
        Scenario::HttpForward => Link::Http(Conn::new(ctx.dial().await?)),
        Scenario::TlsRr => Link::Tls(ctx.tls_conn().await?),
        _ => Link::Tunnel(ctx.tunnel().await?),
    })
}

async fn backoff(deadline: Instant) {
    sleep_until(deadline.min(Instant::now() + ERROR_BACKOFF).into()).await;
}

async fn work(ctx: &Ctx, sc: Scenario, mut link: Link, deadline: Instant, st: &mut Stats) {
    let mut back = vec![0u8; ctx.msg.len()];
    let mut bulk = vec![0u8; 256 * 1024];
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let mut connects = 0;
        let op = async {
            match sc {
                Scenario::HttpForward => http_get(ctx, &mut link, &mut connects).await.map(|_| 0),
                Scenario::ConnectRr => {
                    let s = tunnel_of(ctx, &mut link, &mut connects).await?;
                    ctx.ping(s, &mut back).await.map(|_| 0)
                }
                Scenario::ConnectBulk => {
                    let s = tunnel_of(ctx, &mut link, &mut connects).await?;
                    match s.read(&mut bulk).await? {
                        0 => Err(err("the source closed the tunnel")),
                        n => Ok(n),
                    }
                }
                Scenario::ConnectRate => {
                    let mut s = ctx.tunnel().await?;
                    connects += 1;
                    ctx.ping(&mut s, &mut back).await.map(|_| 0)
                    // dropped here: the client closes
                }
                Scenario::TlsRate => {
                    let mut c = ctx.tls_conn().await?;
                    connects += 1;
                    match exchange(&ctx.tls_req, &mut c).await? {
                        Some(_) => c.s.shutdown().await.map(|_| 0), // close_notify, FIN
                        None => Err(err("TLS connection closed without a response")),
                    }
                }
                Scenario::TlsRr => tls_get(ctx, &mut link, &mut connects).await.map(|_| 0),
                Scenario::IdleTunnels => Ok(0),
            }
        };
        let res = timeout_at(deadline.into(), op).await;
        st.connects += connects;
        match res {
            Err(_) => break, // in flight at the deadline: not counted
            Ok(Ok(n)) if sc == Scenario::ConnectBulk => {
                if Instant::now() <= deadline {
                    st.bytes += n as u64;
                }
            }
            Ok(Ok(_)) => st.done(t0, deadline),
            Ok(Err(e)) => {
                st.error(e);
                link = Link::None;
                backoff(deadline).await;
            }
        }
    }
}

/// The worker's tunnel, opened again if an error dropped it.
async fn tunnel_of<'a>(
    ctx: &Ctx,
    link: &'a mut Link,
    connects: &mut u64,
) -> io::Result<&'a mut TcpStream> {
    if !matches!(link, Link::Tunnel(_)) {
        *link = Link::Tunnel(ctx.tunnel().await?);
        *connects += 1;
    }
    match link {
        Link::Tunnel(s) => Ok(s),
        _ => Err(err("no tunnel")),
    }
}

/// One GET on the worker's keep-alive connection.
async fn http_get(ctx: &Ctx, link: &mut Link, connects: &mut u64) -> io::Result<()> {
    let mut slot = match std::mem::replace(link, Link::None) {
        Link::Http(c) => Some(c),
        _ => None,
    };
    let open = || async { Ok(Conn::new(ctx.dial().await?)) };
    let res = get_on(&ctx.get_req, &mut slot, open, connects).await;
    if let Some(c) = slot {
        *link = Link::Http(c);
    }
    res
}

/// One GET inside the worker's kept-alive TLS connection (through its tunnel).
async fn tls_get(ctx: &Ctx, link: &mut Link, connects: &mut u64) -> io::Result<()> {
    let mut slot = match std::mem::replace(link, Link::None) {
        Link::Tls(c) => Some(c),
        _ => None,
    };
    let res = get_on(&ctx.tls_req, &mut slot, || ctx.tls_conn(), connects).await;
    if let Some(c) = slot {
        *link = Link::Tls(c);
    }
    res
}

/// One GET on a keep-alive connection, opened with `open` when there is none.
/// Like ordinary clients, a reused connection that turns out closed before
/// any byte of the response is retried once on a new connection.
async fn get_on<S, F, Fut>(
    req: &[u8],
    slot: &mut Option<Conn<S>>,
    open: F,
    connects: &mut u64,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<Conn<S>>>,
{
    let mut reused = true;
    loop {
        let c = match slot {
            Some(c) => c,
            None => {
                *connects += 1;
                reused = false;
                slot.insert(open().await?)
            }
        };
        match exchange(req, c).await? {
            Some(keep) => {
                if !keep {
                    *slot = None;
                }
                return Ok(());
            }
            None if reused => *slot = None, // stale keep-alive connection: once more
            None => return Err(err("connection closed without a response")),
        }
    }
}

/// Send the GET and read the response. Ok(None): the connection was found
/// closed before any response byte; Ok(Some(keep)) otherwise.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    req: &[u8],
    c: &mut Conn<S>,
) -> io::Result<Option<bool>> {
    match c.write_all(req).await {
        Ok(()) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    let Some(head) = c.read_head().await? else {
        return Ok(None);
    };
    let code = head.status()?;
    if code != 200 {
        return Err(err(format!("GET answered {code}")));
    }
    c.skip_response_body(&head).await.map(Some)
}

/// TLS scenarios: the client, trusting `--ca` and asking for `--server-name`.
fn tls_client(a: &Run) -> Result<Option<(TlsConnector, ServerName<'static>)>, String> {
    if !a.scenario.tls() {
        return Ok(None);
    }
    let c = crate::tls::client(&a.cas, &a.server_name)?;
    Ok(Some((TlsConnector::from(c.config), c.name)))
}

/// The GET sent inside TLS: origin-form, for the server name on the target's port.
fn tls_request(a: &Run) -> Vec<u8> {
    let port = a.target.rsplit_once(':').map_or("443", |(_, p)| p);
    let (name, path) = (&a.server_name, &a.path);
    format!("GET {path} HTTP/1.1\r\nHost: {name}:{port}\r\nUser-Agent: loadgen\r\n\r\n")
        .into_bytes()
}

/// Hold many tunnels, read the proxy's RSS growth, then check that all still echo.
async fn idle_tunnels(ctx: &Arc<Ctx>, a: &Run, r: &mut Report) -> Result<Stats, String> {
    let limit = rlimit::Resource::NOFILE
        .get()
        .map_or(1024, |(soft, _)| soft);
    let need = a.conns as u64 + 64;
    if need > limit {
        return Err(format!(
            "{} tunnels need about {need} file descriptors; RLIMIT_NOFILE is {limit}",
            a.conns
        ));
    }
    let mut st = Stats::new();
    let rss_before = rss_kib(&a.pids)?;
    let t0 = Instant::now();
    let gate = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..a.conns {
        let (ctx, gate) = (Arc::clone(ctx), Arc::clone(&gate));
        opening.spawn(async move {
            let _permit = gate.acquire().await;
            match timeout(SETUP_TIMEOUT, ctx.tunnel()).await {
                Ok(res) => res,
                Err(_) => Err(err("opening the tunnel timed out")),
            }
        });
    }
    let mut tunnels = Vec::with_capacity(a.conns);
    while let Some(res) = opening.join_next().await {
        st.connects += 1;
        match res {
            Ok(Ok(s)) => tunnels.push(s),
            Ok(Err(e)) => st.error(e),
            Err(e) => st.error(e),
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(a.duration).await;
    let rss_held = rss_kib(&a.pids)?;
    let opened = tunnels.len() as u64;
    let mut checks = tokio::task::JoinSet::new();
    for mut s in tunnels {
        let ctx = Arc::clone(ctx);
        checks.spawn(async move {
            let mut back = vec![0u8; ctx.msg.len()];
            match timeout(ECHO_TIMEOUT, ctx.ping(&mut s, &mut back)).await {
                Ok(res) => res,
                Err(_) => Err(err("liveness echo timed out")),
            }
        });
    }
    while let Some(res) = checks.join_next().await {
        match res {
            Ok(Ok(())) => st.ok += 1,
            Ok(Err(e)) => st.error(format!("liveness: {e}")),
            Err(e) => st.error(e),
        }
    }
    let rss_after_echo = rss_kib(&a.pids)?;
    r.put("opened", V::U(opened));
    r.put("alive", V::U(st.ok));
    r.put("setup_s", V::F(setup_s));
    let kib = |v: Option<u64>| v.map_or(V::Null, V::U);
    r.put("rss_before_kib", kib(rss_before));
    r.put("rss_held_kib", kib(rss_held));
    r.put("rss_after_echo_kib", kib(rss_after_echo));
    let per = |after: Option<u64>| match (rss_before, after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) * 1024.0 / opened as f64),
        _ => None,
    };
    r.opt_f("bytes_per_tunnel", per(rss_held));
    r.opt_f("bytes_per_tunnel_after_echo", per(rss_after_echo));
    Ok(st)
}

/// Summed VmRSS (KiB) of the given processes; None without any.
fn rss_kib(pids: &[u32]) -> Result<Option<u64>, String> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut total = 0;
    for pid in pids {
        let path = format!("/proc/{pid}/status");
        let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| format!("no VmRSS in {path}"))?;
    }
    Ok(Some(total))
}
