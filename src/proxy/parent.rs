//! Egress through a parent proxy (`[upstream] parent`): which route a
//! transaction takes, the connection to the parent, and a tunnel opened
//! with `CONNECT host:port` to it.
//!
//! The decision, the address vetting (with `parent_resolve = "local"`) and
//! the record stay here; the parent only carries the bytes. Its refusal is
//! `parent_refused` (502, the parent's status in the record's
//! `parent_status`), a parent that cannot be reached `parent_unreachable`
//! (502, or 504 when the connect timed out); so is an `https://` parent
//! whose certificate does not verify.
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::Refusal;
use super::txn::Txn;
use super::{ConnCtx, Snapshot};
use crate::config::{Parent, ParentResolve, Settings};
use crate::policy::{Route, Rule};
use crate::reason::Reason;
use crate::target::{Host, Target};

mod stream;
pub(crate) use stream::ParentStream;

/// The longest response head accepted from the parent for a CONNECT.
const MAX_HEAD: usize = 16 * 1024;

/// The route a transaction under `rule` takes: the rule's `route`, else
/// the parent when one is set.
pub fn route(settings: &Settings, rule: Option<&Rule>) -> Route {
    match (&settings.parent, rule.and_then(|r| r.route)) {
        (None, _) | (_, Some(Route::Direct)) => Route::Direct,
        (Some(_), _) => Route::Parent,
    }
}

/// The parent this transaction goes through, if any (and count the route).
pub(crate) fn parent_for<'a>(
    ctx: &ConnCtx,
    settings: &'a Settings,
    rule: Option<&Rule>,
) -> Option<&'a Parent> {
    let r = route(settings, rule);
    ctx.shared.metrics.route(r == Route::Parent);
    match r {
        Route::Parent => settings.parent.as_ref(),
        Route::Direct => None,
    }
}

/// A connection to the parent (TLS for an `https://` parent), timed like
/// any connect.
pub(crate) async fn connect(
    ctx: &ConnCtx,
    parent: &Parent,
    snapshot: &Snapshot,
) -> Result<(ParentStream, SocketAddr), Refusal> {
    let settings: &Settings = snapshot;
    let (tcp, addr) = connect_tcp(ctx, parent, settings).await?;
    match (parent.tls, snapshot.guards.parent_tls.as_ref()) {
        (false, _) => Ok((ParentStream::Plain(tcp), addr)),
        (true, Some(tls)) => {
            let shaken = tokio::time::timeout(
                settings.limits.connect_timeout,
                tls.connector.connect(tls.name.clone(), tcp),
            )
            .await;
            match shaken {
                Ok(Ok(s)) => Ok((ParentStream::Tls(Box::new(s)), addr)),
                Ok(Err(e)) => {
                    tracing::warn!(parent = %parent, error = %e, "TLS with the parent proxy failed");
                    Err(Refusal::new(Reason::ParentUnreachable))
                }
                Err(_) => Err(Refusal::with_status(
                    Reason::ParentUnreachable,
                    ::http::StatusCode::GATEWAY_TIMEOUT,
                )),
            }
        }
        // Built with the snapshot whenever its parent is https://.
        (true, None) => Err(Refusal::new(Reason::ParentUnreachable)),
    }
}

/// The TCP connection to the parent.
async fn connect_tcp(
    ctx: &ConnCtx,
    parent: &Parent,
    settings: &Settings,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let unreachable = Refusal::new(Reason::ParentUnreachable);
    let addrs: Vec<SocketAddr> = match parent.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, parent.port)],
        Err(_) => {
            let looked = tokio::time::timeout(
                settings.limits.connect_timeout,
                tokio::net::lookup_host((parent.host.as_str(), parent.port)),
            )
            .await;
            match looked {
                Ok(Ok(a)) => a.collect(),
                Ok(Err(e)) => {
                    tracing::warn!(parent = %parent, error = %e, "cannot resolve the parent proxy");
                    return Err(unreachable);
                }
                Err(_) => {
                    return Err(Refusal::with_status(
                        Reason::ParentUnreachable,
                        ::http::StatusCode::GATEWAY_TIMEOUT,
                    ))
                }
            }
        }
    };
    let start = std::time::Instant::now();
    let dialed = crate::upstream::dial(&addrs, settings.limits.connect_timeout).await;
    ctx.shared
        .metrics
        .connect_seconds
        .observe(start.elapsed().as_secs_f64());
    dialed.map_err(|e| {
        tracing::warn!(parent = %parent, error = %e, "cannot connect to the parent proxy");
        if e.is_timeout() {
            Refusal::with_status(
                Reason::ParentUnreachable,
                ::http::StatusCode::GATEWAY_TIMEOUT,
            )
        } else {
            unreachable
        }
    })
}

/// True when the address is vetted here before the parent is asked:
/// `parent_resolve = "local"`, or an IP-literal target (its address is
/// known without DNS).
pub fn vets_here(parent: &Parent, target: &Target) -> bool {
    parent.resolve == ParentResolve::Local || matches!(target.host, Host::Ip(_))
}

/// The authority asked of the parent: the target's name (the parent
/// resolves), or with `parent_resolve = "local"` the vetted address.
pub fn authority(target: &Target, vetted: Option<SocketAddr>) -> String {
    if let Some(a) = vetted {
        return a.to_string();
    }
    match &target.host {
        Host::Name(n) => format!("{n}:{}", target.port),
        Host::Ip(ip) => SocketAddr::new(*ip, target.port).to_string(),
    }
}

/// Open a tunnel to `authority` through the parent: `CONNECT`, then the
/// parent's answer. Only a 2xx gives the stream; the parent's status goes
/// into the record either way.
pub(crate) async fn tunnel(
    ctx: &ConnCtx,
    parent: &Parent,
    snapshot: &Snapshot,
    authority: &str,
    txn: &mut Txn,
) -> Result<(ParentStream, SocketAddr), Refusal> {
    let settings: &Settings = snapshot;
    let (mut stream, addr) = connect(ctx, parent, snapshot).await?;
    txn.rec().upstream = Some(addr);
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(auth) = &parent.authorization {
        head.push_str("Proxy-Authorization: ");
        head.push_str(auth.to_str().unwrap_or_default());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let answer = tokio::time::timeout(settings.limits.response_timeout, async {
        stream.write_all(head.as_bytes()).await?;
        read_status(&mut stream).await
    })
    .await;
    let status = match answer {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return Err(Refusal::new(Reason::ParentRefused)),
        Ok(Err(e)) => {
            tracing::debug!(parent = %parent, error = %e, "parent proxy ended the CONNECT");
            return Err(Refusal::new(Reason::ParentUnreachable));
        }
        Err(_) => return Err(Refusal::new(Reason::Timeout)),
    };
    txn.rec().parent_status = Some(status);
    if (200..300).contains(&status) {
        Ok((stream, addr))
    } else {
        tracing::debug!(parent = %parent, status, "parent proxy refused the CONNECT");
        Err(Refusal::new(Reason::ParentRefused))
    }
}

/// Read a response head up to its blank line, byte by byte so nothing of
/// the tunnel past it is consumed; its status code, or None when it is not
/// an HTTP response head.
async fn read_status<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Option<u16>> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_HEAD {
            return Ok(None);
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(parse_status(&head))
}

/// The status code of `HTTP/1.x NNN …`.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some(200)
        );
        assert_eq!(
            parse_status(b"HTTP/1.0 407 Proxy Authentication Required\r\n"),
            Some(407)
        );
        assert_eq!(parse_status(b"SSH-2.0-x\r\n\r\n"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20\r\n\r\n"), None);
    }

    #[test]
    fn authority_is_the_name_or_the_vetted_address() {
        let t = crate::target::Target {
            host: Host::Ip("203.0.113.7".parse().unwrap()),
            port: 443,
        };
        assert_eq!(authority(&t, None), "203.0.113.7:443");
        let v: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(authority(&t, Some(v)), "[2001:db8::1]:443");
    }
}
