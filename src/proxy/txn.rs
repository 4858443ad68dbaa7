//! One transaction's audit record from start to end. The record is sent
//! exactly once: by [`Txn::finish`], or on drop (a client that vanished, or
//! a task cut at shutdown).
//!
//! A transaction with a request body ends when both the transaction and
//! the body going upstream have: `bytes_up` is read from the body's shared
//! counter ([`UpCount`]) then, so whichever path ends the record (answer,
//! refusal, client gone, upstream reset, time-out, shutdown) records what
//! really went upstream, never a count taken before the body was done.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use super::body::UpCount;
use crate::audit::{AuditLog, Decided, Record};
use crate::reason::{Class, Reason};
use crate::target::{Host, Target};

/// An open transaction.
pub struct Txn {
    /// Boxed: a transaction moves through several futures and bodies, and
    /// the record is boxed to be queued anyway.
    rec: Option<Box<Record>>,
    start: Instant,
    audit: AuditLog,
    hard: CancellationToken,
    /// The request body's counter, once one is going upstream.
    upload: Option<Arc<UpCount>>,
}

/// A record whose transaction has ended, ready to send once the request
/// body (if any) is done too.
pub struct Ended {
    rec: Box<Record>,
    start: Instant,
    audit: AuditLog,
}

impl Ended {
    /// Send the record with `bytes_up` more bytes sent upstream.
    pub fn send(mut self, bytes_up: u64) {
        self.rec.bytes_up += bytes_up;
        self.rec.duration_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.audit.send_boxed(self.rec);
    }
}

impl Txn {
    pub fn new(audit: AuditLog, hard: CancellationToken, id: u64, client: SocketAddr) -> Self {
        Txn {
            rec: Some(Box::new(Record::new(id, client, SystemTime::now()))),
            start: Instant::now(),
            audit,
            hard,
            upload: None,
        }
    }

    /// Count the request body going upstream through `up` (see the module
    /// docs): the record waits for that body to be done.
    pub fn count_upload(&mut self, up: Arc<UpCount>) {
        self.upload = Some(up);
    }

    pub fn id(&self) -> u64 {
        self.rec.as_ref().map_or(0, |r| r.id)
    }

    /// The record being filled.
    pub fn rec(&mut self) -> &mut Record {
        // `rec` is only None after finish, which consumes self.
        self.rec.get_or_insert_with(|| {
            Box::new(Record::new(
                0,
                SocketAddr::from(([0, 0, 0, 0], 0)),
                SystemTime::now(),
            ))
        })
    }

    pub fn set_target(&mut self, t: &Target) {
        let r = self.rec();
        r.host = Some(match &t.host {
            Host::Name(n) => n.to_string(),
            Host::Ip(ip) => ip.to_string(),
        });
        r.port = Some(t.port);
    }

    pub fn set_rule(&mut self, name: Option<Arc<str>>) {
        self.rec().rule = name;
    }

    pub fn set_decision(&mut self, d: Decided) {
        self.rec().decision = d;
    }

    pub fn add_up(&mut self, n: u64) {
        self.rec().bytes_up += n;
    }

    pub fn add_down(&mut self, n: u64) {
        self.rec().bytes_down += n;
    }

    /// End the transaction with `status` and, if abnormal, `reason`.
    pub fn finish(mut self, status: Option<u16>, reason: Option<Reason>) {
        if let Some(mut rec) = self.rec.take() {
            rec.status = status.or(rec.status);
            rec.reason = reason.or(rec.reason);
            self.emit(rec);
        }
    }

    /// End a refused transaction with its status and reason. Policy and
    /// client refusals record `deny`; an upstream failure (DNS, connect,
    /// reset, time-out) keeps the policy's decision, so the record says both
    /// what was allowed and why it still failed.
    pub fn refuse(mut self, status: u16, reason: Reason) {
        if let Some(mut rec) = self.rec.take() {
            if reason.class() != Class::Failure {
                rec.decision = Decided::Deny;
            }
            rec.status = Some(status);
            rec.reason = Some(reason);
            self.emit(rec);
        }
    }

    fn emit(&mut self, rec: Box<Record>) {
        let ended = Ended {
            rec,
            start: self.start,
            audit: self.audit.clone(),
        };
        match self.upload.take() {
            Some(up) => up.end_txn(ended),
            None => ended.send(0),
        }
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            if rec.reason.is_none() {
                rec.reason = Some(if self.hard.is_cancelled() {
                    Reason::Shutdown
                } else {
                    Reason::ClientClosed
                });
            }
            self.emit(rec);
        }
    }
}
