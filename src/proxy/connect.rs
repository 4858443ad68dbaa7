//! CONNECT: decide (done by the caller), resolve, vet and dial first; answer
//! `200` only once the upstream connection is up; then take the client's
//! socket back from hyper and hand both sockets to [`super::tunnel`].
//!
//! This is the one place where a tunnel becomes "splice" (with the SNI
//! check of [`super::peek`]) or, once inspection exists, "inspect".
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::tunnel::{self, Check};
use super::txn::Txn;
use super::Guards;
use super::{dial_target, refuse, ConnCtx};
use crate::audit::Decided;
use crate::config::Settings;
use crate::policy::{Action, SniMode};
use crate::reason::Reason;
use crate::target::Target;
use crate::tls::Inspected;

/// Open a tunnel for an allowed CONNECT.
pub async fn tunnel(
    ctx: &Arc<ConnCtx>,
    settings: &Arc<Settings>,
    guards: &Arc<Guards>,
    mut txn: Txn,
    mut req: Request<Incoming>,
    target: Target,
    index: Option<usize>,
) -> Response<ProxyBody> {
    let rule = index.and_then(|i| settings.policy.rule(i));
    let addrs = match dial_target(ctx, settings, &target, rule).await {
        Ok(a) => a,
        Err(r) => return refuse(txn, r, settings),
    };
    let (upstream, addr) = match super::dial(ctx, &addrs, settings).await {
        Ok(c) => c,
        Err(r) => return refuse(txn, r, settings),
    };
    txn.rec().upstream = Some(addr);
    let inspect = match (&guards.inspector, rule) {
        (Some(i), Some(r)) if r.action == Action::Allow => Some(Arc::clone(i)),
        _ => None,
    };
    if let Some(inspector) = inspect {
        txn.set_decision(Decided::Inspect);
        let t = Inspected {
            shared: Arc::clone(&ctx.shared),
            settings: Arc::clone(settings),
            policy: Arc::clone(&settings.policy),
            inspector,
            client: ctx.client,
            target,
            rule: index,
            user: txn.rec().user.clone(),
            guards: Arc::clone(guards),
        };
        return inspect_tunnel(ctx, txn, req, t, upstream);
    }
    let check = match rule {
        Some(r) if r.sni != SniMode::Off => Some(Check {
            mode: r.sni,
            ech: r.ech,
            host: target.host.clone(),
            hello_timeout: settings.limits.header_read_timeout,
        }),
        // A `report` pass (no rule) is still checked: the SNI must match.
        None => Some(Check {
            mode: SniMode::MatchIfTls,
            ech: crate::policy::EchMode::Allow,
            host: target.host.clone(),
            hello_timeout: settings.limits.header_read_timeout,
        }),
        Some(_) => None,
    };
    let idle = settings.limits.tunnel_idle_timeout;
    let hard = ctx.shared.drain.hard.clone();
    let splicer = ctx.shared.splicer.clone();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let open_tunnels = ctx.shared.metrics.open_tunnels.clone();
    // The tunnel keeps the connection's context, and with it the connection
    // permits: an open tunnel counts against the caps.
    let held = Arc::clone(ctx);
    // Boxed, like the connection: the tunnel task is moved into the runtime
    // as a pointer, not as its whole state.
    ctx.shared.drain.tracker.spawn(Box::pin(async move {
        let _held = held;
        let _open = crate::metrics::GaugeGuard::new(&open_tunnels);
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<super::ClientIo>>() {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            }
        };
        let Some(client) = parts.io.into_inner().into_stream() else {
            txn.finish(Some(200), Some(Reason::ClientClosed));
            return;
        };
        // Copy what hyper read past the head (usually nothing): its buffer
        // must not stay alive for the life of an idle tunnel.
        let early = if parts.read_buf.is_empty() {
            bytes::Bytes::new()
        } else {
            bytes::Bytes::copy_from_slice(&parts.read_buf)
        };
        drop(parts.read_buf);
        let stats = tunnel::run(client, early, upstream, check, idle, hard, &splicer).await;
        let rec = txn.rec();
        rec.bytes_up = stats.up;
        rec.bytes_down = stats.down;
        rec.sni = stats.sni;
        rec.ech = stats.ech;
        if stats.denied {
            txn.set_decision(crate::audit::Decided::Deny);
        }
        txn.finish(Some(200), stats.reason);
    }));
    ok()
}

fn ok() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// Answer 200, then terminate TLS with our CA and relay request by request.
fn inspect_tunnel(
    ctx: &Arc<ConnCtx>,
    mut txn: Txn,
    mut req: Request<Incoming>,
    t: Inspected,
    upstream: TcpStream,
) -> Response<ProxyBody> {
    let on_upgrade = hyper::upgrade::on(&mut req);
    let open_tunnels = ctx.shared.metrics.open_tunnels.clone();
    let held = Arc::clone(ctx);
    ctx.shared.drain.tracker.spawn(async move {
        let _held = held;
        let _open = crate::metrics::GaugeGuard::new(&open_tunnels);
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(_) => {
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            }
        };
        let stats = crate::tls::intercept(t, TokioIo::new(upgraded), upstream).await;
        let rec = txn.rec();
        rec.bytes_up = stats.up;
        rec.bytes_down = stats.down;
        rec.sni = stats.sni;
        if stats.denied {
            txn.set_decision(Decided::Deny);
        }
        txn.finish(Some(200), stats.reason);
    });
    ok()
}
