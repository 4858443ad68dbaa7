//! The RFC 5424 message for a record: header, structured data with every
//! record field, and the cut that keeps a datagram under its limit.

use std::net::SocketAddr;

use super::*;
use crate::audit::json::{write_addr, write_hex16, write_rfc3339_millis};
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
        // Byte pushes, not `write!`: this runs once per record on the
        // audit writer's thread (as the JSON line does).
        out.push(b'<');
        out.extend_from_slice(
            itoa::Buffer::new()
                .format(FACILITY * 8 + severity)
                .as_bytes(),
        );
        out.extend_from_slice(b">1 ");
        write_rfc3339_millis(out, end);
        for part in [&self.hostname, APP_NAME, &self.procid, MSG_ID] {
            out.push(b' ');
            out.extend_from_slice(part.as_bytes());
        }
        out.extend_from_slice(b" [");
        out.extend_from_slice(SD_ID.as_bytes());
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
    let name = |out: &mut Vec<u8>, name: &str| {
        out.push(b' ');
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"=\"");
    };
    let text = |out: &mut Vec<u8>, key: &str, v: &str| {
        name(out, key);
        let v = match cut {
            Some(n) => &v[..utf8_floor(v.as_bytes(), n)],
            None => v,
        };
        escape_param(out, v);
        out.push(b'"');
    };
    // Timestamps, ids, numbers and IPv4 addresses need no escaping and are
    // far shorter than any cut: written in place, without a String each.
    let num = |out: &mut Vec<u8>, key: &str, v: u64| {
        name(out, key);
        out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        out.push(b'"');
    };
    let addr = |out: &mut Vec<u8>, key: &str, a: SocketAddr| {
        if a.is_ipv4() {
            name(out, key);
            write_addr(out, a);
            out.push(b'"');
        } else {
            // `[v6]:port`: the `]` is escaped.
            text(out, key, &a.to_string());
        }
    };
    name(out, "ts");
    write_rfc3339_millis(out, r.ts);
    out.extend_from_slice(b"\" id=\"");
    write_hex16(out, r.id);
    out.push(b'"');
    addr(out, "client", r.client);
    if let Some(u) = &r.user {
        text(out, "user", u);
    }
    if let Some(m) = &r.method {
        text(out, "method", m.as_str());
    }
    if let Some(h) = &r.host {
        text(out, "host", h);
    }
    if let Some(p) = r.port {
        num(out, "port", u64::from(p));
    }
    if let Some(u) = &r.url {
        text(out, "url", u);
    }
    text(out, "decision", r.decision.as_str());
    if let Some(v) = &r.rule {
        text(out, "rule", v);
    }
    if let Some(v) = r.reason {
        text(out, "reason", v.as_str());
    }
    if let Some(v) = r.upstream {
        addr(out, "upstream", v);
    }
    if let Some(v) = r.parent_status {
        num(out, "parent_status", u64::from(v));
    }
    if let Some(v) = &r.sni {
        text(out, "sni", v);
    }
    if r.ech {
        text(out, "ech", "true");
    }
    if let Some(v) = r.status {
        num(out, "status", u64::from(v));
    }
    num(out, "bytes_up", r.bytes_up);
    num(out, "bytes_down", r.bytes_down);
    num(out, "duration_ms", r.duration_ms);
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
