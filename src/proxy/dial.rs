//! Resolve, vet and dial for a request or a tunnel, timing each part; an
//! upstream failure comes back as the refusal to send.
use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::error::Refusal;
use super::{Shared, Snapshot};
use crate::config::Settings;
use crate::target::Target;

/// Resolve and vet the target, then dial; refusals come back ready to send.
pub(crate) async fn dial_target(
    shared: &Shared,
    snapshot: &Snapshot,
    target: &Target,
    rule: Option<&crate::policy::Rule>,
) -> Result<Vec<SocketAddr>, Refusal> {
    let hist = &shared.metrics.dns_seconds;
    let vetted = crate::upstream::vetted_addrs(
        &shared.resolver,
        &snapshot.statics,
        target,
        rule,
        &snapshot.dns.allow_private,
        |took| hist.observe(took.as_secs_f64()),
    )
    .await;
    vetted.map_err(|e| upstream_refusal(&e))
}

/// Dial vetted addresses, timing the connect.
pub(crate) async fn dial(
    shared: &Shared,
    addrs: &[SocketAddr],
    settings: &Settings,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let start = std::time::Instant::now();
    let dialed = crate::upstream::dial(addrs, settings.limits.connect_timeout).await;
    shared
        .metrics
        .connect_seconds
        .observe(start.elapsed().as_secs_f64());
    dialed.map_err(|e| upstream_refusal(&e))
}

pub(crate) fn upstream_refusal(e: &crate::upstream::UpstreamError) -> Refusal {
    let reason = e.reason();
    if e.is_timeout() {
        Refusal::with_status(reason, ::http::StatusCode::GATEWAY_TIMEOUT)
    } else {
        Refusal::new(reason)
    }
}
