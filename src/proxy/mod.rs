//! The data path: the accept loop, the connection permit, the client ACL,
//! one hyper HTTP/1 connection per client, and the dispatch of each request
//! to [`http`] (absolute-form forwarding) or [`connect`] (tunnels).
//!
//! Every transaction gets exactly one audit record ([`txn::Txn`]); every
//! refusal goes through [`error::Refusal`]. Policy and settings are read once
//! per request from the current snapshot, so a reload never changes a
//! transaction half-way.
mod accept;
pub mod body;
mod conn;
pub mod connect;
mod dial;
pub mod error;
pub mod groups;
pub mod http;
pub mod inspect;
pub mod parent;
pub mod peek;
pub(crate) mod pipeline;
pub mod pp;
pub mod tunnel;
pub mod txn;

pub use accept::{connection_cap, pipe_cap, serve, unmapped};
pub(crate) use conn::{parse_refusal, server_builder};
pub use conn::{ClientIo, ConnCtx, ConnIo};
pub(crate) use dial::{dial, dial_target};
pub use pipeline::body_refused;
pub(crate) use pipeline::{refuse, truncate};

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::audit::{AuditLog, IdGen};
use crate::auth::Auth;
use crate::config::Settings;
use crate::dns::Resolver;
use crate::limits::{ClientConns, RateLimits};
use crate::metrics::Metrics;
use crate::shutdown::Drain;
use crate::tls::ca::Ca;
use crate::tls::client::{ClientTlsError, ParentTls, Upstreams};
use crate::tls::Inspector;
use txn::Txn;

/// State shared by every connection.
pub struct Shared {
    /// The current [`Snapshot`] (settings, policy and the guards built for
    /// them); swapped whole on reload. It derefs to [`Settings`], so
    /// `settings.load().server` reads as a plain settings value would.
    pub settings: ArcSwap<Snapshot>,
    pub resolver: Resolver,
    pub audit: AuditLog,
    pub ids: IdGen,
    pub drain: Drain,
    /// Connection permits (`server.max_connections`).
    pub conns: Arc<Semaphore>,
    /// Pipes for bulk tunnels to splice through.
    pub splicer: tunnel::Splicer,
    /// The idle time-outs and shutdown of its tunnels.
    pub idler: tunnel::Idler,
    /// The inspection CA, loaded at start when `[tls]` sets one.
    pub ca: Option<Arc<Ca>>,
    /// Bounds the connections being answered with a refusal at once (each
    /// lingers briefly); past it, extra connections are closed at once.
    pub refusing: Arc<Semaphore>,
    /// Open connections per client address (`limits.per_client_connections`).
    pub client_conns: Arc<ClientConns>,
    pub metrics: Arc<Metrics>,
    /// Where reloads leave the snapshots they replace.
    pub retired: crate::retire::Graveyard<Snapshot>,
}

/// One reload's worth of state: the settings and the guards built for
/// them, swapped as one value. The guards' per-rule vectors
/// (`RateLimits::rule`, `Upstreams::for_rule`) are indexed by this
/// settings' rule indices, so a request loads the snapshot once and takes
/// both from it: a reload with reordered rules cannot pair an old index
/// with new vectors.
pub struct Snapshot {
    pub settings: Arc<Settings>,
    pub guards: Arc<Guards>,
    /// `dns.static` of these settings, ready for lookups.
    pub statics: crate::dns::Statics,
}

impl Snapshot {
    pub fn new(settings: Settings, guards: Guards) -> Self {
        Snapshot {
            statics: crate::dns::statics(&settings.dns.static_hosts),
            settings: Arc::new(settings),
            guards: Arc::new(guards),
        }
    }
}

impl std::ops::Deref for Snapshot {
    type Target = Settings;

    fn deref(&self) -> &Settings {
        &self.settings
    }
}

/// What guards the door, per settings snapshot.
pub struct Guards {
    pub rates: RateLimits,
    pub auth: Option<Arc<Auth>>,
    /// Set when a CA is configured: `allow` tunnels are inspected.
    pub inspector: Option<Arc<Inspector>>,
    /// Set when the parent is an `https://` URL (shared with the kept-alive
    /// connections made with it, to tell them apart after a reload).
    pub parent_tls: Option<Arc<ParentTls>>,
    /// Inspected tunnels' upstream connections kept for the next tunnel
    /// (this snapshot's only: a reload starts an empty pool).
    pub kept: inspect::Pool,
}

impl Guards {
    /// Build for `settings`; `ca` is the CA loaded at start (it needs a restart to change).
    ///
    /// # Errors
    /// A client certificate or extra roots file cannot be used.
    pub fn new(settings: &Settings, ca: Option<&Arc<Ca>>) -> Result<Self, ClientTlsError> {
        let inspector = match ca {
            Some(ca) if settings.tls.inspection_enabled() => Some(Arc::new(Inspector {
                ca: Arc::clone(ca),
                upstreams: Upstreams::new(settings)?,
            })),
            _ => None,
        };
        Ok(Guards {
            rates: RateLimits::new(settings),
            auth: Auth::new(&settings.auth).map(Arc::new),
            inspector,
            parent_tls: ParentTls::new(settings)?.map(Arc::new),
            kept: inspect::Pool::new(settings.limits.upstream_idle_timeout),
        })
    }
}

impl Shared {
    /// A new transaction record for `client`.
    pub fn txn(&self, client: SocketAddr) -> Txn {
        Txn::new(
            self.audit.clone(),
            self.drain.hard.clone(),
            self.ids.next(),
            client,
        )
    }
}
