//! egress-proxy: an egress allowlist forward proxy.
//!
//! # Layout
//!
//! The data path, from the leaves up:
//!
//! - [`reason`]: why a transaction was refused or failed: the word, its status and its class (a leaf).
//! - [`target`]: the normalised target of a request; the only place hosts are normalised.
//! - [`policy`]: the compiled catalog and the pure decision on (host, port, method); address vetting in [`policy::ip`].
//! - [`config`]: raw configuration (file + environment) and its validation into [`config::Settings`].
//! - [`reload`]: load and validate again on SIGHUP or a file change; [`retire`]: where replaced snapshots are freed.
//! - [`audit`]: the audit record, its JSON and Squid lines, the sinks (syslog too), the single writer thread, and the log reader.
//! - [`metrics`]: the Prometheus metrics and the status page's state, both fed from the audit records.
//! - [`auth`], [`limits`]: proxy authentication; connection caps and rate limiters.
//! - [`dns`], [`upstream`]: resolution with static overrides, vetting of every address, dialing.
//! - [`tls`]: TLS material for inspection: the CA and its leaf cache, the upstream client configurations.
//! - [`proxy`]: the accept loop, the request pipeline, HTTP forwarding, CONNECT tunnels (spliced or inspected).
//! - [`shutdown`]: the drain (stop accepting, cancel, wait under a deadline).
//!
//! The operator's face, [`operator`]: `check`/`explain` output, `suggest`,
//! `replay`, and the admin listener with the status page. Nothing on the
//! data path calls into it.
#![forbid(unsafe_code)]

/// The crate version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit built (`git rev-parse --short=12 HEAD` at build time;
/// "unknown" outside a git checkout). See build.rs.
pub const COMMIT: &str = env!("EGRESS_PROXY_COMMIT");

pub mod audit;
pub mod auth;
pub mod config;
pub mod dns;
pub mod limits;
pub mod metrics;
pub mod operator;
pub mod policy;
pub mod proxy;
pub mod reason;
pub mod reload;
pub mod retire;
pub mod shutdown;
pub mod target;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::audit::{AuditLog, AuditSink, AuditWriter, IdGen, Tee};
use crate::config::Settings;
use crate::metrics::{Metrics, MetricsSink};
use crate::proxy::{Shared, Snapshot};
use crate::shutdown::Drain;

/// Time allowed for a DNS answer (then `dns_failure`, 504).
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Dns(#[from] dns::SetupError),
    #[error("inspection CA: {0}")]
    Ca(#[from] tls::ca::CaError),
    #[error(transparent)]
    ClientTls(#[from] tls::client::ClientTlsError),
}

/// Start the audit writer on `sink`, with the metrics fed from the same records.
///
/// # Errors
/// The writer thread could not be started.
pub fn start_audit(
    sink: Box<dyn AuditSink>,
) -> std::io::Result<(AuditLog, AuditWriter, Arc<Metrics>)> {
    start_audit_with(sink, None)
}

/// [`start_audit`], plus the RFC 5424 copy of every record to `syslog`
/// (`audit.syslog`: `udp://`, `tcp://` or `tls://host:port`) when set. The
/// syslog sink never makes the writer wait (see [`audit::syslog`]).
///
/// # Errors
/// `syslog` is not a syslog address, or a thread could not be started.
pub fn start_audit_with(
    sink: Box<dyn AuditSink>,
    syslog: Option<&config::SyslogSettings>,
) -> std::io::Result<(AuditLog, AuditWriter, Arc<Metrics>)> {
    let metrics = Arc::new(Metrics::new());
    let mut sinks: Vec<Box<dyn AuditSink>> = vec![
        sink,
        Box::new(MetricsSink::new(Arc::clone(&metrics))),
        Box::new(metrics::status::StatusSink(Arc::clone(&metrics.status))),
    ];
    if let Some(syslog) = syslog {
        let counters = crate::audit::syslog::Counters {
            sent: metrics.syslog_sent.clone(),
            dropped: metrics.syslog_dropped.clone(),
        };
        sinks.push(Box::new(crate::audit::syslog::SyslogSink::start(
            syslog, counters,
        )?));
    }
    let (log, writer) = AuditLog::start(Box::new(Tee(sinks)))?;
    Ok((log, writer, metrics))
}

/// The inspection CA of `settings`, when `[tls]` sets one.
///
/// # Errors
/// The certificate or key cannot be read or used.
pub fn load_ca(settings: &Settings) -> Result<Option<Arc<tls::ca::Ca>>, tls::ca::CaError> {
    load_ca_counted(
        settings,
        prometheus_client::metrics::counter::Counter::default(),
    )
}

/// [`load_ca`], counting the leaves it mints in `minted`.
fn load_ca_counted(
    settings: &Settings,
    minted: prometheus_client::metrics::counter::Counter,
) -> Result<Option<Arc<tls::ca::Ca>>, tls::ca::CaError> {
    match (&settings.tls.ca_cert, &settings.tls.ca_key) {
        (Some(cert), Some(key)) => Ok(Some(Arc::new(
            tls::ca::Ca::load(cert, key)?.with_mint_counter(minted),
        ))),
        _ => Ok(None),
    }
}

/// Load the TLS material `run` would load at start (the CA, the rules'
/// client certificates, extra roots), for `check`.
///
/// # Errors
/// What is wrong with it, as `check` prints it.
pub fn check_tls(settings: &Settings) -> Result<(), String> {
    let ca = load_ca(settings).map_err(|e| format!("[tls] {e}"))?;
    if let Some(syslog) = &settings.audit.syslog {
        if syslog.url.starts_with("tls://") {
            audit::syslog::tls_config(syslog)?;
        }
    }
    proxy::Guards::new(settings, ca.as_ref())
        .map(drop)
        .map_err(|e| e.to_string())
}

/// A proxy ready to serve on bound listeners.
pub struct Proxy {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    admin: Option<TcpListener>,
}

/// A handle to a running proxy: reload, counters.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Proxy {
    /// Set up shared state. Records go to `audit`.
    ///
    /// # Errors
    /// The resolver cannot be configured.
    pub fn new(
        listeners: Vec<TcpListener>,
        settings: Settings,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        let resolver = dns::Resolver::new(&settings.dns, DNS_TIMEOUT)?;
        let pipes = proxy::pipe_cap(settings.server.splice_pipes);
        let cap = proxy::connection_cap(settings.server.max_connections, pipes);
        tracing::info!(
            max_connections = cap,
            splice_pipes = pipes,
            "connection cap"
        );
        metrics.set_catalog(settings.policy.hash(), settings.policy.rules().len());
        metrics
            .status
            .set_catalog(settings.policy.hash(), settings.policy.rules().len());
        metrics.status.set_denials_kept(settings.denials_kept);
        let ca = load_ca_counted(&settings, metrics.leaves_minted.clone())?;
        let guards = proxy::Guards::new(&settings, ca.as_ref())?;
        let drain = Drain::new();
        let shared = Arc::new(Shared {
            settings: ArcSwap::from_pointee(Snapshot::new(settings, guards)),
            resolver,
            audit,
            ids: IdGen::new(),
            idler: proxy::tunnel::Idler::new(drain.hard.clone()),
            drain,
            conns: Arc::new(Semaphore::new(cap)),
            splicer: proxy::tunnel::Splicer::new(pipes, metrics.spliced.clone()),
            refusing: Arc::new(Semaphore::new(256)),
            ca,
            client_conns: Arc::default(),
            metrics,
            retired: retire::Graveyard::default(),
        });
        Ok(Proxy {
            shared,
            listeners,
            admin: None,
        })
    }

    /// Serve the admin endpoints on `listener` too.
    pub fn with_admin(mut self, listener: TcpListener) -> Self {
        self.admin = Some(listener);
        self
    }

    /// A handle for reloads and inspection.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Serve until `shutdown` resolves, then drain within `server.shutdown_grace`.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        for l in self.listeners {
            if let Ok(a) = l.local_addr() {
                tracing::info!(listen = %a, "serving");
            }
            let shared = Arc::clone(&self.shared);
            tokio::spawn(proxy::serve(l, shared));
        }
        if let Some(l) = self.admin {
            if let Ok(a) = l.local_addr() {
                tracing::info!(admin = %a, "admin endpoints");
            }
            tokio::spawn(operator::admin::serve(l, Arc::clone(&self.shared)));
        }
        let sweeper = {
            let shared = Arc::clone(&self.shared);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
                    shared.settings.load().guards.rates.sweep();
                }
            })
        };
        let nudge = tokio::spawn(nudge_allocator());
        shutdown.await;
        sweeper.abort();
        nudge.abort();
        let delay = self.shared.settings.load().server.shutdown_delay;
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: not ready, still accepting");
            self.shared.drain.leaving.cancel();
            tokio::time::sleep(delay).await;
        }
        let grace = self.shared.settings.load().server.shutdown_grace;
        tracing::info!(grace = ?grace, "shutting down: no new connections");
        self.shared.drain.drain(grace).await;
        // Everything is drained: stop the admin listener and what else waits
        // for the hard token, then let the audit writer finish.
        self.shared.drain.hard.cancel();
        self.shared.audit.close();
    }
}

/// Once a second, allocate and free one huge block that is never touched.
///
/// mimalloc returns freed memory to the OS only when a page is freed after
/// the purge delay has passed: a proxy that goes quiet after a burst (a
/// storm of aborted connections, each with a bounded but large head or body
/// buffer) would keep its peak RSS for as long as it stays quiet. Freeing a
/// huge block frees a page of its own, which runs the purges that are due.
/// Costs one untouched allocation a second (no page of it is faulted in);
/// purging at once on every free instead (`MIMALLOC_PURGE_DELAY=0`) cost 14 %
/// of the plain-HTTP request rate.
async fn nudge_allocator() {
    const HUGE: usize = 64 << 20;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        drop(std::hint::black_box(Vec::<u8>::with_capacity(HUGE)));
    }
}

impl Handle {
    /// Swap in new settings (policy, clients, DNS overrides, limits).
    /// Open tunnels and in-flight requests keep the snapshot they started with.
    /// Settings that need a restart keep their running values
    /// ([`Settings::keeping_restart_only`]): the CA above all, so a reload
    /// can neither switch inspection on (the policy would admit tunnels
    /// it relies on inspecting) nor off.
    ///
    /// # Errors
    /// A client certificate or roots file of the new settings cannot be
    /// used; nothing is swapped then.
    pub fn reload(&self, settings: Settings) -> Result<(), StartError> {
        let settings = settings.keeping_restart_only(&self.shared.settings.load());
        let guards = proxy::Guards::new(&settings, self.shared.ca.as_ref())?;
        self.shared
            .metrics
            .set_catalog(settings.policy.hash(), settings.policy.rules().len());
        let status = &self.shared.metrics.status;
        status.set_catalog(settings.policy.hash(), settings.policy.rules().len());
        status.set_denials_kept(settings.denials_kept);
        self.shared.resolver.clear_cache();
        // One swap: requests see the old snapshot or the new one, whole
        // (policy, guards and DNS overrides alike). The old one is freed
        // off the runtime ([`retire`]).
        let old = self
            .shared
            .settings
            .swap(Arc::new(Snapshot::new(settings, guards)));
        self.shared.retired.retire(old);
        Ok(())
    }

    /// The settings now in force.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.shared.settings.load().settings)
    }

    /// Ask the audit writer to reopen its file.
    pub fn reopen_audit(&self) {
        self.shared.audit.reopen();
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The audit handle (queue figures).
    pub fn audit(&self) -> &AuditLog {
        &self.shared.audit
    }

    /// Keys held by the per-client rate limiters now.
    pub fn rate_limit_keys(&self) -> usize {
        self.shared.settings.load().guards.rates.keys()
    }

    /// Sweep idle rate-limit keys now (the proxy also does it every 10 s).
    pub fn sweep_rate_limits(&self) {
        self.shared.settings.load().guards.rates.sweep();
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.drain.tracker.len()
    }
}

/// Serve `listeners` with `settings` until `shutdown` resolves.
///
/// # Errors
/// The proxy could not start.
pub async fn run(
    listeners: Vec<TcpListener>,
    settings: Settings,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    Proxy::new(listeners, settings, audit, metrics)?
        .run(shutdown)
        .await;
    Ok(())
}
