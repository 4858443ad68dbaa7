//! The SNI gate of a spliced tunnel: the client's first bytes are held
//! until its ClientHello is judged against the [`Check`] (and, after a
//! HelloRetryRequest, its second hello too), then replayed unchanged.
use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::ReadHalf;

use super::{Dir, End};
use crate::policy::{EchMode, SniMode};
use crate::proxy::peek::{self, Peek};
use crate::reason::Reason;
use crate::target::{self, Host};

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

/// Hold the client's first bytes until the ClientHello is judged. Returns
/// the bytes to replay upstream now, the bytes read past the hello (held
/// until the upstream has answered: they may be a second hello), and
/// whether the first bytes were a TLS hello.
pub(super) async fn gate(
    client: &ReadHalf<'_>,
    early: Bytes,
    check: &Check,
    seen: &Mutex<(Option<String>, bool)>,
) -> Result<(Vec<u8>, Vec<u8>, bool), End> {
    let mut buf = early.to_vec();
    if buf.is_empty() {
        // A client that sends nothing: nothing is forwarded until it does;
        // the idle time-out governs how long it may wait.
        read_more(client, &mut buf).await?;
        if buf.is_empty() {
            return Ok((buf, Vec::new(), false));
        }
    }
    let judged = judge(client, &mut buf, check.hello_timeout, peek::peek).await?;
    let hello = matches!(judged, Peek::Hello(_));
    verdict(judged, check, seen)?;
    let after = match peek::hello_end(&buf) {
        Some(end) if hello => buf.split_off(end.min(buf.len())),
        _ => Vec::new(),
    };
    Ok((buf, after, hello))
}

/// After the first hello: wait for the upstream's first record (watched by
/// [`watch_first`]); when it is a HelloRetryRequest, hold the client's
/// second hello until it is judged like the first, naming the same host.
/// `buf` holds what the client sent past the first hello. Returns the bytes
/// to replay, and whether the client gave up with them.
pub(super) async fn gate_retry(
    client: &ReadHalf<'_>,
    retry: &RetrySignal,
    check: &Check,
    seen: &Mutex<(Option<String>, bool)>,
    mut buf: Vec<u8>,
) -> Result<Retried, End> {
    let first = seen.lock().map(|s| s.0.clone()).unwrap_or_default();
    // With nothing held, a slow upstream is waited for as long as the
    // tunnel may idle (the client's next bytes stay unread meanwhile). Bytes
    // held past the first hello (0-RTT early data, or a pipelined hello) are
    // held no longer than the hello time-out: an upstream that has not
    // answered by then leaves the tunnel refused rather than unwatched.
    let is_retry = if buf.is_empty() {
        retry.wait().await
    } else {
        tokio::time::timeout(check.hello_timeout, retry.wait())
            .await
            .map_err(|_| End::Denied(Reason::Timeout, None))?
    };
    // No retry, or the upstream ended first (the relay sees that too).
    if !is_retry {
        return Ok(Retried { buf, last: false });
    }
    if buf.is_empty() {
        read_more(client, &mut buf).await?;
        if buf.is_empty() {
            return Ok(Retried { buf, last: false });
        }
    }
    let judged = judge(client, &mut buf, check.hello_timeout, peek::peek_retry).await?;
    if let Peek::Abort(n) = judged {
        // The client gave up with a fatal alert: the upstream gets it (and
        // what came before it), nothing after it, and the tunnel is not a
        // refusal.
        buf.truncate(n);
        return Ok(Retried { buf, last: true });
    }
    if let Peek::Hello(info) = &judged {
        if info.sni != first {
            // RFC 8446 4.1.2: the second hello repeats the first's name.
            // Recorded with the name it carried, as a refused first hello is.
            if let Ok(mut s) = seen.lock() {
                *s = (info.sni.clone(), info.ech);
            }
            return Err(End::Denied(
                Reason::SniMismatch,
                Some(peek::ALERT_UNRECOGNIZED_NAME),
            ));
        }
    }
    verdict(judged, check, seen)?;
    Ok(Retried { buf, last: false })
}

/// What [`gate_retry`] lets through after a HelloRetryRequest.
pub(super) struct Retried {
    /// Bytes to pass on.
    pub buf: Vec<u8>,
    /// The client gave up (a fatal alert ends `buf`): nothing more of it
    /// goes upstream.
    pub last: bool,
}

/// Read into `buf` until `classify` decides (bounded by `timeout`).
async fn judge(
    client: &ReadHalf<'_>,
    buf: &mut Vec<u8>,
    timeout: Duration,
    classify: fn(&[u8]) -> Peek,
) -> Result<Peek, End> {
    tokio::time::timeout(timeout, async {
        loop {
            match classify(buf) {
                Peek::NeedMore => {
                    let before = buf.len();
                    read_more(client, buf).await?;
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
    .map_err(|_| End::Denied(Reason::Timeout, None))?
}

/// Replay held client bytes upstream, counted.
pub(super) async fn forward_held(dir: &mut Dir<'_>, held: Vec<u8>) -> Result<(), End> {
    if !held.is_empty() {
        dir.to.write_all(&held).await.map_err(|_| End::Upstream)?;
        dir.moved(held.len());
    }
    Ok(())
}

/// Pass the upstream's first bytes to the client as they come (nothing is
/// held back), and say whether its first record is a HelloRetryRequest.
/// Keeps at most [`peek::SERVER_FIRST_BYTES`] of it.
pub(super) async fn watch_first(dir: &mut Dir<'_>, retry: &RetrySignal) -> Result<(), End> {
    let mut first = Vec::new();
    loop {
        // Nothing but `first` (empty) is held while the upstream is silent:
        // an idle tunnel waits here, and its memory budget is small.
        dir.from.readable().await.map_err(|_| dir.from_side.end())?;
        let mut buf = vec![0u8; 1024];
        let n = match dir.from.try_read(&mut buf) {
            // EOF: the relay reads it again and half-closes.
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(dir.from_side.end()),
        };
        let read = buf.get(..n).unwrap_or_default();
        dir.to
            .write_all(read)
            .await
            .map_err(|_| dir.to_side.end())?;
        dir.moved(n);
        let want = peek::SERVER_FIRST_BYTES.saturating_sub(first.len());
        first.extend_from_slice(read.get(..want.min(n)).unwrap_or_default());
        let is_retry = match peek::server_first(&first) {
            peek::ServerFirst::NeedMore => continue,
            peek::ServerFirst::HelloRetry => true,
            peek::ServerFirst::Other => false,
        };
        // The client side may not be waiting (not a hello): no matter.
        retry.settle(is_retry);
        return Ok(());
    }
}

fn verdict(judged: Peek, check: &Check, seen: &Mutex<(Option<String>, bool)>) -> Result<(), End> {
    match judged {
        Peek::NotTls if check.mode == SniMode::Require => {
            Err(End::Denied(Reason::SniRequired, None))
        }
        Peek::NotTls | Peek::NeedMore => Ok(()),
        // Only `peek_retry` gives up this way, and `gate_retry` takes it
        // first; anywhere else it is not a hello: fail closed.
        Peek::Abort(_) => Err(End::Denied(
            Reason::BadRequest,
            Some(peek::ALERT_DECODE_ERROR),
        )),
        Peek::Malformed(why) => {
            tracing::debug!(why, "malformed ClientHello refused");
            Err(End::Denied(
                Reason::BadRequest,
                Some(peek::ALERT_DECODE_ERROR),
            ))
        }
        Peek::Hello(info) => {
            if let Ok(mut s) = seen.lock() {
                *s = (info.sni.clone(), info.ech);
            }
            if info.ech && check.ech == EchMode::Deny {
                return Err(End::Denied(
                    Reason::EchDenied,
                    Some(peek::ALERT_ACCESS_DENIED),
                ));
            }
            let Some(sni) = info.sni else {
                return match check.mode {
                    SniMode::Require => Err(End::Denied(
                        Reason::SniRequired,
                        Some(peek::ALERT_UNRECOGNIZED_NAME),
                    )),
                    _ => Ok(()),
                };
            };
            match &check.host {
                // A CONNECT to an address admitted by `addresses`: record the SNI, don't compare.
                Host::Ip(_) => Ok(()),
                Host::Name(host) if sni_matches(&sni, host) => Ok(()),
                Host::Name(_) => Err(End::Denied(
                    Reason::SniMismatch,
                    Some(peek::ALERT_UNRECOGNIZED_NAME),
                )),
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
async fn read_more(client: &ReadHalf<'_>, buf: &mut Vec<u8>) -> Result<(), End> {
    loop {
        client.readable().await.map_err(|_| End::Client)?;
        let room = (peek::MAX_HELLO_BYTES + 1)
            .saturating_sub(buf.len())
            .min(16 * 1024);
        if room == 0 {
            return Err(End::Denied(
                Reason::BadRequest,
                Some(peek::ALERT_DECODE_ERROR),
            ));
        }
        buf.reserve(room);
        match client.try_read_buf(buf) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(End::Client),
        }
    }
}

/// The down direction's word to the up direction: is the upstream's first
/// record a HelloRetryRequest? Settled once (the first word stands); kept
/// in the tunnel's own state rather than a channel, so a checked tunnel
/// allocates nothing for it.
#[derive(Default)]
pub(super) struct RetrySignal {
    /// [`UNSETTLED`], [`NO_RETRY`] or [`RETRY`].
    state: AtomicU8,
    settled: tokio::sync::Notify,
}

const UNSETTLED: u8 = 0;
const NO_RETRY: u8 = 1;
const RETRY: u8 = 2;

impl RetrySignal {
    /// Settle the answer, unless it already is.
    pub(super) fn settle(&self, retry: bool) {
        let word = if retry { RETRY } else { NO_RETRY };
        if self
            .state
            .compare_exchange(UNSETTLED, word, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // A permit if nobody waits yet: the next wait sees it.
            self.settled.notify_one();
        }
    }

    /// The answer, once settled.
    pub(super) async fn wait(&self) -> bool {
        loop {
            let settled = self.settled.notified();
            match self.state.load(Ordering::Acquire) {
                UNSETTLED => settled.await,
                word => return word == RETRY,
            }
        }
    }
}
