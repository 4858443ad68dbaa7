//! What the status page shows: the denied destinations, recent traffic per
//! decision and rule, uptime and the loaded catalog.
//!
//! Fed from audit records by [`StatusSink`] on the audit writer's thread (like
//! the metrics), so the request path never touches it. Memory stays bounded:
//! at most `[status] denials_kept` distinct denied destinations (the one seen
//! longest ago is evicted first, and evictions are counted), one counter per
//! decision and per rule name, and per-minute buckets for the last
//! [`RECENT_MINUTES`] minutes.
//!
//! The admin listener serves this as JSON under
//! `/api/` and as the status page at `/`.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use serde_json::{json, Value};

use crate::audit::{AuditSink, Decided, Record};
use crate::config::{DefaultAction, Settings};
use crate::reason::Reason;

/// How many one-minute buckets of recent traffic are kept.
pub const RECENT_MINUTES: usize = 15;

/// Client addresses counted per denied destination (more are counted in
/// the total only).
pub const CLIENTS_KEPT: usize = 8;

fn count_client(clients: &mut Vec<(IpAddr, u64)>, ip: IpAddr) {
    if let Some((_, n)) = clients.iter_mut().find(|(c, _)| *c == ip) {
        *n += 1;
    } else if clients.len() < CLIENTS_KEPT {
        clients.push((ip, 1));
    }
}

/// The distinct denied destinations kept unless `[status] denials_kept` says otherwise.
pub const DEFAULT_DENIALS_KEPT: usize = 1000;

const DECISIONS: [Decided; 5] = [
    Decided::Allow,
    Decided::Bypass,
    Decided::Inspect,
    Decided::Deny,
    Decided::Report,
];

fn decision_index(d: Decided) -> usize {
    match d {
        Decided::Allow => 0,
        Decided::Bypass => 1,
        Decided::Inspect => 2,
        Decided::Deny => 3,
        Decided::Report => 4,
    }
}

/// Transactions and payload bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub transactions: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Counts {
    fn add(&mut self, r: &Record) {
        self.transactions += 1;
        self.bytes_up = self.bytes_up.saturating_add(r.bytes_up);
        self.bytes_down = self.bytes_down.saturating_add(r.bytes_down);
    }

    fn merge(&mut self, o: &Counts) {
        self.transactions += o.transactions;
        self.bytes_up = self.bytes_up.saturating_add(o.bytes_up);
        self.bytes_down = self.bytes_down.saturating_add(o.bytes_down);
    }

    fn json(&self) -> Value {
        json!({
            "transactions": self.transactions,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
        })
    }
}

/// Counts per decision and per rule name (`None`: no rule decided).
#[derive(Clone, Debug, Default)]
struct Traffic {
    decisions: [Counts; 5],
    rules: HashMap<Option<Arc<str>>, Counts, foldhash::fast::RandomState>,
}

impl Traffic {
    fn add(&mut self, r: &Record) {
        self.decisions[decision_index(r.decision)].add(r);
        match self.rules.get_mut(&r.rule) {
            Some(c) => c.add(r),
            None => {
                let mut c = Counts::default();
                c.add(r);
                self.rules.insert(r.rule.clone(), c);
            }
        }
    }

    fn merge(&mut self, o: &Traffic) {
        for (a, b) in self.decisions.iter_mut().zip(&o.decisions) {
            a.merge(b);
        }
        for (k, v) in &o.rules {
            self.rules.entry(k.clone()).or_default().merge(v);
        }
    }

    fn total(&self) -> Counts {
        let mut t = Counts::default();
        for c in &self.decisions {
            t.merge(c);
        }
        t
    }

    fn json(&self) -> Value {
        let total = self.total();
        let decisions: serde_json::Map<String, Value> = DECISIONS
            .iter()
            .map(|d| {
                (
                    d.as_str().to_string(),
                    self.decisions[decision_index(*d)].json(),
                )
            })
            .collect();
        let mut rules: Vec<(&Option<Arc<str>>, &Counts)> = self.rules.iter().collect();
        rules.sort_by(|a, b| {
            b.1.transactions
                .cmp(&a.1.transactions)
                .then_with(|| a.0.cmp(b.0))
        });
        let rules: Vec<Value> = rules
            .into_iter()
            .map(|(name, c)| {
                json!({
                    "rule": name.as_deref(),
                    "transactions": c.transactions,
                    "bytes_up": c.bytes_up,
                    "bytes_down": c.bytes_down,
                })
            })
            .collect();
        json!({
            "transactions": total.transactions,
            "bytes_up": total.bytes_up,
            "bytes_down": total.bytes_down,
            "decisions": decisions,
            "rules": rules,
        })
    }
}

/// The key of the denial table: one row per (host, port, reason).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DenialKey {
    host: Box<str>,
    port: u16,
    /// None: a policy miss let through by `policy.default = "report"`.
    reason: Option<Reason>,
}

/// One denied destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub host: String,
    pub port: u16,
    /// Why it was refused; None for a policy miss let through by
    /// `policy.default = "report"` (its record carries no reason).
    pub reason: Option<Reason>,
    /// `deny`, or `report` for such a policy miss.
    pub decision: Decided,
    pub count: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub last_client: SocketAddr,
    /// Sightings per client address, for the first [`CLIENTS_KEPT`] addresses seen.
    pub clients: Vec<(IpAddr, u64)>,
    /// The rule named in the last record (a `deny` rule, say), if any.
    pub rule: Option<Arc<str>>,
    pub method: Option<String>,
}

impl Denial {
    /// `host:port`, with an IPv6 literal in brackets.
    pub fn target(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn json(&self) -> Value {
        json!({
            "host": self.host,
            "port": self.port,
            "target": self.target(),
            "reason": self.reason.map(Reason::as_str),
            "decision": self.decision.as_str(),
            "count": self.count,
            "first_seen": rfc3339(self.first_seen),
            "last_seen": rfc3339(self.last_seen),
            "last_client": self.last_client.to_string(),
            "clients": self
                .clients
                .iter()
                .map(|(ip, n)| json!({"client": ip.to_string(), "count": n}))
                .collect::<Vec<_>>(),
            "rule": self.rule.as_deref(),
            "method": self.method,
        })
    }
}

struct Entry {
    /// Position in `Table::order`: the sequence number of the last sighting.
    seq: u64,
    denial: Denial,
}

/// The bounded denial table: distinct keys, the least recently seen evicted first.
struct Table {
    cap: usize,
    map: HashMap<DenialKey, Entry>,
    /// Sequence of the last sighting -> key, oldest first.
    order: BTreeMap<u64, DenialKey>,
    seq: u64,
    evictions: u64,
}

impl Table {
    fn new(cap: usize) -> Self {
        Table {
            cap,
            map: HashMap::new(),
            order: BTreeMap::new(),
            seq: 0,
            evictions: 0,
        }
    }

    fn observe(&mut self, r: &Record, host: &str, port: u16, reason: Option<Reason>) {
        self.seq += 1;
        let seq = self.seq;
        let key = DenialKey {
            host: host.into(),
            port,
            reason,
        };
        let method = r.method.as_ref().map(|m| m.as_str().to_string());
        if let Some(e) = self.map.get_mut(&key) {
            self.order.remove(&e.seq);
            e.seq = seq;
            let d = &mut e.denial;
            d.count += 1;
            d.first_seen = d.first_seen.min(r.ts);
            d.last_seen = d.last_seen.max(r.ts);
            d.last_client = r.client;
            count_client(&mut d.clients, r.client.ip());
            d.decision = r.decision;
            if r.rule.is_some() {
                d.rule.clone_from(&r.rule);
            }
            d.method = method;
            self.order.insert(seq, key);
            return;
        }
        if self.cap == 0 {
            self.evictions += 1;
            return;
        }
        while self.map.len() >= self.cap {
            self.evict_oldest();
        }
        let denial = Denial {
            host: host.to_string(),
            port,
            reason,
            decision: r.decision,
            count: 1,
            first_seen: r.ts,
            last_seen: r.ts,
            last_client: r.client,
            clients: vec![(r.client.ip(), 1)],
            rule: r.rule.clone(),
            method,
        };
        self.order.insert(seq, key.clone());
        self.map.insert(key, Entry { seq, denial });
    }

    fn evict_oldest(&mut self) {
        if let Some((_, key)) = self.order.pop_first() {
            self.map.remove(&key);
            self.evictions += 1;
        }
    }

    fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
        while self.map.len() > cap {
            self.evict_oldest();
        }
    }

    /// Most recently seen first.
    fn newest_first(&self) -> Vec<Denial> {
        self.order
            .values()
            .rev()
            .filter_map(|k| self.map.get(k).map(|e| e.denial.clone()))
            .collect()
    }
}

struct Minute {
    /// Minutes since the Unix epoch.
    minute: u64,
    traffic: Traffic,
}

struct Inner {
    table: Table,
    total: Traffic,
    minutes: VecDeque<Minute>,
}

/// The catalog now loaded and the last reload.
#[derive(Clone, Debug)]
struct CatalogState {
    rules: usize,
    hash: u64,
    loaded_at: SystemTime,
    last_reload: Option<(bool, SystemTime)>,
    reloads_ok: u64,
    reloads_failed: u64,
}

/// The status page's state, shared by the audit writer (which feeds it) and
/// the admin listener (which reads it).
pub struct Status {
    started: Instant,
    started_at: SystemTime,
    inner: Mutex<Inner>,
    catalog: Mutex<CatalogState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn unix_minute(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// RFC 3339 UTC, whole seconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whether a record belongs in the denial table, and under which reason:
/// every refusal (`deny` with its reason), and every policy miss let through
/// by `policy.default = "report"` (no reason: a clean report record carries
/// none, and one that ended abnormally carries the upstream's).
fn destination_reason(decision: Decided, reason: Option<Reason>) -> Option<Option<Reason>> {
    match decision {
        Decided::Deny => reason.map(Some),
        Decided::Report => Some(None),
        _ => None,
    }
}

impl Status {
    /// Empty, keeping at most `denials_kept` distinct denied destinations.
    pub fn new(denials_kept: usize) -> Self {
        Status {
            started: Instant::now(),
            started_at: SystemTime::now(),
            inner: Mutex::new(Inner {
                table: Table::new(denials_kept),
                total: Traffic::default(),
                minutes: VecDeque::with_capacity(RECENT_MINUTES + 1),
            }),
            catalog: Mutex::new(CatalogState {
                rules: 0,
                hash: 0,
                loaded_at: SystemTime::now(),
                last_reload: None,
                reloads_ok: 0,
                reloads_failed: 0,
            }),
        }
    }

    /// Change the bound (`[status] denials_kept`); shrinking evicts the oldest.
    pub fn set_denials_kept(&self, n: usize) {
        lock(&self.inner).table.set_cap(n);
    }

    /// Record the catalog now in force (at start and on every reload).
    pub fn set_catalog(&self, hash: u64, rules: usize) {
        let mut c = lock(&self.catalog);
        if c.hash != hash || c.rules != rules {
            c.loaded_at = SystemTime::now();
        }
        c.hash = hash;
        c.rules = rules;
    }

    /// Record a reload attempt: `ok` when the new configuration was taken,
    /// false when it failed validation and the old one stayed.
    pub fn note_reload(&self, ok: bool) {
        let mut c = lock(&self.catalog);
        c.last_reload = Some((ok, SystemTime::now()));
        if ok {
            c.reloads_ok += 1;
        } else {
            c.reloads_failed += 1;
        }
    }

    /// Seconds since the status state was created (the proxy's start).
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Take a batch of audit records (the writer's thread).
    pub fn observe(&self, records: &[Record]) {
        self.observe_at(records, SystemTime::now());
    }

    fn observe_at(&self, records: &[Record], now: SystemTime) {
        let minute = unix_minute(now);
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        if inner.minutes.back().is_none_or(|m| m.minute != minute) {
            inner.minutes.push_back(Minute {
                minute,
                traffic: Traffic::default(),
            });
        }
        while inner
            .minutes
            .front()
            .is_some_and(|m| m.minute + (RECENT_MINUTES as u64) <= minute)
        {
            inner.minutes.pop_front();
        }
        for r in records {
            inner.total.add(r);
            if let Some(m) = inner.minutes.back_mut() {
                m.traffic.add(r);
            }
            if let (Some(reason), Some(host), Some(port)) = (
                destination_reason(r.decision, r.reason),
                r.host.as_deref(),
                r.port,
            ) {
                inner.table.observe(r, host, port, reason);
            }
        }
    }

    /// The denied destinations, most recently seen first, and the evictions so far.
    pub fn denials(&self) -> (Vec<Denial>, u64) {
        let inner = lock(&self.inner);
        (inner.table.newest_first(), inner.table.evictions)
    }

    /// `/api/denials`.
    pub fn denials_json(&self) -> Value {
        let inner = lock(&self.inner);
        let list: Vec<Value> = inner
            .table
            .newest_first()
            .iter()
            .map(Denial::json)
            .collect();
        json!({
            "kept": inner.table.cap,
            "distinct": list.len(),
            "evictions": inner.table.evictions,
            "denials": list,
        })
    }

    /// `/api/summary`; `settings` is the snapshot in force.
    pub fn summary_json(&self, settings: &Settings) -> Value {
        self.summary_at(settings, SystemTime::now())
    }

    fn summary_at(&self, settings: &Settings, now: SystemTime) -> Value {
        let this_minute = unix_minute(now);
        let first = this_minute.saturating_sub(RECENT_MINUTES as u64 - 1);
        let (total, recent, per_minute, table) = {
            let inner = lock(&self.inner);
            let mut recent = Traffic::default();
            let mut per_minute = Vec::with_capacity(RECENT_MINUTES);
            for m in first..=this_minute {
                let found = inner.minutes.iter().find(|b| b.minute == m);
                let (c, denied) = match found {
                    Some(b) => {
                        recent.merge(&b.traffic);
                        (
                            b.traffic.total(),
                            b.traffic.decisions[decision_index(Decided::Deny)].transactions,
                        )
                    }
                    None => (Counts::default(), 0),
                };
                per_minute.push(json!({
                    "start": rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(m * 60)),
                    "transactions": c.transactions,
                    "denied": denied,
                    "bytes_up": c.bytes_up,
                    "bytes_down": c.bytes_down,
                }));
            }
            let table = json!({
                "kept": inner.table.cap,
                "distinct": inner.table.map.len(),
                "evictions": inner.table.evictions,
            });
            (inner.total.json(), recent, per_minute, table)
        };
        let mut recent = recent.json();
        if let Some(o) = recent.as_object_mut() {
            o.insert("minutes".into(), json!(RECENT_MINUTES));
            o.insert("per_minute".into(), Value::Array(per_minute));
        }
        let c = lock(&self.catalog).clone();
        let source = settings
            .policy_settings
            .catalog
            .as_ref()
            .map_or_else(|| "built-in".to_string(), |p| p.display().to_string());
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "now": rfc3339(now),
            "started": rfc3339(self.started_at),
            "uptime_s": self.uptime_s(),
            "catalog": {
                "rules": c.rules,
                "hash": format!("{:016x}", c.hash),
                "source": source,
                "default": match settings.policy.default_action() {
                    DefaultAction::Deny => "deny",
                    DefaultAction::Report => "report",
                },
                "inspection": settings.policy.inspection_enabled(),
                "loaded_at": rfc3339(c.loaded_at),
                "last_reload": c.last_reload.map(|(ok, at)| json!({"ok": ok, "at": rfc3339(at)})),
                "reloads": {"ok": c.reloads_ok, "failed": c.reloads_failed},
            },
            "totals": total,
            "recent": recent,
            "denials": table,
        })
    }
}

impl Default for Status {
    fn default() -> Self {
        Status::new(DEFAULT_DENIALS_KEPT)
    }
}

/// The audit sink that feeds [`Status`] (on the writer thread).
pub struct StatusSink(pub Arc<Status>);

impl AuditSink for StatusSink {
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        self.0.observe(records);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
