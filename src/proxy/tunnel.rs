//! Relay a tunnel both ways with exact payload counts, correct half-close,
//! an idle time-out and cancellation at shutdown.
//!
//! Memory: an idle tunnel owns no copy buffer. Reads go into one scratch
//! buffer per worker thread and are written on at once; only bytes the other
//! side cannot take yet are copied into a per-tunnel backlog, which is freed
//! as soon as it drains. Its relay is one hand-written future ([`relay`])
//! that boxes the rarely used parts only while in use, and its idle
//! time-out and shutdown are kept by the proxy's [`Idler`], not by a timer
//! and a cancellation waiter of its own.
//!
//! Bulk: a direction that has carried [`SPLICE_AFTER`] bytes moves on to
//! splice(2) through a pipe of its own, so its bytes stay in the kernel. A
//! pipe costs two file descriptors, so only bulk directions get one, and
//! only while the [`Splicer`] has a pipe to spare; otherwise they keep copying.
//!
//! For spliced tunnels with an SNI check, the client's
//! first bytes are held (bounded by [`peek::MAX_HELLO_BYTES`]) until the
//! ClientHello is judged, then replayed unchanged; upstream-to-client bytes
//! flow from the start.
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::peek;
use crate::reason::Reason;

mod gate;
mod idle;
mod relay;

pub use idle::Idler;

pub use gate::{sni_matches, Check};

/// Scratch buffer size: one per worker thread, never per tunnel.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// Bytes a direction carries by copying before it moves on to splice(2):
/// well past a cloud look-up's exchange, well short of an update download.
pub const SPLICE_AFTER: u64 = 256 * 1024;

/// How much one splice(2) call moves (the default pipe capacity).
const SPLICE_CHUNK: usize = 64 * 1024;

/// Hands out splice pipes: each holds two file descriptors for as long as
/// its bulk direction runs, so they are counted against a budget.
#[derive(Clone)]
pub struct Splicer {
    permits: Arc<Semaphore>,
    /// Directions that moved on to splice(2).
    spliced: Counter,
}

impl Splicer {
    /// At most `pipes` pipes at once (0: never splice).
    pub fn new(pipes: usize, spliced: Counter) -> Self {
        Splicer {
            permits: Arc::new(Semaphore::new(pipes.min(Semaphore::MAX_PERMITS))),
            spliced,
        }
    }
}

/// How many pipes may be open at once for `nofile` descriptors: their two
/// descriptors each take at most a sixteenth of them, and never more than
/// 256 pipes (a gateway runs a handful of bulk downloads at once; the rest
/// of the descriptors are for tunnels).
pub fn pipe_budget(nofile: usize) -> usize {
    (nofile / 32).min(256)
}

/// What the record needs from a finished tunnel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Payload bytes client -> upstream.
    pub up: u64,
    /// Payload bytes upstream -> client.
    pub down: u64,
    /// Set when the tunnel ended abnormally or was refused.
    pub reason: Option<Reason>,
    pub sni: Option<String>,
    pub ech: bool,
    /// Refused inside the tunnel (SNI/ECH check).
    pub denied: bool,
}

/// How one direction ended abnormally.
#[derive(Debug)]
enum End {
    Client,
    Upstream,
    Denied(Reason, Option<u8>),
    Timeout,
}

impl End {
    fn reason(&self) -> Reason {
        match self {
            End::Client => Reason::ClientClosed,
            End::Upstream => Reason::UpstreamReset,
            End::Denied(r, _) => *r,
            End::Timeout => Reason::Timeout,
        }
    }
}

/// Which side a stream is, to name the failure.
#[derive(Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn end(self) -> End {
        match self {
            Side::Client => End::Client,
            Side::Upstream => End::Upstream,
        }
    }
}

/// A tunnel's upstream side and limits, ready before the client's socket
/// is taken back from hyper.
pub struct Tunnel {
    pub upstream: TcpStream,
    /// The SNI check of a spliced tunnel, when it has one.
    pub check: Option<Check>,
    pub idle: Duration,
    /// Ends it when idle for `idle`, or at shutdown.
    pub idler: Idler,
    pub splicer: Splicer,
}

/// What both directions of a tunnel share: owned by [`run`]'s future and
/// lent to them.
struct Common<'a> {
    check: Option<&'a Check>,
    /// The SNI and ECH flag of the client's hello, once seen.
    seen: Mutex<(Option<String>, bool)>,
    /// The down direction's word to the up direction (checked tunnels).
    retry: gate::RetrySignal,
    clock: Clock,
    up: AtomicU64,
    down: AtomicU64,
    splicer: &'a Splicer,
}

/// When a tunnel last moved a byte, for the idle time-out.
struct Clock {
    base: Instant,
    /// Milliseconds after `base`.
    last: AtomicU64,
}

impl Clock {
    fn touch(&self) {
        self.last.store(
            u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// How long since a byte moved.
    fn quiet(&self) -> Duration {
        self.base
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }
}

/// Relay until both directions finish, one fails, the tunnel idles out, or
/// the proxy shuts down (both told by `t.idler`). `early` holds client bytes hyper had
/// already read past the CONNECT head.
///
/// Not an `async fn`: its arguments are declared `mut`, which an `async fn`
/// would copy into its body's locals, keeping their room twice for the
/// tunnel's whole life.
#[allow(clippy::manual_async_fn)] // deliberately not an `async fn`: see above
pub fn run(
    mut client: TcpStream,
    early: Bytes,
    mut t: Tunnel,
) -> impl Future<Output = TunnelStats> + Send {
    async move {
        let common = Common {
            check: t.check.as_ref(),
            seen: Mutex::new((None, false)),
            retry: gate::RetrySignal::default(),
            clock: Clock {
                base: Instant::now(),
                last: AtomicU64::new(0),
            },
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            splicer: &t.splicer,
        };
        let ended = {
            let (cr, cw) = client.split();
            let (ur, uw) = t.upstream.split();
            let up = Dir::new(cr, Side::Client, uw, &common.up, &common.clock);
            let down = Dir::new(ur, Side::Upstream, cw, &common.down, &common.clock);
            relay::Relay::new(&common, up, down, early, t.idle, &t.idler).await
        };
        finish(ended, &common, &client)
    }
}

/// The record of a finished tunnel; a refused hello gets its TLS alert.
fn finish(ended: Option<End>, common: &Common<'_>, client: &TcpStream) -> TunnelStats {
    let (sni, ech) = common.seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut stats = TunnelStats {
        up: common.up.load(Ordering::Relaxed),
        down: common.down.load(Ordering::Relaxed),
        reason: ended.as_ref().map(End::reason),
        sni,
        ech,
        denied: false,
    };
    if let Some(End::Denied(reason, alert)) = ended {
        if reason != Reason::Shutdown {
            stats.denied = true;
            if let Some(code) = alert {
                // Best effort: the client may already be gone.
                let _ = client.try_write(&peek::tls_alert(code));
            }
        }
    }
    stats
}

/// One direction of a tunnel: where bytes come from and go, and where they
/// are counted. Small and moved whole between the relay's phases (an idle
/// tunnel's memory is mostly its two directions).
struct Dir<'a> {
    from: ReadHalf<'a>,
    from_side: Side,
    to: WriteHalf<'a>,
    to_side: Side,
    count: &'a AtomicU64,
    clock: &'a Clock,
}

impl<'a> Dir<'a> {
    fn new(
        from: ReadHalf<'a>,
        from_side: Side,
        to: WriteHalf<'a>,
        count: &'a AtomicU64,
        clock: &'a Clock,
    ) -> Self {
        let to_side = match from_side {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        };
        Dir {
            from,
            from_side,
            to,
            to_side,
            count,
            clock,
        }
    }

    fn moved(&self, n: usize) {
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        self.clock.touch();
    }
}

/// A direction past its bulk threshold: splice when a pipe can be had,
/// else copy on.
async fn bulk(mut dir: Dir<'_>, splicer: &Splicer) -> Result<(), End> {
    match Pipe::open(splicer) {
        Ok(pipe) => splice(&mut dir, &pipe).await,
        Err(e) => {
            tracing::debug!(error = %e, "no splice pipe; copying on");
            let mut copying = Copying::default();
            match std::future::poll_fn(|cx| copying.poll(&mut dir, cx, None)).await {
                Copied::Done(r) => r,
                Copied::Bulk => Ok(()),
            }
        }
    }
}

/// How a copy phase ended.
enum Copied {
    Done(Result<(), End>),
    /// The direction carried its bulk threshold; nothing is backlogged.
    Bulk,
}

/// A direction copying: until EOF (then half-close), an error, or (with a
/// bulk threshold) that many bytes moved.
///
/// Each read goes into the worker thread's scratch buffer and is written on
/// within the same poll; only what the other side cannot take yet is
/// copied into a per-tunnel backlog, freed once drained. A short read tells
/// tokio the socket is drained, so a ping-pong message costs one read and
/// one write.
#[derive(Default)]
struct Copying {
    /// Only filled when empty: nothing more is read until it drains.
    backlog: Box<[u8]>,
    off: usize,
    eof: bool,
    /// Bytes moved, counted up to the bulk threshold.
    moved: u32,
}

impl Copying {
    fn poll(
        &mut self,
        dir: &mut Dir<'_>,
        cx: &mut Context<'_>,
        bulk_after: Option<u64>,
    ) -> Poll<Copied> {
        loop {
            // Drain the backlog first.
            while self.off < self.backlog.len() {
                match Pin::new(&mut dir.to).poll_write(cx, &self.backlog[self.off..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Copied::Done(Err(dir.to_side.end())))
                    }
                    Poll::Ready(Ok(n)) => self.off += n,
                    Poll::Pending => return Poll::Pending,
                }
            }
            if !self.backlog.is_empty() {
                // Free it: an idle tunnel keeps no buffer.
                self.backlog = Box::default();
                self.off = 0;
            }
            if self.eof {
                return match Pin::new(&mut dir.to).poll_shutdown(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(Copied::Done(Ok(()))),
                };
            }
            if bulk_after.is_some_and(|b| u64::from(self.moved) >= b) {
                return Poll::Ready(Copied::Bulk);
            }
            match self.step(dir, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Copied::Done(Err(e))),
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    dir.moved(n);
                    self.moved = self
                        .moved
                        .saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
                }
            }
        }
    }

    /// One read into the scratch buffer, written on at once; what the
    /// other side does not take is kept in the backlog.
    fn step(&mut self, dir: &mut Dir<'_>, cx: &mut Context<'_>) -> Poll<Result<usize, End>> {
        SCRATCH_BUF.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut dir.from).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(_)) => return Poll::Ready(Err(dir.from_side.end())),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(0));
            }
            let data = &buf[..n];
            let mut written = 0;
            while written < n {
                match Pin::new(&mut dir.to).poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(dir.to_side.end()))
                    }
                    Poll::Ready(Ok(m)) => written += m,
                    Poll::Pending => break,
                }
            }
            if written < n {
                self.backlog = data[written..].into();
                self.off = 0;
            }
            Poll::Ready(Ok(n))
        })
    }
}

/// A pipe for splicing one direction, with the permit it holds.
struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    _permit: OwnedSemaphorePermit,
}

impl Pipe {
    fn open(splicer: &Splicer) -> io::Result<Pipe> {
        let permit = Arc::clone(&splicer.permits)
            .try_acquire_owned()
            .map_err(|_| io::Error::other("splice pipe budget spent"))?;
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        splicer.spliced.inc();
        Ok(Pipe {
            read,
            write,
            _permit: permit,
        })
    }
}

/// Move one direction through `pipe` with splice(2) until EOF (then
/// half-close) or an error. Bytes are counted as they leave `from`, as the
/// copy phase counts them.
async fn splice(dir: &mut Dir<'_>, pipe: &Pipe) -> Result<(), End> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        let src: &TcpStream = dir.from.as_ref();
        let n = loop {
            src.readable().await.map_err(|_| dir.from_side.end())?;
            match src.try_io(Interest::READABLE, || {
                Ok(rustix::pipe::splice(
                    src,
                    None,
                    &pipe.write,
                    None,
                    SPLICE_CHUNK,
                    flags,
                )?)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(dir.from_side.end()),
            }
        };
        if n == 0 {
            // The pipe is empty: every byte read has been written.
            let _ = dir.to.shutdown().await;
            return Ok(());
        }
        dir.moved(n);
        let dst: &TcpStream = dir.to.as_ref();
        let mut pending = n;
        while pending > 0 {
            dst.writable().await.map_err(|_| dir.to_side.end())?;
            match dst.try_io(Interest::WRITABLE, || {
                Ok(rustix::pipe::splice(
                    &pipe.read, None, dst, None, pending, flags,
                )?)
            }) {
                Ok(0) => return Err(dir.to_side.end()),
                Ok(m) => pending = pending.saturating_sub(m),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Err(dir.to_side.end()),
            }
        }
    }
}
#[cfg(test)]
mod tests;
