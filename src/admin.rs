//! The admin listener, apart from the proxy port: `/healthz`, `/readyz`,
//! `/metrics`, the status page at `/`, and the JSON API under `/api/`
//! (`summary`, `denials`, `explain?target=`, and `suggest`, catalog TOML).
//!
//! Read-only: nothing here changes the proxy's behaviour. When
//! `server.admin_token` is set, every path but `/healthz` needs
//! `Authorization: Bearer <token>`. Without a token, the status page and
//! the API answer only requests whose `Host` is an IP address or
//! `localhost` (a DNS-rebinding guard: another site's page cannot read them
//! through a name that resolves to the admin address).
use std::convert::Infallible;
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

use crate::proxy::Shared;

/// OpenMetrics text content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve the admin endpoints until the hard shutdown (readiness turns 503
/// as soon as the drain begins, so load balancers stop sending).
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let hard = shared.drain.hard.clone();
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
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(&shared, req)) }
            });
            let _ = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(shared: &Shared, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    if path == "/healthz" {
        return text(StatusCode::OK, "ok\n");
    }
    if !authorized(shared, &req) {
        let mut r = text(StatusCode::UNAUTHORIZED, "admin token required\n");
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    match path {
        "/readyz" => {
            if shared.drain.graceful.is_cancelled() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if !shared.audit.healthy() {
                // Drain this replica before its audit queue fills and
                // transactions start to wait (see `audit::UNHEALTHY_AFTER`).
                text(StatusCode::SERVICE_UNAVAILABLE, "audit writes failing\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
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

/// The status page and its JSON API.
fn status_route(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let settings = shared.settings.load();
    if settings.server.admin_token.is_none() && !local_host_header(req) {
        return text(
            StatusCode::FORBIDDEN,
            "use an IP address or localhost in the URL (or set server.admin_token)\n",
        );
    }
    let status = &shared.metrics.status;
    match req.uri().path() {
        "/" => {
            let mut r = respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::status::PAGE.as_bytes(),
            );
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
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
            r
        }
        "/api/summary" => json(StatusCode::OK, &status.summary_json(&settings)),
        "/api/denials" => json(StatusCode::OK, &status.denials_json()),
        "/api/suggest" => {
            let mut ev = status.evidence();
            ev.drop_permitted(&settings.policy);
            let body = ev.to_toml("the denials the status page remembers");
            let mut r = respond(StatusCode::OK, TEXT, body);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        _ => {
            let target = req.uri().query().and_then(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "target")
                    .map(|(_, v)| v.into_owned())
            });
            let Some(target) = target.filter(|t| !t.trim().is_empty()) else {
                return json(
                    StatusCode::BAD_REQUEST,
                    &serde_json::json!({"error": "give a target: /api/explain?target=http://host/path or host:port"}),
                );
            };
            match crate::cli::explain(&settings.policy, &target) {
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
                        "losers": ex.losers.iter().map(|(rule, why)| serde_json::json!({"rule": rule, "why": why})).collect::<Vec<_>>(),
                    }),
                ),
                Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({"error": e})),
            }
        }
    }
}

/// True when the `Host` header names an IP address or `localhost` (or is absent).
fn local_host_header(req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
    else {
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            return rest
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut r = respond(status, "application/json", body);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let settings = shared.settings.load();
    let Some(token) = settings.server.admin_token.as_deref() else {
        return true;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), token.as_bytes())
}

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
