//! Resolve, vet every address, dial a vetted one.
//!
//! Names are checked by the policy before this runs; addresses are checked
//! here after DNS, and the connection goes to the checked `SocketAddr`. The
//! name is never handed to anything that would resolve it again, so DNS
//! rebinding cannot slip past the check.
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::dns::{ResolveError, Resolver, Statics};
use crate::policy::{ip, Rule};
use crate::reason::Reason;
use crate::target::{Host, Target};

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("dns: {0}")]
    Dns(#[from] ResolveError),
    #[error("every address is private or reserved")]
    Private,
    #[error("no address is among the rule's pinned ips")]
    PinMismatch,
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    Timeout,
}

impl UpstreamError {
    /// The audit reason.
    pub fn reason(&self) -> Reason {
        match self {
            UpstreamError::Dns(_) => Reason::DnsFailure,
            UpstreamError::Private => Reason::PrivateAddress,
            UpstreamError::PinMismatch => Reason::PinMismatch,
            UpstreamError::Connect(_) => Reason::UpstreamConnectFailed,
            UpstreamError::Timeout => Reason::Timeout,
        }
    }

    /// True when the client should see 504 rather than the reason's status.
    pub fn is_timeout(&self) -> bool {
        match self {
            UpstreamError::Dns(e) => e.is_timeout(),
            UpstreamError::Timeout => true,
            _ => false,
        }
    }
}

/// Resolve `target` and keep the addresses that may be dialed, in order.
///
/// # Errors
/// DNS failure, or every address refused (private, or outside the pin).
pub async fn vetted_addrs(
    resolver: &Resolver,
    statics: &Statics,
    target: &Target,
    rule: Option<&Rule>,
    allow_private: &[IpNet],
    timed: impl FnOnce(std::time::Duration),
) -> Result<Vec<SocketAddr>, UpstreamError> {
    let ips = match &target.host {
        Host::Ip(ip) => vec![*ip],
        Host::Name(name) => resolver.lookup_timed(statics, name, timed).await?,
    };
    vet(&ips, target.port, rule, allow_private)
}

/// The pure part of [`vetted_addrs`]: classify and pin-check each address.
///
/// # Errors
/// `Private` when no address is public or allowed; `PinMismatch` when some
/// were acceptable but none is among the rule's pinned `ips`.
pub fn vet(
    ips: &[IpAddr],
    port: u16,
    rule: Option<&Rule>,
    allow_private: &[IpNet],
) -> Result<Vec<SocketAddr>, UpstreamError> {
    let pin = rule.filter(|r| r.pin).map(|r| r.ips.as_slice());
    let mut out = Vec::with_capacity(ips.len());
    let mut public_seen = false;
    for &raw in ips {
        // An IPv4-mapped answer is dialed as the IPv4 address it carries.
        let ip = match raw {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(raw, IpAddr::V4),
            v4 => v4,
        };
        if !ip::is_allowed(ip, allow_private) {
            continue;
        }
        public_seen = true;
        if pin.is_some_and(|p| !p.contains(&ip)) {
            continue;
        }
        let addr = SocketAddr::new(ip, port);
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    match (out.is_empty(), public_seen) {
        (false, _) => Ok(out),
        (true, true) => Err(UpstreamError::PinMismatch),
        (true, false) => Err(UpstreamError::Private),
    }
}

/// Dial the vetted addresses in turn under one overall `timeout`; each
/// attempt gets an equal share of what is left, so one black-holed address
/// does not use it all.
///
/// # Errors
/// The last connect error, or `Timeout` when the time ran out.
pub async fn dial(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), UpstreamError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = UpstreamError::Timeout;
    for (i, addr) in addrs.iter().enumerate() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        let share = left / u32::try_from(addrs.len() - i).unwrap_or(1);
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(e)) => last = UpstreamError::Connect(e),
            Err(_) => last = UpstreamError::Timeout,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().filter_map(|s| s.parse().ok()).collect()
    }

    #[test]
    fn private_answers_are_refused_unless_allowed() {
        let ips: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.1.2.3".parse().unwrap()];
        assert!(matches!(
            vet(&ips, 80, None, &[]),
            Err(UpstreamError::Private)
        ));
        let ok = vet(&ips, 80, None, &nets(&["127.0.0.0/8"])).unwrap();
        assert_eq!(ok, vec!["127.0.0.1:80".parse().unwrap()]);
    }

    #[test]
    fn mapped_answer_is_vetted_as_ipv4() {
        let ips: Vec<IpAddr> = vec!["::ffff:127.0.0.1".parse().unwrap()];
        assert!(matches!(
            vet(&ips, 80, None, &[]),
            Err(UpstreamError::Private)
        ));
        let ok = vet(&ips, 80, None, &nets(&["127.0.0.0/8"])).unwrap();
        assert_eq!(ok, vec!["127.0.0.1:80".parse().unwrap()]);
    }
}
