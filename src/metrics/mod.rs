//! Prometheus metrics (OpenMetrics text on the admin listener).
//!
//! Per-transaction counters are fed from audit records by [`MetricsSink`] on
//! the audit writer's thread, so the request path never looks up a labelled
//! metric or takes a lock for them; the request path only touches plain
//! atomic gauges and the two dial-time histograms. Labels are a small fixed
//! set (decision, rule name, reason, result), never a raw host.
pub mod status;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::audit::{AuditLog, AuditSink, Record};

/// Labels of the transaction counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TxnLabels {
    pub decision: &'static str,
    pub rule: String,
    pub reason: &'static str,
}

/// Labels of the per-rule byte counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
}

/// Labels of the reload counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Labels of the route counter: `direct` or `parent`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

/// Labels of the catalog info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CatalogLabels {
    pub hash: String,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    pub transactions: Family<TxnLabels, Counter>,
    pub bytes_up: Family<RuleLabels, Counter>,
    pub bytes_down: Family<RuleLabels, Counter>,
    pub open_connections: Gauge,
    pub open_tunnels: Gauge,
    pub dns_seconds: Histogram,
    pub connect_seconds: Histogram,
    /// Upstream dials by route (`direct`, `parent`).
    pub routes: Family<RouteLabels, Counter>,
    /// The two series of `routes`, made once: the request path counts with
    /// an atomic add, never a labelled lookup.
    route_direct: Counter,
    route_parent: Counter,
    pub reloads: Family<ResultLabels, Counter>,
    pub catalog: Family<CatalogLabels, Gauge>,
    pub catalog_rules: Gauge,
    pub connection_limit: Counter,
    /// Tunnel directions that moved on to splice(2).
    pub spliced: Counter,
    /// Leaf certificates minted for inspected tunnels (leaf cache misses).
    pub leaves_minted: Counter,
    /// Inspected tunnels that took an upstream connection kept from an
    /// earlier tunnel (no dial, no upstream handshake).
    pub upstream_reused: Counter,
    pub audit_written: Counter,
    pub audit_queued: Gauge,
    pub audit_waits: Counter,
    audit_waits_seen: AtomicU64,
    /// Failed audit write attempts (a full disk, say; each retry counts).
    pub audit_write_errors: Counter,
    audit_write_errors_seen: AtomicU64,
    /// Syslog messages handed to the socket (`audit.syslog`).
    pub syslog_sent: Counter,
    /// Syslog messages dropped: queue full or server unreachable.
    pub syslog_dropped: Counter,
    /// The status page's state, fed from the same records (see [`status`]).
    pub status: Arc<status::Status>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics::unregistered();
        m.registry = Registry::with_prefix("egress");
        m.register_traffic();
        m.register_catalog();
        m.register_audit();
        m.registry.register(
            "build",
            "The running build: version and git commit",
            prometheus_client::metrics::info::Info::new(vec![
                ("version", crate::VERSION),
                ("commit", crate::COMMIT),
            ]),
        );
        m
    }

    /// Every metric at zero, in a registry that names none of them.
    fn unregistered() -> Self {
        let routes: Family<RouteLabels, Counter> = Family::default();
        let route_direct = routes
            .get_or_create(&RouteLabels { route: "direct" })
            .clone();
        let route_parent = routes
            .get_or_create(&RouteLabels { route: "parent" })
            .clone();
        Metrics {
            transactions: Family::default(),
            bytes_up: Family::default(),
            bytes_down: Family::default(),
            open_connections: Gauge::default(),
            open_tunnels: Gauge::default(),
            dns_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            connect_seconds: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            routes,
            route_direct,
            route_parent,
            reloads: Family::default(),
            catalog: Family::default(),
            catalog_rules: Gauge::default(),
            connection_limit: Counter::default(),
            spliced: Counter::default(),
            leaves_minted: Counter::default(),
            upstream_reused: Counter::default(),
            audit_written: Counter::default(),
            audit_queued: Gauge::default(),
            audit_waits: Counter::default(),
            audit_waits_seen: AtomicU64::new(0),
            audit_write_errors: Counter::default(),
            audit_write_errors_seen: AtomicU64::new(0),
            syslog_sent: Counter::default(),
            syslog_dropped: Counter::default(),
            status: Arc::default(),
            registry: Registry::default(),
        }
    }

    /// The per-transaction counters, gauges and dial latencies.
    fn register_traffic(&mut self) {
        self.registry.register(
            "transactions",
            "Transactions by decision, rule and reason",
            self.transactions.clone(),
        );
        self.registry.register_with_unit(
            "rule_up",
            "Payload bytes client to upstream by rule",
            Unit::Bytes,
            self.bytes_up.clone(),
        );
        self.registry.register_with_unit(
            "rule_down",
            "Payload bytes upstream to client by rule",
            Unit::Bytes,
            self.bytes_down.clone(),
        );
        self.registry.register(
            "open_connections",
            "Client connections open now",
            self.open_connections.clone(),
        );
        self.registry.register(
            "open_tunnels",
            "CONNECT tunnels open now",
            self.open_tunnels.clone(),
        );
        self.registry.register_with_unit(
            "dns_lookup",
            "DNS lookup latency",
            Unit::Seconds,
            self.dns_seconds.clone(),
        );
        self.registry.register_with_unit(
            "upstream_connect",
            "Upstream TCP connect latency",
            Unit::Seconds,
            self.connect_seconds.clone(),
        );
        self.registry.register(
            "upstream_routes",
            "Transactions sent upstream by route (direct, or through the parent proxy)",
            self.routes.clone(),
        );
    }

    /// Reloads, the catalog and the connection and splice counters.
    fn register_catalog(&mut self) {
        self.registry.register(
            "reloads",
            "Configuration reloads by result",
            self.reloads.clone(),
        );
        self.registry.register(
            "catalog_info",
            "The loaded catalog (hash label; value 1)",
            self.catalog.clone(),
        );
        self.registry.register(
            "catalog_rules",
            "Rules in the loaded catalog",
            self.catalog_rules.clone(),
        );
        self.registry.register(
            "connection_limit_refusals",
            "Connections refused at the connection cap",
            self.connection_limit.clone(),
        );
        self.registry.register(
            "tunnel_splices",
            "Tunnel directions that moved on to splice(2) after their bulk threshold",
            self.spliced.clone(),
        );
        self.registry.register(
            "tls_leaves_minted",
            "Leaf certificates minted for inspected tunnels (leaf cache misses)",
            self.leaves_minted.clone(),
        );
        self.registry.register(
            "tls_upstream_reused",
            "Inspected tunnels that took an upstream connection kept from an earlier tunnel",
            self.upstream_reused.clone(),
        );
    }

    /// The audit writer and syslog counters.
    fn register_audit(&mut self) {
        self.registry.register(
            "audit_records",
            "Audit records written",
            self.audit_written.clone(),
        );
        self.registry.register(
            "audit_queue",
            "Audit records queued, not yet written",
            self.audit_queued.clone(),
        );
        self.registry.register(
            "audit_backpressure_waits",
            "Transactions that waited for the audit writer",
            self.audit_waits.clone(),
        );
        self.registry.register(
            "audit_write_errors",
            "Failed audit write attempts (each retry counts); records are kept and retried",
            self.audit_write_errors.clone(),
        );
        self.registry.register(
            "syslog_sent",
            "Audit messages sent to audit.syslog",
            self.syslog_sent.clone(),
        );
        self.registry.register(
            "syslog_dropped",
            "Audit messages for audit.syslog dropped (queue full or server unreachable)",
            self.syslog_dropped.clone(),
        );
    }

    /// Count one transaction sent upstream, through the parent or not.
    pub fn route(&self, parent: bool) {
        if parent {
            self.route_parent.inc();
        } else {
            self.route_direct.inc();
        }
    }

    /// Record that a catalog is loaded.
    pub fn set_catalog(&self, hash: u64, rules: usize) {
        self.catalog.clear();
        self.catalog
            .get_or_create(&CatalogLabels {
                hash: format!("{hash:016x}"),
            })
            .set(1);
        self.catalog_rules
            .set(i64::try_from(rules).unwrap_or(i64::MAX));
    }

    /// OpenMetrics text, with the audit writer's figures brought up to date.
    pub fn encode(&self, audit: &AuditLog) -> String {
        self.audit_queued
            .set(i64::try_from(audit.queued()).unwrap_or(i64::MAX));
        let waits = audit.waits();
        let seen = self.audit_waits_seen.swap(waits, Ordering::Relaxed);
        self.audit_waits.inc_by(waits.saturating_sub(seen));
        let errors = audit.write_errors();
        let seen = self.audit_write_errors_seen.swap(errors, Ordering::Relaxed);
        self.audit_write_errors.inc_by(errors.saturating_sub(seen));
        let mut out = String::with_capacity(8192);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Count a reload attempt and show it on the status page.
    pub fn note_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.status.note_reload(ok);
    }

    /// The counters for a record's labels, found in the families (a lock
    /// and a hash each) and kept by [`MetricsSink`].
    fn counters(&self, r: &Record) -> Counters {
        Counters {
            transactions: self
                .transactions
                .get_or_create(&TxnLabels {
                    decision: r.decision.as_str(),
                    rule: r.rule.as_deref().unwrap_or("").to_string(),
                    reason: r.reason.map_or("", |x| x.as_str()),
                })
                .clone(),
            bytes: None,
        }
    }

    fn byte_counters(&self, r: &Record) -> (Counter, Counter) {
        let labels = RuleLabels {
            rule: r.rule.as_deref().unwrap_or("").to_string(),
        };
        (
            self.bytes_up.get_or_create(&labels).clone(),
            self.bytes_down.get_or_create(&labels).clone(),
        )
    }
}

/// What one (decision, rule, reason) counts into.
struct Counters {
    transactions: Counter,
    /// Up and down bytes of the rule; made on its first record with bytes,
    /// so a rule that never moved a byte has no byte series.
    bytes: Option<(Counter, Counter)>,
}

type CountersKey = (&'static str, Option<Arc<str>>, &'static str);

/// Past this many label sets the cache starts over (rules come from the
/// catalog, so this is only reached across many reloads).
const COUNTERS_KEPT: usize = 4096;

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The audit sink that turns records into counters (on the writer thread).
///
/// The counters of each (decision, rule, reason) are looked up in their
/// families once and kept, so a record costs one foldhash lookup and a few
/// atomic adds, not three locked SipHash lookups and two allocations.
pub struct MetricsSink {
    metrics: Arc<Metrics>,
    kept: HashMap<CountersKey, Counters, foldhash::fast::RandomState>,
}

impl MetricsSink {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsSink {
            metrics,
            kept: HashMap::default(),
        }
    }

    fn observe(&mut self, r: &Record) {
        let key: CountersKey = (
            r.decision.as_str(),
            r.rule.clone(),
            r.reason.map_or("", |x| x.as_str()),
        );
        if self.kept.len() >= COUNTERS_KEPT && !self.kept.contains_key(&key) {
            self.kept.clear();
        }
        let metrics = &self.metrics;
        let c = self.kept.entry(key).or_insert_with(|| metrics.counters(r));
        c.transactions.inc();
        if r.bytes_up > 0 || r.bytes_down > 0 {
            let (up, down) = c.bytes.get_or_insert_with(|| metrics.byte_counters(r));
            up.inc_by(r.bytes_up);
            down.inc_by(r.bytes_down);
        }
        metrics.audit_written.inc();
    }
}

impl AuditSink for MetricsSink {
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        for r in records {
            self.observe(r);
        }
        Ok(())
    }
}

/// Decrements a gauge when dropped (open connections, open tunnels).
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    pub fn new(g: &Gauge) -> Self {
        g.inc();
        GaugeGuard(g.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
