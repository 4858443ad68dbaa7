//! The `audit.syslog` value: where the messages go, and how.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};

/// How messages travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    /// RFC 5425: TCP framing inside TLS.
    Tls,
}

/// A parsed `audit.syslog` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub transport: Transport,
    /// A name or an IP address (without brackets).
    pub host: String,
    /// 514 (6514 for `tls://`) when the value names none.
    pub port: u16,
}

impl Destination {
    /// Parse `udp://host[:port]`, `tcp://host[:port]` or `tls://host[:port]`
    /// (IPv6 in brackets).
    ///
    /// # Errors
    /// The value is not of that form; the message says why.
    pub fn parse(s: &str) -> Result<Destination, String> {
        let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
            (Transport::Udp, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (Transport::Tcp, r)
        } else if let Some(r) = s.strip_prefix("tls://") {
            (Transport::Tls, r)
        } else {
            return Err(format!(
                "{s:?}: write \"udp://host:514\", \"tcp://host:514\" or \"tls://host:6514\""
            ));
        };
        if rest.contains(['/', '@', '?', '#']) || rest.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?}: only a host and a port may follow the scheme"
            ));
        }
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            let port = match after {
                "" => None,
                a => Some(
                    a.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':port' after ']'"))?,
                ),
            };
            (h, port)
        } else {
            match rest.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(format!(
                        "{s:?}: write an IPv6 address in brackets, [::1]:514"
                    ))
                }
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let port = match port {
            None if transport == Transport::Tls => 6514,
            None => 514,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{s:?}: {p:?} is not a port")),
            },
        };
        Ok(Destination {
            transport,
            host: host.to_string(),
            port,
        })
    }

    /// Resolve now (blocking; only on the sender thread).
    pub(super) fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
        }
        Ok(addrs)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}
