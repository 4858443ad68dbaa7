//! The RFC 5424 copy of every audit record (`audit.syslog`), for a central
//! syslog server or SIEM, beside the file copy.
//!
//! [`SyslogSink::write`] runs on the audit writer's thread and must never
//! wait on the network: it formats each record and offers the message to a
//! bounded queue. When the queue is full the message is dropped and counted
//! (`egress_syslog_dropped_total`); the file copy never waits for syslog.
//! One sender thread owns the socket: UDP (one datagram per record, at most
//! [`MAX_DATAGRAM`] bytes) or TCP with octet-counting framing (RFC 6587
//! `LEN SP MSG`), reconnecting with backoff when the connection drops.
//! Messages handed to the socket are counted (`egress_syslog_sent_total`).
//!
//! A message: `<PRI>1 TIMESTAMP HOSTNAME egress-proxy PROCID audit
//! [egress@32473 id="…" client="…" …] {JSON record}`, facility local0,
//! severity notice for a `deny`, info otherwise. The structured data carries
//! every field of the record under its JSON name (absent fields are left
//! out); the message part is the record's JSON line.
use std::io::{self, Write as _};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use crate::audit::{AuditSink, Decided, Record};

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

/// How messages travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A parsed `audit.syslog` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub transport: Transport,
    /// A name or an IP address (without brackets).
    pub host: String,
    /// 514 when the value names none.
    pub port: u16,
}

impl Destination {
    /// Parse `udp://host[:port]` or `tcp://host[:port]` (IPv6 in brackets).
    ///
    /// # Errors
    /// The value is not of that form; the message says why.
    pub fn parse(s: &str) -> Result<Destination, String> {
        let (transport, rest) = if let Some(r) = s.strip_prefix("udp://") {
            (Transport::Udp, r)
        } else if let Some(r) = s.strip_prefix("tcp://") {
            (Transport::Tcp, r)
        } else {
            return Err(format!(
                "{s:?}: write \"udp://host:514\" or \"tcp://host:514\""
            ));
        };
        if rest.contains(['/', '@', '?', '#']) || rest.contains(char::is_whitespace) {
            return Err(format!(
                "{s:?}: only a host and a port may follow the scheme"
            ));
        }
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            let port = match after {
                "" => None,
                a => Some(
                    a.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':port' after ']'"))?,
                ),
            };
            (h, port)
        } else {
            match rest.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(format!(
                        "{s:?}: write an IPv6 address in brackets, [::1]:514"
                    ))
                }
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        let port = match port {
            None => 514,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{s:?}: {p:?} is not a port")),
            },
        };
        Ok(Destination {
            transport,
            host: host.to_string(),
            port,
        })
    }

    /// Resolve now (blocking; only on the sender thread).
    fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = (self.host.as_str(), self.port).to_socket_addrs()?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
        }
        Ok(addrs)
    }
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

// === the message ===

/// Formats records as RFC 5424 messages for this host and process.
#[derive(Clone, Debug)]
pub struct Formatter {
    hostname: String,
    procid: String,
}

impl Formatter {
    /// This machine's name (from the kernel; `-` when unknown) and process id.
    pub fn new() -> Self {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        Formatter::with(&name, std::process::id())
    }

    /// A formatter with a given host name (cleaned to RFC 5424's
    /// PRINTUSASCII, at most 255) and process id.
    pub fn with(hostname: &str, pid: u32) -> Self {
        let clean: String = hostname
            .trim()
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(255)
            .collect();
        Formatter {
            hostname: if clean.is_empty() { "-".into() } else { clean },
            procid: pid.to_string(),
        }
    }

    /// Append the message for `r` to `out` (no framing). With `limit`, the
    /// message is at most that long (a UDP datagram): the JSON part is cut
    /// first, then, if the structured data alone is too long, its string
    /// values are cut to [`CUT_VALUE`] bytes (which bounds it to a few KiB),
    /// and the structured data then says `truncated="true"`. Values are cut
    /// before escaping and on UTF-8 boundaries, so the header and structured
    /// data stay well formed; the JSON part is free-form text and may end
    /// mid-token.
    pub fn format(&self, r: &Record, out: &mut Vec<u8>, limit: Option<usize>) {
        let start = out.len();
        self.head(r, out, None, false);
        out.push(b' ');
        r.write_json(out);
        let Some(limit) = limit else { return };
        if out.len() - start <= limit {
            return;
        }
        // Too long for a datagram: keep the structured data whole if it
        // fits, else cut its long values; then as much JSON as fits.
        out.truncate(start);
        self.head(r, out, None, true);
        if out.len() - start + 1 > limit {
            out.truncate(start);
            self.head(r, out, Some(CUT_VALUE), true);
        }
        let room = (start + limit).saturating_sub(out.len() + 1);
        if room > 0 {
            let mut json = Vec::new();
            r.write_json(&mut json);
            out.push(b' ');
            out.extend_from_slice(&json[..utf8_floor(&json, room)]);
        }
    }

    /// `<PRI>1 TIMESTAMP HOSTNAME APP PROCID MSGID [SD]`.
    fn head(&self, r: &Record, out: &mut Vec<u8>, cut: Option<usize>, truncated: bool) {
        let severity = if r.decision == Decided::Deny {
            SEVERITY_NOTICE
        } else {
            SEVERITY_INFO
        };
        // The event is the end of the transaction, when the record is written.
        let end =
            r.ts.checked_add(Duration::from_millis(r.duration_ms))
                .unwrap_or(r.ts);
        let _ = write!(
            out,
            "<{}>1 {} {} {APP_NAME} {} {MSG_ID} [{SD_ID}",
            FACILITY * 8 + severity,
            humantime::format_rfc3339_millis(end),
            self.hostname,
            self.procid,
        );
        sd_fields(r, out, cut);
        if truncated {
            out.extend_from_slice(b" truncated=\"true\"");
        }
        out.push(b']');
    }
}

impl Default for Formatter {
    fn default() -> Self {
        Formatter::new()
    }
}

/// Every field of the record as SD-PARAMs, in the JSON order and names.
fn sd_fields(r: &Record, out: &mut Vec<u8>, cut: Option<usize>) {
    let mut text = |name: &str, v: &str| {
        let _ = write!(out, " {name}=\"");
        let v = match cut {
            Some(n) => &v[..utf8_floor(v.as_bytes(), n)],
            None => v,
        };
        escape_param(out, v);
        out.push(b'"');
    };
    text("ts", &humantime::format_rfc3339_millis(r.ts).to_string());
    text("id", &r.id_string());
    text("client", &r.client.to_string());
    if let Some(u) = &r.user {
        text("user", u);
    }
    if let Some(m) = &r.method {
        text("method", m.as_str());
    }
    if let Some(h) = &r.host {
        text("host", h);
    }
    if let Some(p) = r.port {
        text("port", &p.to_string());
    }
    if let Some(u) = &r.url {
        text("url", u);
    }
    text("decision", r.decision.as_str());
    if let Some(v) = &r.rule {
        text("rule", v);
    }
    if let Some(v) = r.reason {
        text("reason", v.as_str());
    }
    if let Some(v) = r.upstream {
        text("upstream", &v.to_string());
    }
    if let Some(v) = &r.sni {
        text("sni", v);
    }
    if r.ech {
        text("ech", "true");
    }
    if let Some(v) = r.status {
        text("status", &v.to_string());
    }
    text("bytes_up", &r.bytes_up.to_string());
    text("bytes_down", &r.bytes_down.to_string());
    text("duration_ms", &r.duration_ms.to_string());
}

/// RFC 5424 §6.3.3: `"`, `\` and `]` in a PARAM-VALUE are escaped with `\`.
pub fn escape_param(out: &mut Vec<u8>, v: &str) {
    for &b in v.as_bytes() {
        if matches!(b, b'"' | b'\\' | b']') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// The longest prefix of `b` no longer than `max` that ends on a UTF-8
/// character boundary.
fn utf8_floor(b: &[u8], max: usize) -> usize {
    if b.len() <= max {
        return b.len();
    }
    let mut n = max;
    // Continuation bytes are 0b10xx_xxxx: step back to a character start.
    while n > 0 && (b[n] & 0xC0) == 0x80 {
        n -= 1;
    }
    n
}

// === the sink ===

/// The counters the sink keeps (registered in [`crate::metrics::Metrics`]).
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

/// The audit sink that forwards each record to syslog without ever blocking.
pub struct SyslogSink {
    tx: Option<SyncSender<Vec<u8>>>,
    fmt: Formatter,
    limit: Option<usize>,
    counters: Counters,
    flags: Arc<Flags>,
    done: Receiver<()>,
    /// True while the queue is full (to log the start of an overflow once).
    overflowing: bool,
}

impl SyslogSink {
    /// Parse `url` and start the sender thread. Name resolution and
    /// connecting happen on that thread, never here.
    ///
    /// # Errors
    /// `url` is not a syslog address, or the thread cannot be spawned.
    pub fn start(url: &str, counters: Counters) -> io::Result<SyslogSink> {
        let dest = Destination::parse(url).map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("audit.syslog: {e}"))
        })?;
        SyslogSink::start_with(dest, counters, Formatter::new(), QUEUE)
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
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(queue);
        let (done_tx, done) = mpsc::sync_channel::<()>(1);
        let flags = Arc::new(Flags {
            closing: AtomicBool::new(false),
            reconnect: AtomicBool::new(false),
        });
        let limit = (dest.transport == Transport::Udp).then_some(MAX_DATAGRAM);
        let sender = Sender {
            dest,
            rx,
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
        for r in records {
            let mut msg = Vec::with_capacity(768);
            self.fmt.format(r, &mut msg, self.limit);
            match tx.try_send(msg) {
                Ok(()) => self.overflowing = false,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.counters.dropped.inc();
                    if !self.overflowing {
                        tracing::warn!("syslog queue full: dropping audit messages (see egress_syslog_dropped_total); the file copy is complete");
                        self.overflowing = true;
                    }
                }
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
}

struct Sender {
    dest: Destination,
    rx: Receiver<Vec<u8>>,
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
        while let Ok(msg) = self.rx.recv() {
            if self.flags.reconnect.swap(false, Ordering::Relaxed) {
                conn = None;
            }
            let mut attempts = 0;
            loop {
                let Some(c) = conn.as_mut() else {
                    match self.open() {
                        Ok(c) => conn = Some(c),
                        Err(()) if self.flags.closing.load(Ordering::Relaxed) => {
                            return self.give_up(1);
                        }
                        Err(()) => continue,
                    }
                    continue;
                };
                match send(c, &msg, &mut frame) {
                    Ok(()) => {
                        self.counters.sent.inc();
                        self.up();
                        break;
                    }
                    Err(e) => {
                        self.down(&e);
                        conn = None;
                        attempts += 1;
                        // A datagram is not retried; a TCP message is, on a new connection.
                        if self.dest.transport == Transport::Udp || attempts >= TCP_ATTEMPTS {
                            self.counters.dropped.inc();
                            break;
                        }
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
        let left = self.rx.try_iter().count() as u64;
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
            frame.clear();
            let _ = write!(frame, "{} ", msg.len());
            frame.extend_from_slice(msg);
            s.write_all(frame)?;
            *last = Instant::now();
            Ok(())
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::SystemTime;

    use crate::reason::Reason;

    fn record() -> Record {
        let ts = SystemTime::UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
        let mut r = Record::new(0xabc, "192.0.2.10:40000".parse().unwrap(), ts);
        r.method = Some(http::Method::GET);
        r.host = Some("example.com".into());
        r.port = Some(80);
        r.url = Some("http://example.com/a\"b]c\\d".into());
        r.reason = Some(Reason::NotInCatalog);
        r.status = Some(403);
        r.duration_ms = 2;
        r
    }

    fn text(r: &Record, limit: Option<usize>) -> String {
        let mut out = Vec::new();
        Formatter::with("gw-01", 4321).format(r, &mut out, limit);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn destinations_parse() {
        let d = Destination::parse("udp://127.0.0.1:5514").unwrap();
        assert_eq!(
            (d.transport, d.host.as_str(), d.port),
            (Transport::Udp, "127.0.0.1", 5514)
        );
        let d = Destination::parse("tcp://siem.example.net").unwrap();
        assert_eq!(
            (d.transport, d.host.as_str(), d.port),
            (Transport::Tcp, "siem.example.net", 514)
        );
        let d = Destination::parse("tcp://[::1]:6514").unwrap();
        assert_eq!((d.host.as_str(), d.port), ("::1", 6514));
        assert_eq!(d.to_string(), "tcp://[::1]:6514");
        assert_eq!(Destination::parse("udp://[::1]").unwrap().port, 514);
        for bad in [
            "udp://",
            "udp://:514",
            "udp://host:0",
            "udp://host:99999",
            "udp://host:x",
            "udp://::1:514",
            "udp://[::1",
            "udp://[::1]514",
            "udp://host:514/path",
            "udp://user@host:514",
            "http://host:514",
            "tcp://ho st:514",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad} must not parse");
        }
    }

    #[test]
    fn a_denial_is_a_notice_with_every_field_escaped() {
        let t = text(&record(), None);
        let want = "<133>1 2026-01-02T03:04:05.680Z gw-01 egress-proxy 4321 audit \
                    [egress@32473 ts=\"2026-01-02T03:04:05.678Z\" id=\"0000000000000abc\" \
                    client=\"192.0.2.10:40000\" method=\"GET\" host=\"example.com\" port=\"80\" \
                    url=\"http://example.com/a\\\"b\\]c\\\\d\" decision=\"deny\" reason=\"not_in_catalog\" \
                    status=\"403\" bytes_up=\"0\" bytes_down=\"0\" duration_ms=\"2\"] {";
        assert!(t.starts_with(want), "{t}\n{want}");
        let json = &t[t.find("] {").unwrap() + 2..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v, serde_json::to_value(record()).unwrap());
    }

    #[test]
    fn an_allowed_transaction_is_info_and_absent_fields_are_left_out() {
        let mut r = record();
        r.decision = Decided::Bypass;
        r.method = Some(http::Method::CONNECT);
        r.url = None;
        r.reason = None;
        r.status = Some(200);
        r.user = Some(Arc::from("gateway"));
        r.rule = Some(Arc::from("KSN"));
        r.sni = Some("example.com".into());
        r.ech = true;
        r.upstream = Some("[2001:db8::1]:443".parse().unwrap());
        let t = text(&r, None);
        assert!(t.starts_with("<134>1 "), "{t}");
        assert!(!t.contains(" url=") && !t.contains(" reason="), "{t}");
        for p in [
            " user=\"gateway\"",
            " rule=\"KSN\"",
            " sni=\"example.com\"",
            " ech=\"true\"",
            " upstream=\"[2001:db8::1\\]:443\"",
        ] {
            assert!(t.contains(p), "{p} missing: {t}");
        }
    }

    #[test]
    fn the_hostname_is_printable_ascii_or_nil() {
        assert!(text(&record(), None).contains(" gw-01 egress-proxy "));
        let mut out = Vec::new();
        Formatter::with(" \n", 1).format(&record(), &mut out, None);
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Z - egress-proxy 1 audit "));
    }

    #[test]
    fn a_huge_record_is_cut_to_a_well_formed_datagram() {
        let mut r = record();
        r.url = Some(format!("http://example.com/{}", "é]".repeat(20_000)));
        let t = text(&r, Some(MAX_DATAGRAM));
        assert!(t.len() <= MAX_DATAGRAM, "{}", t.len());
        assert!(t.contains(" truncated=\"true\"] {"), "{t}");
        assert!(
            t.contains(" duration_ms=\"2\""),
            "every field is still there"
        );
        // A cut value ends cleanly: no dangling escape before the closing quote.
        let url = &t[t.find(" url=\"").unwrap() + 6..t.find("\" decision=").unwrap()];
        assert!(!url.ends_with('\\') || url.ends_with("\\\\"), "{url}");
        // A record that fits is not marked.
        assert!(!text(&record(), Some(MAX_DATAGRAM)).contains("truncated"));
        // A medium record keeps its structured data whole and cuts only the JSON.
        r.url = Some(format!("http://example.com/{}", "x".repeat(5000)));
        let t = text(&r, Some(MAX_DATAGRAM));
        assert!(
            t.len() <= MAX_DATAGRAM && t.contains(&"x".repeat(5000)),
            "{}",
            t.len()
        );
        assert!(t.contains(" truncated=\"true\"]"));
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        // A TCP server that never accepts: the sender blocks in backoff.
        let dest = Destination::parse("tcp://127.0.0.1:1").unwrap();
        let counters = Counters::default();
        let mut sink =
            SyslogSink::start_with(dest, counters.clone(), Formatter::with("h", 1), 4).unwrap();
        let batch = vec![record(); 100];
        let t = Instant::now();
        sink.write(&batch).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // At most the queue plus the one in hand are kept.
        assert!(counters.dropped.get() >= 95, "{}", counters.dropped.get());
        assert_eq!(counters.sent.get(), 0);
        drop(sink);
        assert_eq!(
            counters.dropped.get(),
            100,
            "what was left is counted at close"
        );
    }

    /// Read one octet-counted frame.
    fn frame(s: &mut std::net::TcpStream) -> Option<String> {
        let mut len = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).ok()? == 0 {
                return None;
            }
            if b[0] == b' ' {
                break;
            }
            len.push(b[0]);
        }
        let n: usize = std::str::from_utf8(&len).ok()?.parse().ok()?;
        let mut msg = vec![0u8; n];
        s.read_exact(&mut msg).ok()?;
        String::from_utf8(msg).ok()
    }

    #[test]
    fn tcp_frames_are_octet_counted_and_the_sender_reconnects() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("tcp://{}", l.local_addr().unwrap());
        let counters = Counters::default();
        let mut sink = SyslogSink::start(&url, counters.clone()).unwrap();
        let mut r = record();
        sink.write(std::slice::from_ref(&r)).unwrap();
        let (mut c1, _) = l.accept().unwrap();
        c1.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let m = frame(&mut c1).unwrap();
        assert!(
            m.starts_with("<133>1 ") && m.contains("id=\"0000000000000abc\""),
            "{m}"
        );
        // The server goes away; the next messages arrive on a new connection.
        drop(c1);
        std::thread::sleep(IDLE_CHECK + Duration::from_millis(100));
        r.id = 0xdef;
        sink.write(std::slice::from_ref(&r)).unwrap();
        let (mut c2, _) = l.accept().unwrap();
        c2.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let m = frame(&mut c2).unwrap();
        assert!(m.contains("id=\"0000000000000def\""), "{m}");
        drop(sink);
        assert_eq!((counters.sent.get(), counters.dropped.get()), (2, 0));
    }
}
