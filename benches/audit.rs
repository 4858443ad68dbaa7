//! The audit writer's ceiling: records per second the real writer sustains,
//! end to end (from the first record sent until the last is written, or
//! for syslog received), set up as `egress-proxy run` sets it up
//! (`start_audit_with`: the line sink, the metrics and status-page sinks,
//! and the syslog sink when `audit.syslog` is set), with the proxy's
//! allocator.
//!
//! Modes: JSON lines to a file, Squid lines to a file (the file on tmpfs:
//! `/dev/shm` when there is one), and JSON to a file with `audit.syslog`
//! over UDP and over TCP to a receiver in this process that counts every
//! message. The syslog sink drops what its queue cannot take rather than
//! make the writer wait, so the feeder keeps at most [`WINDOW`] records
//! ahead of what the sender has handed to its socket: the rate is the
//! sustained one without a drop.
//!
//! Besides the rate, the CPU time of the writer thread (and of the syslog
//! sender thread) per record, from `/proc/self/task/*/stat`, and what that
//! is at the proxy's rate: `cargo bench --bench audit -- --rate 66000`
//! (default 66,000 records/s, the best http-forward rate in README
//! "Performance"). `RECORDS=N` records per run (default 400,000), `ROUNDS=N`
//! runs per mode (default 3; the median is shown).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic on bad setup

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use egress_proxy::audit::{Decided, LineSink, Reason, Record};
use egress_proxy::config::{AuditFormat, AuditPath, SyslogSettings};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Records the feeder may be ahead of the syslog sender (its queue holds 8192).
const WINDOW: u64 = 4096;

#[derive(Clone, Copy, PartialEq)]
enum Syslog {
    Off,
    Udp,
    Tcp,
}

struct Mode {
    name: &'static str,
    format: AuditFormat,
    syslog: Syslog,
}

const MODES: [Mode; 4] = [
    Mode {
        name: "JSON to a file",
        format: AuditFormat::Json,
        syslog: Syslog::Off,
    },
    Mode {
        name: "Squid lines to a file",
        format: AuditFormat::Squid,
        syslog: Syslog::Off,
    },
    Mode {
        name: "JSON to a file + syslog over UDP",
        format: AuditFormat::Json,
        syslog: Syslog::Udp,
    },
    Mode {
        name: "JSON to a file + syslog over TCP",
        format: AuditFormat::Json,
        syslog: Syslog::Tcp,
    },
];

/// One run: wall time, records, CPU seconds of the writer and the syslog sender.
struct Run {
    rate: f64,
    writer_us: f64,
    sender_us: f64,
    received: u64,
    bytes: u64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rate: f64 = args
        .iter()
        .position(|a| a == "--rate")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(66_000.0);
    let records: u64 = env_or("RECORDS", 400_000);
    let rounds: usize = env_or("ROUNDS", 3);
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("scratch dir");
    println!(
        "| mode | records/s, end to end | writer CPU per record | syslog sender CPU per record | ceiling on a core (1 ÷ CPU per record) | ceiling ÷ {} tx/s | writer (+ sender) CPU at {} records/s |",
        rate_text(rate),
        rate_text(rate)
    );
    println!("|---|---|---|---|---|---|---|");
    for mode in &MODES {
        let mut runs: Vec<Run> = (0..rounds)
            .map(|i| run(mode, &base.path().join(format!("audit-{i}.log")), records))
            .collect();
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let m = &runs[runs.len() / 2];
        let sender = if mode.syslog == Syslog::Off {
            "—".to_string()
        } else {
            format!("{:.2} µs", m.sender_us)
        };
        let share = rate * m.writer_us / 1e6 * 100.0;
        let both = rate * (m.writer_us + m.sender_us) / 1e6 * 100.0;
        let share = if mode.syslog == Syslog::Off {
            format!("{share:.1} % of a core")
        } else {
            format!("{share:.1} % (+ sender: {both:.1} %) of a core")
        };
        // The slower of the two threads bounds what the pair sustains.
        let ceiling = 1e6 / m.writer_us.max(m.sender_us);
        println!(
            "| {} | {} | {:.2} µs | {sender} | {} | {:.1}× (end to end {:.1}×) | {share} |",
            mode.name,
            rate_text(m.rate),
            m.writer_us,
            rate_text(ceiling),
            ceiling / rate,
            m.rate / rate,
        );
        if mode.syslog == Syslog::Tcp {
            assert_eq!(m.received, records, "{}: every message received", mode.name);
        }
        eprintln!(
            "{}: rates {:?}, {} bytes of file, {} syslog messages received (median run)",
            mode.name,
            runs.iter().map(|r| rate_text(r.rate)).collect::<Vec<_>>(),
            m.bytes,
            m.received
        );
    }
    println!();
    println!(
        "{records} records per run, median of {rounds} runs; end to end (the last record \
         written, or received by the syslog receiver in this process); file on {}.",
        if base.path().starts_with("/dev/shm") {
            "tmpfs (/dev/shm)"
        } else {
            "the temp dir"
        }
    );
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rate_text(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else {
        format!("{:.1}k", r / 1e3)
    }
}

/// Write `n` records through a new writer set up for `mode`.
fn run(mode: &Mode, path: &Path, n: u64) -> Run {
    let _ = std::fs::remove_file(path);
    let receiver = match mode.syslog {
        Syslog::Off => None,
        Syslog::Udp => Some(Receiver::udp()),
        Syslog::Tcp => Some(Receiver::tcp()),
    };
    let syslog = receiver.as_ref().map(|r| SyslogSettings {
        url: r.url.clone(),
        extra_roots: Vec::new(),
        client_cert: None,
    });
    let sink = LineSink::open(AuditPath::File(path.to_path_buf()), mode.format)
        .expect("audit file")
        .log_query(mode.format == AuditFormat::Json);
    let (log, writer, metrics) =
        egress_proxy::start_audit_with(Box::new(sink), syslog.as_ref()).expect("writer");
    // Let the writer and the syslog sender start (and connect) first.
    std::thread::sleep(Duration::from_millis(200));
    let cpu_before = (thread_cpu("audit-writer"), thread_cpu("audit-syslog"));
    let templates = templates();
    let start = Instant::now();
    for i in 0..n {
        if receiver.is_some() && i % 256 == 0 {
            // Stay within the syslog queue: no drop, the sustained rate.
            // Waiting sleeps: a spinning feeder would take a core from the
            // writer and the sender on a small machine.
            while i - (metrics.syslog_sent.get() + metrics.syslog_dropped.get()) > WINDOW {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        let mut r = templates[(i % templates.len() as u64) as usize].clone();
        r.id = i;
        log.send(r);
    }
    while log.written() < n
        || metrics.syslog_sent.get() + metrics.syslog_dropped.get() < n && receiver.is_some()
    {
        std::thread::sleep(Duration::from_micros(200));
    }
    let mut elapsed = start.elapsed();
    let received = match &receiver {
        Some(r) => {
            // Until the last message arrived (UDP may lose some: then
            // until none has come for a while).
            let got = r.wait_for(n);
            elapsed = elapsed.max(r.last_at().saturating_duration_since(start));
            got
        }
        None => 0,
    };
    let elapsed = elapsed.as_secs_f64();
    let cpu_after = (thread_cpu("audit-writer"), thread_cpu("audit-syslog"));
    assert_eq!(metrics.syslog_dropped.get(), 0, "{}: no drop", mode.name);
    log.close();
    drop(log);
    writer.join();
    let per = |a: f64, b: f64| (b - a) / n as f64 * 1e6;
    Run {
        rate: n as f64 / elapsed,
        writer_us: per(cpu_before.0, cpu_after.0),
        sender_us: per(cpu_before.1, cpu_after.1),
        received,
        bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
    }
}

/// CPU seconds (user + system) of this process's thread named `name`.
fn thread_cpu(name: &str) -> f64 {
    let hz = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("/proc")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
        let fields: Vec<&str> = rest.split(' ').collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        total += ticks / hz;
    }
    total
}

/// A mix like a gateway's traffic: spliced look-ups (half), plain HTTP
/// downloads with a query string, inspected requests, and refusals.
fn templates() -> Vec<Record> {
    let now = SystemTime::now();
    (0..64u16)
        .map(|k| {
            let client: SocketAddr = format!("10.20.{}.{}:{}", k / 8, 10 + k, 40_000 + k)
                .parse()
                .unwrap();
            let mut r = Record::new(0, client, now);
            r.duration_ms = u64::from(k) * 37;
            match k % 8 {
                0..=3 => {
                    r.method = Some(http::Method::CONNECT);
                    r.host = Some(format!("ksn{}.kaspersky-labs.com", k % 4));
                    r.port = Some(443);
                    r.decision = Decided::Bypass;
                    r.rule = Some(Arc::from("Kaspersky KSN lookup"));
                    r.upstream = Some("203.0.113.7:443".parse().unwrap());
                    r.sni = r.host.clone();
                    r.status = Some(200);
                    r.bytes_up = 517 + u64::from(k);
                    r.bytes_down = 4242 * u64::from(k);
                }
                4 | 5 => {
                    r.method = Some(http::Method::GET);
                    r.host = Some("update.avira-update.com".into());
                    r.port = Some(80);
                    r.url = Some(format!(
                        "http://update.avira-update.com/update/x_vdf/{k}/xvdfinfo.gz?ver=8.18.{k}&sig=3f2a9c"
                    ));
                    r.decision = Decided::Allow;
                    r.rule = Some(Arc::from("Avira updates"));
                    r.upstream = Some("198.51.100.23:80".parse().unwrap());
                    r.status = Some(200);
                    r.bytes_up = 312;
                    r.bytes_down = 1_048_576 + u64::from(k);
                }
                6 => {
                    r.method = Some(http::Method::GET);
                    r.host = Some("licence.clearswift.net".into());
                    r.port = Some(443);
                    r.url = Some("https://licence.clearswift.net/v2/check".into());
                    r.decision = Decided::Inspect;
                    r.rule = Some(Arc::from("Clearswift licence"));
                    r.upstream = Some("192.0.2.44:443".parse().unwrap());
                    r.status = Some(200);
                    r.bytes_up = 900;
                    r.bytes_down = 2100;
                }
                _ => {
                    r.method = Some(http::Method::CONNECT);
                    r.host = Some(format!("telemetry{k}.example.net"));
                    r.port = Some(443);
                    r.decision = Decided::Deny;
                    r.reason = Some(Reason::NotInCatalog);
                    r.status = Some(403);
                }
            }
            r
        })
        .collect()
}

/// A loopback syslog receiver that counts messages until dropped.
struct Receiver {
    url: String,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// When the last message arrived, in nanoseconds after `epoch`.
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Receiver {
    fn udp() -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
        let sock2 = socket2::SockRef::from(&sock);
        let _ = sock2.set_recv_buffer_size(8 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let url = format!("udp://{}", sock.local_addr().unwrap());
        Receiver::spawn(url, move |count, stop| {
            let mut buf = vec![0u8; 65_536];
            while !stop.load(Ordering::Relaxed) {
                if sock.recv(&mut buf).is_ok() {
                    count.add(1);
                }
            }
        })
    }

    fn tcp() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("tcp");
        listener.set_nonblocking(true).unwrap();
        let url = format!("tcp://{}", listener.local_addr().unwrap());
        Receiver::spawn(url, move |count, stop| {
            let mut frames = Frames::default();
            let mut buf = vec![0u8; 256 * 1024];
            let mut conn = None;
            while !stop.load(Ordering::Relaxed) {
                if let Ok((s, _)) = listener.accept() {
                    s.set_nonblocking(false).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                    frames = Frames::default();
                    conn = Some(s);
                }
                let Some(s) = conn.as_mut() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                match s.read(&mut buf) {
                    Ok(0) => conn = None,
                    Ok(k) => count.add(frames.feed(&buf[..k])),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(_) => conn = None,
                }
            }
        })
    }

    fn spawn(url: String, body: impl FnOnce(Counter, Arc<AtomicBool>) + Send + 'static) -> Self {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let epoch = Instant::now();
        let counter = Counter {
            count: Arc::clone(&count),
            last: Arc::clone(&last),
            epoch,
        };
        let s = Arc::clone(&stop);
        std::thread::spawn(move || body(counter, s));
        Receiver {
            url,
            count,
            stop,
            last,
            epoch,
        }
    }

    /// Messages received, once `n` have arrived or none for 300 ms.
    fn wait_for(&self, n: u64) -> u64 {
        let mut quiet_since = Instant::now();
        let mut seen = self.count.load(Ordering::Relaxed);
        while seen < n && quiet_since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_micros(200));
            let now = self.count.load(Ordering::Relaxed);
            if now != seen {
                (seen, quiet_since) = (now, Instant::now());
            }
        }
        seen
    }

    /// When the last message arrived.
    fn last_at(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A receiver's count of messages, and when the last arrived.
struct Counter {
    count: Arc<AtomicU64>,
    /// Nanoseconds after `epoch`.
    last: Arc<AtomicU64>,
    epoch: Instant,
}

impl Counter {
    fn add(&self, n: u64) {
        if n > 0 {
            let at = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last.store(at, Ordering::Relaxed);
            self.count.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Counts octet-counted frames (`LEN SP MSG`, RFC 6587) across reads.
#[derive(Default)]
struct Frames {
    /// Bytes of the current message still to skip.
    skip: usize,
    /// Digits of the next length read so far.
    len: usize,
}

impl Frames {
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut n = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(data.len());
                self.skip -= k;
                data = &data[k..];
                if self.skip == 0 {
                    n += 1;
                }
                continue;
            }
            let b = data[0];
            data = &data[1..];
            if b == b' ' {
                self.skip = self.len;
                self.len = 0;
            } else {
                self.len = self.len * 10 + usize::from(b - b'0');
            }
        }
        n
    }
}
