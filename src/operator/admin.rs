//! The admin listener, apart from the proxy port: `/healthz`, `/readyz`,
//! `/metrics`, the status page at `/`, and the JSON API under `/api/`
//! (`summary`, `denials`, `explain?target=`, and `suggest`, catalog TOML).
//!
//! Read-only: nothing here changes the proxy's behaviour. When
//! `server.admin_token` is set, every path but the probes (`/healthz`,
//! `/readyz`) needs `Authorization: Bearer <token>` or a sign-in session
//! cookie (see [`super::session`]): `/` then answers a browser without
//! either with a sign-in form that posts the token to `/signin`, and
//! `/signout` ends the session. Every path but the probes (`/healthz`,
//! `/readyz`) needs exactly one `Host` header, and without a token that
//! header must be an IP literal or `localhost` (a DNS-rebinding guard:
//! another site's page cannot read the metrics or the API through a name
//! that resolves to the admin address). Connections are capped and timed
//! out (`server.admin_max_connections`, `server.admin_idle_timeout`): the
//! listener must not be a way to exhaust the process's sockets.
use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use http_body_util::BodyExt as _;

use super::session::{self, Sessions};
use super::suggest::Evidence;
use crate::proxy::Shared;

/// OpenMetrics text content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve the admin endpoints until the hard shutdown (readiness turns 503
/// as soon as the drain begins, so load balancers stop sending).
///
/// At most `server.admin_max_connections` connections at once: past it a
/// connection gets a 503 and a close, so idle or slow clients cannot pile
/// up tasks and sockets. Each one may take `server.admin_idle_timeout` to
/// send a request head, and stay idle that long between requests.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let hard = shared.drain.hard.clone();
    let open = Arc::new(AtomicUsize::new(0));
    let sessions = Arc::new(Sessions::new());
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = hard.cancelled() => break,
        };
        let settings = shared.settings.load();
        let Some(slot) = Slot::take(&open, settings.server.admin_max_connections) else {
            refuse_busy(&stream);
            continue;
        };
        let idle = settings.server.admin_idle_timeout;
        let shared = Arc::clone(&shared);
        let sessions = Arc::clone(&sessions);
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                let sessions = Arc::clone(&sessions);
                async move { Ok::<_, Infallible>(route(&shared, &sessions, req).await) }
            });
            // hyper's head time-out runs from the connection's start and
            // again from the end of each response: it is the idle limit too.
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(idle)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// One of the admin listener's connection slots, given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>, cap: usize) -> Option<Slot> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .ok()
        .map(|_| Slot(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answer a connection over the cap with a 503 and close it, without a
/// task: a fresh socket's send buffer takes the few bytes at once, and
/// whatever does not fit is dropped with the connection.
fn refuse_busy(stream: &tokio::net::TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\
        Content-Type: text/plain; charset=utf-8\r\nContent-Length: 27\r\n\r\n\
        too many admin connections\n";
    let _ = stream.try_write(BUSY);
}

/// The admin listener is plain HTTP: the session cookie cannot be `Secure`.
const LISTENER_IS_TLS: bool = false;
/// The largest sign-in form body read.
const MAX_FORM: usize = 4096;

async fn route(
    shared: &Shared,
    sessions: &Sessions,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() == Method::POST && (path == "/signin" || path == "/signout") {
        if let Err(refusal) = host_guard(shared, &req) {
            return refusal.response();
        }
        return if path == "/signin" {
            sign_in(shared, sessions, req).await
        } else {
            sign_out(sessions, &req)
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    // The probes answer a load balancer or an orchestrator, which reads
    // nothing but the status: no token, no Host guard (DESIGN.md).
    if path == "/healthz" {
        return text(StatusCode::OK, "ok\n");
    }
    if path == "/readyz" {
        return readiness(shared);
    }
    if !authorized(shared, sessions, &req) {
        if path == "/" && host_guard(shared, &req).is_ok() {
            return sign_in_page(StatusCode::UNAUTHORIZED, "");
        }
        let mut r = text(StatusCode::UNAUTHORIZED, "admin token required\n");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    if let Err(refusal) = host_guard(shared, &req) {
        return refusal.response();
    }
    match path {
        "/metrics" => {
            let body = shared.metrics.encode(&shared.audit);
            respond(StatusCode::OK, OPENMETRICS, body)
        }
        "/" | "/api/summary" | "/api/denials" | "/api/explain" | "/api/suggest" => {
            status_route(shared, &req)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz`: 503 while draining, or while audit writes have been failing
/// for over a second (drain this replica before its audit queue fills and
/// transactions start to wait; see `audit::UNHEALTHY_AFTER`).
fn readiness(shared: &Shared) -> Response<Full<Bytes>> {
    if shared.drain.leaving.is_cancelled() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !shared.audit.healthy() {
        text(StatusCode::SERVICE_UNAVAILABLE, "audit writes failing\n")
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

/// The DNS-rebinding guard, on every path but the probes.
///
/// Exactly one `Host` header (RFC 9112 section 3.2: a server must answer
/// 400 to more than one; two could be read differently here and by a
/// front end). Without an admin token it must name an IP literal or
/// `localhost` (403 otherwise): another site's page reaching the admin
/// port through a name that resolves to it then cannot read anything.
fn host_guard(shared: &Shared, req: &Request<Incoming>) -> Result<(), HostRefusal> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err(HostRefusal::NotOne);
    };
    if shared.settings.load().server.admin_token.is_some() {
        return Ok(());
    }
    // An absolute-form target's authority overrides Host (RFC 9112
    // section 3.2.2), so it must pass too.
    let authority = req.uri().authority().map(http::uri::Authority::as_str);
    if host.to_str().is_ok_and(local_host) && authority.is_none_or(local_host) {
        Ok(())
    } else {
        Err(HostRefusal::NotLocal)
    }
}

/// Why [`host_guard`] refused a request.
#[derive(Debug, thiserror::Error)]
enum HostRefusal {
    #[error("send exactly one Host header")]
    NotOne,
    #[error("use an IP address or localhost in the URL (or set server.admin_token)")]
    NotLocal,
}

impl HostRefusal {
    fn response(&self) -> Response<Full<Bytes>> {
        let status = match self {
            HostRefusal::NotOne => StatusCode::BAD_REQUEST,
            HostRefusal::NotLocal => StatusCode::FORBIDDEN,
        };
        respond(status, TEXT, format!("{self}\n"))
    }
}

/// The status page and its JSON API.
fn status_route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let settings = shared.settings.load();
    let status = &shared.metrics.status;
    match req.uri().path() {
        "/" => {
            // With a token, a "Sign out" button (it ends a browser session).
            let body = if settings.server.admin_token.is_some() {
                PAGE.replace("<!--signout-->", SIGN_OUT)
            } else {
                PAGE.to_string()
            };
            let mut r = respond(StatusCode::OK, "text/html; charset=utf-8", body);
            page_headers(&mut r);
            r
        }
        "/api/summary" => json(StatusCode::OK, &status.summary_json(&settings)),
        "/api/denials" => json(StatusCode::OK, &status.denials_json()),
        "/api/suggest" => {
            let mut ev = Evidence::from_status(status);
            ev.drop_permitted(&settings.policy);
            let body = ev.to_toml("the denials the status page remembers");
            let mut r = respond(StatusCode::OK, TEXT, body);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        _ => {
            let param = |name: &str| {
                req.uri().query().and_then(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.into_owned())
                })
            };
            let target = param("target");
            let client = param("client").filter(|c| !c.trim().is_empty());
            let Some(target) = target.filter(|t| !t.trim().is_empty()) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "give a target: /api/explain?target=http://host/path, https://host/path or host:port"}),
                );
            };
            match super::cli::explain_routed(&settings, &target, client.as_deref()) {
                Ok(ex) => json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "target": ex.input,
                        "method": ex.method.as_str(),
                        "normalised": ex.target.to_string(),
                        "decision": ex.verdict.as_str(),
                        "rule": ex.rule,
                        "reason": ex.reason,
                        "why": ex.why,
                        "route": ex.route,
                        "note": ex.note,
                        "client": ex.client.as_ref().map(|(ip, _)| ip.to_string()),
                        "client_group": ex.client.as_ref().and_then(|(_, g)| g.clone()),
                        "losers": ex.losers.iter().map(|(rule, why)| serde_json::json!({"rule": rule, "why": why})).collect::<Vec<_>>(),
                    }),
                ),
                Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
            }
        }
    }
}

/// True when `host` is exactly an IPv4 literal, a bracketed IPv6 literal
/// or `localhost`, with an optional numeric port, and nothing else
/// (`[::1].evil.example` and `127.0.0.1.evil.example` are names).
fn local_host(host: &str) -> bool {
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) if v6.parse::<Ipv6Addr>().is_ok() => {
                return after.is_empty() || after.strip_prefix(':').is_some_and(numeric_port);
            }
            _ => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    port.is_none_or(numeric_port)
        && (name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok())
}

/// One to five digits that make a port number.
fn numeric_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = respond(status, "application/json", body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The bearer token, or a live session cookie, when a token is set.
fn authorized(shared: &Shared, sessions: &Sessions, req: &Request<Incoming>) -> bool {
    let settings = shared.settings.load();
    let Some(token) = settings.server.admin_token.as_deref() else {
        return true;
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match bearer {
        Some(given) => constant_time_eq(given.as_bytes(), token.as_bytes()),
        None => session::cookie_value(req.headers()).is_some_and(|c| sessions.valid(c, token)),
    }
}

/// `POST /signin` (`token=…`, form-encoded): the right token starts a
/// session and sends the browser to `/`; a wrong one gets the form again.
async fn sign_in(
    shared: &Shared,
    sessions: &Sessions,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let settings = shared.settings.load();
    let Some(token) = settings.server.admin_token.clone() else {
        return see_other("/", None);
    };
    let body = match http_body_util::Limited::new(req.into_body(), MAX_FORM)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "sign-in form too large\n"),
    };
    let given = url::form_urlencoded::parse(&body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        return sign_in_page(StatusCode::UNAUTHORIZED, "That is not the admin token.");
    }
    match sessions.start(&token) {
        Some(value) => see_other("/", Some(session::set_cookie(&value, LISTENER_IS_TLS))),
        None => text(StatusCode::SERVICE_UNAVAILABLE, "no random source\n"),
    }
}

/// `POST /signout`: end the session and clear the cookie.
fn sign_out(sessions: &Sessions, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(c) = session::cookie_value(req.headers()) {
        sessions.end(c);
    }
    see_other("/", Some(session::clear_cookie(LISTENER_IS_TLS)))
}

fn see_other(to: &'static str, cookie: Option<String>) -> Response<Full<Bytes>> {
    let mut r = respond(StatusCode::SEE_OTHER, TEXT, Bytes::new());
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(to));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        r.headers_mut().insert(header::SET_COOKIE, c);
    }
    r
}

/// The sign-in form (`note`: a line above it, e.g. after a wrong token).
fn sign_in_page(status: StatusCode, note: &str) -> Response<Full<Bytes>> {
    let note = if note.is_empty() {
        String::new()
    } else {
        format!("<p id=\"note\" role=\"alert\">{note}</p>")
    };
    let mut r = respond(
        status,
        "text/html; charset=utf-8",
        SIGN_IN.replace("<!--note-->", &note),
    );
    page_headers(&mut r);
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Headers for the HTML pages: a strict CSP (forms post only here), no
/// sniffing, no referrer, no caching.
fn page_headers(r: &mut Response<Full<Bytes>>) {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The sign-in form served on `/` to a browser without a session.
const SIGN_IN: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>egress-proxy: sign in</title>
<style>
body { font: 16px/1.4 system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1b1f24; }
main { max-width: 22rem; margin: 4rem auto; padding: 1.2rem; background: #fff; border: 1px solid #d5d9de; border-radius: 6px; }
h1 { font-size: 1.2rem; margin: 0 0 .8rem; }
label { display: block; margin-bottom: .3rem; }
input { box-sizing: border-box; width: 100%; font: inherit; padding: .4rem; margin-bottom: .8rem; }
button { font: inherit; padding: .4rem 1rem; }
#note { color: #a4161a; }
</style>
</head>
<body>
<main>
<h1>egress-proxy status</h1>
<!--note-->
<form method="post" action="/signin">
<label for="token">Admin token (<code>server.admin_token</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Sign in</button>
</form>
</main>
</body>
</html>
"#;

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    respond(status, TEXT, body)
}

const TEXT: &str = "text/plain; charset=utf-8";

/// A response with `status`, `content_type` and `body`.
fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The status page: one self-contained document (inline CSS and script, no
/// external assets) that polls `/api/summary`, `/api/denials` and
/// `/api/suggest` every 2 s and runs `/api/explain` from a form.
pub const PAGE: &str = include_str!("status.html");

/// The sign-out button put into the page header when a token is set.
const SIGN_OUT: &str = r#"<form id="signout" method="post" action="/signout"><button type="submit">Sign out</button></form>"#;
