//! ClientHello peek for spliced CONNECT tunnels.
//!
//! After the proxy answers `200` to a CONNECT it does not decrypt, it reads the
//! client's first bytes, keeps them, and asks [`peek`] what they are. The
//! caller appends every new read to its buffer and calls [`peek`] again while
//! the answer is [`Peek::NeedMore`]; the kept bytes are later replayed to the
//! upstream unchanged. This module is pure and synchronous: no I/O, no state
//! between calls, no panics, and work linear in `buf.len()` (at most
//! [`MAX_HELLO_BYTES`] of it is ever examined).
//!
//! # What is checked
//!
//! * "TLS or not" is judged as the most lenient TLS server would judge it,
//!   because the tunnel is spliced and the upstream, not this peek, decides
//!   what the bytes mean. Go's `crypto/tls` takes any first record whose
//!   type is alert or handshake and whose version is below `0x1000` (it
//!   drops warning alerts before the ClientHello and never checks the
//!   version of the first record); OpenSSL still takes an SSLv2-compatible
//!   hello. So a first byte that is a TLS record content type
//!   (`0x14`–`0x18`), whatever the bytes after it, is TLS, and so is an
//!   SSLv2 record header carrying CLIENT-HELLO (OpenSSL's own test: high bit
//!   of the first byte set, third byte `0x01`). Only a clean sequence of
//!   handshake records (record version `0x03xx`) carrying a ClientHello
//!   passes; every other TLS-shaped start is [`Peek::Malformed`] (fail
//!   closed). Everything else is [`Peek::NotTls`], decided on the first
//!   byte (the third for a high first byte).
//! * Otherwise the handshake records are reassembled (a ClientHello may be
//!   fragmented over several records, and each record over several reads)
//!   until the first handshake message is complete. Anything that is not a
//!   clean sequence of handshake records carrying exactly one ClientHello is
//!   [`Peek::Malformed`] (fail closed): another record type before the hello
//!   is complete, a zero-length or over-long record, a first handshake message
//!   that is not a ClientHello, a record that carries bytes past the end of
//!   the hello, a hello too big for [`MAX_HELLO_BYTES`], bytes left over
//!   inside the hello or its extension block, a duplicated extension, an
//!   extension whose contents do not parse, and a `server_name` extension
//!   that is not exactly one non-empty UTF-8 `host_name`.
//! * Bytes after the record that completes the hello (a TLS 1.3 client may
//!   pipeline ChangeCipherSpec and early data) are ignored.
//!
//! Parsing is done by `tls-parser`: [`parse_tls_handshake_client_hello`] on the
//! reassembled message body (rather than `parse_tls_message_handshake`, which
//! silently drops bytes left over inside the message), `parse_tls_extension_unknown`
//! for the raw extension framing (types, duplicates, the exact `server_name`
//! bytes) and [`parse_tls_client_hello_extensions`] to check that every
//! extension's contents parse. Only the record reassembly is done here.
//!
//! # No rustls cross-check
//!
//! The hello is *not* also fed to `rustls::server::Acceptor`. The tunnel is
//! spliced: what matters is whether the *upstream* (OpenSSL, BoringSSL, Go,
//! SChannel, ...) accepts the hello, and rustls is stricter than many of them
//! in ways that have nothing to do with the SNI check, so failing closed on
//! its verdict would refuse legitimate clients. Observed with rustls 0.23
//! (see the `rustls_*` tests): it refuses a hello without a
//! `signature_algorithms` extension (legal before TLS 1.3, sent by legacy
//! TLS 1.0–1.2 clients), refuses an SNI that is not a syntactically valid DNS
//! name, and *accepts* an IP-address SNI but reports it as "no SNI" — so it
//! would not even give us the name that was sent. The checks that matter for
//! the SNI decision (a single `host_name`, no duplicate `server_name`
//! extension, no bytes hidden around it) are done here explicitly; the extra
//! cost of a second full parse per tunnel would buy nothing for the decision.
//! In tests, rustls is used as an oracle: for real rustls-generated hellos
//! both parsers agree on the name.

use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_extension_sni_content,
    parse_tls_extension_unknown, parse_tls_handshake_client_hello, SNIType, TlsExtension,
};

#[cfg(test)]
mod tests;

/// The most bytes [`peek`] will look at: if this many bytes are buffered and
/// the ClientHello is still not complete, the answer is [`Peek::Malformed`].
/// A handshake message announcing a length that cannot fit is refused at once.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// The largest record accepted. TLSPlaintext fragments are at most 2^14
/// bytes; this is the (lenient) TLSCiphertext bound, 2^14 + 2048.
pub const MAX_RECORD_LEN: usize = (1 << 14) + 2048;

/// TLS extension type of `encrypted_client_hello` (draft-ietf-tls-esni).
pub const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// TLS alert description `handshake_failure`.
pub const ALERT_HANDSHAKE_FAILURE: u8 = 40;
/// TLS alert description `access_denied`.
pub const ALERT_ACCESS_DENIED: u8 = 49;
/// TLS alert description `decode_error`.
pub const ALERT_DECODE_ERROR: u8 = 50;
/// TLS alert description `unrecognized_name`.
pub const ALERT_UNRECOGNIZED_NAME: u8 = 112;

/// TLS record content types: change_cipher_spec, alert, handshake,
/// application_data, heartbeat. A server reading a record of any of them
/// first takes the connection for TLS.
const RECORD_TYPES: std::ops::RangeInclusive<u8> = 0x14..=0x18;
const SSL2_MT_CLIENT_HELLO: u8 = 1;
const CONTENT_TYPE_CHANGE_CIPHER_SPEC: u8 = 0x14;
const CONTENT_TYPE_ALERT: u8 = 0x15;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const CONTENT_TYPE_APPLICATION_DATA: u8 = 0x17;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;

/// What the first bytes of a tunnel are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Looks like TLS so far; the ClientHello is not complete yet.
    NeedMore,
    /// No TLS server would take the first bytes as a record: not TLS.
    NotTls,
    /// A complete, well-formed ClientHello.
    Hello(ClientHelloInfo),
    /// Starts like TLS but is not a parsable ClientHello (fail closed). The
    /// text is a short reason for logs.
    Malformed(&'static str),
    /// After a HelloRetryRequest only ([`peek_retry`]): the client gives up
    /// with a fatal alert instead of a second hello. The first `n` bytes
    /// (any ChangeCipherSpec or early data, then the alert) may go to the
    /// upstream, and nothing the client sends after them.
    Abort(usize),
}

/// What the SNI check needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHelloInfo {
    /// The `server_name` host name exactly as sent (not normalised), if any.
    pub sni: Option<String>,
    /// True when the hello carries an `encrypted_client_hello` extension.
    pub ech: bool,
}

/// Classify the bytes a client sent first in a tunnel.
///
/// `buf` is everything read so far; call again with more bytes appended while
/// the answer is [`Peek::NeedMore`]. Never panics; looks at no more than
/// [`MAX_HELLO_BYTES`] bytes.
pub fn peek(buf: &[u8]) -> Peek {
    match buf {
        [] => return Peek::NeedMore,
        [first, ..] if *first & 0x80 != 0 => return sslv2(buf),
        [first, ..] if !RECORD_TYPES.contains(first) => return Peek::NotTls,
        [first, ..] if *first != CONTENT_TYPE_HANDSHAKE => {
            return Peek::Malformed("a TLS record other than a handshake comes first")
        }
        [_] => return Peek::NeedMore,
        [_, major, ..] if *major != 0x03 => return Peek::Malformed("bad record version"),
        _ => {}
    }
    let buf = &buf[..buf.len().min(MAX_HELLO_BYTES)];
    match scan_records(buf) {
        Scan::Incomplete if buf.len() >= MAX_HELLO_BYTES => {
            Peek::Malformed("ClientHello larger than the peek limit")
        }
        Scan::Incomplete => Peek::NeedMore,
        Scan::Bad(why) => Peek::Malformed(why),
        Scan::Complete { records } => {
            let message = reassemble(buf, records);
            parse_client_hello(&message)
        }
    }
}

/// Where the records that carry the ClientHello end in `buf`, once
/// [`peek`] has judged it a [`Peek::Hello`]. Bytes past it belong to what
/// comes after the hello (a second hello, early data) and are judged, if at
/// all, only once the upstream has answered.
pub fn hello_end(buf: &[u8]) -> Option<usize> {
    let buf = buf.get(..buf.len().min(MAX_HELLO_BYTES))?;
    let Scan::Complete { records } = scan_records(buf) else {
        return None;
    };
    let mut end = 0usize;
    for _ in 0..records {
        let (&hi, &lo) = (buf.get(end + 3)?, buf.get(end + 4)?);
        end += RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
    }
    Some(end)
}

/// What the upstream's first TLS record says about the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFirst {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A HelloRetryRequest: the client will send a second ClientHello,
    /// which must be judged like the first.
    HelloRetry,
    /// Anything else (a ServerHello, an alert, not TLS): the client's next
    /// bytes are no hello.
    Other,
}

/// The `random` of a ServerHello that makes it a HelloRetryRequest
/// (RFC 8446 section 4.1.3: SHA-256 of "HelloRetryRequest").
pub const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xcf, 0x21, 0xad, 0x74, 0xe5, 0x9a, 0x61, 0x11, 0xbe, 0x1d, 0x8c, 0x02, 0x1e, 0x65, 0xb8, 0x91,
    0xc2, 0xa2, 0x11, 0x16, 0x7a, 0xbb, 0x8c, 0x5e, 0x07, 0x9e, 0x09, 0xe2, 0xc8, 0xa8, 0x33, 0x9c,
];

/// Bytes of the upstream's first record [`server_first`] needs: the record
/// header, the handshake header, `legacy_version` and `random`.
pub const SERVER_FIRST_BYTES: usize = RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN + 2 + 32;

const HANDSHAKE_SERVER_HELLO: u8 = 2;

/// Judge the upstream's first bytes: is it asking for a second ClientHello?
///
/// A server's first record that is a handshake record too short to carry a
/// ServerHello's `random` is judged a HelloRetryRequest (fail closed: the
/// client's next bytes are then checked as a hello).
pub fn server_first(buf: &[u8]) -> ServerFirst {
    match buf {
        [] => ServerFirst::NeedMore,
        [first, ..] if *first != CONTENT_TYPE_HANDSHAKE => ServerFirst::Other,
        [_, _, _, hi, lo, ..]
            if usize::from(u16::from_be_bytes([*hi, *lo]))
                < SERVER_FIRST_BYTES - RECORD_HEADER_LEN =>
        {
            ServerFirst::HelloRetry
        }
        [_, _, _, _, _, typ, ..] if *typ != HANDSHAKE_SERVER_HELLO => ServerFirst::Other,
        _ => match buf.get(SERVER_FIRST_BYTES - 32..SERVER_FIRST_BYTES) {
            None => ServerFirst::NeedMore,
            Some(random) if random == HELLO_RETRY_RANDOM => ServerFirst::HelloRetry,
            Some(_) => ServerFirst::Other,
        },
    }
}

/// A ChangeCipherSpec record as a TLS 1.3 client in middlebox
/// compatibility mode sends it before its second ClientHello.
const CHANGE_CIPHER_SPEC: [u8; 6] = [0x14, 0x03, 0x03, 0x00, 0x01, 0x01];

/// Classify the client's bytes after a HelloRetryRequest: leading
/// ChangeCipherSpec records (exactly as RFC 8446 appendix D.4 has them) and
/// application_data records (0-RTT early data sent with the first hello,
/// which the server skips after a HelloRetryRequest, RFC 8446 section
/// 4.2.10) are skipped, then the rest must be a ClientHello as [`peek`]
/// judges one; bytes that are not TLS are [`Peek::Malformed`] here.
///
/// Skipping application_data records is safe: a server that did not offer
/// to skip them (no `early_data` in the first hello) fails on them, so the
/// hello behind them is the only one any server can act on.
pub fn peek_retry(buf: &[u8]) -> Peek {
    let mut rest = buf;
    loop {
        match rest.first() {
            Some(&CONTENT_TYPE_CHANGE_CIPHER_SPEC) => {
                let n = rest.len().min(CHANGE_CIPHER_SPEC.len());
                if rest.get(..n) != CHANGE_CIPHER_SPEC.get(..n) {
                    return Peek::Malformed("bad ChangeCipherSpec before the second ClientHello");
                }
                if n < CHANGE_CIPHER_SPEC.len() {
                    return Peek::NeedMore;
                }
                rest = rest.get(n..).unwrap_or_default();
            }
            Some(&CONTENT_TYPE_APPLICATION_DATA) => {
                if rest.get(1..3).is_some_and(|v| v != [0x03, 0x03]) {
                    return Peek::Malformed("bad early data record before the second ClientHello");
                }
                let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
                    return Peek::NeedMore;
                };
                let len = usize::from(u16::from_be_bytes([hi, lo]));
                if len == 0 || len > MAX_RECORD_LEN {
                    return Peek::Malformed("bad early data record before the second ClientHello");
                }
                match rest.get(RECORD_HEADER_LEN + len..) {
                    Some(after) => rest = after,
                    None => return Peek::NeedMore,
                }
            }
            Some(&CONTENT_TYPE_ALERT) => return fatal_alert(buf.len() - rest.len(), rest),
            _ => break,
        }
    }
    match peek(rest) {
        Peek::NotTls => Peek::Malformed("no second ClientHello after a HelloRetryRequest"),
        other => other,
    }
}

/// A client that cannot meet a HelloRetryRequest (say, the group asked
/// for) ends with a fatal alert: one two-byte alert record of level
/// fatal, whose `at + 7` bytes may be passed on (the server then closes).
/// Anything else in an alert record there, a warning above all (a lenient
/// server reads on past one, to a hello it may take a name from), is
/// malformed.
fn fatal_alert(at: usize, rest: &[u8]) -> Peek {
    const ALERT_RECORD_LEN: usize = RECORD_HEADER_LEN + 2;
    const FATAL: u8 = 2;
    // Judged as far as it has come: a record that cannot be one fatal
    // alert is refused at once, not held until the hello time-out.
    let record = rest.get(..ALERT_RECORD_LEN).unwrap_or(rest);
    let fits = record.iter().enumerate().all(|(i, &b)| match i {
        1 => b == 0x03,
        2 => (0x01..=0x03).contains(&b),
        3 => b == 0x00,
        4 => b == 0x02,
        5 => b == FATAL,
        _ => true,
    });
    if !fits {
        Peek::Malformed("an alert other than one fatal alert instead of the second ClientHello")
    } else if record.len() < ALERT_RECORD_LEN {
        Peek::NeedMore
    } else {
        Peek::Abort(at + ALERT_RECORD_LEN)
    }
}

/// A first byte with the high bit set: an SSLv2 record header (two-byte
/// length) carrying CLIENT-HELLO when its third byte is 1, which OpenSSL
/// still negotiates TLS from. It carries no extensions, so no SNI to check:
/// refused, as no current client sends one.
fn sslv2(buf: &[u8]) -> Peek {
    match buf.get(2) {
        None => Peek::NeedMore,
        Some(&SSL2_MT_CLIENT_HELLO) => Peek::Malformed("SSLv2-compatible ClientHello"),
        Some(_) => Peek::NotTls,
    }
}

/// A fatal TLS alert record (TLS 1.2+ record version) with the given
/// description, e.g. [`ALERT_UNRECOGNIZED_NAME`], [`ALERT_ACCESS_DENIED`] or
/// [`ALERT_HANDSHAKE_FAILURE`], for the proxy to send before closing a refused
/// tunnel.
pub fn tls_alert(description: u8) -> [u8; 7] {
    const FATAL: u8 = 2;
    [
        CONTENT_TYPE_ALERT,
        0x03,
        0x03,
        0x00,
        0x02,
        FATAL,
        description,
    ]
}

enum Scan {
    Incomplete,
    Bad(&'static str),
    /// The hello is exactly the payloads of the first `records` records.
    Complete {
        records: usize,
    },
}

/// Walk the record headers without copying, checking each one, until the
/// first handshake message is complete.
fn scan_records(buf: &[u8]) -> Scan {
    let mut pos = 0usize;
    let mut records = 0usize;
    // Handshake payload bytes in the records fully read so far.
    let mut seen = 0usize;
    // The handshake header (type, 24-bit length), which may itself be
    // fragmented over records.
    let mut header = [0u8; HANDSHAKE_HEADER_LEN];
    // Total handshake message length (header + body), once known.
    let mut message_len: Option<usize> = None;

    loop {
        let rest = buf.get(pos..).unwrap_or_default();
        // Check what is present of the next record header before waiting.
        if rest
            .first()
            .is_some_and(|&typ| typ != CONTENT_TYPE_HANDSHAKE)
        {
            return Scan::Bad("non-handshake record before the ClientHello is complete");
        }
        if rest.get(1).is_some_and(|&major| major != 0x03) {
            return Scan::Bad("bad record version");
        }
        let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
            return Scan::Incomplete;
        };
        let record_len = usize::from(u16::from_be_bytes([hi, lo]));
        if record_len == 0 {
            return Scan::Bad("empty handshake record");
        }
        if record_len > MAX_RECORD_LEN {
            return Scan::Bad("record too long");
        }
        let after_header = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let payload = after_header.get(..record_len).unwrap_or(after_header);

        if message_len.is_none() {
            // Pick up the handshake header bytes this record carries.
            let missing = HANDSHAKE_HEADER_LEN.saturating_sub(seen);
            for (slot, &b) in header
                .iter_mut()
                .skip(seen)
                .zip(payload.iter().take(missing))
            {
                *slot = b;
            }
            let have = seen + payload.len().min(missing);
            if have >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
                return Scan::Bad("first handshake message is not a ClientHello");
            }
            if have >= HANDSHAKE_HEADER_LEN {
                let body_len = usize::from(header[1]) << 16
                    | usize::from(header[2]) << 8
                    | usize::from(header[3]);
                let total = HANDSHAKE_HEADER_LEN + body_len;
                // At least one record header precedes it on the wire.
                if total + RECORD_HEADER_LEN > MAX_HELLO_BYTES {
                    return Scan::Bad("ClientHello larger than the peek limit");
                }
                message_len = Some(total);
            }
        }
        if message_len.is_some_and(|total| seen + record_len > total) {
            return Scan::Bad("record carries bytes past the ClientHello");
        }
        if payload.len() < record_len {
            return Scan::Incomplete;
        }
        seen += record_len;
        records += 1;
        pos += RECORD_HEADER_LEN + record_len;
        if message_len == Some(seen) {
            return Scan::Complete { records };
        }
    }
}

/// Concatenate the payloads of the first `records` records (all complete and
/// checked by [`scan_records`]).
fn reassemble(buf: &[u8], records: usize) -> Vec<u8> {
    let mut message = Vec::new();
    let mut rest = buf;
    for _ in 0..records {
        let (Some(&hi), Some(&lo)) = (rest.get(3), rest.get(4)) else {
            break;
        };
        let end = RECORD_HEADER_LEN + usize::from(u16::from_be_bytes([hi, lo]));
        message.extend_from_slice(rest.get(RECORD_HEADER_LEN..end).unwrap_or_default());
        rest = rest.get(end..).unwrap_or_default();
    }
    message
}

/// Parse a complete handshake message (header included) known to be a
/// ClientHello of the announced length.
fn parse_client_hello(message: &[u8]) -> Peek {
    let body = message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
    let Ok((rest, hello)) = parse_tls_handshake_client_hello(body) else {
        return Peek::Malformed("unparsable ClientHello");
    };
    if !rest.is_empty() {
        return Peek::Malformed("trailing bytes in the ClientHello");
    }
    let Some(extensions) = hello.ext else {
        // A hello without an extension block (SSLv3/TLS 1.0 style).
        return Peek::Hello(ClientHelloInfo {
            sni: None,
            ech: false,
        });
    };
    match parse_extensions(extensions) {
        Ok(info) => Peek::Hello(info),
        Err(why) => Peek::Malformed(why),
    }
}

fn parse_extensions(block: &[u8]) -> Result<ClientHelloInfo, &'static str> {
    // Every extension's contents must parse (fail closed).
    match parse_tls_client_hello_extensions(block) {
        Ok(([], _)) => {}
        _ => return Err("unparsable ClientHello extensions"),
    }
    // Raw framing: types (GREASE included, which tls-parser folds into one
    // variant) for the duplicate check, and the exact `server_name` bytes.
    let mut types: Vec<u16> = Vec::new();
    let mut sni_data: Option<&[u8]> = None;
    let mut rest = block;
    while !rest.is_empty() {
        let Ok((next, TlsExtension::Unknown(typ, data))) = parse_tls_extension_unknown(rest) else {
            return Err("unparsable ClientHello extensions");
        };
        types.push(typ.0);
        if typ.0 == 0 {
            sni_data = Some(data);
        }
        rest = next;
    }
    let ech = types.contains(&EXT_ENCRYPTED_CLIENT_HELLO);
    types.sort_unstable();
    if types.windows(2).any(|w| w.first() == w.get(1)) {
        return Err("duplicate ClientHello extension");
    }
    let sni = match sni_data {
        None => None,
        Some(data) => Some(parse_sni(data)?),
    };
    Ok(ClientHelloInfo { sni, ech })
}

/// The `server_name` extension of a ClientHello must hold exactly one
/// non-empty `host_name` and nothing else (as OpenSSL requires).
fn parse_sni(data: &[u8]) -> Result<String, &'static str> {
    let Ok((rest, TlsExtension::SNI(names))) = parse_tls_extension_sni_content(data) else {
        return Err("unparsable server_name extension");
    };
    let [(typ, name)] = names.as_slice() else {
        return Err("server_name extension without exactly one name");
    };
    // tls-parser skips what it cannot read inside the list and after it:
    // the extension must be exactly list length + one entry.
    if !rest.is_empty() || data.len() != 2 + 3 + name.len() {
        return Err("trailing bytes in the server_name extension");
    }
    if *typ != SNIType::HostName {
        return Err("server_name is not a host_name");
    }
    if name.is_empty() {
        return Err("empty server_name");
    }
    match std::str::from_utf8(name) {
        Ok(name) => Ok(name.to_owned()),
        Err(_) => Err("server_name is not UTF-8"),
    }
}
