//! Rate limits (governor) and the per-client connection cap.
//!
//! Keyed limiters are per client address (requests/s and new tunnels/s,
//! each with a burst equal to its count); per-rule limiters cap all clients
//! together. Everything here is rebuilt on reload; keyed state is swept so
//! memory stays bounded whatever the number of distinct clients.
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{Rate, Settings};

/// A refused check: how long until the next one would pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limited {
    /// Whole seconds for `Retry-After` (at least 1).
    pub retry_after: u64,
}

fn quota(rate: Rate) -> Option<Quota> {
    let burst = NonZeroU32::new(rate.count)?;
    let period = rate
        .per
        .checked_div(rate.count)?
        .max(Duration::from_nanos(1));
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

fn limited(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Limited {
    let wait = not_until.wait_time_from(DefaultClock::default().now());
    Limited {
        retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    }
    .at_least_one()
}

impl Limited {
    fn at_least_one(self) -> Self {
        Limited {
            retry_after: self.retry_after.max(1),
        }
    }
}

/// The rate limiters of one settings snapshot.
pub struct RateLimits {
    requests: Option<DefaultKeyedRateLimiter<IpAddr>>,
    tunnels: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Indexed by rule; None where the rule has no `rate`.
    rules: Vec<Option<DefaultDirectRateLimiter>>,
}

impl RateLimits {
    /// Build from `[rates]` and the catalog's `rate` keys.
    pub fn new(settings: &Settings) -> Self {
        let keyed = |r: Option<Rate>| r.and_then(quota).map(RateLimiter::keyed);
        RateLimits {
            requests: keyed(settings.rates.per_client_requests),
            tunnels: keyed(settings.rates.per_client_tunnels),
            rules: settings
                .policy
                .rules()
                .iter()
                .map(|r| r.rate.and_then(quota).map(RateLimiter::direct))
                .collect(),
        }
    }

    /// One request from `client` (every request, CONNECT included).
    ///
    /// # Errors
    /// Over the per-client request rate.
    pub fn request(&self, client: IpAddr) -> Result<(), Limited> {
        match &self.requests {
            Some(l) => l.check_key(&client).map_err(|n| limited(&n)),
            None => Ok(()),
        }
    }

    /// One new tunnel from `client`.
    ///
    /// # Errors
    /// Over the per-client tunnel rate.
    pub fn tunnel(&self, client: IpAddr) -> Result<(), Limited> {
        match &self.tunnels {
            Some(l) => l.check_key(&client).map_err(|n| limited(&n)),
            None => Ok(()),
        }
    }

    /// One transaction to rule `index` (all clients together).
    ///
    /// # Errors
    /// Over the rule's `rate`.
    pub fn rule(&self, index: usize) -> Result<(), Limited> {
        match self.rules.get(index) {
            Some(Some(l)) => l.check().map_err(|n| limited(&n)),
            _ => Ok(()),
        }
    }

    /// Forget idle keys (called periodically).
    pub fn sweep(&self) {
        for l in [&self.requests, &self.tunnels].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }

    /// Keys held by the keyed limiters (for tests and metrics).
    pub fn keys(&self) -> usize {
        [&self.requests, &self.tunnels]
            .into_iter()
            .flatten()
            .map(|l| l.len())
            .sum()
    }
}

/// Open connections per client address.
#[derive(Default)]
pub struct ClientConns {
    open: DashMap<IpAddr, usize>,
}

/// Held for the life of a client connection.
pub struct ClientPermit {
    conns: Arc<ClientConns>,
    ip: IpAddr,
}

impl ClientConns {
    /// Take a slot for `ip`, unless it already holds `cap`.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<ClientPermit> {
        let mut n = self.open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        drop(n);
        Some(ClientPermit {
            conns: Arc::clone(self),
            ip,
        })
    }

    /// Distinct clients with open connections.
    pub fn clients(&self) -> usize {
        self.open.len()
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        self.conns.open.remove_if_mut(&self.ip, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_burst_is_the_count() {
        let q = quota(Rate {
            count: 50,
            per: Duration::from_secs(1),
        })
        .map(|q| q.burst_size().get());
        assert_eq!(q, Some(50));
    }

    #[test]
    fn client_cap_counts_and_releases() {
        let c = Arc::new(ClientConns::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = c.acquire(ip, 2);
        let b = c.acquire(ip, 2);
        assert!(a.is_some() && b.is_some());
        assert!(c.acquire(ip, 2).is_none());
        drop(a);
        assert!(c.acquire(ip, 2).is_some());
        drop(b);
        assert_eq!(c.clients(), 0, "entries go when the last connection closes");
    }
}
