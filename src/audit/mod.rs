//! The audit record (DESIGN.md "Audit record"), its reasons, and the one writer
//! task that serialises records off the request path.
//!
//! Records are written in order and never dropped: when the writer falls
//! behind, senders wait on the bounded channel (fail closed). This module owns
//! the field names; nothing else formats a record.
//!
//! - [`record`]: the record and its ids; [`Reason`] is re-exported from
//!   [`crate::reason`].
//! - [`json`], [`squid`]: the two line formats.
//! - [`sink`]: where records go; [`writer`]: the writer thread.
//! - [`read`]: the reader of written logs (`suggest`, `replay`).
//! - [`syslog`]: the RFC 5424 copy of every record.
pub mod json;
pub mod read;
pub mod record;
pub mod sink;
pub mod squid;
pub mod syslog;
pub mod writer;

pub use crate::reason::Reason;
pub use record::{format_id, Decided, IdGen, Record};
pub use sink::{AuditSink, LineSink, MemorySink, Tee};
pub use writer::{yield_to_traffic, AuditLog, AuditWriter, HIGH_WATER, UNHEALTHY_AFTER};
