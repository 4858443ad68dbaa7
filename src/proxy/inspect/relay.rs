//! The HTTP/1.1 inside an inspected tunnel: a hyper server on the
//! terminated client stream, built like the proxy's own listener (head
//! limits, time-outs), and one client connection to the re-originated
//! upstream (kept from an earlier tunnel, or made for this one), which goes
//! back to the pool if it ends reusable.
//!
//! Inner requests are requests: each is admitted as a plain one is (head
//! size, the client's and the rule's rates, the policy for its method, a
//! body on a body-less method) and must name the tunnel's host and nothing
//! else. The upstream gets a `Host` the proxy writes, never the client's.
//! Every inner transaction, a head hyper refuses included, gets exactly one
//! record carrying the tunnel's user and upstream address.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Mutex};

use super::{Conn, Inspected};
use crate::audit::Decided;
use crate::proxy::body::{ProxyBody, RequestBody, ResponseBody, UpCount};
use crate::proxy::error::Refusal;
use crate::proxy::http::strip_hop_by_hop;
use crate::proxy::pipeline::{check_head, client_rates, decide};
use crate::proxy::txn::Txn;
use crate::proxy::{parse_refusal, refuse, server_builder, truncate, ConnIo};
use crate::reason::Reason;
use crate::target::{self, Host, Target};

/// The upstream as the inner requests share it.
type Sender = Arc<Mutex<Conn>>;
/// Set by the upstream connection task when it ends: `Some(true)` when it
/// ended on a TLS error.
type Failed = watch::Receiver<Option<bool>>;

/// One inspected tunnel as its inner requests see it.
pub(super) struct Tunnel<'a> {
    pub t: &'a Inspected,
    /// What the inner server has read, to tell a slow head from an idle
    /// keep-alive connection at the head time-out.
    pub io: Arc<ConnIo>,
}

impl Tunnel<'_> {
    /// A record for an inner transaction, before its request is known.
    fn txn(&self) -> Txn {
        let t = self.t;
        let mut txn = t.shared.txn(t.client);
        txn.set_target(&t.target);
        txn.set_rule(t.rule.and_then(|i| t.snapshot.policy.rule_name(i)));
        txn.set_decision(Decided::Inspect);
        let rec = txn.rec();
        rec.user.clone_from(&t.user);
        rec.upstream = t.upstream;
        txn
    }

    /// A record for `req`: its method and the URL the upstream is sent
    /// (the tunnel's authority, never the client's spelling; no fragment).
    fn request_txn(&self, req: &Request<Incoming>) -> Txn {
        let mut txn = self.txn();
        let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let url = format!("https://{}{pq}", host_value(&self.t.target));
        let rec = txn.rec();
        rec.method = Some(req.method().clone());
        rec.url = Some(truncate(url, 4096));
        txn
    }

    /// Record a head the inner server refused itself (bad framing, too
    /// large, a head time-out); the reason is also the tunnel's.
    fn record_conn_error(&self, e: &hyper::Error) -> Option<Reason> {
        let Some((reason, status)) = parse_refusal(e, self.io.partial()) else {
            tracing::debug!(error = %e, "inspected connection ended");
            return None;
        };
        let mut txn = self.txn();
        match status {
            Some(s) => txn.refuse(s, reason),
            None => {
                txn.set_decision(Decided::Deny);
                txn.finish(None, Some(reason));
            }
        }
        Some(reason)
    }
}

/// `host[:port]` of the tunnel's target, the port left out when 443: the
/// `Host` the upstream gets, and the authority of the recorded URL.
fn host_value(t: &Target) -> String {
    let host = match &t.host {
        Host::Ip(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        other => other.to_string(),
    };
    if t.port == 443 {
        host
    } else {
        format!("{host}:{}", t.port)
    }
}

/// Serve the inner requests with `svc` until the client goes, the head
/// limits refuse it, or the proxy stops. Returns the tunnel's reason.
async fn serve<I, S>(cx: &Tunnel<'_>, io: TokioIo<I>, svc: S) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let plain = Plain {
        inner: io.into_inner(),
        io: Arc::clone(&cx.io),
    };
    let served = server_builder(&cx.t.snapshot).serve_connection(TokioIo::new(plain), svc);
    let hard = cx.t.shared.drain.hard.clone();
    tokio::select! {
        // Each inner request has its own record; the connection ending
        // (idle time-out, client gone) is not a refusal of the tunnel.
        r = served => r.err().and_then(|e| cx.record_conn_error(&e)),
        () = hard.cancelled() => Some(Reason::Shutdown),
    }
}

/// The upstream TLS failed: answer each request with the refusal.
pub(super) async fn refuse_all<I>(cx: &Tunnel<'_>, io: TokioIo<I>, reason: Reason) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let status = if reason == Reason::Timeout {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    let svc = service_fn(|req: Request<Incoming>| {
        cx.io.mark_idle();
        let txn = cx.request_txn(&req);
        let resp = refuse(txn, Refusal::with_status(reason, status), &cx.t.snapshot);
        async move { Ok::<_, std::convert::Infallible>(resp) }
    });
    serve(cx, io, svc).await.or(Some(reason))
}

/// Relay HTTP/1.1 between the terminated client and the upstream; keep the
/// upstream connection for the next tunnel if it ends ready for another
/// request.
pub(super) async fn relay<I>(cx: &Tunnel<'_>, io: TokioIo<I>, conn: Conn) -> Option<Reason>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let sender: Sender = Arc::new(Mutex::new(conn));
    let svc = service_fn(|req: Request<Incoming>| {
        // A head is complete: what was read so far is not a partial head.
        cx.io.mark_idle();
        let sender = Arc::clone(&sender);
        async move { Ok::<_, std::convert::Infallible>(inner(cx, req, sender).await) }
    });
    let reason = serve(cx, io, svc).await;
    if let (Ok(conn), false) = (Arc::try_unwrap(sender), reason == Some(Reason::Shutdown)) {
        super::keep(cx.t, conn.into_inner()).await;
    }
    reason
}

/// One inner request: admit, forward with the proxy's `Host`, record.
async fn inner(cx: &Tunnel<'_>, req: Request<Incoming>, sender: Sender) -> Response<ProxyBody> {
    let snapshot = &cx.t.snapshot;
    // Records are never dropped: wait here when the writer is behind.
    cx.t.shared.audit.ready().await;
    let mut txn = cx.request_txn(&req);
    if let Err(r) = admit(cx, &mut txn, &req) {
        return refuse(txn, r, snapshot);
    }
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if let Ok(v) = HeaderValue::from_str(&host_value(&cx.t.target)) {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = http::Uri::from(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    // Counted as on the plain path: whichever way the transaction ends (a
    // client that vanishes drops this future with it), its record waits
    // for the body and counts what went upstream.
    let body = RequestBody::counted(body, &mut txn).marking(Arc::clone(&cx.io));
    let up = body.count();
    let out = Request::from_parts(parts, body);
    let mut conn = sender.lock().await;
    let sent = send(cx, &mut conn, out, &mut txn).await;
    match sent {
        Ok(resp) => {
            conn.note_auth(resp.headers());
            if up.is_some() {
                // A request body: an origin that does not read it (a CL.0
                // origin, or one answering early) reads it as a request of
                // its own, whose answer must not reach another tunnel.
                conn.pinned = true;
            }
            drop(conn);
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let status = parts.status.as_u16();
            let body = ResponseBody::new(body, txn, status);
            Response::from_parts(parts, ProxyBody::Streamed(Box::new(body)))
        }
        Err(Sent::Timeout) => refuse(txn, Refusal::new(Reason::Timeout), snapshot),
        Err(Sent::Refused(r)) => refuse(txn, r, snapshot),
        Err(Sent::Failed(tls)) => {
            let mut failed = conn.failed.clone();
            drop(conn);
            let reason = match up.as_deref().and_then(UpCount::client_fault) {
                Some(r) => r,
                None => upstream_failure(tls, &mut failed).await,
            };
            refuse(txn, Refusal::new(reason), snapshot)
        }
    }
}

/// Why an inner request was not answered by the upstream.
enum Sent {
    Timeout,
    /// The upstream (or the client's body) failed; true for a TLS error.
    Failed(bool),
    /// Dialling again (for a connection the origin had closed) failed.
    Refused(Refusal),
}

/// Send `out` on `conn`. A connection that carried a request before (kept
/// from another tunnel, or by this one) may have been closed by the origin
/// while idle: if it is closed, or hands the request back unsent, a direct
/// tunnel dials again (resolved and vetted anew) and sends it there, once.
/// A request the origin may have read goes again only when it is safe to
/// repeat: GET, HEAD or OPTIONS without a body, the connection closed or
/// reset before a whole answer (the origin closed it as the request went
/// out). The record's `upstream` is where it went last.
async fn send(
    cx: &Tunnel<'_>,
    conn: &mut Conn,
    mut out: Request<RequestBody>,
    txn: &mut Txn,
) -> Result<Response<Incoming>, Sent> {
    let timeout = cx.t.snapshot.limits.response_timeout;
    conn.note_auth(out.headers());
    let mut retried = false;
    loop {
        let again = conn.used && !retried && cx.t.key.is_some();
        conn.used = true;
        txn.rec().upstream = conn.addr.or(cx.t.upstream);
        match tokio::time::timeout(timeout, conn.sender.ready()).await {
            Err(_) => return Err(Sent::Timeout),
            Ok(Err(_)) if again => {
                retried = true;
                *conn = fresh(cx, out.headers()).await?;
                continue;
            }
            Ok(Err(_)) => return Err(Sent::Failed(false)),
            Ok(Ok(())) => {}
        }
        // Only a connection that idled can be closed under a request by an
        // origin's idle time-out (none is as short as this): the copy is
        // not made for back-to-back requests.
        let replay = (again && conn.idled(IDLE_RISK))
            .then(|| Replay::of(&out))
            .flatten();
        match tokio::time::timeout(timeout, conn.sender.try_send_request(out)).await {
            Err(_) => return Err(Sent::Timeout),
            Ok(Ok(resp)) => {
                conn.answered = Some(std::time::Instant::now());
                return Ok(resp);
            }
            Ok(Err(mut e)) => match (e.take_message(), replay) {
                (Some(req), _) if again => {
                    retried = true;
                    out = req;
                    *conn = fresh(cx, out.headers()).await?;
                }
                (None, Some(replay)) if closed_under(e.error()) => {
                    tracing::debug!(error = %e.error(), "kept connection closed as a safe request went out");
                    retried = true;
                    out = replay.request();
                    *conn = fresh(cx, out.headers()).await?;
                }
                _ => {
                    let e = e.into_error();
                    tracing::debug!(error = %e, "inner request failed");
                    return Err(Sent::Failed(crate::tls::is_tls_error(&e)));
                }
            },
        }
    }
}

/// How long a connection idles before a safe request on it is copied to be
/// sent again should the origin close the connection under it.
const IDLE_RISK: std::time::Duration = std::time::Duration::from_millis(100);

/// A request safe to send again: its method, target and headers, when it
/// is a GET, HEAD or OPTIONS without a body.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(req: &Request<RequestBody>) -> Option<Replay> {
        use http::Method;
        use hyper::body::Body;
        let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        (safe && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn request(self) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::empty());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// The connection went away under a request: closed before a whole answer,
/// or reset (not a TLS failure, not a malformed answer).
fn closed_under(e: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    e.is_incomplete_message()
        || crate::proxy::body::io_error(e).is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
                    | ErrorKind::UnexpectedEof
            ) && !crate::tls::is_tls_error(e)
        })
}

/// A new connection in place of one the origin closed, marked as the
/// request it will carry requires.
async fn fresh(cx: &Tunnel<'_>, headers: &http::HeaderMap) -> Result<Conn, Sent> {
    tracing::debug!("kept upstream connection closed by the origin; dialling again");
    let mut conn = super::redial(cx.t).await.map_err(Sent::Refused)?;
    conn.note_auth(headers);
    Ok(conn)
}

/// Admit an inner request through the plain pipeline's steps, in its
/// order: head size, the client's request rate, then (for the target step)
/// the tunnel's host, then the decision for the method.
fn admit(cx: &Tunnel<'_>, txn: &mut Txn, req: &Request<Incoming>) -> Result<(), Refusal> {
    let t = cx.t;
    check_head(req, &t.snapshot)?;
    client_rates(&t.snapshot.guards, t.client.ip(), false)?;
    check_host(&t.target, req)?;
    decide(&t.snapshot, &t.groups, txn, &t.target, req).map(drop)
}

/// The inner request names the tunnel's host and nothing else: exactly one
/// `Host`, equal to the CONNECT host and port once normalised, and, in
/// absolute form, an `https://` URL with the same authority. Anything else
/// would let a client reach another name with our certificate attached
/// (domain fronting).
///
/// # Errors
/// 403 `host_mismatch`; 400 `bad_request` for a target that is neither
/// origin-form nor an `https://` URL.
fn check_host(t: &Target, req: &Request<Incoming>) -> Result<(), Refusal> {
    let uri = req.uri();
    match (uri.scheme_str(), uri.authority()) {
        (Some(s), Some(a)) if s.eq_ignore_ascii_case("https") => {
            if !names(t, a.as_str()) {
                return Err(Refusal::new(Reason::HostMismatch));
            }
        }
        (None, None) => {}
        _ => return Err(Refusal::new(Reason::BadRequest)),
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) if h.to_str().is_ok_and(|h| names(t, h)) => Ok(()),
        _ => Err(Refusal::new(Reason::HostMismatch)),
    }
}

/// `raw` (a `Host` value or URL authority) names `t`; 443 when no port.
fn names(t: &Target, raw: &str) -> bool {
    target::parse_host_header(raw, 443).is_ok_and(|x| x == *t)
}

/// `upstream_tls` when the request's error or the upstream connection's
/// own error is a TLS one, else `upstream_reset`.
async fn upstream_failure(tls: bool, failed: &mut Failed) -> Reason {
    let from_conn = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        failed.wait_for(Option::is_some),
    )
    .await
    .ok()
    .and_then(|r| r.ok().and_then(|v| *v));
    if tls || from_conn == Some(true) {
        Reason::UpstreamTls
    } else {
        Reason::UpstreamReset
    }
}

/// The terminated client stream as the inner server reads it: counts the
/// plaintext read into [`ConnIo`], as [`crate::proxy::ClientIo`] does for
/// the proxy's own listener.
struct Plain<S> {
    inner: S,
    io: Arc<ConnIo>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Plain<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.io.add_read(n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Plain<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
