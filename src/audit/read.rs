//! The reader of written audit logs: what `suggest` and `replay` read.
//! Several files and globs (`audit.log*`), gzip-compressed files (by their
//! magic bytes) and standard input (`-`); each line is a JSON record
//! (`audit.format = "json"`) or a Squid access.log line (`audit.format =
//! "squid"`, [`squid_record`]), recognised per line. Fields it does not know
//! are ignored; lines that are not records are counted by why, not fatal.
use std::collections::BTreeMap;
use std::io::{self, BufRead, IsTerminal, Read};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(skip)]
    pub time: Option<SystemTime>,
    /// Read from a Squid line: no rule, no reason, and `allow` stands for
    /// any transaction let through (see [`Logged::fill_from`]).
    #[serde(skip)]
    pub squid: bool,
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

/// What reading logs found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Files read.
    pub files: u64,
    /// Records read (and passed to the caller, unless before `since`).
    pub records: u64,
    /// Of `records`, Squid lines.
    pub squid: u64,
    /// Lines that are not audit records (blank lines aside).
    pub skipped: u64,
    /// The first such line's number (in its file).
    pub first_skipped: Option<u64>,
    /// Why lines were skipped: how many, and where the first was.
    pub skipped_why: BTreeMap<&'static str, (u64, String)>,
    /// Records older than `since`, left out.
    pub before_since: u64,
}

impl LogStats {
    fn skip(&mut self, why: &'static str, source: &str, line: u64) {
        self.skipped += 1;
        self.first_skipped.get_or_insert(line);
        self.skipped_why
            .entry(why)
            .or_insert_with(|| (0, format!("{source}:{line}")))
            .0 += 1;
    }

    /// What was read, for standard error at the end:
    /// `read 3 files: 1200 records (40 Squid lines), 2 lines skipped (…)`.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "read {} file{}: {} record{}",
            self.files,
            plural(self.files),
            self.records + self.before_since,
            plural(self.records + self.before_since)
        );
        if self.squid > 0 {
            out += &format!(" ({} Squid line{})", self.squid, plural(self.squid));
        }
        if self.before_since > 0 {
            out += &format!(", {} before --since left out", self.before_since);
        }
        out += &format!(", {} line{} skipped", self.skipped, plural(self.skipped));
        if !self.skipped_why.is_empty() {
            let why: Vec<String> = self
                .skipped_why
                .iter()
                .map(|(w, (n, first))| format!("{w}: {n}, first {first}"))
                .collect();
            out += &format!(" ({})", why.join("; "));
        }
        out
    }

    /// A line for standard error when lines were skipped.
    pub fn skipped_note(&self, source: &str) -> Option<String> {
        (self.skipped > 0).then(|| {
            format!(
                "skipped {} unparsable line{} in {source} (first: line {}); only audit records (JSON or Squid lines) are read",
                self.skipped,
                plural(self.skipped),
                self.first_skipped.unwrap_or(0)
            )
        })
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Why a line was skipped.
const NOT_A_RECORD: &str = "neither a JSON record nor a Squid line";
const BAD_JSON: &str = "JSON but not an audit record (ts, decision)";
const BAD_SQUID: &str = "a Squid line with a bad field";

/// Open `path` for reading (`-`: standard input), gunzipping a file that
/// starts with gzip's magic bytes.
///
/// # Errors
/// The file cannot be opened.
pub fn open_log(path: &Path) -> io::Result<Box<dyn BufRead>> {
    if path == Path::new("-") {
        return Ok(Box::new(io::BufReader::new(io::stdin())));
    }
    let f = std::fs::File::open(path)?;
    maybe_gunzip(f)
}

fn maybe_gunzip<R: Read + 'static>(r: R) -> io::Result<Box<dyn BufRead>> {
    let mut r = io::BufReader::with_capacity(256 * 1024, r);
    if r.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        let gz = flate2::bufread::MultiGzDecoder::new(r);
        return Ok(Box::new(io::BufReader::with_capacity(256 * 1024, gz)));
    }
    Ok(Box::new(r))
}

/// The files `--audit` names: `-`, paths, and globs (`*`, `?`, `[`), each
/// glob's matches in name order. A glob that matches nothing is an error.
///
/// # Errors
/// A bad glob, or one with no match.
pub fn expand(patterns: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for p in patterns {
        let text = p.to_string_lossy();
        if p == Path::new("-") || !text.contains(['*', '?', '[']) {
            out.push(p.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = glob::glob(&text)
            .map_err(|e| format!("--audit {text:?}: {e}"))?
            .filter_map(Result::ok)
            .filter(|f| f.is_file())
            .collect();
        if found.is_empty() {
            return Err(format!("--audit {text:?}: no file matches"));
        }
        found.sort();
        out.append(&mut found);
    }
    Ok(out)
}

/// Read every log in `paths` (after [`expand`]), calling `f` with each
/// record at or after `since`. A progress bar on standard error shows the
/// bytes read when standard error is a terminal.
///
/// # Errors
/// A file cannot be opened or read.
pub fn read_logs(
    paths: &[PathBuf],
    since: Option<SystemTime>,
    mut f: impl FnMut(Logged),
) -> Result<LogStats, String> {
    let total: u64 = paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let bar = if io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut stats = LogStats::default();
    for p in paths {
        let source = p.display().to_string();
        bar.set_message(source.clone());
        let reader = if p == Path::new("-") {
            open_log(p)
        } else {
            std::fs::File::open(p).and_then(|file| maybe_gunzip(bar.wrap_read(file)))
        }
        .map_err(|e| format!("cannot read {source}: {e}"))?;
        read_one(reader, &source, since, &mut stats, &mut f)
            .map_err(|e| format!("cannot read {source}: {e}"))?;
        stats.files += 1;
    }
    bar.finish_and_clear();
    Ok(stats)
}

/// Read one audit log, calling `f` with each record at or after `since`.
/// Lines that are not records are counted, not fatal.
///
/// # Errors
/// An I/O error reading.
pub fn read_log(
    r: impl BufRead,
    since: Option<SystemTime>,
    mut f: impl FnMut(Logged),
) -> io::Result<LogStats> {
    let mut stats = LogStats::default();
    read_one(r, "-", since, &mut stats, &mut f)?;
    stats.files = 1;
    Ok(stats)
}

fn read_one(
    mut r: impl BufRead,
    source: &str,
    since: Option<SystemTime>,
    stats: &mut LogStats,
    f: &mut impl FnMut(Logged),
) -> io::Result<()> {
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
        let parsed = if line.starts_with(b"{") {
            serde_json::from_slice::<Logged>(line)
                .ok()
                .and_then(|mut l| {
                    l.time = Some(humantime::parse_rfc3339_weak(&l.ts).ok()?);
                    l.decided()?;
                    Some(l)
                })
                .ok_or(BAD_JSON)
        } else if line.first().is_some_and(u8::is_ascii_digit) {
            std::str::from_utf8(line)
                .ok()
                .and_then(squid_record)
                .ok_or(BAD_SQUID)
        } else {
            Err(NOT_A_RECORD)
        };
        let mut l = match parsed {
            Ok(l) => l,
            Err(why) => {
                stats.skip(why, source, n);
                continue;
            }
        };
        l.line = n;
        if since.is_some_and(|s| l.time.is_some_and(|t| t < s)) {
            stats.before_since += 1;
            continue;
        }
        stats.records += 1;
        stats.squid += u64::from(l.squid);
        f(l);
    }
    Ok(())
}

/// A Squid access.log line (`logformat squid`, as `audit.format = "squid"`
/// writes it: `time elapsed client code/status bytes method URL user
/// hierarchy/peer type`) as a record: the start time is `time - elapsed`;
/// `TCP_DENIED` is `deny` (with the reason unknown), `NONE_NONE` a refusal
/// before any policy (reason `squid NONE_NONE/…`), anything else `allow`.
pub fn squid_record(line: &str) -> Option<Logged> {
    let fields: Vec<&str> = line.split_ascii_whitespace().collect();
    let [time, elapsed, client, code, _bytes, method, url, ref rest @ ..] = fields[..] else {
        return None;
    };
    // The proxy-auth user, when the line has one; it decides user groups.
    let user = rest
        .first()
        .filter(|u| **u != "-")
        .map(|u| (*u).to_string());
    let (secs, millis) = time.split_once('.').unwrap_or((time, "0"));
    let end = SystemTime::UNIX_EPOCH
        + Duration::from_secs(secs.parse().ok()?)
        + Duration::from_millis(format!("{millis:0<3}").get(..3)?.parse().ok()?);
    let elapsed: u64 = elapsed.parse().ok()?;
    let start = end
        .checked_sub(Duration::from_millis(elapsed))
        .unwrap_or(end);
    client.parse::<IpAddr>().ok()?;
    let (tag, status) = code.split_once('/')?;
    let status: u16 = status.parse().ok()?;
    let (decision, reason) = if tag.starts_with("TCP_DENIED") {
        ("deny", (status != 403).then(|| format!("squid {code}")))
    } else if tag.starts_with("NONE") {
        ("deny", Some(format!("squid {code}")))
    } else if tag.starts_with("TCP_") {
        ("allow", None)
    } else {
        return None;
    };
    let mut l = Logged {
        ts: humantime::format_rfc3339_millis(start).to_string(),
        client: Some(client.to_string()),
        method: (method != "-").then(|| method.to_string()),
        host: None,
        port: None,
        url: None,
        decision: decision.to_string(),
        rule: None,
        reason,
        status: Some(status),
        time: Some(start),
        squid: true,
        line: 0,
        user,
        client_group: None,
    };
    if method == "CONNECT" {
        let (host, port) = url.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        l.host = Some(host.to_string());
        l.port = Some(port.parse().ok()?);
    } else if url != "-" {
        l.url = Some(url.to_string());
    }
    Some(l)
}

impl Logged {
    /// Fill in what a Squid line does not carry (the rule, the deny reason,
    /// `bypass` or `report`) by deciding the record under `policy` (the
    /// configuration's catalog, which wrote the log), when that agrees with
    /// the line: permitted and permitted, or refused and refused by policy.
    pub fn fill_from(&mut self, policy: &crate::policy::Policy) {
        use crate::policy::Verdict;
        if !self.squid || self.reason.is_some() {
            return;
        }
        let Some(t) = self.target() else {
            return;
        };
        let d = policy.decide(&t, &self.method());
        let name = |i: Option<usize>| i.and_then(|i| policy.rule(i)).map(|r| r.name.clone());
        match (self.decided(), d.verdict) {
            (Some(Decided::Allow), Verdict::Allow | Verdict::Bypass | Verdict::Report) => {
                self.decision = match d.verdict {
                    Verdict::Bypass => "bypass",
                    Verdict::Report => "report",
                    _ => "allow",
                }
                .into();
                self.rule = name(d.rule);
                self.reason = d.reason.map(|r| r.as_str().to_string());
            }
            (Some(Decided::Deny), Verdict::Deny) => {
                self.rule = name(d.rule);
                self.reason = d.reason.map(|r| r.as_str().to_string());
            }
            _ => {}
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn squid_lines_are_records() {
        let l = squid_record("1767323047.178   1500 192.0.2.10 TCP_TUNNEL/200 4242 CONNECT ksn1.kaspersky-labs.com:443 - HIER_DIRECT/203.0.113.7 -").unwrap();
        assert_eq!(l.ts, "2026-01-02T03:04:05.678Z");
        assert_eq!(
            (l.host.as_deref(), l.port),
            (Some("ksn1.kaspersky-labs.com"), Some(443))
        );
        assert_eq!(l.decided(), Some(Decided::Allow));
        assert_eq!(l.method(), http::Method::CONNECT);
        let l = squid_record("1767323045.678      0 192.0.2.10 TCP_DENIED/403 0 GET http://example.com/x?q=1 - HIER_NONE/- -").unwrap();
        assert_eq!(l.decided(), Some(Decided::Deny));
        assert_eq!(l.reason, None);
        assert_eq!(l.target().unwrap().to_string(), "example.com:80");
        let l = squid_record("1767323045.678      0 192.0.2.10 TCP_DENIED/407 0 CONNECT [2001:db8::1]:443 - HIER_NONE/- -").unwrap();
        assert_eq!(l.reason.as_deref(), Some("squid TCP_DENIED/407"));
        assert_eq!(l.host.as_deref(), Some("2001:db8::1"));
        let l =
            squid_record("1767323045.678      0 192.0.2.10 NONE_NONE/000 0 - - - HIER_NONE/- -")
                .unwrap();
        assert_eq!(l.reason.as_deref(), Some("squid NONE_NONE/000"));
        assert!(
            squid_record("1767323045.678 x 192.0.2.10 TCP_MISS/200 0 GET http://a/ -").is_none()
        );
        assert!(squid_record("1767323045.678 0 nobody TCP_MISS/200 0 GET http://a/ -").is_none());
    }

    #[test]
    fn json_and_squid_lines_mix_and_gzip_is_read_by_its_magic() {
        use std::io::Write as _;
        let text = "{\"ts\":\"2025-01-01T00:00:00Z\",\"host\":\"a.example\",\"port\":443,\"decision\":\"deny\",\"reason\":\"not_in_catalog\"}\n\
                    1767323045.678      0 192.0.2.10 TCP_DENIED/403 0 GET http://example.com/ - HIER_NONE/- -\n\
                    {\"no\":1}\n\
                    garbage\n";
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        let dir = std::env::temp_dir().join(format!("egress-read-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log.1");
        std::fs::write(&path, gz).unwrap();
        let mut got = Vec::new();
        let stats = read_logs(std::slice::from_ref(&path), None, |l| got.push(l)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            (stats.files, stats.records, stats.squid, stats.skipped),
            (1, 2, 1, 2)
        );
        assert!(got[1].squid && !got[0].squid);
        let summary = stats.summary();
        assert!(
            summary.contains("read 1 file: 2 records (1 Squid line), 2 lines skipped"),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("{NOT_A_RECORD}: 1, first {}:4", path.display())),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("{BAD_JSON}: 1, first {}:3", path.display())),
            "{summary}"
        );
    }
}
