//! The one writer thread: a bounded queue that makes transactions wait
//! rather than drop a record, batches written in order, failures logged
//! once and recovered from.
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use super::*;

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
mod tests {
    use super::*;

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
