//! PROXY protocol v1/v2 from a load balancer in front (`server.proxy_protocol`).
//!
//! The header is read exactly (peeked, parsed with the `ppp` crate, then
//! consumed), so the bytes behind it reach hyper untouched. The address it
//! carries becomes the client address for ACLs, limits and records. Whether
//! a peer may send one at all (`server.proxy_protocol_from`) is decided by
//! the caller; [`sniff`] tells a header from a request without consuming.
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header we wait for (v2 with TLVs; v1 is at most 107 bytes).
const MAX_HEADER: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum PpError {
    #[error("no complete PROXY header in time")]
    Timeout,
    #[error("malformed PROXY header")]
    Malformed,
    #[error("connection closed before the PROXY header")]
    Closed,
    #[error("nothing sent in time")]
    Idle,
}

/// How a v1 header starts.
const V1_SIGNATURE: &[u8] = b"PROXY ";
/// How a v2 header starts.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// Whether the connection opens with a PROXY header (v1 or v2), judged on
/// its first bytes, which stay unread. Waits only while what arrived is
/// still the start of a signature.
///
/// # Errors
/// `Idle` when nothing arrived within `timeout`, `Timeout` when only the
/// start of a signature did, `Closed` when the peer left first.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Result<bool, PpError> {
    let mut seen = 0;
    match tokio::time::timeout(timeout, sniff_bytes(stream, &mut seen)).await {
        Ok(r) => r,
        Err(_) if seen == 0 => Err(PpError::Idle),
        Err(_) => Err(PpError::Timeout),
    }
}

async fn sniff_bytes(stream: &TcpStream, seen: &mut usize) -> Result<bool, PpError> {
    let mut buf = [0u8; 12];
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| PpError::Closed)?;
        if n == 0 {
            return Err(PpError::Closed);
        }
        let head = &buf[..n];
        if head.starts_with(V1_SIGNATURE) || head.starts_with(V2_SIGNATURE) {
            return Ok(true);
        }
        if !V1_SIGNATURE.starts_with(head) && !V2_SIGNATURE.starts_with(head) {
            return Ok(false);
        }
        if n == *seen {
            // Nothing new yet: wait a little rather than spin on peek.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *seen = n;
    }
}

/// Read the PROXY header; returns the client address it carries, or `peer`
/// for a LOCAL (health-check) or UNKNOWN header.
///
/// # Errors
/// A missing, malformed or slow header.
pub async fn read_header(
    stream: &mut TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<SocketAddr, PpError> {
    tokio::time::timeout(timeout, read(stream, peer))
        .await
        .map_err(|_| PpError::Timeout)?
}

async fn read(stream: &mut TcpStream, peer: SocketAddr) -> Result<SocketAddr, PpError> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut last = 0;
    loop {
        let n = stream.peek(&mut buf).await.map_err(|_| PpError::Closed)?;
        if n == 0 {
            return Err(PpError::Closed);
        }
        let parsed = HeaderResult::parse(&buf[..n]);
        if parsed.is_incomplete() {
            if n >= MAX_HEADER {
                return Err(PpError::Malformed);
            }
            if n == last {
                // Nothing new yet: wait a little rather than spin on peek.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            last = n;
            continue;
        }
        let (len, addr) = match parsed {
            HeaderResult::V1(Ok(h)) => (h.header.len(), v1_addr(&h.addresses)),
            HeaderResult::V2(Ok(h)) => (h.len(), v2_addr(&h)),
            _ => return Err(PpError::Malformed),
        };
        let mut consumed = vec![0u8; len];
        stream
            .read_exact(&mut consumed)
            .await
            .map_err(|_| PpError::Closed)?;
        return Ok(addr.unwrap_or(peer));
    }
}

fn v1_addr(a: &v1::Addresses) -> Option<SocketAddr> {
    match a {
        v1::Addresses::Tcp4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v1::Addresses::Tcp6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_addr(h: &v2::Header<'_>) -> Option<SocketAddr> {
    if h.command == v2::Command::Local {
        return None;
    }
    match h.addresses {
        v2::Addresses::IPv4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v2::Addresses::IPv6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        _ => None,
    }
}
