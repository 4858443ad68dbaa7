//! The relay phase of a tunnel as one hand-written future: both
//! directions, then the idle time-out and shutdown ([`idle::Idler`]),
//! polled in that order (a direction's end is seen before the clock).
//!
//! Memory: an idle tunnel is parked in this future, so it holds only what
//! a silent direction needs: its two socket halves and a few counters. The
//! rarely used parts live in boxes that exist only while in use: a checked
//! tunnel's opening (the SNI gate, the watch of the upstream's first
//! record, held bytes being replayed), a backlog the other side cannot take
//! yet, and a bulk direction's splice.
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;

use super::gate::{forward_held, gate, gate_retry, watch_first};
use super::{bulk, idle, Common, Copied, Copying, Dir, End, SPLICE_AFTER};
use crate::reason::Reason;

/// A direction's boxed opening; it gives the direction back when done,
/// and says whether the direction goes on to relay.
type Opening<'a> = Pin<Box<dyn Future<Output = (Dir<'a>, Result<Opened, End>)> + Send + 'a>>;

/// How a direction's opening ended well.
enum Opened {
    /// Relay on.
    Relay,
    /// The client gave up after a HelloRetryRequest: its fatal alert was
    /// passed on and the upstream's write side closed; nothing more of the
    /// client's goes upstream.
    Finished,
}

/// Where one direction is.
enum Flow<'a> {
    /// A checked side before its first bytes: waits on the socket's own
    /// read readiness, with nothing allocated.
    First(Dir<'a>),
    /// Its opening runs (boxed).
    Opening(Opening<'a>),
    /// Copying through the worker's scratch buffer.
    Copy(Dir<'a>, Copying),
    /// Past the bulk threshold (boxed: splice, or copying on).
    Bulk(Pin<Box<dyn Future<Output = Result<(), End>> + Send + 'a>>),
    /// Finished (EOF passed on and half-closed).
    Done,
}

/// Both directions of a tunnel and its entry in the [`idle::Idler`].
pub(super) struct Relay<'a> {
    common: &'a Common<'a>,
    up: Flow<'a>,
    down: Flow<'a>,
    idle: Duration,
    expiry: idle::Entry<'a>,
}

impl<'a> Relay<'a> {
    /// `up` carries the client's bytes, `early` the ones hyper had read.
    /// A checked tunnel opens each direction through its check; without
    /// one, only bytes read early need an opening (to be replayed).
    pub(super) fn new(
        common: &'a Common<'a>,
        up: Dir<'a>,
        down: Dir<'a>,
        early: Bytes,
        idle: Duration,
        idler: &'a idle::Idler,
    ) -> Self {
        let checked = common.check.is_some();
        let up = if !early.is_empty() {
            Flow::Opening(Box::pin(open_up(up, early, common)))
        } else if checked {
            Flow::First(up)
        } else {
            Flow::Copy(up, Copying::default())
        };
        let down = if checked {
            Flow::First(down)
        } else {
            Flow::Copy(down, Copying::default())
        };
        Relay {
            common,
            up,
            down,
            idle,
            expiry: idler.entry(),
        }
    }
}

impl Future for Relay<'_> {
    /// Why the tunnel ended abnormally; `None` when both directions finished.
    type Output = Option<End>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<End>> {
        let this = self.get_mut();
        let common = this.common;
        if let Poll::Ready(Err(e)) = this.up.poll(cx, common, first_up) {
            return Poll::Ready(Some(e));
        }
        if let Poll::Ready(Err(e)) = this.down.poll(cx, common, first_down) {
            return Poll::Ready(Some(e));
        }
        if matches!((&this.up, &this.down), (Flow::Done, Flow::Done)) {
            return Poll::Ready(None);
        }
        // Armed for the latest possible end; traffic since only moves it on
        // (one arm per idle period, not per message).
        match this.expiry.poll(cx, this.idle, || common.clock.quiet()) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(idle::Expired::Idle) => Poll::Ready(Some(End::Timeout)),
            Poll::Ready(idle::Expired::Shutdown) => {
                Poll::Ready(Some(End::Denied(Reason::Shutdown, None)))
            }
        }
    }
}

impl<'a> Flow<'a> {
    /// Move this direction on as far as it goes; `Ready(Ok)` once it has
    /// finished (and stays so). `first` opens a checked side once its first
    /// bytes are there.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        common: &'a Common<'a>,
        first: fn(Dir<'a>, &'a Common<'a>) -> Opening<'a>,
    ) -> Poll<Result<(), End>> {
        loop {
            // The common case first, in place: a copying direction.
            if let Flow::Copy(dir, copying) = self {
                match copying.poll(dir, cx, Some(SPLICE_AFTER)) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Copied::Done(r)) => {
                        *self = Flow::Done;
                        return Poll::Ready(r);
                    }
                    Poll::Ready(Copied::Bulk) => {}
                }
            }
            *self = match mem::replace(self, Flow::Done) {
                Flow::Done => return Poll::Ready(Ok(())),
                Flow::First(dir) => match dir.from.as_ref().poll_read_ready(cx) {
                    Poll::Pending => {
                        *self = Flow::First(dir);
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(dir.from_side.end())),
                    Poll::Ready(Ok(())) => Flow::Opening(first(dir, common)),
                },
                Flow::Opening(mut opening) => match opening.as_mut().poll(cx) {
                    Poll::Pending => {
                        *self = Flow::Opening(opening);
                        return Poll::Pending;
                    }
                    Poll::Ready((_, Err(e))) => return Poll::Ready(Err(e)),
                    Poll::Ready((_, Ok(Opened::Finished))) => return Poll::Ready(Ok(())),
                    Poll::Ready((dir, Ok(Opened::Relay))) => Flow::Copy(dir, Copying::default()),
                },
                // Only here once it carried its bulk threshold.
                Flow::Copy(dir, _) => Flow::Bulk(Box::pin(bulk(dir, common.splicer))),
                Flow::Bulk(mut bulk) => match bulk.as_mut().poll(cx) {
                    Poll::Pending => {
                        *self = Flow::Bulk(bulk);
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => return Poll::Ready(r),
                },
            };
        }
    }
}

fn first_up<'a>(dir: Dir<'a>, common: &'a Common<'a>) -> Opening<'a> {
    Box::pin(open_up(dir, Bytes::new(), common))
}

fn first_down<'a>(dir: Dir<'a>, common: &'a Common<'a>) -> Opening<'a> {
    Box::pin(open_down(dir, common))
}

/// Client to upstream: with a check, the client's first bytes (and after a
/// HelloRetryRequest its second hello) are held until judged, then
/// replayed; without one, bytes hyper read early are replayed.
async fn open_up<'a>(
    mut dir: Dir<'a>,
    early: Bytes,
    common: &'a Common<'a>,
) -> (Dir<'a>, Result<Opened, End>) {
    let r = async {
        let Some(check) = common.check else {
            forward_held(&mut dir, early.to_vec()).await?;
            return Ok(Opened::Relay);
        };
        let (held, after, hello) = gate(&dir.from, early, check, &common.seen).await?;
        forward_held(&mut dir, held).await?;
        if !hello {
            forward_held(&mut dir, after).await?;
            return Ok(Opened::Relay);
        }
        // A HelloRetryRequest makes the client send a second hello, which
        // a lenient server (OpenSSL) takes the name from; what came after
        // the first hello waits for the upstream's answer.
        let retried = gate_retry(&dir.from, &common.retry, check, &common.seen, after).await?;
        forward_held(&mut dir, retried.buf).await?;
        if retried.last {
            // The client gave up with a fatal alert: the upstream sees the
            // end after it, and the client's side is read no more.
            let _ = dir.to.shutdown().await;
            return Ok(Opened::Finished);
        }
        Ok(Opened::Relay)
    }
    .await;
    (dir, r)
}

/// Upstream to client, checked: its first record is watched for a
/// HelloRetryRequest while it passes.
async fn open_down<'a>(mut dir: Dir<'a>, common: &'a Common<'a>) -> (Dir<'a>, Result<Opened, End>) {
    let r = watch_first(&mut dir, &common.retry).await;
    // Ended before its first record was whole: no retry to wait for.
    common.retry.settle(false);
    (dir, r.map(|()| Opened::Relay))
}
