//! The audit record (DESIGN.md "Audit record"), its reasons, and the one writer
//! task that serialises records off the request path.
//!
//! Records are written in order and never dropped: when the writer falls
//! behind, senders wait on the bounded channel (fail closed). This module owns
//! the field names; nothing else formats a record.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use crate::config::{AuditFormat, AuditPath};
pub use crate::reason::Reason;

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
    pub method: Option<http::Method>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub url: Option<String>,
    pub decision: Decided,
    pub rule: Option<Arc<str>>,
    pub reason: Option<Reason>,
    pub upstream: Option<SocketAddr>,
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
            method: None,
            host: None,
            port: None,
            url: None,
            decision: Decided::Deny,
            rule: None,
            reason: None,
            upstream: None,
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

impl Record {
    /// Append the record as one JSON object (no newline) to `out`.
    ///
    /// The same fields and order as the `Serialize` impl, written without
    /// intermediate strings: this runs once per transaction on the writer.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Byte pushes and itoa, not `write!`: the formatting machinery was
        // the largest single cost of a proxied request (callgrind).
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b"{\"ts\":\"");
        write_rfc3339_millis(out, self.ts);
        out.extend_from_slice(b"\",\"id\":\"");
        write_hex16(out, self.id);
        out.extend_from_slice(b"\",\"client\":\"");
        write_addr(out, self.client);
        out.push(b'"');
        let text = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            // serde_json escapes; writing to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, v);
        };
        let word = |out: &mut Vec<u8>, key: &str, v: &str| {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":\"");
            out.extend_from_slice(v.as_bytes());
            out.push(b'"');
        };
        if let Some(u) = &self.user {
            text(out, "user", u);
        }
        if let Some(m) = &self.method {
            text(out, "method", m.as_str());
        }
        if let Some(h) = &self.host {
            text(out, "host", h);
        }
        if let Some(p) = self.port {
            out.extend_from_slice(b",\"port\":");
            out.extend_from_slice(num.format(p).as_bytes());
        }
        if let Some(u) = &self.url {
            text(out, "url", u);
        }
        word(out, "decision", self.decision.as_str());
        if let Some(r) = &self.rule {
            text(out, "rule", r);
        }
        if let Some(r) = self.reason {
            word(out, "reason", r.as_str());
        }
        if let Some(u) = self.upstream {
            out.extend_from_slice(b",\"upstream\":\"");
            write_addr(out, u);
            out.push(b'"');
        }
        if let Some(sni) = &self.sni {
            text(out, "sni", sni);
        }
        if self.ech {
            out.extend_from_slice(b",\"ech\":true");
        }
        if let Some(st) = self.status {
            out.extend_from_slice(b",\"status\":");
            out.extend_from_slice(num.format(st).as_bytes());
        }
        out.extend_from_slice(b",\"bytes_up\":");
        out.extend_from_slice(num.format(self.bytes_up).as_bytes());
        out.extend_from_slice(b",\"bytes_down\":");
        out.extend_from_slice(num.format(self.bytes_down).as_bytes());
        out.extend_from_slice(b",\"duration_ms\":");
        out.extend_from_slice(num.format(self.duration_ms).as_bytes());
        out.push(b'}');
    }
}

/// Append `id` as 16 lower-case hex digits (as [`format_id`]).
fn write_hex16(out: &mut Vec<u8>, id: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(HEX[((id >> (shift * 4)) & 0xf) as usize]);
    }
}

/// Append a socket address as `Display` writes it; IPv4 without the
/// formatting machinery, IPv6 (rare here) through it.
fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    let mut num = itoa::Buffer::new();
    match addr {
        SocketAddr::V4(a) => {
            let [a1, a2, a3, a4] = a.ip().octets();
            out.extend_from_slice(num.format(a1).as_bytes());
            for o in [a2, a3, a4] {
                out.push(b'.');
                out.extend_from_slice(num.format(o).as_bytes());
            }
        }
        SocketAddr::V6(_) => {
            use std::io::Write as _;
            let _ = write!(out, "{addr}");
            return;
        }
    }
    out.push(b':');
    out.extend_from_slice(num.format(addr.port()).as_bytes());
}

/// Append `ts` as RFC 3339 UTC with milliseconds
/// (`2026-01-02T03:04:05.678Z`), as `humantime::format_rfc3339_millis`
/// writes it, for times from 1970 to 9999.
fn write_rfc3339_millis(out: &mut Vec<u8>, ts: SystemTime) {
    let since = ts
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let millis = since.subsec_millis();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let two = |out: &mut Vec<u8>, v: u64| {
        out.push(b'0' + (v / 10 % 10) as u8);
        out.push(b'0' + (v % 10) as u8);
    };
    let y = u64::try_from(y).unwrap_or(0);
    two(out, y / 100);
    two(out, y % 100);
    out.push(b'-');
    two(out, u64::from(m));
    out.push(b'-');
    two(out, u64::from(d));
    out.push(b'T');
    two(out, rem / 3600);
    out.push(b':');
    two(out, rem / 60 % 60);
    out.push(b':');
    two(out, rem % 60);
    out.push(b'.');
    let ms = u64::from(millis);
    out.push(b'0' + (ms / 100) as u8);
    two(out, ms % 100);
    out.push(b'Z');
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Lower the calling thread's priority (nice 10), so that on a busy core
/// a connection woken by the network preempts the writer instead of waiting
/// for its batch: records cost no request latency. The writer still gets
/// every idle moment, and back-pressure (a full queue makes transactions
/// wait) gives it the core when records pile up, so none is lost.
pub fn yield_to_traffic() {
    let tid = rustix::thread::gettid();
    // Never raise it: a proxy started under `nice 15` keeps its writer there.
    let now = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    if let Err(e) = rustix::process::setpriority_process(Some(tid), now.max(WRITER_NICE)) {
        tracing::debug!(error = %e, "could not lower the writer's priority");
    }
}

/// The audit writer's nice value (see [`yield_to_traffic`]).
const WRITER_NICE: i32 = 10;

/// Format a record id: 16 lower-case hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("ts", &humantime::format_rfc3339_millis(self.ts).to_string())?;
        m.serialize_entry("id", &format_id(self.id))?;
        m.serialize_entry("client", &self.client.to_string())?;
        if let Some(u) = &self.user {
            m.serialize_entry("user", u.as_ref())?;
        }
        if let Some(v) = &self.method {
            m.serialize_entry("method", v.as_str())?;
        }
        if let Some(v) = &self.host {
            m.serialize_entry("host", v)?;
        }
        if let Some(v) = self.port {
            m.serialize_entry("port", &v)?;
        }
        if let Some(v) = &self.url {
            m.serialize_entry("url", v)?;
        }
        m.serialize_entry("decision", self.decision.as_str())?;
        if let Some(v) = &self.rule {
            m.serialize_entry("rule", v.as_ref())?;
        }
        if let Some(v) = self.reason {
            m.serialize_entry("reason", v.as_str())?;
        }
        if let Some(v) = self.upstream {
            m.serialize_entry("upstream", &v.to_string())?;
        }
        if let Some(v) = &self.sni {
            m.serialize_entry("sni", v)?;
        }
        if self.ech {
            m.serialize_entry("ech", &true)?;
        }
        if let Some(v) = self.status {
            m.serialize_entry("status", &v)?;
        }
        m.serialize_entry("bytes_up", &self.bytes_up)?;
        m.serialize_entry("bytes_down", &self.bytes_down)?;
        m.serialize_entry("duration_ms", &self.duration_ms)?;
        m.end()
    }
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

    pub fn next(&self) -> u64 {
        self.prefix ^ self.next.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen::new()
    }
}

// === the sink and the writer ===

/// Where serialised records go. The writer calls it from its own thread.
///
/// Each batch is handed over exactly once: a sink that fails keeps what it
/// has not written yet and finishes it in [`AuditSink::resume`], so a
/// record is never written twice (a batch rewritten from its start after a
/// partial write duplicated records) and never half.
pub trait AuditSink: Send + 'static {
    /// Take a batch of records, in order, and write it.
    ///
    /// # Errors
    /// An I/O error. The sink has kept the part it did not write; the writer
    /// logs the error and calls [`AuditSink::resume`] until it succeeds.
    fn write(&mut self, records: &[Record]) -> io::Result<()>;
    /// Write what a failed [`AuditSink::write`] or `resume` kept. Default:
    /// nothing is ever kept.
    ///
    /// # Errors
    /// An I/O error; the rest stays kept for the next call.
    fn resume(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Reopen the destination (log rotation). Default: nothing to do.
    ///
    /// # Errors
    /// An I/O error opening the new file.
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// JSON-lines (or Squid) text to stdout, a file, or any [`Write`].
///
/// A batch is serialised into one buffer and written with plain `write`
/// calls that track how far they got: after a short write and an error
/// (a full disk), [`AuditSink::resume`] goes on from the first unwritten
/// byte, so the file ends up with every line once and none torn.
pub struct LineSink {
    /// Where [`AuditSink::reopen`] reopens; `None` for an injected writer.
    path: Option<AuditPath>,
    format: AuditFormat,
    out: Box<dyn Write + Send>,
    /// Serialised lines not yet accepted by `out`, from `done` on.
    pending: Vec<u8>,
    done: usize,
}

/// Past this, the batch buffer is shrunk after use: one batch of long URLs
/// must not pin megabytes for the life of the process.
const PENDING_KEPT: usize = 4 << 20;

impl LineSink {
    /// Open the destination.
    ///
    /// # Errors
    /// The file cannot be opened for appending.
    pub fn open(path: AuditPath, format: AuditFormat) -> io::Result<Self> {
        let out = open_out(&path)?;
        Ok(LineSink {
            path: Some(path),
            ..LineSink::from_writer(out, format)
        })
    }

    /// Write lines to `out` (the seam tests use to play a full disk).
    /// [`AuditSink::reopen`] keeps `out`.
    pub fn from_writer(out: Box<dyn Write + Send>, format: AuditFormat) -> Self {
        LineSink {
            path: None,
            format,
            out,
            pending: Vec::with_capacity(64 * 1024),
            done: 0,
        }
    }

    /// Write `pending[done..]`, advancing `done` by what each call took.
    fn drain(&mut self) -> io::Result<()> {
        while self.done < self.pending.len() {
            match self.out.write(&self.pending[self.done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Stdout buffers; a file does not (the batch is already one write).
        self.out.flush()?;
        self.pending.clear();
        self.done = 0;
        if self.pending.capacity() > PENDING_KEPT {
            self.pending.shrink_to(64 * 1024);
        }
        Ok(())
    }
}

fn open_out(path: &AuditPath) -> io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        AuditPath::Stdout => Box::new(io::stdout()),
        AuditPath::File(p) => Box::new(open_append(p)?),
    })
}

fn open_append(p: &PathBuf) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
}

impl AuditSink for LineSink {
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        // Appended after anything still pending, so order holds even if a
        // caller skips `resume`.
        for r in records {
            match self.format {
                AuditFormat::Json => r.write_json(&mut self.pending),
                // Writing into a Vec cannot fail.
                AuditFormat::Squid => {
                    let _ = squid_line(&mut self.pending, r);
                }
            }
            self.pending.push(b'\n');
        }
        self.drain()
    }

    fn resume(&mut self) -> io::Result<()> {
        self.drain()
    }

    fn reopen(&mut self) -> io::Result<()> {
        if self.path.is_none() {
            return Ok(());
        }
        // Finish a torn line in the old file first: half a line in each
        // file would be two broken records. Failing, keep the old file.
        self.drain()?;
        if let Some(path) = &self.path {
            self.out = open_out(path)?;
        }
        Ok(())
    }
}

/// Squid's native access.log line (`logformat squid`, Squid 4 and later):
/// `time elapsed client code/status bytes method URL user hierarchy/peer type`,
/// that is `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
///
/// As in Squid, `time` is when the transaction ended (the record's `ts`
/// plus `duration_ms`), `bytes` is what was sent to the client (here the
/// body or payload bytes, `bytes_down`, without headers), and a missing
/// status is `000`. Fields that could hold a space are percent-escaped so
/// every line splits into exactly ten fields. README "Audit formats" gives
/// the mapping both ways.
fn squid_line(out: &mut Vec<u8>, r: &Record) -> io::Result<()> {
    let end =
        r.ts.checked_add(std::time::Duration::from_millis(r.duration_ms))
            .unwrap_or(r.ts)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
    let tag = squid_tag(r);
    // Squid's error suffixes mark a transfer that ended badly; a request
    // refused or never processed has none.
    let suffix = match tag {
        "TCP_MISS" | "TCP_TUNNEL" => squid_suffix(r.reason),
        _ => "",
    };
    write!(
        out,
        "{}.{:03} {:>6} {} {}{}/{:03} {} {} ",
        end.as_secs(),
        end.subsec_millis(),
        r.duration_ms,
        r.client.ip(),
        tag,
        suffix,
        r.status.unwrap_or(0),
        r.bytes_down,
        r.method.as_ref().map_or("-", http::Method::as_str),
    )?;
    match (&r.url, &r.host, r.port) {
        (Some(u), _, _) => squid_field(out, u),
        (None, Some(h), Some(p)) if h.contains(':') => {
            out.push(b'[');
            squid_field(out, h);
            write!(out, "]:{p}")?;
        }
        (None, Some(h), Some(p)) => {
            squid_field(out, h);
            write!(out, ":{p}")?;
        }
        (None, Some(h), None) => squid_field(out, h),
        _ => out.push(b'-'),
    }
    out.push(b' ');
    match r.user.as_deref() {
        Some(u) if !u.is_empty() => squid_field(out, u),
        _ => out.push(b'-'),
    }
    match r.upstream {
        Some(a) => write!(out, " HIER_DIRECT/{} -", a.ip()),
        None => write!(out, " HIER_NONE/- -"),
    }
}

/// The result tag (`%Ss` without its suffix), from Squid's own set:
/// `TCP_DENIED` for a refusal by policy, client ACL, authentication or rate
/// limit (and for a tunnel closed by the SNI/ECH check); `NONE_NONE` for a
/// request that was never processed (unparsable or oversized head, the
/// connection cap, shutdown, a client that sent no request); `TCP_TUNNEL`
/// for any other CONNECT; `TCP_MISS` for any other request (forwarded, or
/// failed upstream: the status tells which).
fn squid_tag(r: &Record) -> &'static str {
    let connect = r.method.as_ref() == Some(&http::Method::CONNECT);
    if r.decision != Decided::Deny {
        return if connect { "TCP_TUNNEL" } else { "TCP_MISS" };
    }
    match r.reason {
        // A tunnel refused after its 200: the SNI/ECH check, or a malformed hello.
        Some(_) if connect && r.status == Some(200) => "TCP_DENIED",
        Some(reason) if reason.class().is_denial() => "TCP_DENIED",
        _ => "NONE_NONE",
    }
}

/// Squid's error suffix: `_TIMEDOUT` for a time-out, `_ABORTED` for a
/// transfer cut short by a peer or by shutdown; nothing otherwise.
fn squid_suffix(reason: Option<Reason>) -> &'static str {
    match reason {
        Some(Reason::Timeout) => "_TIMEDOUT",
        Some(Reason::ClientClosed | Reason::UpstreamReset | Reason::Shutdown) => "_ABORTED",
        _ => "",
    }
}

/// Write `s` as one whitespace-free field: bytes outside printable ASCII,
/// space and `%` are percent-encoded (Squid escapes such bytes the same way).
fn squid_field(out: &mut Vec<u8>, s: &str) {
    for &b in s.as_bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(b);
        } else {
            out.push(b'%');
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Records kept in memory, for tests and the status page.
#[derive(Clone, Default)]
pub struct MemorySink {
    records: Arc<Mutex<Vec<Record>>>,
    changed: Arc<Notify>,
}

impl MemorySink {
    pub fn new() -> Self {
        MemorySink::default()
    }

    /// A copy of every record written so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Wait until `pred` holds for the records written (or `timeout` passes);
    /// returns the records at that point.
    pub async fn wait_for(
        &self,
        timeout: std::time::Duration,
        pred: impl Fn(&[Record]) -> bool,
    ) -> Vec<Record> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            let now = self.records();
            if pred(&now) {
                return now;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.records();
            }
        }
    }
}

impl AuditSink for MemorySink {
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        if let Ok(mut r) = self.records.lock() {
            r.extend_from_slice(records);
        }
        self.changed.notify_waiters();
        Ok(())
    }
}

/// Several sinks written in turn (file plus memory for the status page, say).
pub struct Tee(pub Vec<Box<dyn AuditSink>>);

impl AuditSink for Tee {
    /// Every sink takes the batch once, even after one of them failed (it
    /// then finishes in `resume`); the first error is returned.
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        first_error(self.0.iter_mut().map(|s| s.write(records)))
    }

    fn resume(&mut self) -> io::Result<()> {
        first_error(self.0.iter_mut().map(|s| s.resume()))
    }

    fn reopen(&mut self) -> io::Result<()> {
        first_error(self.0.iter_mut().map(|s| s.reopen()))
    }
}

/// Run every result to the end; the first error, if any.
fn first_error(results: impl Iterator<Item = io::Result<()>>) -> io::Result<()> {
    let mut first = Ok(());
    for r in results {
        if let (Err(e), true) = (r, first.is_ok()) {
            first = Err(e);
        }
    }
    first
}

enum Msg {
    Record(Box<Record>),
    Reopen,
    /// Write what is queued, then stop (shutdown, after the drain).
    Close,
}

/// How many queued records make new transactions wait for the writer.
pub const HIGH_WATER: usize = 65_536;

/// The cloneable handle that transactions send records through.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::UnboundedSender<Msg>,
    state: Arc<WriterState>,
}

struct WriterState {
    queued: AtomicUsize,
    written: AtomicU64,
    waits: AtomicU64,
    drained: Notify,
    /// Failed write attempts (each retry counts).
    write_errors: AtomicU64,
    /// When the current run of failures began, in milliseconds after
    /// `epoch` plus one; 0 while writes succeed.
    failing_since: AtomicU64,
    epoch: std::time::Instant,
}

impl WriterState {
    fn new() -> Self {
        WriterState {
            queued: AtomicUsize::new(0),
            written: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            drained: Notify::new(),
            write_errors: AtomicU64::new(0),
            failing_since: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn note_failure(&self) {
        self.write_errors.fetch_add(1, Ordering::Relaxed);
        // Only the first failure of a run sets the start.
        let _ = self.failing_since.compare_exchange(
            0,
            self.now_ms(),
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    fn note_success(&self) {
        self.failing_since.store(0, Ordering::Release);
    }

    fn failing_for(&self) -> Option<Duration> {
        match self.failing_since.load(Ordering::Acquire) {
            0 => None,
            since => Some(Duration::from_millis(self.now_ms().saturating_sub(since))),
        }
    }
}

/// How long the writer may keep failing before `/readyz` turns 503: long
/// enough to ride out a hiccup, short enough that a load balancer drains
/// the replica well before the queue fills and transactions block.
pub const UNHEALTHY_AFTER: Duration = Duration::from_secs(1);

/// The writer thread; `join` after every handle is dropped flushes the rest.
pub struct AuditWriter {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AuditWriter {
    /// Wait until every record sent before the last handle was dropped is written.
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("audit writer thread panicked");
            }
        }
    }
}

impl AuditLog {
    /// Start the writer thread on `sink`.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(mut sink: Box<dyn AuditSink>) -> io::Result<(AuditLog, AuditWriter)> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Msg>();
        let state = Arc::new(WriterState::new());
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                yield_to_traffic();
                let mut batch: Vec<Record> = Vec::with_capacity(256);
                let mut closing = false;
                let mut idle_polls = 0u32;
                let mut failures = FailureLog::default();
                while !closing {
                    // Under load, poll every millisecond: senders then only
                    // push (no wake-up, no context switch per record). After
                    // ~50 ms without records, block so an idle proxy sleeps.
                    let first = match rx.try_recv() {
                        Ok(m) => {
                            idle_polls = 0;
                            m
                        }
                        Err(mpsc::error::TryRecvError::Empty) if idle_polls < 50 => {
                            idle_polls += 1;
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            continue;
                        }
                        Err(mpsc::error::TryRecvError::Empty) => {
                            idle_polls = 0;
                            match rx.blocking_recv() {
                                Some(m) => m,
                                None => break,
                            }
                        }
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    };
                    let mut reopen = false;
                    let mut next = Some(first);
                    while let Some(m) = next.take() {
                        match m {
                            Msg::Record(r) => batch.push(*r),
                            Msg::Reopen => reopen = true,
                            Msg::Close => closing = true,
                        }
                        // A reopen ends the batch: what follows goes to the new file.
                        if batch.len() < 4096 && !closing && !reopen {
                            next = rx.try_recv().ok();
                        }
                    }
                    write_batch(sink.as_mut(), &batch, &st, &mut failures);
                    let n = batch.len();
                    batch.clear();
                    st.written.fetch_add(n as u64, Ordering::Relaxed);
                    if st.queued.fetch_sub(n, Ordering::AcqRel) - n < HIGH_WATER {
                        st.drained.notify_waiters();
                    }
                    if reopen {
                        if let Err(e) = sink.reopen() {
                            tracing::error!(error = %e, "cannot reopen the audit file; keeping the old one");
                        }
                    }
                }
            })?;
        Ok((
            AuditLog { tx, state },
            AuditWriter {
                thread: Some(thread),
            },
        ))
    }

    /// Wait while the writer is behind (fail closed). Cheap when it is not.
    pub async fn ready(&self) {
        while self.state.queued.load(Ordering::Acquire) >= HIGH_WATER {
            self.state.waits.fetch_add(1, Ordering::Relaxed);
            let n = self.state.drained.notified();
            if self.state.queued.load(Ordering::Acquire) < HIGH_WATER {
                break;
            }
            n.await;
        }
    }

    /// Queue a record. Never drops it; never blocks (see [`AuditLog::ready`]).
    pub fn send(&self, record: Record) {
        self.send_boxed(Box::new(record));
    }

    /// [`AuditLog::send`] for a record already boxed.
    pub fn send_boxed(&self, record: Box<Record>) {
        self.state.queued.fetch_add(1, Ordering::AcqRel);
        if self.tx.send(Msg::Record(record)).is_err() {
            self.state.queued.fetch_sub(1, Ordering::AcqRel);
            tracing::error!("audit writer is gone; record lost");
        }
    }

    /// Ask the writer to write what is queued and stop; [`AuditWriter::join`]
    /// then returns even while other handles remain.
    pub fn close(&self) {
        let _ = self.tx.send(Msg::Close);
    }

    /// Ask the writer to reopen its file (SIGHUP).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.state.written.load(Ordering::Relaxed)
    }

    /// Records queued and not yet written.
    pub fn queued(&self) -> usize {
        self.state.queued.load(Ordering::Relaxed)
    }

    /// How often a transaction waited for the writer.
    pub fn waits(&self) -> u64 {
        self.state.waits.load(Ordering::Relaxed)
    }

    /// Failed write attempts so far (each retry counts).
    pub fn write_errors(&self) -> u64 {
        self.state.write_errors.load(Ordering::Relaxed)
    }

    /// How long the writer has been failing, if it is failing now.
    pub fn failing_for(&self) -> Option<Duration> {
        self.state.failing_for()
    }

    /// False once the writer has been failing for longer than
    /// [`UNHEALTHY_AFTER`] (`/readyz` then answers 503).
    pub fn healthy(&self) -> bool {
        self.failing_for().is_none_or(|d| d <= UNHEALTHY_AFTER)
    }
}

/// Write one batch, then resume it after I/O errors until it is all out:
/// records are never dropped, and never handed to a sink twice.
fn write_batch(
    sink: &mut dyn AuditSink,
    batch: &[Record],
    st: &WriterState,
    failures: &mut FailureLog,
) {
    let mut delay = Duration::from_millis(10);
    let mut result = sink.write(batch);
    while let Err(e) = result {
        st.note_failure();
        failures.failed(&e);
        std::thread::sleep(delay);
        // At most a second: a freed disk is used again within one.
        delay = (delay * 2).min(Duration::from_secs(1));
        result = sink.resume();
    }
    st.note_success();
    failures.recovered();
}

/// The `audit write failed` log, rate-limited: a full disk fails every
/// retry, and one line per retry would fill what little space is left.
/// The first failure is logged at once, then one line per
/// [`FailureLog::EVERY`] with the count since, then one when writes recover.
#[derive(Default)]
struct FailureLog {
    /// When the current run of failures began, and its last log line.
    began: Option<std::time::Instant>,
    logged: Option<std::time::Instant>,
    unlogged: u64,
    total: u64,
}

impl FailureLog {
    const EVERY: Duration = Duration::from_secs(10);

    fn failed(&mut self, e: &io::Error) {
        let now = std::time::Instant::now();
        self.began.get_or_insert(now);
        self.total += 1;
        self.unlogged += 1;
        if self
            .logged
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            return;
        }
        tracing::error!(
            error = %e,
            failures = self.unlogged,
            "audit write failed; keeping the records and retrying (new transactions wait once the queue is full)"
        );
        self.logged = Some(now);
        self.unlogged = 0;
    }

    fn recovered(&mut self) {
        let Some(began) = self.began.take() else {
            return;
        };
        tracing::warn!(
            failures = self.total,
            after = ?began.elapsed(),
            "audit writes recovered; nothing was lost"
        );
        *self = FailureLog::default();
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;

    #[test]
    fn hand_written_json_equals_the_serialize_impl() {
        let mut r = Record::new(
            0xdead_beef,
            "127.0.0.1:4000".parse().unwrap(),
            SystemTime::UNIX_EPOCH,
        );
        let mut a = Vec::new();
        r.write_json(&mut a);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&a).unwrap(),
            serde_json::to_value(&r).unwrap()
        );
        r.user = Some(Arc::from("gate\"way"));
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.url = Some("http://x/\"quoted\"\u{7f}".into());
        r.decision = Decided::Bypass;
        r.rule = Some(Arc::from("Kaspersky KSN lookup"));
        r.reason = Some(Reason::SniMismatch);
        r.upstream = Some("[::1]:443".parse().unwrap());
        r.sni = Some("www.example.com".into());
        r.ech = true;
        r.status = Some(200);
        r.bytes_up = 1;
        r.bytes_down = 2;
        r.duration_ms = 3;
        let mut b = Vec::new();
        r.write_json(&mut b);
        let parsed: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(parsed, serde_json::to_value(&r).unwrap());
        assert_eq!(parsed["port"], 443);
        assert_eq!(parsed["user"], "gate\"way");
    }

    #[test]
    fn fast_fields_are_written_as_display_writes_them() {
        // Timestamps: every day boundary over leap years, centuries and
        // 2038, plus odd seconds and milliseconds.
        let mut t = 0u64;
        while t < 8_000_000_000 {
            for ms in [0u64, 7, 45, 999] {
                let ts = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(t * 1000 + ms);
                let mut out = Vec::new();
                write_rfc3339_millis(&mut out, ts);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    humantime::format_rfc3339_millis(ts).to_string(),
                    "at {t}.{ms}"
                );
            }
            t += 86_400 * 13 + 3_601;
        }
        for id in [0u64, 1, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            let mut out = Vec::new();
            write_hex16(&mut out, id);
            assert_eq!(String::from_utf8(out).unwrap(), format_id(id));
        }
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:3128",
            "255.255.255.255:65535",
            "192.0.2.10:40000",
            "[::1]:443",
            "[2001:db8::8a2e:370:7334]:8080",
            "[::ffff:192.0.2.1]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            write_addr(&mut out, addr);
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
    }

    #[test]
    fn the_writer_thread_yields_to_traffic() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let (writer, other) = std::thread::spawn(|| {
            yield_to_traffic();
            let tid = rustix::thread::gettid();
            (
                rustix::process::getpriority_process(Some(tid)).unwrap(),
                std::thread::spawn(|| {
                    rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
                }),
            )
        })
        .join()
        .unwrap();
        assert_eq!(
            writer,
            before.max(WRITER_NICE),
            "the writer runs at nice 10"
        );
        // Only that thread: the caller and the process keep theirs.
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
        // (A thread it spawns inherits it, as Linux does.)
        assert_eq!(other.join().unwrap(), writer);
    }
}

#[cfg(test)]
mod squid_tests {
    use super::*;
    use std::time::Duration;

    fn record() -> Record {
        // 2026-01-02T03:04:05.678Z
        let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        Record::new(1, "192.0.2.10:40000".parse().unwrap(), ts)
    }

    fn line(r: &Record) -> String {
        let mut out = Vec::new();
        squid_line(&mut out, r).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_spliced_tunnel_is_tcp_tunnel_with_host_and_port() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.decision = Decided::Bypass;
        r.rule = Some(Arc::from("Kaspersky KSN lookup"));
        r.upstream = Some("203.0.113.7:443".parse().unwrap());
        r.status = Some(200);
        r.bytes_up = 517;
        r.bytes_down = 4242;
        r.duration_ms = 1500;
        // The time is the end: ts + 1.5 s.
        assert_eq!(
            line(&r),
            "1767323047.178   1500 192.0.2.10 TCP_TUNNEL/200 4242 CONNECT \
             ksn1.kaspersky-labs.com:443 - HIER_DIRECT/203.0.113.7 -"
        );
    }

    #[test]
    fn a_forwarded_request_is_tcp_miss_with_the_url() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.host = Some("repo.clearswift.net".into());
        r.port = Some(80);
        r.url = Some("http://repo.clearswift.net/update/list.xml?x=1".into());
        r.decision = Decided::Allow;
        r.rule = Some(Arc::from("Clearswift updates"));
        r.upstream = Some("[2001:db8::5]:80".parse().unwrap());
        r.user = Some(Arc::from("gateway"));
        r.status = Some(200);
        r.bytes_down = 5;
        r.duration_ms = 12;
        assert_eq!(
            line(&r),
            "1767323045.690     12 192.0.2.10 TCP_MISS/200 5 GET \
             http://repo.clearswift.net/update/list.xml?x=1 gateway HIER_DIRECT/2001:db8::5 -"
        );
    }

    #[test]
    fn a_policy_refusal_is_tcp_denied_without_a_peer() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.host = Some("example.com".into());
        r.port = Some(80);
        r.url = Some("http://example.com/".into());
        r.reason = Some(Reason::NotInCatalog);
        r.status = Some(403);
        assert_eq!(
            line(&r),
            "1767323045.678      0 192.0.2.10 TCP_DENIED/403 0 GET http://example.com/ - HIER_NONE/- -"
        );
        // Authentication and rate limits are refusals too, as in Squid (TCP_DENIED/407).
        r.reason = Some(Reason::AuthRequired);
        r.status = Some(407);
        assert!(line(&r).contains(" TCP_DENIED/407 "), "{}", line(&r));
        r.reason = Some(Reason::RateLimited);
        r.status = Some(429);
        assert!(line(&r).contains(" TCP_DENIED/429 "), "{}", line(&r));
    }

    #[test]
    fn a_denied_connect_to_an_ipv6_literal_brackets_the_address() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("2001:db8::1".into());
        r.port = Some(443);
        r.reason = Some(Reason::IpLiteral);
        r.status = Some(403);
        let l = line(&r);
        assert!(
            l.contains(" TCP_DENIED/403 0 CONNECT [2001:db8::1]:443 - HIER_NONE/- -"),
            "{l}"
        );
    }

    #[test]
    fn a_tunnel_closed_by_the_sni_check_is_denied_with_status_200() {
        let mut r = record();
        r.method = Some(http::Method::CONNECT);
        r.host = Some("ksn1.kaspersky-labs.com".into());
        r.port = Some(443);
        r.reason = Some(Reason::SniMismatch);
        r.sni = Some("www.example.com".into());
        r.upstream = Some("203.0.113.7:443".parse().unwrap());
        r.status = Some(200);
        let l = line(&r);
        assert!(l.contains(" TCP_DENIED/200 0 CONNECT "), "{l}");
        // A malformed hello inside the tunnel too.
        r.reason = Some(Reason::BadRequest);
        assert!(line(&r).contains(" TCP_DENIED/200 "), "{}", line(&r));
    }

    #[test]
    fn abnormal_ends_carry_squids_suffixes() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.url = Some("http://a.example/".into());
        r.decision = Decided::Allow;
        r.status = Some(200);
        r.reason = Some(Reason::ClientClosed);
        assert!(line(&r).contains(" TCP_MISS_ABORTED/200 "), "{}", line(&r));
        r.reason = Some(Reason::UpstreamReset);
        assert!(line(&r).contains(" TCP_MISS_ABORTED/200 "), "{}", line(&r));
        r.reason = Some(Reason::Timeout);
        r.status = Some(504);
        assert!(line(&r).contains(" TCP_MISS_TIMEDOUT/504 "), "{}", line(&r));
        // An upstream that cannot be reached: a miss with the error status.
        r.reason = Some(Reason::UpstreamConnectFailed);
        r.status = Some(502);
        assert!(line(&r).contains(" TCP_MISS/502 "), "{}", line(&r));
        r.method = Some(http::Method::CONNECT);
        r.url = None;
        r.host = Some("a.example".into());
        r.port = Some(443);
        r.status = Some(200);
        r.reason = Some(Reason::ClientClosed);
        assert!(
            line(&r).contains(" TCP_TUNNEL_ABORTED/200 "),
            "{}",
            line(&r)
        );
    }

    #[test]
    fn requests_never_processed_are_none_none() {
        let mut r = record();
        r.reason = Some(Reason::BadRequest);
        r.status = Some(400);
        assert_eq!(
            line(&r),
            "1767323045.678      0 192.0.2.10 NONE_NONE/400 0 - - - HIER_NONE/- -"
        );
        // A head that never came (time-out, or the client closed first).
        r.reason = Some(Reason::Timeout);
        r.status = None;
        assert!(line(&r).contains(" NONE_NONE/000 "), "{}", line(&r));
        r.reason = Some(Reason::ClientClosed);
        assert!(line(&r).contains(" NONE_NONE/000 "), "{}", line(&r));
        r.reason = Some(Reason::Shutdown);
        r.status = Some(503);
        assert!(line(&r).contains(" NONE_NONE/503 "), "{}", line(&r));
        r.reason = Some(Reason::ConnectionLimit);
        r.status = Some(503);
        assert!(line(&r).contains(" NONE_NONE/503 "), "{}", line(&r));
    }

    #[test]
    fn fields_never_contain_spaces() {
        let mut r = record();
        r.method = Some(http::Method::GET);
        r.url = Some("http://a.example/".into());
        r.decision = Decided::Allow;
        r.user = Some(Arc::from("gate way%ü"));
        r.status = Some(200);
        r.duration_ms = 1_234_567;
        let l = line(&r);
        assert!(l.contains(" gate%20way%25%C3%BC "), "{l}");
        // Elapsed wider than six digits just grows, as in Squid.
        assert!(l.contains(" 1234567 192.0.2.10 "), "{l}");
        assert_eq!(l.split(' ').filter(|f| !f.is_empty()).count(), 10, "{l}");
    }
}

#[cfg(test)]
mod sink_tests {
    //! The file sink on a disk that fills up: a short write, then ENOSPC,
    //! then space again. Every record must land exactly once, whole.
    use super::*;
    use std::time::{Duration, Instant};

    /// A `Write` with `room` bytes of space left; a write takes what fits
    /// (a short write), and with no room fails with ENOSPC, as a file on a
    /// full filesystem does.
    #[derive(Clone, Default)]
    struct Disk {
        data: Arc<Mutex<Vec<u8>>>,
        room: Arc<AtomicUsize>,
    }

    impl Disk {
        fn with_room(room: usize) -> Self {
            let d = Disk::default();
            d.room.store(room, Ordering::SeqCst);
            d
        }
        fn bytes(&self) -> Vec<u8> {
            self.data.lock().unwrap().clone()
        }
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst);
            if room == 0 {
                return Err(io::Error::from(rustix::io::Errno::NOSPC));
            }
            let n = buf.len().min(room);
            self.room.fetch_sub(n, Ordering::SeqCst);
            self.data.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn record(i: u64) -> Record {
        let mut r = Record::new(i, "127.0.0.1:4000".parse().unwrap(), SystemTime::UNIX_EPOCH);
        r.method = Some(http::Method::GET);
        r.url = Some(format!("http://repo.clearswift.net/file/{i}"));
        r.status = Some(200);
        r
    }

    /// The lines the records must become, each once, in order.
    fn expected(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.write_json(&mut out);
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn a_short_write_then_enospc_resumes_after_the_written_bytes() {
        let disk = Disk::with_room(150);
        let mut sink = LineSink::from_writer(Box::new(disk.clone()), AuditFormat::Json);
        let batch: Vec<Record> = (0..5).map(record).collect();
        let e = sink.write(&batch).expect_err("the disk is full");
        assert_eq!(
            e.raw_os_error(),
            Some(rustix::io::Errno::NOSPC.raw_os_error())
        );
        assert_eq!(disk.bytes().len(), 150, "a short write took 150 bytes");
        assert!(sink.resume().is_err(), "still full");
        disk.room.store(usize::MAX, Ordering::SeqCst);
        sink.resume().expect("space again");
        // Nothing more to do, and a later batch follows on.
        sink.resume().expect("idempotent");
        let more: Vec<Record> = (5..7).map(record).collect();
        sink.write(&more).expect("write");
        let all: Vec<Record> = (0..7).map(record).collect();
        assert_eq!(
            String::from_utf8(disk.bytes()).unwrap(),
            String::from_utf8(expected(&all)).unwrap()
        );
    }

    #[test]
    fn the_writer_keeps_every_record_once_through_a_full_disk() {
        let disk = Disk::with_room(1000);
        let memory = MemorySink::new();
        let tee = Tee(vec![
            Box::new(LineSink::from_writer(
                Box::new(disk.clone()),
                AuditFormat::Json,
            )),
            Box::new(memory.clone()),
        ]);
        let (log, writer) = AuditLog::start(Box::new(tee)).unwrap();
        let records: Vec<Record> = (0..3000).map(record).collect();
        for chunk in records.chunks(300) {
            for r in chunk {
                log.send(r.clone());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Failing: counted, and unhealthy once it lasts past a second.
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.healthy() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!log.healthy(), "failing for over a second is unhealthy");
        assert!(log.write_errors() > 0);
        assert!(log.failing_for().unwrap() > UNHEALTHY_AFTER);
        assert_eq!(disk.bytes().len(), 1000, "only what fit");

        disk.room.store(usize::MAX, Ordering::SeqCst);
        while log.written() < 3000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(log.written(), 3000);
        assert!(log.healthy(), "healthy again once writes succeed");
        assert_eq!(log.failing_for(), None);
        log.close();
        drop(log);
        writer.join();
        // Byte for byte: each line once, whole, in order.
        assert!(
            disk.bytes() == expected(&records),
            "the file differs from one line per record"
        );
        // The other sinks of the tee saw each batch once too.
        assert_eq!(memory.records(), records);
    }
}
