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
use crate::policy::{EchMode, Rule, SniMode};
use crate::reason::Reason;
use crate::target::Target;

/// Open a tunnel for an allowed CONNECT.
pub async fn tunnel(
    ctx: &Arc<ConnCtx>,
    mut x: Exchange,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let (upstream, addr, bridge) = match open_upstream(ctx, &mut x).await {
        Ok(c) => c,
        Err(r) => return x.refuse(r),
    };
    x.txn.rec().upstream = Some(addr);
    let inspector = x.snapshot.guards.inspector.clone();
    match inspector {
        Some(inspector) if x.decision.inspect => {
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
                upstream: Some(addr),
            };
            spawn(ctx, x.txn, &mut req, move |upgraded| async move {
                let _bridge = bridge;
                Some(inspect::intercept(t, TokioIo::new(upgraded), upstream).await)
            })
        }
        _ => {
            let check = sni_check(x.rule(), &x.target, &x.snapshot.limits);
            let idle = x.snapshot.limits.tunnel_idle_timeout;
            let hard = ctx.shared.drain.hard.clone();
            let splicer = ctx.shared.splicer.clone();
            spawn(ctx, x.txn, &mut req, move |upgraded| async move {
                let _bridge = bridge;
                let (client, early) = take_socket(upgraded)?;
                Some(tunnel::run(client, early, upstream, check, idle, hard, &splicer).await)
            })
        }
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
        let addrs = dial_target(ctx, &snapshot, &x.target, rule).await?;
        let (socket, addr) = super::dial(ctx, &addrs, &snapshot).await?;
        return Ok((socket, addr, None));
    };
    let vetted = if parent::vets_here(parent, &x.target) {
        dial_target(ctx, &snapshot, &x.target, rule)
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

/// Answer 200, and on a task of its own wait for hyper's upgrade, run the
/// tunnel with `run`, and complete the record from its [`TunnelStats`]
/// (`None`: the client's socket could not be had, `client_closed`).
///
/// The task takes the connection's permits (an open tunnel counts against
/// the caps) and the connection's span, but not its context: an idle
/// tunnel holds only what it needs. Boxed, like the connection: the tunnel
/// task is moved into the runtime as a pointer, not as its whole state.
fn spawn<F, Fut>(
    ctx: &Arc<ConnCtx>,
    mut txn: Txn,
    req: &mut Request<Incoming>,
    run: F,
) -> Response<ProxyBody>
where
    F: FnOnce(Upgraded) -> Fut + Send + 'static,
    Fut: Future<Output = Option<TunnelStats>> + Send,
{
    let on_upgrade = hyper::upgrade::on(req);
    let open_tunnels = ctx.shared.metrics.open_tunnels.clone();
    let held = ctx.take_held();
    ctx.shared.drain.tracker.spawn(Box::pin(
        async move {
            let _held = held;
            let _open = crate::metrics::GaugeGuard::new(&open_tunnels);
            let stats = match on_upgrade.await {
                Ok(upgraded) => run(upgraded).await,
                Err(e) => {
                    tracing::debug!(error = %e, "CONNECT upgrade failed");
                    None
                }
            };
            let Some(stats) = stats else {
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            };
            let rec = txn.rec();
            rec.bytes_up = stats.up;
            rec.bytes_down = stats.down;
            rec.sni = stats.sni;
            rec.ech = stats.ech;
            if stats.denied {
                txn.set_decision(Decided::Deny);
            }
            txn.finish(Some(200), stats.reason);
        }
        .instrument(tracing::Span::current()),
    ));
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
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
