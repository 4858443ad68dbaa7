//! The JSON-lines form of a record: written by hand on the writer thread
//! (fast, no intermediate map), and the `Serialize` impl it must equal.
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use super::*;

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
        if let Some(g) = &self.client_group {
            text(out, "client_group", g);
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
        if let Some(p) = self.parent_status {
            out.extend_from_slice(b",\"parent_status\":");
            out.extend_from_slice(num.format(p).as_bytes());
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
pub(crate) fn write_hex16(out: &mut Vec<u8>, id: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(HEX[((id >> (shift * 4)) & 0xf) as usize]);
    }
}

/// Append a socket address as `Display` writes it; IPv4 without the
/// formatting machinery, IPv6 (rare here) through it.
pub(crate) fn write_addr(out: &mut Vec<u8>, addr: SocketAddr) {
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
pub(crate) fn write_rfc3339_millis(out: &mut Vec<u8>, ts: SystemTime) {
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

impl Serialize for Record {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("ts", &humantime::format_rfc3339_millis(self.ts).to_string())?;
        m.serialize_entry("id", &format_id(self.id))?;
        m.serialize_entry("client", &self.client.to_string())?;
        if let Some(u) = &self.user {
            m.serialize_entry("user", u.as_ref())?;
        }
        if let Some(g) = &self.client_group {
            m.serialize_entry("client_group", g.as_ref())?;
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
        if let Some(v) = self.parent_status {
            m.serialize_entry("parent_status", &v)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        r.parent_status = Some(407);
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
        assert_eq!(parsed["parent_status"], 407);
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
}
