//! CONNECT: decide (done by the pipeline), resolve, vet and dial first;
//! answer `200` only once the upstream connection is up; then take the
//! client's socket back from hyper and run the tunnel on its own task.
//!
//! This is the one place where a tunnel becomes "splice" (with the SNI
//! check of [`super::peek`]) or "inspect" (the policy's
//! `Decision::inspect`, [`super::inspect`]). Both end the same way: one
//! [`TunnelStats`] completes the tunnel's record.
use std::future::Future;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::DropGuard;
use tracing::Instrument;

use super::body::ProxyBody;
use super::inspect::{self, Inspected};
use super::parent;
use super::pipeline::Exchange;
use super::tunnel::{self, Check, TunnelStats};
use super::txn::Txn;
use super::{dial_target, ConnCtx};
use crate::audit::Decided;
use crate::policy::{EchMode, Route, Rule, SniMode};
use crate::reason::Reason;
use crate::target::Target;

/// Open a tunnel for an allowed CONNECT.
pub async fn tunnel(
    ctx: &Arc<ConnCtx>,
    mut x: Exchange,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let inspector = x.snapshot.guards.inspector.clone();
    if let Some(inspector) = inspector.filter(|_| x.decision.inspect) {
        return inspect_tunnel(ctx, x, req, inspector).await;
    }
    let (upstream, addr, bridge) = match open_upstream(ctx, &mut x).await {
        Ok(c) => c,
        Err(r) => return x.refuse(r),
    };
    x.txn.rec().upstream = Some(addr);
    let t = tunnel::Tunnel {
        upstream,
        check: sni_check(x.rule(), &x.target, &x.snapshot.limits),
        idle: x.snapshot.limits.tunnel_idle_timeout,
        idler: ctx.shared.idler.clone(),
        splicer: ctx.shared.splicer.clone(),
    };
    spawn(ctx, x.txn, &mut req, bridge, t, |t, upgraded, span| {
        let (client, early) = span.in_scope(|| take_socket(upgraded))?;
        Some(tunnel::run(client, early, t).instrument(relay_span(span)))
    })
}

/// An inspected tunnel: its upstream is a connection kept from an earlier
/// tunnel to the same target under the same rule when one is ready (no
/// dial: the `200` goes at once), else dialled as for a spliced tunnel.
/// Only direct tunnels keep connections (and may dial again inside the
/// tunnel); through a parent each tunnel has its own.
async fn inspect_tunnel(
    ctx: &Arc<ConnCtx>,
    mut x: Exchange,
    mut req: Request<Incoming>,
    inspector: Arc<crate::tls::Inspector>,
) -> Response<ProxyBody> {
    let rule = x.decision.rule.and_then(|i| x.snapshot.policy.rule(i));
    // Not counted here: `open_upstream` counts the route of a tunnel that
    // dials, a kept connection's is counted where it is taken.
    let direct = parent::route(&x.snapshot, rule) == Route::Direct;
    let key = direct.then(|| inspect::Key {
        rule: x.decision.rule,
        target: x.target.clone(),
    });
    let kept = key.as_ref().and_then(|k| x.snapshot.guards.kept.take(k));
    let (upstream, addr, bridge) = match kept {
        Some(conn) => {
            ctx.shared.metrics.route(false);
            ctx.shared.metrics.upstream_reused.inc();
            (inspect::Upstream::Kept(conn), None, None)
        }
        None => match open_upstream(ctx, &mut x).await {
            Ok((socket, addr, bridge)) => (inspect::Upstream::Dialled(socket), Some(addr), bridge),
            Err(r) => return x.refuse(r),
        },
    };
    let addr = addr.or_else(|| upstream.addr());
    x.txn.rec().upstream = addr;
    x.txn.set_decision(Decided::Inspect);
    let t = Inspected {
        shared: Arc::clone(&ctx.shared),
        snapshot: Arc::clone(&x.snapshot),
        inspector,
        client: ctx.client,
        target: x.target,
        rule: x.decision.rule,
        user: x.txn.rec().user.clone(),
        groups: super::groups::GroupCache::default(),
        upstream: addr,
        key,
    };
    spawn(
        ctx,
        x.txn,
        &mut req,
        bridge,
        (t, upstream),
        |(t, upstream), upgraded, span| {
            Some(inspect::intercept(t, TokioIo::new(upgraded), upstream).instrument(span))
        },
    )
}

/// The span a spliced tunnel keeps while it relays: the connection's when
/// debug lines are logged (the relay logs only at debug), else none. An open
/// span holds a slot and its formatted fields in the log's registry for the
/// tunnel's whole life, a sixth of an idle tunnel's memory; the lines before
/// the relay (the upgrade, taking the socket) are still logged in it.
fn relay_span(span: tracing::Span) -> tracing::Span {
    let debug = span.in_scope(|| {
        tracing::enabled!(target: "egress_proxy::proxy::tunnel", tracing::Level::DEBUG)
            || tracing::enabled!(target: "egress_proxy::proxy::tunnel::gate", tracing::Level::DEBUG)
    });
    if debug {
        span
    } else {
        tracing::Span::none()
    }
}

/// The upstream connection of a tunnel: the vetted address dialled
/// directly, or a `CONNECT` through the parent proxy (to the name, or with
/// `parent_resolve = "local"` and for IP literals to the vetted address);
/// through an `https://` parent, with the guard of its TLS bridge, held
/// while the tunnel runs.
async fn open_upstream(
    ctx: &ConnCtx,
    x: &mut Exchange,
) -> Result<(TcpStream, std::net::SocketAddr, Option<DropGuard>), super::error::Refusal> {
    let snapshot = Arc::clone(&x.snapshot);
    let rule = x.decision.rule.and_then(|i| snapshot.policy.rule(i));
    let Some(parent) = parent::parent_for(ctx, &snapshot, rule) else {
        let addrs = dial_target(&ctx.shared, &snapshot, &x.target, rule).await?;
        let (socket, addr) = super::dial(&ctx.shared, &addrs, &snapshot).await?;
        return Ok((socket, addr, None));
    };
    let vetted = if parent::vets_here(parent, &x.target) {
        dial_target(&ctx.shared, &snapshot, &x.target, rule)
            .await?
            .first()
            .copied()
    } else {
        None
    };
    let authority = parent::authority(&x.target, vetted);
    let (stream, addr) = parent::tunnel(ctx, parent, &snapshot, &authority, &mut x.txn).await?;
    let (socket, bridge) = stream.into_socket(ctx).map_err(|e| {
        // A socket pair for a TLS parent: only file descriptors run out.
        tracing::warn!(error = %e, "no socket pair for a tunnel through the parent");
        super::error::Refusal::new(Reason::ConnectionLimit)
    })?;
    Ok((socket, addr, bridge))
}

/// The SNI check of a spliced tunnel: the rule's, and for a `report` pass
/// (no rule) still a match of the SNI, when TLS.
fn sni_check(
    rule: Option<&Rule>,
    target: &Target,
    limits: &crate::config::Limits,
) -> Option<Check> {
    let (mode, ech) = match rule {
        Some(r) if r.sni == SniMode::Off => return None,
        Some(r) => (r.sni, r.ech),
        None => (SniMode::MatchIfTls, EchMode::Allow),
    };
    Some(Check {
        mode,
        ech,
        host: target.host.clone(),
        hello_timeout: limits.header_read_timeout,
    })
}

/// Answer 200, and on a task of its own wait for hyper's upgrade, make the
/// tunnel's future with `run` from `parts`, the upgraded connection and the
/// connection's span, and complete the record from its [`TunnelStats`]
/// (`run` gives `None`: the client's socket could not be had,
/// `client_closed`).
///
/// The task takes the connection's permits (an open tunnel counts against
/// the caps) and the bridge of a TLS parent, but not its context: an idle
/// tunnel holds only what it needs. Boxed, like the connection: the tunnel
/// task is moved into the runtime as a pointer, not as its whole state.
/// `parts` and the span wait for the upgrade in a box of their own, and
/// `run` (capturing nothing) makes the future without awaiting it: so the
/// task holds them once, inside the tunnel's future, rather than a second
/// copy beside it.
fn spawn<P, F, Fut>(
    ctx: &Arc<ConnCtx>,
    mut txn: Txn,
    req: &mut Request<Incoming>,
    bridge: Option<DropGuard>,
    parts: P,
    run: F,
) -> Response<ProxyBody>
where
    P: Send + 'static,
    F: FnOnce(P, Upgraded, tracing::Span) -> Option<Fut> + Send + 'static,
    Fut: Future<Output = TunnelStats> + Send + 'static,
{
    let on_upgrade = hyper::upgrade::on(req);
    let open_tunnels = ctx.shared.metrics.open_tunnels.clone();
    let held = ctx.take_held();
    let pending = Box::new((parts, tracing::Span::current()));
    ctx.shared.drain.tracker.spawn(Box::pin(async move {
        let open = crate::metrics::GaugeGuard::new(&open_tunnels);
        // Pinned where it is made: the tunnel's future is the task's
        // largest part, and a named local moved into an `.await` would
        // keep a second copy's room in the task.
        let mut tunnel = std::pin::pin!(match on_upgrade.await {
            Ok(upgraded) => {
                let (parts, span) = unbox(pending);
                run(parts, upgraded, span)
            }
            Err(e) => {
                let (_, span) = unbox(pending);
                span.in_scope(|| tracing::debug!(error = %e, "CONNECT upgrade failed"));
                None
            }
        });
        let Some(tunnel) = tunnel.as_mut().as_pin_mut() else {
            txn.finish(Some(200), Some(Reason::ClientClosed));
            return;
        };
        let stats = tunnel.await;
        let rec = txn.rec();
        rec.bytes_up = stats.up;
        rec.bytes_down = stats.down;
        rec.sni = stats.sni;
        rec.ech = stats.ech;
        if stats.denied {
            txn.set_decision(Decided::Deny);
        }
        txn.finish(Some(200), stats.reason);
        // Held to the end: the permits, the gauge and a TLS parent's bridge
        // (moved here rather than bound at the start, which would keep a
        // second copy's room in the task).
        drop((held, bridge, open));
    }));
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}

/// The contents of a box, the box freed now (a box moved out of in a
/// task's state is freed only when the task ends).
#[allow(clippy::boxed_local)] // the point: the box is consumed here
fn unbox<T>(b: Box<T>) -> T {
    *b
}

/// The client's TCP socket back from hyper, with what hyper read past the
/// head (usually nothing), copied: hyper's buffer must not stay alive for
/// the life of an idle tunnel.
fn take_socket(upgraded: Upgraded) -> Option<(TcpStream, bytes::Bytes)> {
    let Ok(parts) = upgraded.downcast::<TokioIo<super::ClientIo>>() else {
        tracing::error!("upgraded connection is not a TCP stream");
        return None;
    };
    let client = parts.io.into_inner().into_stream()?;
    let early = if parts.read_buf.is_empty() {
        bytes::Bytes::new()
    } else {
        bytes::Bytes::copy_from_slice(&parts.read_buf)
    };
    drop(parts.read_buf);
    Some((client, early))
}

#[cfg(test)]
mod tests {
    use super::relay_span;

    fn kept_at(filter: &str) -> bool {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let conn = tracing::info_span!("conn", client = "192.0.2.1:40000");
            assert!(!conn.is_none());
            !relay_span(conn).is_none()
        })
    }

    /// An open span costs the log's registry memory for as long as the
    /// tunnel is open: a relaying tunnel keeps the connection's span only
    /// when its debug lines are logged.
    #[test]
    fn a_relaying_tunnel_keeps_its_span_only_for_debug_lines() {
        assert!(!kept_at("info"));
        assert!(!kept_at(
            "egress_proxy=info,egress_proxy::proxy::conn=debug"
        ));
        assert!(kept_at("debug"));
        assert!(kept_at("info,egress_proxy::proxy::tunnel=debug"));
        assert!(kept_at("info,egress_proxy::proxy::tunnel::gate=debug"));
    }
}
