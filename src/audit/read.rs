//! The reader of written JSON-lines audit logs (a file or standard input):
//! what `suggest` and `replay` read. Fields it does not know are ignored;
//! lines that are not records are counted, not fatal.
use std::io::{self, BufRead};
use std::net::IpAddr;
use std::path::Path;
use std::time::SystemTime;

use serde::Deserialize;

use super::Decided;
use crate::reason::Reason;
use crate::target::{self, Host, Target};

/// One line of a JSON-lines audit log, as written by the proxy. Fields this
/// version does not know are ignored.
#[derive(Clone, Debug, Deserialize)]
pub struct Logged {
    pub ts: String,
    #[serde(default)]
    pub client: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub client_group: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub url: Option<String>,
    pub decision: String,
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(skip)]
    pub time: Option<SystemTime>,
    /// The line number in the file (from 1).
    #[serde(skip)]
    pub line: u64,
}

impl Logged {
    /// The `decision` field, if it is one this version knows.
    pub fn decided(&self) -> Option<Decided> {
        Some(match self.decision.as_str() {
            "allow" => Decided::Allow,
            "bypass" => Decided::Bypass,
            "inspect" => Decided::Inspect,
            "deny" => Decided::Deny,
            "report" => Decided::Report,
            _ => return None,
        })
    }

    /// The `reason` field, if present and known.
    pub fn reason_code(&self) -> Option<Reason> {
        let r = self.reason.as_deref()?;
        Reason::ALL.into_iter().find(|x| x.as_str() == r)
    }

    /// The client address without its port.
    pub fn client_ip(&self) -> Option<IpAddr> {
        let c = self.client.as_deref()?;
        c.parse::<std::net::SocketAddr>()
            .map(|s| s.ip())
            .or_else(|_| c.parse::<IpAddr>())
            .ok()
    }

    /// The target: `host` and `port`, else the `url` of a plain HTTP request.
    pub fn target(&self) -> Option<Target> {
        if let (Some(h), Some(port)) = (self.host.as_deref(), self.port) {
            let host = match h.parse::<IpAddr>() {
                Ok(ip) => Host::Ip(ip),
                Err(_) => target::normalize_host(h).ok()?,
            };
            return (port != 0).then_some(Target { host, port });
        }
        let uri: http::Uri = self.url.as_deref()?.parse().ok()?;
        target::parse_absolute(&uri).ok()
    }

    /// The method, `CONNECT` for a tunnel; a record without one is a
    /// `GET` when it has a URL, else a tunnel.
    pub fn method(&self) -> http::Method {
        match self
            .method
            .as_deref()
            .map(|m| http::Method::from_bytes(m.as_bytes()))
        {
            Some(Ok(m)) => m,
            _ if self.url.is_some() => http::Method::GET,
            _ => http::Method::CONNECT,
        }
    }
}

/// What reading a log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Records read (and passed to the caller, unless before `since`).
    pub records: u64,
    /// Lines that are not audit records in JSON (blank lines aside).
    pub skipped: u64,
    /// The first such line's number.
    pub first_skipped: Option<u64>,
    /// Records older than `since`, left out.
    pub before_since: u64,
}

impl LogStats {
    /// A line for standard error when lines were skipped.
    pub fn skipped_note(&self, source: &str) -> Option<String> {
        (self.skipped > 0).then(|| {
            format!(
                "skipped {} unparsable line{} in {source} (first: line {}); only JSON audit records (audit.format = \"json\") are read",
                self.skipped,
                if self.skipped == 1 { "" } else { "s" },
                self.first_skipped.unwrap_or(0)
            )
        })
    }
}

/// Open `path` for reading (`-`: standard input).
///
/// # Errors
/// The file cannot be opened.
pub fn open_log(path: &Path) -> io::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::BufReader::new(io::stdin())));
    }
    let f = std::fs::File::open(path)?;
    Ok(Box::new(io::BufReader::with_capacity(256 * 1024, f)))
}

/// Read a JSON-lines audit log, calling `f` with each record at or after
/// `since`. Lines that are not records are counted, not fatal.
///
/// # Errors
/// An I/O error reading.
pub fn read_log(
    mut r: impl BufRead,
    since: Option<SystemTime>,
    mut f: impl FnMut(Logged),
) -> io::Result<LogStats> {
    let mut stats = LogStats::default();
    let mut buf = Vec::with_capacity(1024);
    let mut n = 0u64;
    loop {
        buf.clear();
        if r.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        n += 1;
        let line = buf.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let parsed = serde_json::from_slice::<Logged>(line)
            .ok()
            .and_then(|mut l| {
                l.time = Some(humantime::parse_rfc3339_weak(&l.ts).ok()?);
                l.decided()?;
                l.line = n;
                Some(l)
            });
        let Some(l) = parsed else {
            stats.skipped += 1;
            stats.first_skipped.get_or_insert(n);
            continue;
        };
        if since.is_some_and(|s| l.time.is_some_and(|t| t < s)) {
            stats.before_since += 1;
            continue;
        }
        stats.records += 1;
        f(l);
    }
    Ok(stats)
}

/// `--since`: a duration back from `now` (`"1h"`, `"30m"`) or an RFC 3339 time.
///
/// # Errors
/// Neither.
pub fn parse_since(value: &str, now: SystemTime) -> Result<SystemTime, String> {
    let v = value.trim();
    if let Ok(t) = humantime::parse_rfc3339_weak(v) {
        return Ok(t);
    }
    let d = humantime::parse_duration(v)
        .map_err(|_| format!("--since {value:?}: write a duration such as \"1h\" or \"30m\", or a time such as \"2025-01-31T08:00:00Z\""))?;
    Ok(now.checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH))
}
