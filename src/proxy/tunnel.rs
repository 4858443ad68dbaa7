//! Relay a tunnel both ways with exact payload counts, correct half-close,
//! an idle time-out and cancellation at shutdown.
//!
//! Memory: an idle tunnel owns no copy buffer. Reads go into one scratch
//! buffer per worker thread and are written on at once; only bytes the other
//! side cannot take yet are copied into a per-tunnel backlog, which is freed
//! as soon as it drains.
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

use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::peek;
use crate::reason::Reason;

mod gate;

use gate::{forward_held, gate, gate_retry, watch_first};
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

/// Relay until both directions finish, one fails, the tunnel idles out, or
/// `hard` is cancelled (shutdown). `early` holds client bytes hyper had
/// already read past the CONNECT head.
pub async fn run(
    mut client: TcpStream,
    early: Bytes,
    mut upstream: TcpStream,
    check: Option<Check>,
    idle: Duration,
    hard: CancellationToken,
    splicer: &Splicer,
) -> TunnelStats {
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let seen: Mutex<(Option<String>, bool)> = Mutex::new((None, false));

    let ended = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        // Only a checked tunnel watches the upstream's first record.
        let signal = gate::RetrySignal::default();
        let retry = check.is_some().then_some(&signal);
        let mut up_dir = Dir {
            from: &mut cr,
            from_side: Side::Client,
            to: &mut uw,
            to_side: Side::Upstream,
            count: &up,
            last: &last,
            base,
        };
        let up_fut = up_direction(&mut up_dir, early, check.as_ref(), retry, &seen, splicer);
        let mut down_dir = Dir {
            from: &mut ur,
            from_side: Side::Upstream,
            to: &mut cw,
            to_side: Side::Client,
            count: &down,
            last: &last,
            base,
        };
        let down_fut = down_direction(&mut down_dir, retry, splicer);
        tokio::pin!(up_fut, down_fut);

        let timer = tokio::time::sleep(idle);
        // Made once: a fresh `cancelled()` per wake-up would register with
        // the shared token (a lock) on every message.
        let cancelled = hard.cancelled();
        tokio::pin!(timer, cancelled);
        let (mut up_done, mut down_done) = (false, false);
        let mut ended: Option<End> = None;
        while !(up_done && down_done) {
            tokio::select! {
                biased;
                r = &mut up_fut, if !up_done => {
                    up_done = true;
                    if let Err(e) = r { ended = Some(e); break; }
                }
                r = &mut down_fut, if !down_done => {
                    down_done = true;
                    if let Err(e) = r { ended = Some(e); break; }
                }
                () = &mut timer => {
                    let quiet = base.elapsed().saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                    if quiet >= idle {
                        ended = Some(End::Timeout);
                        break;
                    }
                    timer.as_mut().reset(tokio::time::Instant::now() + (idle - quiet));
                }
                () = &mut cancelled => {
                    ended = Some(End::Denied(Reason::Shutdown, None));
                    break;
                }
            }
        }
        ended
    };
    finish(ended, &seen, &up, &down, &client)
}

/// The record of a finished tunnel; a refused hello gets its TLS alert.
fn finish(
    ended: Option<End>,
    seen: &Mutex<(Option<String>, bool)>,
    up: &AtomicU64,
    down: &AtomicU64,
    client: &TcpStream,
) -> TunnelStats {
    let (sni, ech) = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let mut stats = TunnelStats {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
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

/// Client to upstream: with a check, the client's first bytes (and after a
/// HelloRetryRequest its second hello) are held until judged; then relay.
async fn up_direction(
    dir: &mut Dir<'_, '_>,
    early: Bytes,
    check: Option<&Check>,
    retry: Option<&gate::RetrySignal>,
    seen: &Mutex<(Option<String>, bool)>,
    splicer: &Splicer,
) -> Result<(), End> {
    let (held, after, hello) = match check {
        Some(c) => {
            if early.is_empty() {
                // Nothing is held (or allocated) while the client is
                // silent; the idle time-out governs how long it may be.
                readable(dir.from).await.map_err(|_| End::Client)?;
            }
            // Boxed: the gate's state is freed once the hello is judged.
            Box::pin(gate(dir.from, early, c, seen)).await?
        }
        None => (early.to_vec(), Vec::new(), false),
    };
    forward_held(dir.to, held, dir.count, dir.last, dir.base).await?;
    let after = match (hello, check, retry) {
        // A HelloRetryRequest makes the client send a second hello,
        // which a lenient server (OpenSSL) takes the name from; what
        // came after the first hello waits for the upstream's answer.
        (true, Some(c), Some(rx)) => Box::pin(gate_retry(dir.from, rx, c, seen, after)).await?,
        _ => after,
    };
    forward_held(dir.to, after, dir.count, dir.last, dir.base).await?;
    relay(dir, splicer).await
}

/// Upstream to client: a checked tunnel watches the upstream's first record
/// for a HelloRetryRequest; then relay.
async fn down_direction(
    dir: &mut Dir<'_, '_>,
    retry: Option<&gate::RetrySignal>,
    splicer: &Splicer,
) -> Result<(), End> {
    if let Some(signal) = retry {
        // Boxed, like the gate, and only once the upstream has spoken: an
        // idle tunnel holds none of it.
        readable(dir.from).await.map_err(|_| dir.from_side.end())?;
        let watched = Box::pin(watch_first(dir, signal)).await;
        // Ended before its first record was whole: no retry to wait for.
        signal.settle(false);
        watched?;
    }
    relay(dir, splicer).await
}

/// Wait until `from` has something to read (or its end), holding no waiter
/// of its own: the socket's read waker slot serves, as only this direction
/// reads this socket. A few bytes of an idle tunnel's state, where tokio's
/// `readable()` future would take 168.
async fn readable(from: &ReadHalf<'_>) -> io::Result<()> {
    std::future::poll_fn(|cx| from.as_ref().poll_read_ready(cx)).await
}

fn touch(last: &AtomicU64, base: Instant) {
    last.store(
        u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// One direction of a tunnel: where bytes come from and go, and where they
/// are counted. Passed by reference so the copy and splice futures stay small
/// (an idle tunnel's memory is mostly its two directions' futures).
struct Dir<'a, 'b> {
    from: &'a mut ReadHalf<'b>,
    from_side: Side,
    to: &'a mut WriteHalf<'b>,
    to_side: Side,
    count: &'a AtomicU64,
    last: &'a AtomicU64,
    base: Instant,
}

impl Dir<'_, '_> {
    fn moved(&self, n: usize) {
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        touch(self.last, self.base);
    }
}

/// Copy one direction until EOF (then half-close) or an error; past
/// [`SPLICE_AFTER`] bytes, splice instead when a pipe can be had.
async fn relay(dir: &mut Dir<'_, '_>, splicer: &Splicer) -> Result<(), End> {
    if let Copied::Done(r) = copy(dir, Some(SPLICE_AFTER)).await {
        return r;
    }
    // Boxed: a tunnel that never goes bulk carries no room for this.
    Box::pin(bulk(dir, splicer)).await
}

/// A direction past its bulk threshold: splice when a pipe can be had,
/// else copy on.
async fn bulk(dir: &mut Dir<'_, '_>, splicer: &Splicer) -> Result<(), End> {
    match Pipe::open(splicer) {
        Ok(pipe) => splice(dir, &pipe).await,
        Err(e) => {
            tracing::debug!(error = %e, "no splice pipe; copying on");
            match copy(dir, None).await {
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

/// Copy until EOF (then half-close), an error, or (with `bulk_after`) that
/// many bytes moved.
///
/// Poll-based so that each read goes into the worker thread's scratch
/// buffer and is written on within the same poll; only what the other side
/// cannot take yet is copied into a per-tunnel backlog, freed once drained.
/// A short read tells tokio the socket is drained, so a ping-pong message
/// costs one read and one write.
async fn copy(dir: &mut Dir<'_, '_>, bulk_after: Option<u64>) -> Copied {
    let mut backlog: Vec<u8> = Vec::new();
    let mut off = 0usize;
    let mut eof = false;
    let mut moved = 0u64;
    std::future::poll_fn(move |cx| loop {
        // Drain the backlog first.
        while off < backlog.len() {
            match Pin::new(&mut *dir.to).poll_write(cx, &backlog[off..]) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    return Poll::Ready(Copied::Done(Err(dir.to_side.end())))
                }
                Poll::Ready(Ok(n)) => off += n,
                Poll::Pending => return Poll::Pending,
            }
        }
        if !backlog.is_empty() {
            // Free it: an idle tunnel keeps no buffer.
            backlog = Vec::new();
            off = 0;
        }
        if eof {
            return match Pin::new(&mut *dir.to).poll_shutdown(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(Copied::Done(Ok(()))),
            };
        }
        if bulk_after.is_some_and(|b| moved >= b) {
            return Poll::Ready(Copied::Bulk);
        }
        let step = SCRATCH_BUF.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *dir.from).poll_read(cx, &mut rb) {
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
                match Pin::new(&mut *dir.to).poll_write(cx, &data[written..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        return Poll::Ready(Err(dir.to_side.end()))
                    }
                    Poll::Ready(Ok(m)) => written += m,
                    Poll::Pending => break,
                }
            }
            if written < n {
                backlog.extend_from_slice(&data[written..]);
            }
            Poll::Ready(Ok(n))
        });
        match step {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Copied::Done(Err(e))),
            Poll::Ready(Ok(0)) => eof = true,
            Poll::Ready(Ok(n)) => {
                dir.moved(n);
                moved += n as u64;
            }
        }
    })
    .await
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
async fn splice(dir: &mut Dir<'_, '_>, pipe: &Pipe) -> Result<(), End> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        let src: &TcpStream = (*dir.from).as_ref();
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
        let dst: &TcpStream = (*dir.to).as_ref();
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
