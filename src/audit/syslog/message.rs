//! The RFC 5424 message for a record: header, structured data with every
//! record field, and the cut that keeps a datagram under its limit.

use super::*;
use crate::audit::{Decided, Record};

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
    if let Some(v) = r.parent_status {
        text("parent_status", &v.to_string());
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
