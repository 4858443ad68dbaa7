//! Where records go: the [`AuditSink`] seam, the line sink for a file or
//! standard output (JSON or Squid lines), the in-memory sink and the tee.
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::squid::squid_line;
use super::*;
use crate::config::{AuditFormat, AuditPath};

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
    /// Keep URL query strings (`audit.log_query`).
    log_query: bool,
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
            log_query: format == AuditFormat::Json,
            out,
            pending: Vec::with_capacity(64 * 1024),
            done: 0,
        }
    }

    /// Keep URL query strings (true) or cut each URL after its `?` as Squid's
    /// `strip_query_terms` does (`audit.log_query`; the default is true for
    /// JSON, false for Squid lines).
    #[must_use]
    pub fn log_query(mut self, keep: bool) -> Self {
        self.log_query = keep;
        self
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
            let stripped;
            let r = match r.url.as_deref().and_then(|u| u.find('?')) {
                Some(q) if !self.log_query && q + 1 < r.url.as_deref().map_or(0, str::len) => {
                    // As Squid: the `?` stays, to show there was a query.
                    let mut c = r.clone();
                    c.url = r.url.as_deref().map(|u| u[..=q].to_string());
                    stripped = c;
                    &stripped
                }
                _ => r,
            };
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

#[cfg(test)]
mod tests {
    //! The file sink on a disk that fills up: a short write, then ENOSPC,
    //! then space again. Every record must land exactly once, whole.
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::SystemTime;
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

    /// What one record with a query string becomes in `format`, with
    /// `log_query` set or left at the format's default.
    fn with_query(format: AuditFormat, keep: Option<bool>) -> String {
        let disk = Disk::with_room(1 << 20);
        let mut sink = LineSink::from_writer(Box::new(disk.clone()), format);
        if let Some(k) = keep {
            sink = sink.log_query(k);
        }
        let mut r = record(1);
        r.url = Some("http://repo.clearswift.net/file?token=s3cret&x=1".into());
        let mut plain = record(2);
        plain.url = Some("http://repo.clearswift.net/list?".into());
        sink.write(&[r, plain]).unwrap();
        String::from_utf8(disk.bytes()).unwrap()
    }

    #[test]
    fn squid_lines_strip_query_strings_unless_log_query() {
        let text = with_query(AuditFormat::Squid, None);
        assert!(
            text.contains(" http://repo.clearswift.net/file? "),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains(" http://repo.clearswift.net/list? "),
            "{text}"
        );
        let text = with_query(AuditFormat::Squid, Some(true));
        assert!(
            text.contains(" http://repo.clearswift.net/file?token=s3cret&x=1 "),
            "{text}"
        );
    }

    #[test]
    fn json_keeps_query_strings_unless_log_query_is_false() {
        let text = with_query(AuditFormat::Json, None);
        assert!(
            text.contains(r#""url":"http://repo.clearswift.net/file?token=s3cret&x=1""#),
            "{text}"
        );
        let text = with_query(AuditFormat::Json, Some(false));
        assert!(
            text.contains(r#""url":"http://repo.clearswift.net/file?""#),
            "{text}"
        );
        assert!(!text.contains("s3cret"), "{text}");
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
