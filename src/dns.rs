//! Name resolution: `dns.static` overrides first, then hickory-resolver with
//! its cache, under one time-out. Hickory's types stay inside this file.
//!
//! Names are looked up as fully qualified (no search-domain expansion), and
//! every answer is returned for vetting: this module never dials and never
//! decides whether an address is acceptable.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::DnsSettings;

/// Why a name could not be resolved (`dns_failure`: 502, or 504 on a time-out).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no such name")]
    NoSuchName,
    #[error("no addresses for the name")]
    NoAddresses,
    #[error("resolver failure: {0}")]
    ServerFailure(String),
    #[error("resolver timed out")]
    Timeout,
}

impl ResolveError {
    /// True for the time-out case (answered 504 rather than 502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ResolveError::Timeout)
    }
}

/// The `dns.static` overrides of one settings snapshot, answered without
/// asking DNS. Looked up on every request: foldhash, not SipHash (the keys
/// come from the config). They live in the proxy's reload snapshot, so a
/// request resolves with the overrides of the settings it was decided
/// under, never with those of a later reload.
pub type Statics = HashMap<Box<str>, Vec<IpAddr>, foldhash::fast::RandomState>;

/// [`Statics`] from `dns.static`.
pub fn statics(hosts: &HashMap<Box<str>, Vec<IpAddr>>) -> Statics {
    hosts.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The resolver shared by every transaction.
pub struct Resolver {
    hickory: TokioResolver,
    timeout: Duration,
}

/// Errors building the resolver.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up DNS: {0}")]
pub struct SetupError(String);

impl Resolver {
    /// Build from `[dns]`: the configured nameservers, or the system's.
    ///
    /// # Errors
    /// The system configuration cannot be read and no nameservers are set.
    pub fn new(settings: &DnsSettings, timeout: Duration) -> Result<Self, SetupError> {
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| SetupError(e.to_string()))?
        } else {
            let servers = settings.nameservers.iter().map(name_server).collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = (timeout / 2).max(Duration::from_millis(100));
        opts.attempts = 2;
        opts.cache_size = 4096;
        opts.ndots = 0;
        let hickory = builder.build().map_err(|e| SetupError(e.to_string()))?;
        Ok(Resolver { hickory, timeout })
    }

    /// Every address of a normalised name: from `statics` when listed
    /// there, else from DNS; `timed` gets the time a real DNS query took
    /// (static overrides are not timed).
    ///
    /// # Errors
    /// No such name, no addresses, a resolver failure, or the time-out.
    pub async fn lookup_timed(
        &self,
        statics: &Statics,
        name: &str,
        timed: impl FnOnce(Duration),
    ) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(ips) = statics.get(name) {
            return Ok(ips.clone());
        }
        let fqdn = format!("{name}.");
        let start = std::time::Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.hickory.lookup_ip(fqdn)).await;
        timed(start.elapsed());
        match answer {
            Err(_) => Err(ResolveError::Timeout),
            Ok(Ok(found)) => {
                let ips: Vec<IpAddr> = found.iter().collect();
                if ips.is_empty() {
                    Err(ResolveError::NoAddresses)
                } else {
                    Ok(ips)
                }
            }
            Ok(Err(e)) if e.is_nx_domain() => Err(ResolveError::NoSuchName),
            Ok(Err(e)) if e.is_no_records_found() => Err(ResolveError::NoAddresses),
            Ok(Err(e))
                if e.to_string().contains("timed out") || e.to_string().contains("timeout") =>
            {
                Err(ResolveError::Timeout)
            }
            Ok(Err(e)) => Err(ResolveError::ServerFailure(e.to_string())),
        }
    }

    /// Forget cached answers (after a reload).
    pub fn clear_cache(&self) {
        self.hickory.clear_cache();
    }
}

fn name_server(addr: &SocketAddr) -> NameServerConfig {
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = addr.port();
    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
    ns.connections = vec![udp, tcp];
    ns
}
