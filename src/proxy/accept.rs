//! The door: the accept loop, the connection permit and the per-client
//! cap, the client ACL and the PROXY header, and the raw refusals made
//! before hyper reads a request. Also the caps derived from the
//! file-descriptor limit.
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conn::{connection, linger};
use super::error::Refusal;
use super::{pp, tunnel, Shared};
use crate::config::Settings;
use crate::reason::Reason;

/// The soft file-descriptor limit.
pub(super) fn nofile() -> usize {
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    usize::try_from(nofile).unwrap_or(usize::MAX)
}

/// How many splice pipes may be open at once: `server.splice_pipes`, or
/// when unset, derived from the file-descriptor limit
/// (see [`tunnel::pipe_budget`]).
pub fn pipe_cap(configured: Option<usize>) -> usize {
    configured.unwrap_or_else(|| tunnel::pipe_budget(nofile()))
}

/// The connection cap: `server.max_connections`, or when 0, derived from
/// the file-descriptor limit (two descriptors a connection, some kept back,
/// and two for each splice pipe set aside).
pub fn connection_cap(configured: usize, pipes: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let reserved = pipes.saturating_mul(2).saturating_add(64);
    (nofile().saturating_sub(reserved) / 2).max(16)
}

/// Accept connections on `listener` until the drain begins.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let graceful = shared.drain.graceful.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = graceful.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            // Unmapped first: ACLs, limits and records see one spelling.
            Ok((stream, peer)) => (stream, unmapped(peer)),
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = Arc::clone(&shared.conns).try_acquire_owned().ok();
        let shared2 = Arc::clone(&shared);
        match permit {
            Some(permit) => {
                // Boxed: the connection future is kilobytes (hyper's
                // dispatcher and our service), and the task would otherwise
                // be moved whole several times on its way into the runtime.
                // One span a connection: its log lines name the client and
                // the record ids' prefix, so they can be tied to its records.
                let span = tracing::info_span!(
                    "conn",
                    ids = %format_args!("{:08x}", shared.ids.prefix()),
                    client = %peer
                );
                shared
                    .drain
                    .tracker
                    .spawn(Box::pin(connection(stream, peer, shared2, permit)).instrument(span));
            }
            None => {
                shared.metrics.connection_limit.inc();
                match Arc::clone(&shared.refusing).try_acquire_owned() {
                    Ok(r) => {
                        shared.drain.tracker.spawn(async move {
                            let _r = r;
                            refuse_raw(stream, peer, &shared2, Reason::ConnectionLimit).await;
                        });
                    }
                    Err(_) => {
                        // Flooded: record it and close without answering.
                        let txn = shared.txn(peer);
                        txn.refuse(503, Reason::ConnectionLimit);
                        drop(stream);
                    }
                }
            }
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:10.0.0.5`, as a
/// dual-stack listener or a PROXY header may give it) as plain IPv4, so
/// ACLs, rate-limit keys and records know one client by one address.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(addr, |v4| SocketAddr::from((v4, addr.port()))),
        IpAddr::V4(_) => addr,
    }
}

/// `ip` must be [`unmapped`] already.
pub(super) fn client_allowed(allow: &[IpNet], ip: IpAddr) -> bool {
    allow.iter().any(|n| n.contains(&ip))
}

/// Why a connection is not served: refused (as whom, why), or closed
/// quietly (nothing was asked, as hyper closes an idle connection).
pub(super) enum NotServed {
    Refuse(SocketAddr, Reason),
    Quiet,
}

/// Who the client of a new connection is: its peer, or with
/// `server.proxy_protocol` and a peer in `proxy_protocol_from`, the address
/// the PROXY header carries. Both must be in `clients.allow`.
pub(super) async fn client_of(
    stream: &mut TcpStream,
    peer: SocketAddr,
    settings: &Settings,
) -> Result<SocketAddr, NotServed> {
    if !client_allowed(&settings.clients, peer.ip()) {
        return Err(NotServed::Refuse(peer, Reason::ClientNotAllowed));
    }
    if !settings.server.proxy_protocol {
        return Ok(peer);
    }
    let timeout = settings.limits.header_read_timeout;
    if !client_allowed(&settings.server.proxy_protocol_from, peer.ip()) {
        // A client connecting directly. A PROXY header from it would be a
        // claim to be someone else: refused, and recorded as itself.
        return match pp::sniff(stream, timeout).await {
            Ok(false) => Ok(peer),
            Ok(true) => {
                tracing::warn!(client = %peer, "PROXY header from a peer outside server.proxy_protocol_from; refused");
                Err(NotServed::Refuse(peer, Reason::ClientNotAllowed))
            }
            Err(pp::PpError::Idle | pp::PpError::Closed) => Err(NotServed::Quiet),
            Err(_) => Err(NotServed::Refuse(peer, Reason::BadRequest)),
        };
    }
    // A trusted balancer: the header is required, and the address it
    // carries is the client for ACLs, limits and records.
    let client = match pp::read_header(stream, peer, timeout).await {
        Ok(client) => unmapped(client),
        Err(e) => {
            tracing::debug!(error = %e, client = %peer, "PROXY header refused");
            return Err(NotServed::Refuse(peer, Reason::BadRequest));
        }
    };
    if !client_allowed(&settings.clients, client.ip()) {
        return Err(NotServed::Refuse(client, Reason::ClientNotAllowed));
    }
    Ok(client)
}

/// Answer a refusal before hyper reads the request, then close without a
/// reset: stop writing, and read (and discard) what the client still sends
/// for a moment, so unread bytes do not turn our close into an RST that
/// would destroy the answer before the client reads it.
pub(super) async fn refuse_raw(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    reason: Reason,
) {
    let refusal = Refusal::new(reason);
    let txn = shared.txn(peer);
    let id = txn.id();
    txn.refuse(refusal.status.as_u16(), reason);
    let raw = refusal.raw(id);
    // Less to read than after a refused head: nothing was asked yet.
    linger(stream, Some(&raw), 256 * 1024).await;
}
