//! The RFC 5424 copy of every audit record (`audit.syslog`), for a central
//! syslog server or SIEM, beside the file copy.
//!
//! [`SyslogSink::write`] runs on the audit writer's thread and must never
//! wait on the network: it formats each record and offers the message to a
//! bounded queue. When the queue is full the message is dropped and counted
//! (`egress_syslog_dropped_total`); the file copy never waits for syslog.
//! One sender thread owns the socket: UDP (one datagram per record, at most
//! [`MAX_DATAGRAM`] bytes), TCP with octet-counting framing (RFC 6587
//! `LEN SP MSG`), or TLS (RFC 5425: the same framing inside TLS, the server
//! verified against the system roots plus `[tls] extra_roots`, optionally
//! presenting `audit.syslog_client_cert`), reconnecting with backoff when
//! the connection drops.
//! Messages handed to the socket are counted (`egress_syslog_sent_total`).
//!
//! A message: `<PRI>1 TIMESTAMP HOSTNAME egress-proxy PROCID audit
//! [egress@32473 id="…" client="…" …] {JSON record}`, facility local0,
//! severity notice for a `deny`, info otherwise. The structured data carries
//! every field of the record under its JSON name (absent fields are left
//! out); the message part is the record's JSON line.
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender as BatchTx};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::audit::{AuditSink, Record};
use crate::config::SyslogSettings;

mod destination;
mod message;
pub use destination::{Destination, Transport};
pub use message::{escape_param, Formatter};

/// Messages waiting for the sender thread; beyond this they are dropped.
pub const QUEUE: usize = 8192;
/// The largest UDP datagram sent: longer messages are cut (RFC 5424 §6.1
/// asks receivers to take 2048 octets and recommends 8192).
pub const MAX_DATAGRAM: usize = 8192;
/// The structured-data id: `egress` at the documentation enterprise number.
pub const SD_ID: &str = "egress@32473";
/// APP-NAME.
pub const APP_NAME: &str = "egress-proxy";
/// MSGID.
pub const MSG_ID: &str = "audit";
/// Facility local0.
const FACILITY: u8 = 16;
const SEVERITY_NOTICE: u8 = 5;
const SEVERITY_INFO: u8 = 6;
/// In a message cut to fit a datagram, string values are cut to this.
const CUT_VALUE: usize = 256;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A TCP connection idle this long is checked for a close by the server
/// before it is written to (otherwise the first message after a close is lost).
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long dropping the sink waits for queued messages to go out.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// Write attempts for one TCP message before it is dropped.
const TCP_ATTEMPTS: u32 = 3;

// === the sink ===

/// The counters the sink keeps (registered with the proxy's metrics).
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Messages handed to the socket.
    pub sent: Counter,
    /// Messages dropped: queue full, or the server unreachable.
    pub dropped: Counter,
}

/// State shared by the sink and its sender thread.
struct Flags {
    /// The sink is gone: send what is queued if connected, else give up.
    closing: AtomicBool,
    /// SIGHUP: resolve and connect again before the next message.
    reconnect: AtomicBool,
}

/// The messages of one [`AuditSink::write`], back to back: the writer
/// hands the sender thread one batch (one allocation, at most one wake-up)
/// per batch of records, not one per record.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Where each message ends in `bytes`.
    ends: Vec<usize>,
}

impl Batch {
    fn len(&self) -> usize {
        self.ends.len()
    }

    fn messages(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let m = &self.bytes[start..end];
            start = end;
            m
        })
    }
}

/// The audit sink that forwards each record to syslog without ever blocking.
pub struct SyslogSink {
    tx: Option<BatchTx<Batch>>,
    /// Messages queued for the sender (not yet taken by it), at most `queue`.
    queued: Arc<AtomicUsize>,
    queue: usize,
    fmt: Formatter,
    limit: Option<usize>,
    counters: Counters,
    flags: Arc<Flags>,
    done: Receiver<()>,
    /// True while the queue is full (to log the start of an overflow once).
    overflowing: bool,
}

impl SyslogSink {
    /// Parse `settings.url` and start the sender thread. Name resolution
    /// and connecting happen on that thread, never here; for `tls://` the
    /// roots and the client certificate are loaded here.
    ///
    /// # Errors
    /// The url is not a syslog address, a TLS file cannot be used, or the
    /// thread cannot be spawned.
    pub fn start(settings: &SyslogSettings, counters: Counters) -> io::Result<SyslogSink> {
        let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
        let dest =
            Destination::parse(&settings.url).map_err(|e| invalid(format!("audit.syslog: {e}")))?;
        let tls = match dest.transport {
            Transport::Tls => Some(tls_config(settings).map_err(invalid)?),
            Transport::Udp | Transport::Tcp => None,
        };
        SyslogSink::start_tls(dest, tls, counters, Formatter::new(), QUEUE)
    }

    /// Start with an explicit formatter and queue size (tests).
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn start_with(
        dest: Destination,
        counters: Counters,
        fmt: Formatter,
        queue: usize,
    ) -> io::Result<SyslogSink> {
        SyslogSink::start_tls(dest, None, counters, fmt, queue)
    }

    /// [`SyslogSink::start_with`] with the client configuration a `tls://`
    /// destination uses (required for one).
    ///
    /// # Errors
    /// A `tls://` destination without `tls`, or the thread cannot be spawned.
    pub fn start_tls(
        dest: Destination,
        tls: Option<Arc<ClientConfig>>,
        counters: Counters,
        fmt: Formatter,
        queue: usize,
    ) -> io::Result<SyslogSink> {
        if dest.transport == Transport::Tls && tls.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "audit.syslog: tls:// needs a TLS client configuration",
            ));
        }
        let (tx, rx) = mpsc::channel::<Batch>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (done_tx, done) = mpsc::sync_channel::<()>(1);
        let flags = Arc::new(Flags {
            closing: AtomicBool::new(false),
            reconnect: AtomicBool::new(false),
        });
        let limit = (dest.transport == Transport::Udp).then_some(MAX_DATAGRAM);
        let sender = Sender {
            dest,
            tls,
            rx,
            queued: Arc::clone(&queued),
            counters: counters.clone(),
            flags: Arc::clone(&flags),
            backoff: BACKOFF_MIN,
            down_since: None,
        };
        std::thread::Builder::new()
            .name("audit-syslog".into())
            .spawn(move || {
                sender.run();
                let _ = done_tx.send(());
            })?;
        Ok(SyslogSink {
            tx: Some(tx),
            queued,
            queue,
            fmt,
            limit,
            counters,
            flags,
            done,
            overflowing: false,
        })
    }
}

impl AuditSink for SyslogSink {
    fn write(&mut self, records: &[Record]) -> io::Result<()> {
        let Some(tx) = &self.tx else { return Ok(()) };
        // What the queue has room for is sent; the rest is dropped.
        let room = self
            .queue
            .saturating_sub(self.queued.load(Ordering::Acquire));
        let take = records.len().min(room);
        let mut dropped = records.len() - take;
        if take > 0 {
            let mut batch = Batch {
                bytes: Vec::with_capacity(take * 768),
                ends: Vec::with_capacity(take),
            };
            for r in &records[..take] {
                self.fmt.format(r, &mut batch.bytes, self.limit);
                batch.ends.push(batch.bytes.len());
            }
            self.queued.fetch_add(take, Ordering::AcqRel);
            if tx.send(batch).is_err() {
                self.queued.fetch_sub(take, Ordering::AcqRel);
                dropped += take;
            }
        }
        if dropped == 0 {
            self.overflowing = false;
        } else {
            self.counters.dropped.inc_by(dropped as u64);
            if !self.overflowing {
                tracing::warn!("syslog queue full: dropping audit messages (see egress_syslog_dropped_total); the file copy is complete");
                self.overflowing = true;
            }
        }
        // Syslog never fails the batch: the file copy must not be retried for it.
        Ok(())
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.flags.reconnect.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for SyslogSink {
    fn drop(&mut self) {
        // Closing the queue lets the sender finish what is queued; wait a
        // little for it (shutdown), never long.
        self.flags.closing.store(true, Ordering::Relaxed);
        drop(self.tx.take());
        let _ = self.done.recv_timeout(FLUSH_WAIT);
    }
}

// === the sender thread ===

enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream, Instant),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>, Instant),
}

struct Sender {
    dest: Destination,
    tls: Option<Arc<ClientConfig>>,
    rx: Receiver<Batch>,
    /// The sink's count of queued messages, lowered as batches are taken.
    queued: Arc<AtomicUsize>,
    counters: Counters,
    flags: Arc<Flags>,
    backoff: Duration,
    /// When the current outage began (to log it once, and its end).
    down_since: Option<Instant>,
}

impl Sender {
    fn run(mut self) {
        // Resolve and connect at start, so a wrong address shows in the log
        // at once rather than with the first record.
        let mut conn: Option<Conn> = self.open().ok();
        let mut frame = Vec::with_capacity(1024);
        while let Ok(batch) = self.rx.recv() {
            self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
            if self.flags.reconnect.swap(false, Ordering::Relaxed) {
                conn = None;
            }
            for (i, msg) in batch.messages().enumerate() {
                if !self.deliver(&mut conn, msg, &mut frame) {
                    return self.give_up((batch.len() - i) as u64);
                }
            }
        }
    }

    /// Send one message, connecting first if need be: a datagram once, a
    /// TCP message up to [`TCP_ATTEMPTS`] times on new connections. False
    /// when the sink is closing and the server is unreachable (give up).
    fn deliver(&mut self, conn: &mut Option<Conn>, msg: &[u8], frame: &mut Vec<u8>) -> bool {
        let mut attempts = 0;
        loop {
            let Some(c) = conn.as_mut() else {
                match self.open() {
                    Ok(c) => *conn = Some(c),
                    Err(()) if self.flags.closing.load(Ordering::Relaxed) => return false,
                    Err(()) => {}
                }
                continue;
            };
            match send(c, msg, frame) {
                Ok(()) => {
                    self.counters.sent.inc();
                    self.up();
                    return true;
                }
                Err(e) => {
                    self.down(&e);
                    *conn = None;
                    attempts += 1;
                    // A datagram is not retried; a TCP message is, on a new connection.
                    if self.dest.transport == Transport::Udp || attempts >= TCP_ATTEMPTS {
                        self.counters.dropped.inc();
                        return true;
                    }
                }
            }
        }
    }

    /// Resolve and open; on failure wait out the backoff (cut short when
    /// the sink closes) and return `Err`.
    fn open(&mut self) -> Result<Conn, ()> {
        let opened = self
            .dest
            .resolve()
            .and_then(|addrs| match self.dest.transport {
                Transport::Udp => open_udp(&addrs),
                Transport::Tcp => open_tcp(&addrs),
                Transport::Tls => open_tcp(&addrs).and_then(|c| match (c, &self.tls) {
                    (Conn::Tcp(s, _), Some(cfg)) => open_tls(s, &self.dest.host, cfg),
                    _ => Err(io::Error::other("no TLS configuration")),
                }),
            });
        match opened {
            Ok(c) => Ok(c),
            Err(e) => {
                self.down(&e);
                self.sleep_backoff();
                Err(())
            }
        }
    }

    fn sleep_backoff(&mut self) {
        let until = Instant::now() + self.backoff;
        while Instant::now() < until && !self.flags.closing.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20).min(self.backoff));
        }
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    fn down(&mut self, e: &io::Error) {
        if self.down_since.is_none() {
            tracing::warn!(syslog = %self.dest, error = %e, "syslog server unreachable; retrying with backoff (the file copy is unaffected)");
            self.down_since = Some(Instant::now());
        }
    }

    fn up(&mut self) {
        if let Some(t) = self.down_since.take() {
            tracing::info!(syslog = %self.dest, after = ?t.elapsed(), "syslog server reachable again");
        }
        self.backoff = BACKOFF_MIN;
    }

    /// The sink is gone and the server unreachable: count what is left as dropped.
    fn give_up(&self, in_hand: u64) {
        let left: u64 = self.rx.try_iter().map(|b| b.len() as u64).sum();
        self.counters.dropped.inc_by(in_hand + left);
    }
}

fn open_udp(addrs: &[SocketAddr]) -> io::Result<Conn> {
    let to = *addrs
        .first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
    let local: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    // Unconnected: ICMP errors from a closed port are not reported back,
    // as with any syslog sender; UDP gives no delivery guarantee anyway.
    Ok(Conn::Udp(UdpSocket::bind(local)?, to))
}

fn open_tcp(addrs: &[SocketAddr]) -> io::Result<Conn> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for a in addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                return Ok(Conn::Tcp(s, Instant::now()));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Send one message: a datagram, or an octet-counted frame (`LEN SP MSG`).
fn send(c: &mut Conn, msg: &[u8], frame: &mut Vec<u8>) -> io::Result<()> {
    match c {
        Conn::Udp(s, to) => s.send_to(msg, *to).map(|_| ()),
        Conn::Tcp(s, last) => {
            if last.elapsed() >= IDLE_CHECK {
                check_open(s)?;
            }
            octet_counted(frame, msg);
            s.write_all(frame)?;
            *last = Instant::now();
            Ok(())
        }
        Conn::Tls(s, last) => {
            if last.elapsed() >= IDLE_CHECK {
                check_open_tls(s)?;
            }
            octet_counted(frame, msg);
            s.write_all(frame)?;
            s.flush()?;
            *last = Instant::now();
            Ok(())
        }
    }
}

/// `LEN SP MSG` (RFC 6587 §3.4.1, RFC 5425 §4.3).
fn octet_counted(frame: &mut Vec<u8>, msg: &[u8]) {
    frame.clear();
    let _ = write!(frame, "{} ", msg.len());
    frame.extend_from_slice(msg);
}

/// The client configuration for `tls://`: the system roots plus
/// `[tls] extra_roots`, and the client certificate when one is set.
///
/// # Errors
/// A roots or certificate file cannot be used; the message says which.
pub fn tls_config(settings: &SyslogSettings) -> Result<Arc<ClientConfig>, String> {
    use crate::tls::client;
    let roots = client::roots(&settings.extra_roots).map_err(|e| format!("audit.syslog: {e}"))?;
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("audit.syslog: {e}"))?
            .with_root_certificates(roots);
    let cfg = match &settings.client_cert {
        Some((cert, key)) => {
            let (chain, key) = client::client_cert(cert, key)
                .map_err(|e| format!("audit.syslog_client_cert: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("audit.syslog_client_cert: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// TLS over a connected socket, the handshake done (so a certificate
/// problem shows as a connection failure, logged and retried with backoff).
fn open_tls(s: TcpStream, host: &str, cfg: &Arc<ClientConfig>) -> io::Result<Conn> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut conn = ClientConnection::new(Arc::clone(cfg), name).map_err(io::Error::other)?;
    s.set_read_timeout(Some(WRITE_TIMEOUT))?;
    let mut sock = s;
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(Conn::Tls(
        Box::new(StreamOwned::new(conn, sock)),
        Instant::now(),
    ))
}

/// Has the server closed an idle connection? (It never sends anything, so
/// a readable socket means EOF or an error.)
fn check_open(s: &TcpStream) -> io::Result<()> {
    s.set_nonblocking(true)?;
    let mut b = [0u8; 1];
    let r = s.peek(&mut b);
    s.set_nonblocking(false)?;
    match r {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "closed by the syslog server",
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e),
    }
}

/// [`check_open`] through TLS: the server may have sent records since
/// (session tickets, a close_notify), so read them without blocking rather
/// than peek at the socket.
fn check_open_tls(s: &mut StreamOwned<ClientConnection, TcpStream>) -> io::Result<()> {
    use std::io::Read as _;
    s.sock.set_nonblocking(true)?;
    let r = (|| loop {
        match s.conn.read_tls(&mut s.sock) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "closed by the syslog server",
                ))
            }
            Ok(_) => {
                s.conn.process_new_packets().map_err(io::Error::other)?;
                let mut b = [0u8; 256];
                match s.conn.reader().read(&mut b) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            "close_notify from the syslog server",
                        ))
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    })();
    s.sock.set_nonblocking(false)?;
    r
}

#[cfg(test)]
mod tests;
