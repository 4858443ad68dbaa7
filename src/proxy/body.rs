//! Bodies: the response body type the proxy serves, and the counting
//! wrappers that stream request and response bodies without buffering them,
//! adding their sizes to the transaction's record.
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::txn::{Ended, Txn};
use crate::reason::Reason;

/// What the proxy answers with: a small fixed body, or a streamed upstream one.
pub enum ProxyBody {
    Full(Option<Bytes>),
    Streamed(Box<ResponseBody>),
}

impl ProxyBody {
    pub fn full(b: Bytes) -> Self {
        ProxyBody::Full(Some(b))
    }

    pub fn empty() -> Self {
        ProxyBody::Full(None)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Streamed(s) => Pin::new(s.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Streamed(s) => s.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Streamed(s) => s.inner.size_hint(),
        }
    }
}

/// Shared between the request body (read by the upstream connection task)
/// and the transaction, which may end first (client gone, upstream reset,
/// time-out): its record then waits here for the body to be done, so that
/// `bytes_up` is what was handed upstream in the end.
#[derive(Default)]
pub struct UpCount {
    pub bytes: AtomicU64,
    /// The client's body failed: it vanished mid-upload.
    pub client_error: AtomicBool,
    /// The client's body was malformed (bad chunked framing): a 400.
    pub malformed: AtomicBool,
    ending: Mutex<Ending>,
}

/// Which of the two ends came first.
#[derive(Default)]
struct Ending {
    /// The body is complete, failed, or dropped: no more bytes go up.
    body_done: bool,
    /// The transaction's record, when the transaction ended first.
    parked: Option<Ended>,
}

impl UpCount {
    /// The transaction has ended: send its record now if the body is done,
    /// else when it is.
    pub fn end_txn(&self, ended: Ended) {
        let mut e = self.ending.lock().unwrap_or_else(PoisonError::into_inner);
        if e.body_done {
            drop(e);
            ended.send(self.bytes.load(Ordering::Acquire));
        } else {
            e.parked = Some(ended);
        }
    }

    /// No more of the body goes up (complete, failed or dropped).
    pub fn body_done(&self) -> bool {
        self.ending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .body_done
    }

    /// The client's part in a failed send: a malformed body is a 400
    /// (`bad_request`), a client that went away mid-upload `client_closed`;
    /// `None` when the body is not to blame.
    pub fn client_fault(&self) -> Option<Reason> {
        if self.malformed.load(Ordering::Relaxed) {
            Some(Reason::BadRequest)
        } else if self.client_error.load(Ordering::Relaxed) {
            Some(Reason::ClientClosed)
        } else {
            None
        }
    }

    /// The body is done: send the record if the transaction already ended.
    fn end_body(&self) {
        let parked = {
            let mut e = self.ending.lock().unwrap_or_else(PoisonError::into_inner);
            e.body_done = true;
            e.parked.take()
        };
        if let Some(ended) = parked {
            ended.send(self.bytes.load(Ordering::Acquire));
        }
    }
}

/// The client's request body on its way upstream, counted.
pub struct RequestBody {
    /// None: no body at all (a request the proxy sends again on a new
    /// connection after the first one closed under it).
    inner: Option<Incoming>,
    /// None for a request without a body: nothing to count, nothing allocated.
    count: Option<Arc<UpCount>>,
    /// Marked idle when the body is complete (see `ConnIo`).
    conn: Option<Arc<super::ConnIo>>,
}

impl RequestBody {
    /// Wrap `inner`, counting into `count`. The transaction must be told
    /// ([`Txn::count_upload`]) or its record misses these bytes; prefer
    /// [`RequestBody::counted`].
    pub fn new(inner: Incoming, count: Option<Arc<UpCount>>) -> Self {
        RequestBody {
            inner: Some(inner),
            count,
            conn: None,
        }
    }

    /// No body.
    pub fn empty() -> Self {
        RequestBody {
            inner: None,
            count: None,
            conn: None,
        }
    }

    /// Wrap `inner`, counted into `txn`'s record (nothing to count, and
    /// nothing allocated, for a request without a body).
    pub fn counted(inner: Incoming, txn: &mut Txn) -> Self {
        let count = (!inner.is_end_stream()).then(|| Arc::new(UpCount::default()));
        if let Some(c) = &count {
            txn.count_upload(Arc::clone(c));
        }
        RequestBody::new(inner, count)
    }

    /// The counter, to tell why a send failed.
    pub fn count(&self) -> Option<Arc<UpCount>> {
        self.count.clone()
    }

    /// Mark the client connection idle when this body is complete.
    pub fn marking(mut self, conn: Arc<super::ConnIo>) -> Self {
        self.conn = Some(conn);
        self
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match (&polled, &this.count) {
            (Poll::Ready(Some(Ok(f))), Some(count)) => {
                if let Some(d) = f.data_ref() {
                    count.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            (Poll::Ready(Some(Err(e))), Some(count)) => {
                let flag = if is_malformed(e) {
                    &count.malformed
                } else {
                    &count.client_error
                };
                flag.store(true, Ordering::Relaxed);
                count.end_body();
            }
            (Poll::Ready(None), Some(count)) => count.end_body(),
            _ => {}
        }
        if inner.is_end_stream() {
            if let Some(c) = &this.conn {
                c.mark_idle();
            }
            if let Some(count) = &this.count {
                count.end_body();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for RequestBody {
    /// Sent, failed or abandoned: nothing more of it goes upstream.
    fn drop(&mut self) {
        if let Some(count) = &self.count {
            count.end_body();
        }
    }
}

/// A body error from bad framing (a malformed chunk: hyper wraps an
/// `InvalidInput`/`InvalidData` io error), as opposed to a client that went
/// away (EOF, reset).
fn is_malformed(e: &hyper::Error) -> bool {
    io_error(e).map_or_else(
        || e.is_parse(),
        |io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            )
        },
    )
}

/// The first I/O error in what caused `e`, if any.
pub(crate) fn io_error(e: &hyper::Error) -> Option<&std::io::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cur = err.source();
    }
    None
}

/// The upstream response body on its way to the client; owns the
/// transaction and ends it when the body ends, fails, or is dropped.
pub struct ResponseBody {
    inner: Incoming,
    txn: Option<Txn>,
    status: u16,
}

impl ResponseBody {
    /// The transaction counts the upload already
    /// ([`RequestBody::counted`]).
    pub fn new(inner: Incoming, txn: Txn, status: u16) -> Self {
        ResponseBody {
            inner,
            txn: Some(txn),
            status,
        }
    }

    /// The transaction with its status.
    fn take_txn(&mut self) -> Option<Txn> {
        let mut txn = self.txn.take()?;
        txn.rec().status = Some(self.status);
        Some(txn)
    }

    fn end(&mut self, reason: Option<Reason>) {
        if let Some(txn) = self.take_txn() {
            txn.finish(None, reason);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(txn)) = (f.data_ref(), this.txn.as_mut()) {
                    txn.add_down(d.len() as u64);
                }
                // hyper stops polling once the body says it is complete.
                if this.inner.is_end_stream() {
                    this.end(None);
                }
            }
            // A truncated or reset upstream body: the error reaches hyper,
            // which aborts the client connection rather than pad the body.
            Poll::Ready(Some(Err(_))) => this.end(Some(Reason::UpstreamReset)),
            Poll::Ready(None) => this.end(None),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            // Complete (an empty body, or one hyper finished without a final poll).
            self.end(None);
            return;
        }
        // Dropped before its end: the client went away (or shutdown cut it;
        // Txn's drop records which).
        drop(self.take_txn());
    }
}
