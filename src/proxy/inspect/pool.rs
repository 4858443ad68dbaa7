//! Upstream connections of inspected tunnels, kept for the next tunnel.
//!
//! An inspected tunnel re-originates TLS to its upstream: a TCP and a TLS
//! handshake per tunnel, more than the proxy's whole work on the client's
//! side. When a tunnel ends with its upstream connection idle and reusable,
//! the connection is kept here for the next inspected tunnel to the same
//! target under the same rule, as Squid keeps its server connections.
//!
//! What makes sharing sound:
//! - the key is the rule and the target (host and port) within one settings
//!   snapshot (the pool lives in the snapshot's guards): the connection was
//!   dialled to an address vetted for that target under that rule, verified
//!   for that host, with that rule's client certificate (if any). A reload
//!   starts an empty pool; the old one closes with its snapshot, and a
//!   tunnel of the old snapshot ending after the reload keeps nothing;
//! - a connection goes back only when hyper says it is ready for another
//!   request: every response read to its end, nothing in flight (a tunnel
//!   that ends mid-response closes its connection);
//! - a connection that carried connection-based authentication (NTLM,
//!   Negotiate: the origin ties the login to the TCP connection) belongs to
//!   its client and is never kept; nor is one that carried a request body
//!   (an origin that does not read it reads it as a request of the client's
//!   making, whose answer would reach the next tunnel);
//! - every inner request is still admitted and recorded on its own; the
//!   pool changes where a request goes, never whether it may.
//!
//! Bounded: at most [`PER_KEY`] idle connections per key and [`TOTAL`] in
//! all; one janitor task per pool closes those idle past
//! `limits.upstream_idle_timeout` (within half of it) and ends when the pool
//! is empty.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use http::{header, HeaderMap};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;

use crate::proxy::body::RequestBody;
use crate::reason::Reason;
use crate::target::Target;

/// Idle connections kept per rule and target.
pub const PER_KEY: usize = 64;
/// Idle connections kept in all, per settings snapshot.
pub const TOTAL: usize = 512;
/// How long a tunnel's end waits for its upstream connection to be ready
/// for another request, to keep it.
const KEEP_WAIT: Duration = Duration::from_millis(250);

/// One upstream HTTP/1.1 connection over verified TLS, as a tunnel uses it.
/// Dropped, it closes.
pub struct Conn {
    pub sender: SendRequest<RequestBody>,
    /// Set by the connection's task when it ends: `Some(true)` when it ended
    /// on a TLS error (TLS 1.3 reports a refused client certificate only
    /// when the first response is read).
    pub failed: watch::Receiver<Option<bool>>,
    /// The vetted address it goes to (the records' `upstream`).
    pub addr: Option<SocketAddr>,
    /// Carried a request before: a request it returns unsent (closed by the
    /// origin while idle) may go on a new connection.
    pub used: bool,
    /// When the head of its last answer came: a connection idle for
    /// longer may be closed by the origin under the next request.
    pub answered: Option<Instant>,
    /// Tied to this tunnel, never kept for another: it carried
    /// connection-based authentication, or a request body.
    pub pinned: bool,
    task: tokio::task::AbortHandle,
}

impl Conn {
    /// HTTP/1.1 over `tls`, its connection driven by a task of its own.
    ///
    /// # Errors
    /// `upstream_reset` when hyper cannot start the connection.
    pub async fn open<T>(tls: T, addr: Option<SocketAddr>) -> Result<Conn, Reason>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, RequestBody>(TokioIo::new(tls))
            .await
            .map_err(|_| Reason::UpstreamReset)?;
        let (failed_tx, failed) = watch::channel(None);
        let task = tokio::spawn(async move {
            let tls = conn
                .await
                .err()
                .is_some_and(|e| crate::tls::is_tls_error(&e));
            let _ = failed_tx.send(Some(tls));
        })
        .abort_handle();
        Ok(Conn {
            sender,
            failed,
            addr,
            used: false,
            answered: None,
            pinned: false,
            task,
        })
    }

    /// Note connection-based authentication in a request's or a response's
    /// headers (`Authorization`, `WWW-Authenticate`, and their proxy forms
    /// as an origin may misuse them): any token of a value naming NTLM,
    /// Negotiate or Kerberos (one header may list several challenges).
    /// Erring towards pinning costs only a connection not kept.
    pub fn note_auth(&mut self, headers: &HeaderMap) {
        if self.pinned {
            return;
        }
        let connection_bound = |v: &http::HeaderValue| {
            v.as_bytes()
                .split(|b| matches!(b, b' ' | b',' | b'\t'))
                .any(|t| {
                    [b"NTLM".as_slice(), b"Negotiate", b"Kerberos"]
                        .iter()
                        .any(|s| t.eq_ignore_ascii_case(s))
                })
        };
        for name in [
            header::AUTHORIZATION,
            header::WWW_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::PROXY_AUTHENTICATE,
        ] {
            if headers.get_all(&name).iter().any(connection_bound) {
                self.pinned = true;
            }
        }
    }
}

impl Conn {
    /// Idle for `d` or more since its last answer (or never answered): the
    /// origin may have closed it by now.
    pub fn idled(&self, d: Duration) -> bool {
        self.answered.is_none_or(|t| t.elapsed() >= d)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The pool's key: which rule let the tunnel out, and to where.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub rule: Option<usize>,
    pub target: Target,
}

/// Idle upstream connections of one settings snapshot.
pub struct Pool {
    idle_timeout: Duration,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    idle: HashMap<Key, Vec<(Conn, Instant)>>,
    count: usize,
    janitor: bool,
}

impl Inner {
    /// Take out what idled past `timeout` or closed; returned so that it is
    /// dropped (closed) outside the lock.
    fn expired(&mut self, now: Instant, timeout: Duration) -> Vec<Conn> {
        let mut out = Vec::new();
        self.idle.retain(|_, list| {
            let mut i = 0;
            while i < list.len() {
                let (conn, since) = &list[i];
                if now.duration_since(*since) >= timeout || conn.sender.is_closed() {
                    out.push(list.swap_remove(i).0);
                } else {
                    i += 1;
                }
            }
            !list.is_empty()
        });
        self.count -= out.len();
        out
    }
}

impl Pool {
    /// A pool keeping connections idle for at most `idle_timeout` (zero:
    /// none kept).
    pub fn new(idle_timeout: Duration) -> Self {
        Pool {
            idle_timeout,
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently kept connection for `key` that is still open and
    /// ready, if any.
    pub fn take(&self, key: &Key) -> Option<Conn> {
        if self.idle_timeout.is_zero() {
            return None;
        }
        let now = Instant::now();
        let mut stale = Vec::new();
        let found = {
            let mut inner = self.lock();
            let list = inner.idle.get_mut(key)?;
            let mut found = None;
            while let Some((mut conn, since)) = list.pop() {
                if now.duration_since(since) < self.idle_timeout
                    && !conn.sender.is_closed()
                    && conn.sender.is_ready()
                {
                    // It idled: the origin may close it under the next
                    // request, which then goes on a new connection (its
                    // first request is copied for that, whatever the time).
                    conn.used = true;
                    conn.answered = None;
                    found = Some(conn);
                    break;
                }
                stale.push(conn);
            }
            let taken = stale.len() + usize::from(found.is_some());
            if list.is_empty() {
                inner.idle.remove(key);
            }
            inner.count -= taken;
            found
        };
        drop(stale);
        found
    }

    /// Keep `conn` for the next tunnel to `key` once it is ready for another
    /// request: at once, or as soon as its task has seen the last response
    /// end; a response cut short closed it, and one still in flight keeps
    /// it out (waited for at most [`KEEP_WAIT`]).
    pub async fn keep(&self, key: Key, mut conn: Conn) {
        if self.idle_timeout.is_zero() || conn.pinned {
            return;
        }
        if let Ok(Ok(())) = tokio::time::timeout(KEEP_WAIT, conn.sender.ready()).await {
            self.put(key, conn);
        }
    }

    /// Keep `conn`, ready for another request, for the next tunnel to `key`
    /// if it may be shared and there is room; otherwise it closes.
    fn put(&self, key: Key, conn: Conn) {
        if self.idle_timeout.is_zero() || conn.pinned || conn.sender.is_closed() {
            return;
        }
        let spawn_janitor = {
            let mut inner = self.lock();
            if inner.count >= TOTAL {
                return;
            }
            let list = inner.idle.entry(key).or_default();
            if list.len() >= PER_KEY {
                return;
            }
            list.push((conn, Instant::now()));
            inner.count += 1;
            !std::mem::replace(&mut inner.janitor, true)
        };
        if spawn_janitor {
            tokio::spawn(janitor(Arc::downgrade(&self.inner), self.idle_timeout));
        }
    }

    /// Idle connections kept now.
    pub fn len(&self) -> usize {
        self.lock().count
    }

    /// No idle connection kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Close what idles past `timeout`, every half of it (at least every 100
/// ms, at most every 5 s); end with the pool or when it is empty.
async fn janitor(pool: Weak<Mutex<Inner>>, timeout: Duration) {
    let period = (timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = pool.upgrade() else {
            return;
        };
        let expired = {
            let mut inner = inner.lock().unwrap_or_else(PoisonError::into_inner);
            let expired = inner.expired(Instant::now(), timeout);
            if inner.count == 0 {
                inner.janitor = false;
                drop(inner);
                drop(expired);
                return;
            }
            expired
        };
        drop(expired);
    }
}

#[cfg(test)]
mod tests;
