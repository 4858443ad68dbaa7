//! Relay a tunnel both ways with exact payload counts, correct half-close,
//! an idle time-out and cancellation at shutdown.
//!
//! Memory: an idle tunnel owns no copy buffer. Reads go into one scratch
//! buffer per worker thread and are written on at once; only bytes the other
//! side cannot take yet are copied into a per-tunnel backlog, which is freed
//! as soon as it drains. For spliced tunnels with an SNI check, the client's
//! first bytes are held (bounded by [`peek::MAX_HELLO_BYTES`]) until the
//! ClientHello is judged, then replayed unchanged; upstream-to-client bytes
//! flow from the start.
use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::peek::{self, Peek};
use crate::audit::Reason;
use crate::policy::{EchMode, SniMode};
use crate::target::{self, Host};

/// Scratch buffer size: one per worker thread, never per tunnel.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH].into_boxed_slice());
}

/// The SNI check for a spliced tunnel.
#[derive(Clone, Debug)]
pub struct Check {
    pub mode: SniMode,
    pub ech: EchMode,
    /// The CONNECT host the SNI must match.
    pub host: Host,
    /// How long a started ClientHello may take to complete.
    pub hello_timeout: Duration,
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
    client: TcpStream,
    early: Bytes,
    upstream: TcpStream,
    check: Option<Check>,
    idle: Duration,
    hard: CancellationToken,
) -> TunnelStats {
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let seen: Mutex<(Option<String>, bool)> = Mutex::new((None, false));

    let up_fut = async {
        let held = match &check {
            Some(c) => gate(&client, early, c, &seen).await?,
            None => early.to_vec(),
        };
        if !held.is_empty() {
            write_all(&upstream, &held, Side::Upstream).await?;
            up.fetch_add(held.len() as u64, Ordering::Relaxed);
            touch(&last, base);
        }
        drop(held);
        relay(&client, Side::Client, &upstream, Side::Upstream, &up, &last, base).await
    };
    let down_fut = relay(&upstream, Side::Upstream, &client, Side::Client, &down, &last, base);
    tokio::pin!(up_fut, down_fut);

    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let (mut up_done, mut down_done) = (false, false);
    let mut ended: Option<End> = None;
    while !(up_done && down_done) {
        tokio::select! {
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
            () = hard.cancelled() => {
                ended = Some(End::Denied(Reason::Shutdown, None));
                break;
            }
        }
    }
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

fn touch(last: &AtomicU64, base: Instant) {
    last.store(u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// Hold the client's first bytes until the ClientHello is judged. Returns
/// the bytes to replay upstream.
async fn gate(
    client: &TcpStream,
    early: Bytes,
    check: &Check,
    seen: &Mutex<(Option<String>, bool)>,
) -> Result<Vec<u8>, End> {
    let mut buf = early.to_vec();
    if buf.is_empty() {
        // A client that sends nothing: nothing is forwarded until it does;
        // the idle time-out governs how long it may wait.
        read_more(client, &mut buf).await?;
        if buf.is_empty() {
            return Ok(buf);
        }
    }
    let judged = tokio::time::timeout(check.hello_timeout, async {
        loop {
            match peek::peek(&buf) {
                Peek::NeedMore => {
                    let before = buf.len();
                    read_more(client, &mut buf).await?;
                    if buf.len() == before {
                        // EOF inside a ClientHello: nothing worth replaying.
                        return Err(End::Client);
                    }
                }
                other => return Ok(other),
            }
        }
    })
    .await
    .map_err(|_| End::Denied(Reason::Timeout, None))??;
    verdict(judged, check, seen)?;
    Ok(buf)
}

fn verdict(judged: Peek, check: &Check, seen: &Mutex<(Option<String>, bool)>) -> Result<(), End> {
    match judged {
        Peek::NotTls if check.mode == SniMode::Require => Err(End::Denied(Reason::SniRequired, None)),
        Peek::NotTls | Peek::NeedMore => Ok(()),
        Peek::Malformed(why) => {
            tracing::debug!(why, "malformed ClientHello refused");
            Err(End::Denied(Reason::BadRequest, Some(peek::ALERT_DECODE_ERROR)))
        }
        Peek::Hello(info) => {
            if let Ok(mut s) = seen.lock() {
                *s = (info.sni.clone(), info.ech);
            }
            if info.ech && check.ech == EchMode::Deny {
                return Err(End::Denied(Reason::EchDenied, Some(peek::ALERT_ACCESS_DENIED)));
            }
            let Some(sni) = info.sni else {
                return match check.mode {
                    SniMode::Require => Err(End::Denied(Reason::SniRequired, Some(peek::ALERT_UNRECOGNIZED_NAME))),
                    _ => Ok(()),
                };
            };
            match &check.host {
                // A CONNECT to an address admitted by `addresses`: record the SNI, don't compare.
                Host::Ip(_) => Ok(()),
                Host::Name(host) if sni_matches(&sni, host) => Ok(()),
                Host::Name(_) => Err(End::Denied(Reason::SniMismatch, Some(peek::ALERT_UNRECOGNIZED_NAME))),
            }
        }
    }
}

/// Does a ClientHello's SNI name `host` (a normalised CONNECT host)?
///
/// RFC 6066 allows only an ASCII host name there, so the SNI must already be
/// one: letters, digits, `-`, `_` and dots, at most one trailing dot; it is
/// then compared without regard to ASCII case. Spellings that only a
/// WHATWG/IDNA mapping would equate (percent-encoding, full-width
/// characters, U-labels) do not match: the upstream would see another name.
pub fn sni_matches(sni: &str, host: &str) -> bool {
    let name = sni.strip_suffix('.').unwrap_or(sni);
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.eq_ignore_ascii_case(host)
        && target::normalize_host(name).is_ok_and(|h| matches!(h, Host::Name(n) if *n == *host))
}

/// Read what the client has into `buf` (bounded by the hello limit).
async fn read_more(client: &TcpStream, buf: &mut Vec<u8>) -> Result<(), End> {
    loop {
        client.readable().await.map_err(|_| End::Client)?;
        let room = (peek::MAX_HELLO_BYTES + 1).saturating_sub(buf.len()).min(16 * 1024);
        if room == 0 {
            return Err(End::Denied(Reason::BadRequest, Some(peek::ALERT_DECODE_ERROR)));
        }
        buf.reserve(room);
        match client.try_read_buf(buf) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(End::Client),
        }
    }
}

async fn write_all(to: &TcpStream, mut data: &[u8], side: Side) -> Result<(), End> {
    while !data.is_empty() {
        to.writable().await.map_err(|_| side.end())?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(side.end()),
        }
    }
    Ok(())
}

/// Copy `from` -> `to` until EOF (then half-close `to`) or an error.
async fn relay(
    from: &TcpStream,
    from_side: Side,
    to: &TcpStream,
    to_side: Side,
    count: &AtomicU64,
    last: &AtomicU64,
    base: Instant,
) -> Result<(), End> {
    let mut backlog: Vec<u8> = Vec::new();
    loop {
        from.readable().await.map_err(|_| from_side.end())?;
        let step = SCRATCH_BUF.with_borrow_mut(|buf| {
            let n = match from.try_read(buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(0)),
                Err(_) => return Err(from_side.end()),
            };
            let mut written = 0;
            while written < n {
                match to.try_write(&buf[written..n]) {
                    Ok(m) => written += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(to_side.end()),
                }
            }
            if written < n {
                backlog.extend_from_slice(&buf[written..n]);
            }
            Ok(Some(n))
        })?;
        match step {
            None => {
                let _ = socket2::SockRef::from(to).shutdown(Shutdown::Write);
                return Ok(());
            }
            Some(0) => continue,
            Some(n) => {
                count.fetch_add(n as u64, Ordering::Relaxed);
                touch(last, base);
            }
        }
        if !backlog.is_empty() {
            write_all(to, &backlog, to_side).await?;
            // Free it: an idle tunnel keeps no buffer.
            backlog = Vec::new();
        }
    }
}
