//! CONNECT: decide (done by the caller), resolve, vet and dial first; answer
//! `200` only once the upstream connection is up; then take the client's
//! socket back from hyper and hand both sockets to [`super::tunnel`].
//!
//! This is the one place where a tunnel becomes "splice" (with the SNI
//! check of [`super::peek`]) or, once inspection exists, "inspect".
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::tunnel::{self, Check};
use super::txn::Txn;
use super::{dial_target, refuse, ConnCtx};
use crate::audit::Reason;
use crate::config::Settings;
use crate::policy::{Rule, SniMode};
use crate::target::Target;

/// Open a tunnel for an allowed CONNECT.
pub async fn tunnel(
    ctx: &ConnCtx,
    settings: &Settings,
    mut txn: Txn,
    mut req: Request<Incoming>,
    target: Target,
    rule: Option<&Rule>,
) -> Response<ProxyBody> {
    let addrs = match dial_target(ctx, settings, &target, rule).await {
        Ok(a) => a,
        Err(r) => return refuse(txn, r, settings),
    };
    let (upstream, addr) = match super::dial(ctx, &addrs, settings).await {
        Ok(c) => c,
        Err(r) => return refuse(txn, r, settings),
    };
    txn.rec().upstream = Some(addr);
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
    let on_upgrade = hyper::upgrade::on(&mut req);
    let open_tunnels = ctx.shared.metrics.open_tunnels.clone();
    ctx.shared.drain.tracker.spawn(async move {
        let _open = crate::metrics::GaugeGuard::new(&open_tunnels);
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            }
        };
        let parts = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("upgraded connection is not a TCP stream");
                txn.finish(Some(200), Some(Reason::ClientClosed));
                return;
            }
        };
        let client = parts.io.into_inner();
        let stats = tunnel::run(client, parts.read_buf, upstream, check, idle, hard).await;
        let rec = txn.rec();
        rec.bytes_up = stats.up;
        rec.bytes_down = stats.down;
        rec.sni = stats.sni;
        rec.ech = stats.ech;
        if stats.denied {
            txn.set_decision(crate::audit::Decided::Deny);
        }
        txn.finish(Some(200), stats.reason);
    });
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = StatusCode::OK;
    resp
}
