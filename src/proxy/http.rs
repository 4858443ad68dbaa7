//! Plain HTTP forwarding of absolute-form requests: switch to origin-form,
//! set `Host` from the URI, strip hop-by-hop headers both ways, and stream
//! bodies through a kept-alive upstream connection to the vetted address.
use std::net::SocketAddr;
use std::sync::Arc;

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::uri::{PathAndQuery, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::body::{ProxyBody, RequestBody, ResponseBody, UpCount};
use super::error::Refusal;
use super::pipeline::Exchange;
use super::txn::Txn;
use super::{dial_target, parent, refuse, ConnCtx, Snapshot};
use crate::config::{Parent, Settings};
use crate::reason::Reason;
use crate::target::{Host, Target};
use crate::tls::client::ParentTls;

/// A kept-alive upstream connection.
pub struct Pooled {
    /// Where requests on it go: the vetted address (direct, or tunnelled
    /// through the parent), or the parent itself.
    addr: SocketAddr,
    /// The record's `upstream`: the address dialled (the parent's, for
    /// either way through it).
    upstream: SocketAddr,
    via: Via,
    /// The parent's host and port, and for an `https://` parent the TLS
    /// configuration it was made with (a reload may change the parent, its
    /// scheme or the roots it is verified with).
    parent: Option<(Box<str>, u16, Option<Arc<ParentTls>>)>,
    sender: client::SendRequest<RequestBody>,
}

/// How a plain request reaches its origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// To the vetted address.
    Direct,
    /// To the parent, in absolute form with the name (the parent resolves).
    Proxy,
    /// In origin form inside a `CONNECT` to the vetted address through the
    /// parent (`parent_resolve = "local"`, or an IP-literal target): the
    /// parent connects where we vetted, and `Host` stays the name (a
    /// request line with the address would make the parent rewrite it).
    Tunnel,
}

/// Where one request goes: the vetted addresses (none when the parent
/// resolves), how, and through which parent.
#[derive(Clone, Copy)]
struct Hop<'a> {
    addrs: &'a [SocketAddr],
    via: Via,
    parent: Option<&'a Parent>,
}

/// Forward one request and stream the response back.
pub async fn forward(ctx: &ConnCtx, x: Exchange, req: Request<Incoming>) -> Response<ProxyBody> {
    let Exchange {
        snapshot,
        mut txn,
        target,
        decision,
    } = x;
    let settings: &Settings = &snapshot;
    let rule = decision.rule.and_then(|i| settings.policy.rule(i));
    let parent = parent::parent_for(ctx, settings, rule);
    let via = match parent {
        None => Via::Direct,
        Some(p) if parent::vets_here(p, &target) => Via::Tunnel,
        Some(_) => Via::Proxy,
    };
    let addrs = match via {
        Via::Proxy => Vec::new(),
        _ => match dial_target(&ctx.shared, &snapshot, &target, rule).await {
            Ok(a) => a,
            Err(r) => return refuse(txn, r, settings),
        },
    };
    let hop = Hop {
        addrs: &addrs,
        via,
        parent,
    };
    let (out, up) = upstream_request(ctx, req, &mut txn, &target, hop, settings);
    let resp = match send(ctx, hop, &snapshot, &mut txn, out, up.as_deref()).await {
        Ok(resp) => resp,
        Err(r) => return refuse(txn, r, settings),
    };
    respond(txn, via, resp, settings)
}

/// The request as it goes upstream (origin form, or absolute form with the
/// parent's credentials for a proxying parent), and its upload count.
fn upstream_request(
    ctx: &ConnCtx,
    req: Request<Incoming>,
    txn: &mut Txn,
    target: &Target,
    hop: Hop<'_>,
    settings: &Settings,
) -> (Request<RequestBody>, Option<Arc<UpCount>>) {
    let (parts, body) = req.into_parts();
    let body = RequestBody::counted(body, txn).marking(Arc::clone(&ctx.io));
    let up = body.count();
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.headers_mut() = parts.headers;
    prepare_request_headers(out.headers_mut(), target, settings.server.via);
    *out.uri_mut() = match (hop.via, hop.parent) {
        (Via::Proxy, Some(p)) => {
            if let Some(auth) = &p.authorization {
                out.headers_mut()
                    .insert(header::PROXY_AUTHORIZATION, auth.clone());
            }
            absolute_form(target, &parts.uri)
        }
        _ => origin_form(&parts.uri),
    };
    (out, up)
}

/// Send on the kept-alive connection when it fits (once more on a fresh
/// one when a stale connection never sent it), else on a new connection.
async fn send(
    ctx: &ConnCtx,
    hop: Hop<'_>,
    snapshot: &Snapshot,
    txn: &mut Txn,
    mut out: Request<RequestBody>,
    up: Option<&UpCount>,
) -> Result<Response<Incoming>, Refusal> {
    let parent_tls = snapshot.guards.parent_tls.as_ref();
    let mut reused = take_pooled(ctx, hop.addrs, hop.via, hop.parent, parent_tls);
    loop {
        let mut pooled = match reused.take() {
            Some(p) => p,
            None => connect(ctx, hop.addrs, hop.parent, hop.via, snapshot, txn).await?,
        };
        txn.rec().upstream = Some(pooled.upstream);
        let was_reused = pooled.sender.is_ready();
        let sent = tokio::time::timeout(snapshot.limits.response_timeout, async {
            if pooled.sender.ready().await.is_err() {
                return Err(None);
            }
            pooled.sender.try_send_request(out).await.map_err(Some)
        })
        .await;
        match sent {
            Ok(Ok(resp)) => {
                put_pooled(ctx, pooled);
                return Ok(resp);
            }
            Ok(Err(Some(mut e))) => match e.take_message() {
                // Never sent: a stale kept-alive connection. Try a fresh one.
                Some(req) if was_reused => {
                    out = req;
                    continue;
                }
                _ => {
                    tracing::debug!(error = %e.error(), "upstream request failed");
                    return Err(Refusal::new(send_failure(up)));
                }
            },
            Ok(Err(None)) => return Err(Refusal::new(Reason::UpstreamReset)),
            Err(_) => return Err(Refusal::new(Reason::Timeout)),
        }
    }
}

/// The response for the client: the parent's status recorded, a parent's
/// own refusal refused, hop-by-hop headers stripped, the body streamed.
fn respond(
    mut txn: Txn,
    via: Via,
    resp: Response<Incoming>,
    settings: &Settings,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    match via {
        Via::Proxy => txn.rec().parent_status = Some(parts.status.as_u16()),
        // The parent's answer to the CONNECT the connection was opened with.
        Via::Tunnel => {
            txn.rec().parent_status.get_or_insert(200);
        }
        Via::Direct => {}
    }
    if via == Via::Proxy && parent_refused(&parts) {
        return refuse(txn, Refusal::new(Reason::ParentRefused), settings);
    }
    strip_hop_by_hop(&mut parts.headers);
    if settings.server.via {
        add_via(&mut parts.headers);
    }
    let status = parts.status.as_u16();
    // The transaction counts the upload already (`RequestBody::counted`).
    let body = ResponseBody::new(body, txn, status);
    Response::from_parts(parts, ProxyBody::Streamed(Box::new(body)))
}

/// The parent's own refusal of a plain request, as against the origin's
/// answer relayed by it: a 407 (the parent wants credentials), or a
/// non-2xx that carries Squid's `X-Squid-Error` (its error pages do).
fn parent_refused(parts: &::http::response::Parts) -> bool {
    parts.status == ::http::StatusCode::PROXY_AUTHENTICATION_REQUIRED
        || (!parts.status.is_success() && parts.headers.contains_key("x-squid-error"))
}

/// Why sending failed: the client's body was malformed (400) or cut by
/// the client, else the upstream went away.
fn send_failure(up: Option<&UpCount>) -> Reason {
    up.and_then(UpCount::client_fault)
        .unwrap_or(Reason::UpstreamReset)
}

/// The kept-alive connection, when it goes where this request goes: to
/// one of its vetted addresses, or to the parent (any target).
fn take_pooled(
    ctx: &ConnCtx,
    addrs: &[SocketAddr],
    via: Via,
    parent: Option<&Parent>,
    parent_tls: Option<&Arc<ParentTls>>,
) -> Option<Pooled> {
    let same_parent = |pooled: &Pooled| match (&pooled.parent, parent) {
        (None, None) => true,
        (Some((host, port, tls)), Some(p)) => {
            **host == *p.host && *port == p.port && same_tls(tls.as_ref(), parent_tls, p.tls)
        }
        _ => false,
    };
    let mut slot = ctx.upstream.lock().ok()?;
    match slot.take() {
        Some(p)
            if p.via == via
                && same_parent(&p)
                && (via == Via::Proxy || addrs.contains(&p.addr))
                && !p.sender.is_closed() =>
        {
            Some(p)
        }
        _ => None,
    }
}

/// A kept-alive connection to the parent made with `pooled` TLS serves a
/// parent that wants `tls` with `current`: plain for plain, and for TLS
/// the very configuration of this snapshot (a reload from `http://` to
/// `https://`, or of the roots, must not reuse the old connection).
fn same_tls(pooled: Option<&Arc<ParentTls>>, current: Option<&Arc<ParentTls>>, tls: bool) -> bool {
    match (pooled, tls.then_some(current).flatten()) {
        (None, None) => !tls,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

fn put_pooled(ctx: &ConnCtx, p: Pooled) {
    if let Ok(mut slot) = ctx.upstream.lock() {
        *slot = Some(p);
    }
}

async fn connect(
    ctx: &ConnCtx,
    addrs: &[SocketAddr],
    parent: Option<&Parent>,
    via: Via,
    snapshot: &Snapshot,
    txn: &mut Txn,
) -> Result<Pooled, Refusal> {
    let (sender, addr, upstream) = match (via, parent) {
        (Via::Proxy, Some(p)) => {
            let (s, a) = parent::connect(ctx, p, snapshot).await?;
            (handshake(ctx, s).await?, a, a)
        }
        (Via::Tunnel, Some(p)) => {
            // Vetted here (the caller resolved): the first address.
            let vetted = *addrs
                .first()
                .ok_or(Refusal::new(Reason::UpstreamConnectFailed))?;
            let (s, a) = parent::tunnel(ctx, p, snapshot, &vetted.to_string(), txn).await?;
            (handshake(ctx, s).await?, vetted, a)
        }
        _ => {
            let (s, a) = super::dial(&ctx.shared, addrs, snapshot).await?;
            (handshake(ctx, s).await?, a, a)
        }
    };
    Ok(Pooled {
        addr,
        upstream,
        via,
        parent: parent.map(|p| {
            let tls = snapshot.guards.parent_tls.as_ref().filter(|_| p.tls);
            (p.host.as_str().into(), p.port, tls.cloned())
        }),
        sender,
    })
}

/// An HTTP/1.1 client connection on `io`, driven by a task until it ends
/// or the proxy stops hard.
async fn handshake<I>(ctx: &ConnCtx, io: I) -> Result<client::SendRequest<RequestBody>, Refusal>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = client::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|_| Refusal::new(Reason::UpstreamConnectFailed))?;
    let hard = ctx.shared.drain.hard.clone();
    ctx.shared.drain.tracker.spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r { tracing::debug!(error = %e, "upstream connection ended") },
            () = hard.cancelled() => {}
        }
    });
    Ok(sender)
}

/// The origin-form target sent upstream: the path, `/` when the absolute
/// URI has none (`http://h:p`, `http://h:p?q`, `http://h:p#f`), and the
/// query. A fragment is never sent (`http::Uri` drops it when parsing).
fn origin_form(uri: &Uri) -> Uri {
    let pq = match uri.query() {
        // `path()` is `/` for an empty path.
        Some(q) => PathAndQuery::try_from(format!("{}?{q}", uri.path())),
        None => PathAndQuery::try_from(uri.path()),
    };
    // Both parts come from a parsed URI, so they parse again; `/` if not.
    Uri::from(pq.unwrap_or_else(|_| PathAndQuery::from_static("/")))
}

/// The absolute-form target sent to a parent proxy: `http://`, the
/// `Host` sent, and the origin-form target.
fn absolute_form(target: &Target, uri: &Uri) -> Uri {
    let text = format!("http://{}{}", host_header(target), origin_form(uri));
    text.parse().unwrap_or_else(|_| origin_form(uri))
}

/// The record's `url`: exactly what is forwarded, as a URL: the scheme,
/// the `Host` sent upstream (the normalised target, the port unless 80),
/// and the origin-form target.
pub fn forwarded_url(target: &Target, uri: &Uri) -> String {
    format!("http://{}{}", host_header(target), origin_form(uri))
}

/// Headers that belong to one hop and never cross the proxy.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Remove hop-by-hop headers, the ones `Connection` names, and
/// `Transfer-Encoding` (hyper frames each hop itself).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| *n != header::HOST && *n != header::CONTENT_LENGTH)
            .collect();
        for n in named {
            headers.remove(n);
        }
    }
    for n in &HOP_BY_HOP {
        headers.remove(n);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

fn prepare_request_headers(headers: &mut HeaderMap, target: &Target, via: bool) {
    strip_hop_by_hop(headers);
    if let Ok(v) = HeaderValue::from_str(&host_header(target)) {
        headers.insert(header::HOST, v);
    }
    if via {
        add_via(headers);
    }
}

/// The `Host` sent upstream: the normalised target, the port unless 80.
fn host_header(target: &Target) -> String {
    match (&target.host, target.port) {
        (Host::Name(n), 80) => n.to_string(),
        (Host::Name(n), p) => {
            let mut h = String::with_capacity(n.len() + 6);
            h.push_str(n);
            h.push(':');
            h.push_str(itoa::Buffer::new().format(p));
            h
        }
        (Host::Ip(std::net::IpAddr::V6(ip)), 80) => format!("[{ip}]"),
        (Host::Ip(std::net::IpAddr::V6(ip)), p) => format!("[{ip}]:{p}"),
        (Host::Ip(ip), 80) => ip.to_string(),
        (Host::Ip(ip), p) => format!("{ip}:{p}"),
    }
}

fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static("1.1 egress-proxy"));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
    use super::*;

    fn parent_tls() -> Arc<ParentTls> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        Arc::new(ParentTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name: rustls::pki_types::ServerName::try_from("parent.test").unwrap(),
        })
    }

    #[test]
    fn a_kept_alive_parent_connection_serves_only_the_same_scheme_and_roots() {
        let (a, b) = (parent_tls(), parent_tls());
        // Plain for plain.
        assert!(same_tls(None, None, false));
        // http:// -> https:// on the same host and port (a reload): never
        // the plain connection, whose credentials would go in clear.
        assert!(!same_tls(None, Some(&a), true));
        // https:// -> http://.
        assert!(!same_tls(Some(&a), None, false));
        assert!(!same_tls(Some(&a), Some(&a), false));
        // TLS made with this snapshot's configuration, and only that one
        // (a reload rebuilds it, e.g. with other roots).
        assert!(same_tls(Some(&a), Some(&a), true));
        assert!(!same_tls(Some(&a), Some(&b), true));
        assert!(!same_tls(None, None, true));
    }
}
