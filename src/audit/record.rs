//! The audit record (DESIGN.md "Audit record"): its fields, its `decision`,
//! and the ids that name it in refusal bodies.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use crate::reason::Reason;

/// The `decision` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decided {
    Allow,
    Bypass,
    Inspect,
    Deny,
    Report,
}

impl Decided {
    pub const fn as_str(self) -> &'static str {
        match self {
            Decided::Allow => "allow",
            Decided::Bypass => "bypass",
            Decided::Inspect => "inspect",
            Decided::Deny => "deny",
            Decided::Report => "report",
        }
    }
}

/// One audit record (DESIGN.md "Audit record"). Absent values are `None` and
/// are left out of the JSON, never written as empty strings.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub ts: SystemTime,
    pub id: u64,
    pub client: SocketAddr,
    pub user: Option<Arc<str>>,
    /// The client's groups (`[clients.groups]`), comma-separated; absent
    /// when it is in none.
    pub client_group: Option<Arc<str>>,
    pub method: Option<http::Method>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub url: Option<String>,
    pub decision: Decided,
    pub rule: Option<Arc<str>>,
    pub reason: Option<Reason>,
    pub upstream: Option<SocketAddr>,
    /// The parent proxy's status for this transaction's CONNECT (or its
    /// refusal of a plain request), when it went through a parent.
    pub parent_status: Option<u16>,
    pub sni: Option<String>,
    pub ech: bool,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

impl Record {
    /// A record with only the start fields set; the rest is filled as the
    /// transaction goes.
    pub fn new(id: u64, client: SocketAddr, ts: SystemTime) -> Self {
        Record {
            ts,
            id,
            client,
            user: None,
            client_group: None,
            method: None,
            host: None,
            port: None,
            url: None,
            decision: Decided::Deny,
            rule: None,
            reason: None,
            upstream: None,
            parent_status: None,
            sni: None,
            ech: false,
            status: None,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
        }
    }

    /// The `id` as written in records and refusal bodies.
    pub fn id_string(&self) -> String {
        format_id(self.id)
    }
}

/// Format a record id: 16 lower-case hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Ids unique within a process and, with a random prefix, across restarts.
pub struct IdGen {
    prefix: u64,
    next: AtomicU64,
}

impl IdGen {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        IdGen {
            prefix: h.finish() << 32,
            next: AtomicU64::new(1),
        }
    }

    /// The upper half every id of this process shares (8 hex digits as
    /// written), for the connection spans of the log.
    pub fn prefix(&self) -> u32 {
        (self.prefix >> 32) as u32
    }

    pub fn next(&self) -> u64 {
        self.prefix ^ self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen::new()
    }
}
