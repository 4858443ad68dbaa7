//! Tests for the ClientHello peek, on real rustls ClientHellos and on hellos
//! rebuilt from their parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use rustls::pki_types::ServerName;
use rustls::server::Acceptor;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;

const HOST: &str = "ksn1.kaspersky-labs.com";

// ---------------------------------------------------------------- helpers

fn client_config() -> ClientConfig {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// The bytes a rustls client sends first (the ClientHello records).
fn rustls_hello_with(config: ClientConfig, name: &str) -> Vec<u8> {
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

fn rustls_hello(name: &str) -> Vec<u8> {
    rustls_hello_with(client_config(), name)
}

/// One real hello for the property tests (key shares make each one differ).
fn real_hello() -> &'static [u8] {
    static HELLO: OnceLock<Vec<u8>> = OnceLock::new();
    HELLO.get_or_init(|| rustls_hello(HOST))
}

fn hello(sni: Option<&str>, ech: bool) -> Peek {
    Peek::Hello(ClientHelloInfo {
        sni: sni.map(str::to_owned),
        ech,
    })
}

/// The handshake message (header included) carried by a run of handshake records.
fn handshake_message(mut records: &[u8]) -> Vec<u8> {
    let mut message = Vec::new();
    while !records.is_empty() {
        assert_eq!(records[0], 0x16);
        let len = usize::from(u16::from_be_bytes([records[3], records[4]]));
        message.extend_from_slice(&records[5..5 + len]);
        records = &records[5 + len..];
    }
    message
}

/// Frame a handshake message into records whose payload sizes cycle through `sizes`.
fn frame(message: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(size.clamp(1, 16384).min(rest.len()));
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
        rest = tail;
    }
    out
}

fn frame_one(message: &[u8]) -> Vec<u8> {
    frame(message, &[message.len()])
}

/// A ClientHello taken apart: everything before the extension block, and the
/// extensions in order.
struct Parts {
    head: Vec<u8>,
    extensions: Option<Vec<(u16, Vec<u8>)>>,
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

fn split(message: &[u8]) -> Parts {
    assert_eq!(message[0], 1);
    let body = &message[4..];
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]); // session id
    at += 2 + u16_at(body, at); // cipher suites
    at += 1 + usize::from(body[at]); // compression methods
    let head = body[..at].to_vec();
    if at == body.len() {
        return Parts {
            head,
            extensions: None,
        };
    }
    let block_len = u16_at(body, at);
    at += 2;
    assert_eq!(at + block_len, body.len());
    let mut extensions = Vec::new();
    while at < body.len() {
        let typ = u16_at(body, at) as u16;
        let len = u16_at(body, at + 2);
        extensions.push((typ, body[at + 4..at + 4 + len].to_vec()));
        at += 4 + len;
    }
    Parts {
        head,
        extensions: Some(extensions),
    }
}

/// Rebuild the handshake message (header included), fixing up every length.
fn build(parts: &Parts) -> Vec<u8> {
    let mut body = parts.head.clone();
    if let Some(extensions) = &parts.extensions {
        let mut block = Vec::new();
        for (typ, data) in extensions {
            block.extend_from_slice(&typ.to_be_bytes());
            block.extend_from_slice(&(data.len() as u16).to_be_bytes());
            block.extend_from_slice(data);
        }
        body.extend_from_slice(&(block.len() as u16).to_be_bytes());
        body.extend_from_slice(&block);
    }
    let mut message = vec![1];
    message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    message.extend_from_slice(&body);
    message
}

/// Contents of a `server_name` extension holding the given (type, name) entries.
fn sni_data(names: &[(u8, &[u8])]) -> Vec<u8> {
    let mut list = Vec::new();
    for (typ, name) in names {
        list.push(*typ);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    data
}

/// A real hello edited by `edit` on its extension list, as one record.
fn edited_hello(edit: impl FnOnce(&mut Vec<(u16, Vec<u8>)>)) -> Vec<u8> {
    let mut parts = split(&handshake_message(real_hello()));
    edit(parts.extensions.as_mut().unwrap());
    frame_one(&build(&parts))
}

/// A real hello whose `server_name` extension holds `data`.
fn hello_with_sni_data(data: Vec<u8>) -> Vec<u8> {
    edited_hello(|exts| {
        let sni = exts.iter_mut().find(|(typ, _)| *typ == 0).unwrap();
        sni.1 = data;
    })
}

fn hello_with_sni(name: &[u8]) -> Vec<u8> {
    hello_with_sni_data(sni_data(&[(0, name)]))
}

/// A minimal hand-built ClientHello body head: TLS 1.0, zero random, no
/// session id, one cipher suite, null compression.
fn minimal_head() -> Vec<u8> {
    let mut head = vec![0x03, 0x01];
    head.extend_from_slice(&[0u8; 32]);
    head.extend_from_slice(&[0, 0, 2, 0x00, 0x2f, 1, 0]);
    head
}

fn rustls_accept(bytes: &[u8]) -> Result<Option<String>, rustls::Error> {
    let mut acceptor = Acceptor::default();
    acceptor.read_tls(&mut &bytes[..]).unwrap();
    match acceptor.accept() {
        Ok(Some(accepted)) => Ok(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) => panic!("rustls wants more bytes"),
        Err((e, _alert)) => Err(e),
    }
}

// ---------------------------------------------------------------- real hellos

#[test]
fn real_hello_gives_sni() {
    let bytes = rustls_hello(HOST);
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
}

#[test]
fn real_hello_with_bytes_after_it() {
    // A TLS 1.3 client may pipeline ChangeCipherSpec / early data.
    let mut bytes = rustls_hello(HOST);
    bytes.extend_from_slice(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x01, 0x17, 0x03]);
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
}

#[test]
fn tls12_only_hello() {
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
    let bytes = rustls_hello_with(config, HOST);
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
}

#[test]
fn every_prefix_needs_more() {
    let bytes = rustls_hello(HOST);
    for n in 0..bytes.len() {
        assert_eq!(peek(&bytes[..n]), Peek::NeedMore, "prefix of {n} bytes");
    }
}

#[test]
fn reframed_into_three_records() {
    let message = handshake_message(&rustls_hello(HOST));
    let third = message.len() / 3 + 1;
    let bytes = frame(&message, &[third]);
    assert_eq!(bytes.len(), message.len() + 3 * 5);
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
    for n in 0..bytes.len() {
        assert_eq!(peek(&bytes[..n]), Peek::NeedMore, "prefix of {n} bytes");
    }
}

#[test]
fn reframed_with_split_handshake_header() {
    let message = handshake_message(&rustls_hello(HOST));
    // Handshake header over records of 1, 2 and 1 bytes, then the rest.
    for sizes in [&[1, 2, 1, 100][..], &[1][..], &[3, 7][..], &[2, 16384][..]] {
        let bytes = frame(&message, sizes);
        assert_eq!(peek(&bytes), hello(Some(HOST), false), "sizes {sizes:?}");
    }
}

#[test]
fn upper_case_sni_is_kept_as_sent() {
    let bytes = hello_with_sni(b"KSN1.Kaspersky-Labs.COM");
    assert_eq!(peek(&bytes), hello(Some("KSN1.Kaspersky-Labs.COM"), false));
    // Trailing dot and IP literal are also passed through for the caller.
    let bytes = hello_with_sni(b"ksn1.kaspersky-labs.com.");
    assert_eq!(peek(&bytes), hello(Some("ksn1.kaspersky-labs.com."), false));
    let bytes = hello_with_sni(b"10.1.2.3");
    assert_eq!(peek(&bytes), hello(Some("10.1.2.3"), false));
}

#[test]
fn hello_without_sni() {
    let mut config = client_config();
    config.enable_sni = false;
    let bytes = rustls_hello_with(config, HOST);
    assert_eq!(peek(&bytes), hello(None, false));
}

#[test]
fn hello_without_extensions() {
    let parts = Parts {
        head: minimal_head(),
        extensions: None,
    };
    assert_eq!(peek(&frame_one(&build(&parts))), hello(None, false));
    let parts = Parts {
        head: minimal_head(),
        extensions: Some(Vec::new()),
    };
    assert_eq!(peek(&frame_one(&build(&parts))), hello(None, false));
}

#[test]
fn hand_built_hello() {
    let parts = Parts {
        head: minimal_head(),
        extensions: Some(vec![(0, sni_data(&[(0, b"example.org")]))]),
    };
    let bytes = frame_one(&build(&parts));
    assert_eq!(peek(&bytes), hello(Some("example.org"), false));
}

#[test]
fn ech_extension_is_reported() {
    let bytes = edited_hello(|exts| {
        // An outer ECH extension: type outer(0), cipher suite, config id,
        // enc, payload -- contents are opaque to the peek.
        let mut ech = vec![0, 0x00, 0x01, 0x00, 0x01, 0x2a, 0x00, 0x04, 1, 2, 3, 4];
        ech.extend_from_slice(&[0x00, 0x08, 9, 9, 9, 9, 9, 9, 9, 9]);
        exts.insert(0, (EXT_ENCRYPTED_CLIENT_HELLO, ech));
    });
    assert_eq!(peek(&bytes), hello(Some(HOST), true));
    // Without SNI too.
    let bytes = edited_hello(|exts| {
        exts.retain(|(typ, _)| *typ != 0);
        exts.push((EXT_ENCRYPTED_CLIENT_HELLO, vec![1]));
    });
    assert_eq!(peek(&bytes), hello(None, true));
}

#[test]
fn grease_extensions_are_not_duplicates() {
    let bytes = edited_hello(|exts| {
        exts.insert(0, (0x0a0a, Vec::new()));
        exts.push((0x1a1a, vec![0]));
    });
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
}

// ---------------------------------------------------------------- not TLS

#[test]
fn not_tls_is_decided_early() {
    assert_eq!(peek(b""), Peek::NeedMore);
    assert_eq!(peek(&[0x16]), Peek::NeedMore);
    assert_eq!(peek(&[0x16, 0x03]), Peek::NeedMore);
    assert_eq!(peek(b"G"), Peek::NotTls);
    assert_eq!(
        peek(b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n"),
        Peek::NotTls
    );
    assert_eq!(peek(b"SSH-2.0-OpenSSH_9.6\r\n"), Peek::NotTls);
    // Bytes just outside the record content types.
    assert_eq!(peek(&[0x13, 0x03, 0x03, 0x00, 0x02]), Peek::NotTls);
    assert_eq!(peek(&[0x19, 0x03, 0x03, 0x00, 0x02]), Peek::NotTls);
    assert_eq!(peek(&[0x00]), Peek::NotTls);
    // A high first byte waits for the third: SSLv2 or not.
    assert_eq!(peek(&[0x80]), Peek::NeedMore);
    assert_eq!(peek(&[0x80, 0x2e]), Peek::NeedMore);
    assert_eq!(peek(&[0x80, 0x2e, 0x02]), Peek::NotTls);
    assert_eq!(peek(&[0xff, 0xff, 0xff, 0xff]), Peek::NotTls);
}

// ---------------------------------------------------------------- what lenient servers take

/// A real hello whose first record header has its version bytes replaced.
fn with_record_version(major: u8, minor: u8) -> Vec<u8> {
    let mut bytes = real_hello().to_vec();
    bytes[1] = major;
    bytes[2] = minor;
    bytes
}

#[test]
fn any_record_content_type_first_is_tls() {
    // Go's crypto/tls drops a warning alert before the ClientHello and reads
    // the hello after it: the hello behind it was never checked.
    let warning = [0x15, 0x03, 0x01, 0x00, 0x02, 0x01, 0x5a];
    let mut bytes = warning.to_vec();
    bytes.extend_from_slice(&rustls_hello("evil.test"));
    assert_malformed(&bytes);
    assert_malformed(&warning);
    assert_malformed(&warning[..1]);
    // Every record content type, on its own or before a real hello.
    for typ in [0x14, 0x15, 0x17, 0x18] {
        assert_malformed(&[typ]);
        let mut bytes = vec![typ, 0x03, 0x03, 0x00, 0x01, 0x01];
        bytes.extend_from_slice(&rustls_hello("evil.test"));
        assert_malformed(&bytes);
    }
    // A fatal alert, application data, a heartbeat.
    assert_malformed(&tls_alert(ALERT_HANDSHAKE_FAILURE));
    assert_malformed(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]);
    assert_malformed(&[0x18, 0x03, 0x03, 0x00, 0x03, 0x01, 0x00, 0x00]);
}

#[test]
fn first_record_version_other_than_3_is_refused() {
    // Go does not check the first record's version (anything below 0x1000).
    for (major, minor) in [
        (0x00, 0x00),
        (0x02, 0x00),
        (0x01, 0x03),
        (0x0f, 0xff),
        (0x16, 0x03),
    ] {
        assert_malformed(&with_record_version(major, minor));
        assert_malformed(&[0x16, major]);
    }
    // Every 0x03xx record version carries the hello as before.
    for minor in [0x00, 0x01, 0x03, 0x04] {
        assert_eq!(
            peek(&with_record_version(0x03, minor)),
            hello(Some(HOST), false)
        );
    }
}

#[test]
fn sslv2_compatible_hello_is_refused() {
    // SSLv2 header (length 0x2e), CLIENT-HELLO, version 3.1, cipher specs...
    let v2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10, 0x07, 0x00, 0xc0,
    ];
    assert_malformed(&v2);
    assert_malformed(&v2[..3]);
    // OpenSSL's test is the high bit and the message type, whatever the length.
    assert_malformed(&[0xff, 0x00, 0x01]);
    assert_malformed(&[0x81, 0x10, 0x01, 0x00, 0x02]);
}

// ---------------------------------------------------------------- malformed

fn assert_malformed(bytes: &[u8]) {
    assert!(
        matches!(peek(bytes), Peek::Malformed(_)),
        "{:?} for {:02x?}",
        peek(bytes),
        &bytes[..bytes.len().min(16)]
    );
}

#[test]
fn tls_header_then_garbage() {
    // Record of garbage: first handshake byte is not ClientHello.
    assert_malformed(b"\x16\x03\x01\x00\x10GET / HTTP/1.1\r\n");
    // Garbage record length.
    assert_malformed(b"\x16\x03\xff\xff\xffgarbage");
    // Not decided before the record header is there.
    assert_eq!(peek(b"\x16\x03\x01\x00"), Peek::NeedMore);
    // A ClientHello body that does not parse.
    let mut message = vec![1, 0, 0, 10];
    message.extend_from_slice(b"0123456789");
    assert_malformed(&frame_one(&message));
}

#[test]
fn bad_records_before_the_hello_completes() {
    let message = handshake_message(&rustls_hello(HOST));
    let first = frame_one(&message[..50]);
    let rest = frame_one(&message[50..]);
    // Alert, ChangeCipherSpec, application data between fragments.
    for record in [
        &tls_alert(ALERT_HANDSHAKE_FAILURE)[..],
        &[0x14, 0x03, 0x03, 0x00, 0x01, 0x01][..],
        &[0x17, 0x03, 0x03, 0x00, 0x01, 0x00][..],
        &[0x17][..],
        &[0x16, 0x02][..],
    ] {
        let mut bytes = first.clone();
        bytes.extend_from_slice(record);
        assert_malformed(&bytes);
        bytes.extend_from_slice(&rest);
        assert_malformed(&bytes);
    }
    // The reassembled hello alone is fine.
    let mut bytes = first.clone();
    bytes.extend_from_slice(&rest);
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
}

#[test]
fn empty_and_over_long_records() {
    assert_malformed(&[0x16, 0x03, 0x01, 0x00, 0x00]);
    let mut bytes = vec![0x16, 0x03, 0x01];
    bytes.extend_from_slice(&((MAX_RECORD_LEN + 1) as u16).to_be_bytes());
    assert_malformed(&bytes);
    // Empty record after a first fragment.
    let message = handshake_message(&rustls_hello(HOST));
    let mut bytes = frame_one(&message[..10]);
    bytes.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x00]);
    assert_malformed(&bytes);
}

#[test]
fn other_first_handshake_message() {
    // ServerHello (2) instead of ClientHello.
    let mut message = handshake_message(&rustls_hello(HOST));
    message[0] = 2;
    assert_malformed(&frame_one(&message));
    // Decided on the first handshake byte, before the rest arrives.
    assert_malformed(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x02]);
}

#[test]
fn oversize_hello_is_refused_at_once() {
    // 4-byte header announcing a 64 KiB body: refused with 9 bytes.
    assert_malformed(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x01, 0x00, 0x00]);
    assert_malformed(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff]);
    // Largest announced length that can still fit is waited for.
    let body = MAX_HELLO_BYTES - 5 - 4;
    let header = [1, (body >> 16) as u8, (body >> 8) as u8, body as u8];
    assert_eq!(peek(&frame_one(&header)), Peek::NeedMore);
    let body = body + 1;
    let header = [1, (body >> 16) as u8, (body >> 8) as u8, body as u8];
    assert_malformed(&frame_one(&header));
}

#[test]
fn buffer_limit_without_complete_hello() {
    // A hello that would fit by its length but needs more record headers
    // than the limit leaves room for.
    let body = MAX_HELLO_BYTES - 5 - 4;
    let mut message = vec![1, (body >> 16) as u8, (body >> 8) as u8, body as u8];
    message.resize(4 + body, 0);
    let bytes = frame(&message, &[16384]);
    assert!(bytes.len() > MAX_HELLO_BYTES);
    assert_eq!(peek(&bytes[..MAX_HELLO_BYTES - 1]), Peek::NeedMore);
    assert_malformed(&bytes[..MAX_HELLO_BYTES]);
    assert_malformed(&bytes);
}

#[test]
fn record_past_the_hello() {
    // The record completing the hello carries one more byte.
    let mut message = handshake_message(&rustls_hello(HOST));
    message.push(0);
    let bytes = frame_one(&message);
    assert_malformed(&bytes);
    // Detected from the record header, before the payload arrives.
    assert_malformed(&bytes[..10]);
    let bytes = frame(&message, &[100]);
    assert_malformed(&bytes);
}

#[test]
fn trailing_bytes_inside_the_hello() {
    // Bytes after the extension block, inside the announced length.
    let mut message = handshake_message(&rustls_hello(HOST));
    message.extend_from_slice(&[0, 0]);
    let len = (message.len() - 4) as u32;
    message[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    assert_malformed(&frame_one(&message));
    // Extension block length shorter than the extensions.
    let message = handshake_message(&rustls_hello(HOST));
    let mut parts = split(&message);
    let extensions = parts.extensions.take().unwrap();
    let mut built = build(&parts);
    let mut block = Vec::new();
    for (typ, data) in &extensions {
        block.extend_from_slice(&typ.to_be_bytes());
        block.extend_from_slice(&(data.len() as u16).to_be_bytes());
        block.extend_from_slice(data);
    }
    built.extend_from_slice(&((block.len() - 1) as u16).to_be_bytes());
    built.extend_from_slice(&block);
    let len = (built.len() - 4) as u32;
    built[1..4].copy_from_slice(&len.to_be_bytes()[1..]);
    assert_malformed(&frame_one(&built));
}

#[test]
fn bad_server_name_extensions() {
    // Two names.
    assert_malformed(&hello_with_sni_data(sni_data(&[
        (0, b"allowed.example"),
        (0, b"other.example"),
    ])));
    // A non-host_name entry.
    assert_malformed(&hello_with_sni_data(sni_data(&[(1, b"other.example")])));
    assert_malformed(&hello_with_sni_data(sni_data(&[
        (0, b"allowed.example"),
        (1, b"other.example"),
    ])));
    // Empty name, empty list, empty extension.
    assert_malformed(&hello_with_sni(b""));
    assert_malformed(&hello_with_sni_data(vec![0, 0]));
    assert_malformed(&hello_with_sni_data(Vec::new()));
    // Not UTF-8.
    assert_malformed(&hello_with_sni(b"caf\xe9.example"));
    // Unparsable: list length beyond the extension, or bytes after the list.
    let mut data = sni_data(&[(0, b"allowed.example")]);
    data[1] += 1;
    assert_malformed(&hello_with_sni_data(data));
    let mut data = sni_data(&[(0, b"allowed.example")]);
    data.push(0);
    assert_malformed(&hello_with_sni_data(data));
    // Garbage inside the list after the one entry.
    let mut data = sni_data(&[(0, b"allowed.example")]);
    data.extend_from_slice(&[0, 0x10]);
    let list_len = (data.len() - 2) as u16;
    data[..2].copy_from_slice(&list_len.to_be_bytes());
    assert_malformed(&hello_with_sni_data(data));
}

#[test]
fn duplicate_extensions() {
    // A second server_name extension.
    assert_malformed(&edited_hello(|exts| {
        exts.push((0, sni_data(&[(0, b"other.example")])));
    }));
    // Any other duplicate.
    assert_malformed(&edited_hello(|exts| {
        let first = exts.iter().find(|(typ, _)| *typ != 0).unwrap().clone();
        exts.push(first);
    }));
    assert_malformed(&edited_hello(|exts| {
        exts.push((EXT_ENCRYPTED_CLIENT_HELLO, vec![1]));
        exts.push((EXT_ENCRYPTED_CLIENT_HELLO, vec![2]));
    }));
}

#[test]
fn unparsable_extension_contents() {
    // extended_master_secret (23) must be empty.
    assert_malformed(&edited_hello(|exts| {
        exts.retain(|(typ, _)| *typ != 23);
        exts.push((23, vec![0]));
    }));
    // supported_versions with an odd list.
    assert_malformed(&edited_hello(|exts| {
        let sv = exts.iter_mut().find(|(typ, _)| *typ == 43).unwrap();
        sv.1 = vec![3, 3, 4, 3];
    }));
}

// ---------------------------------------------------------------- alerts

#[test]
fn alert_records() {
    assert_eq!(
        tls_alert(ALERT_UNRECOGNIZED_NAME),
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]
    );
    assert_eq!(tls_alert(ALERT_ACCESS_DENIED)[6], 49);
    assert_eq!(tls_alert(ALERT_HANDSHAKE_FAILURE)[6], 40);
    assert_eq!(tls_alert(ALERT_DECODE_ERROR)[6], 50);
    // tls-parser reads it back as a fatal alert.
    let alert = tls_alert(ALERT_ACCESS_DENIED);
    let (rest, record) = tls_parser::parse_tls_plaintext(&alert).unwrap();
    assert!(rest.is_empty());
    match record.msg.as_slice() {
        [tls_parser::TlsMessage::Alert(a)] => {
            assert_eq!(a.severity, tls_parser::TlsAlertSeverity::Fatal);
            assert_eq!(a.code, tls_parser::TlsAlertDescription::AccessDenied);
        }
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------- rustls as an oracle

#[test]
fn rustls_agrees_on_real_hellos() {
    for name in [
        HOST,
        "example.org",
        "a-b.c.example",
        "xn--bcher-kva.example",
    ] {
        let bytes = rustls_hello(name);
        let Peek::Hello(info) = peek(&bytes) else {
            panic!("{name}");
        };
        assert_eq!(info.sni.as_deref(), Some(name));
        assert_eq!(rustls_accept(&bytes).unwrap().as_deref(), Some(name));
    }
}

#[test]
fn rustls_reports_ip_sni_as_absent() {
    // Observed divergence: rustls accepts an IP literal as host_name but
    // reports no SNI; the peek returns what was sent.
    let bytes = hello_with_sni(b"10.1.2.3");
    assert_eq!(rustls_accept(&bytes).unwrap(), None);
    assert_eq!(peek(&bytes), hello(Some("10.1.2.3"), false));
}

#[test]
fn rustls_lowercases_sni() {
    let bytes = hello_with_sni(b"KSN1.Kaspersky-Labs.COM");
    assert_eq!(rustls_accept(&bytes).unwrap().as_deref(), Some(HOST));
    assert_eq!(peek(&bytes), hello(Some("KSN1.Kaspersky-Labs.COM"), false));
}

#[test]
fn rustls_refuses_what_other_servers_accept() {
    // No signature_algorithms: legal for TLS <= 1.2 clients.
    let bytes = edited_hello(|exts| exts.retain(|(typ, _)| *typ != 13));
    assert!(rustls_accept(&bytes).is_err());
    assert_eq!(peek(&bytes), hello(Some(HOST), false));
    // Not a valid DNS name: the peek returns it, the caller compares.
    let bytes = hello_with_sni(b"bad name.example");
    assert!(rustls_accept(&bytes).is_err());
    assert_eq!(peek(&bytes), hello(Some("bad name.example"), false));
}

#[test]
fn rustls_and_peek_refuse_two_names() {
    let bytes = hello_with_sni_data(sni_data(&[(0, b"a.example"), (0, b"b.example")]));
    assert!(rustls_accept(&bytes).is_err());
    assert_malformed(&bytes);
}

// ---------------------------------------------------------------- properties

/// A final verdict (anything but NeedMore) never changes when more bytes arrive.
fn assert_stable(bytes: &[u8]) {
    let full = peek(bytes);
    let mut decided: Option<Peek> = None;
    for n in 0..=bytes.len() {
        let p = peek(&bytes[..n]);
        if let Some(d) = &decided {
            assert_eq!(&p, d, "verdict changed at {n}");
        } else if p != Peek::NeedMore {
            decided = Some(p);
        }
    }
    if let Some(d) = decided {
        assert_eq!(full, d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let p = peek(&bytes);
        match bytes.first() {
            Some(0x14..=0x18) => prop_assert_ne!(p, Peek::NotTls),
            Some(&b) if b < 0x80 => prop_assert_eq!(p, Peek::NotTls),
            _ => {}
        }
        assert_stable(&bytes);
    }

    #[test]
    fn record_types_are_never_not_tls(
        typ in 0x14u8..=0x18,
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = vec![typ];
        bytes.extend_from_slice(&rest);
        prop_assert_ne!(peek(&bytes), Peek::NotTls);
        // A lone 0x16 waits for its version byte; anything else is decided.
        if typ != 0x16 || rest.first().is_some_and(|&b| b != 0x03) {
            prop_assert!(matches!(peek(&bytes), Peek::Malformed(_)));
        }
        assert_stable(&bytes);
    }

    #[test]
    fn tls_looking_bytes_are_never_not_tls(
        minor in any::<u8>(),
        rest in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = vec![0x16, 0x03, minor];
        bytes.extend_from_slice(&rest);
        prop_assert_ne!(peek(&bytes), Peek::NotTls);
        assert_stable(&bytes);
    }

    #[test]
    fn truncations_need_more(n in 0usize..1000) {
        let bytes = real_hello();
        let n = n % bytes.len();
        prop_assert_eq!(peek(&bytes[..n]), Peek::NeedMore);
    }

    #[test]
    fn mutations_never_panic(
        edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in any::<usize>(),
    ) {
        let mut bytes = real_hello().to_vec();
        for (at, x) in edits {
            let at = at % bytes.len();
            bytes[at] ^= x;
        }
        let cut = cut % (bytes.len() + 1);
        let _ = peek(&bytes[..cut]);
        assert_stable(&bytes);
    }

    #[test]
    fn any_reframing_gives_the_same_hello(
        sizes in proptest::collection::vec(1usize..400, 1..8),
        extra in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let message = handshake_message(real_hello());
        let mut bytes = frame(&message, &sizes);
        let len = bytes.len();
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(peek(&bytes), hello(Some(HOST), false));
        prop_assert_eq!(peek(&bytes[..len - 1]), Peek::NeedMore);
    }
}

// ---------------------------------------------------------------- after a HelloRetryRequest

/// A server's first record: a ServerHello with `random`.
fn server_hello(random: &[u8; 32]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(random);
    body.extend_from_slice(&[0, 0x13, 0x01, 0x00, 0x00, 0x00]);
    let mut message = vec![2, 0, 0, u8::try_from(body.len()).unwrap()];
    message.extend_from_slice(&body);
    frame_one(&message)
}

#[test]
fn a_hello_retry_request_is_told_from_a_server_hello() {
    let hrr = server_hello(&HELLO_RETRY_RANDOM);
    assert_eq!(server_first(&hrr), ServerFirst::HelloRetry);
    assert_eq!(server_first(&server_hello(&[7; 32])), ServerFirst::Other);
    // Decided only once the random is there, and the same from then on.
    for n in 0..SERVER_FIRST_BYTES {
        assert_eq!(server_first(&hrr[..n]), ServerFirst::NeedMore, "{n} bytes");
    }
    assert_eq!(
        server_first(&hrr[..SERVER_FIRST_BYTES]),
        ServerFirst::HelloRetry
    );
    // An alert, or bytes that are not TLS, ask for no second hello.
    assert_eq!(
        server_first(&tls_alert(ALERT_HANDSHAKE_FAILURE)),
        ServerFirst::Other
    );
    assert_eq!(server_first(b"SSH-2.0-x\r\n"), ServerFirst::Other);
    // Another handshake message first.
    let mut other = server_hello(&HELLO_RETRY_RANDOM);
    other[5] = 11;
    assert_eq!(server_first(&other), ServerFirst::Other);
    // A first handshake record too short to carry a random: fail closed.
    assert_eq!(
        server_first(&[0x16, 0x03, 0x03, 0x00, 0x04, 2, 0, 0, 0]),
        ServerFirst::HelloRetry
    );
}

#[test]
fn the_retried_hello_is_judged_like_the_first() {
    let hello = rustls_hello(HOST);
    assert_eq!(peek_retry(&hello), peek(&hello));
    // After the middlebox-compatibility ChangeCipherSpec records.
    let mut bytes = CHANGE_CIPHER_SPEC.to_vec();
    bytes.extend_from_slice(&hello);
    assert_eq!(peek_retry(&bytes), hello_peek_of(HOST));
    for n in 0..CHANGE_CIPHER_SPEC.len() + 5 {
        assert_eq!(peek_retry(&bytes[..n]), Peek::NeedMore, "{n} bytes");
    }
    // Anything but a hello there is refused: not TLS, a bad CCS, other records.
    assert_malformed_retry(b"GET / HTTP/1.1\r\n");
    assert_malformed_retry(&[0x14, 0x03, 0x03, 0x00, 0x01, 0x02]);
}

/// A client that cannot meet a HelloRetryRequest gives up with one fatal
/// alert: that much (and a ChangeCipherSpec before it) may pass, never a
/// byte after it. A warning alert there (a lenient server reads on past
/// it, to a hello it may take a name from) or any other alert record is
/// refused.
#[test]
fn a_fatal_alert_instead_of_the_retried_hello_ends_what_may_pass() {
    let hello = rustls_hello("other.example");
    let fatal = tls_alert(ALERT_HANDSHAKE_FAILURE);
    assert_eq!(peek_retry(&fatal), Peek::Abort(7));
    for n in 0..fatal.len() {
        assert_eq!(peek_retry(&fatal[..n]), Peek::NeedMore, "{n} bytes");
    }
    let mut then_hello = fatal.to_vec();
    then_hello.extend_from_slice(&hello);
    assert_eq!(peek_retry(&then_hello), Peek::Abort(7));
    let mut ccs_then_alert = CHANGE_CIPHER_SPEC.to_vec();
    ccs_then_alert.extend_from_slice(&fatal);
    ccs_then_alert.extend_from_slice(&hello);
    assert_eq!(
        peek_retry(&ccs_then_alert),
        Peek::Abort(CHANGE_CIPHER_SPEC.len() + 7)
    );
    let mut warning = [0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00].to_vec();
    assert_malformed_retry(&warning);
    warning.extend_from_slice(&hello);
    assert_malformed_retry(&warning);
    // Record versions no TLS stack sends, a longer alert record, an odd level.
    for bad in [
        [0x15, 0x00, 0x00, 0x00, 0x02, 0x02, 0x28],
        [0x15, 0x02, 0x00, 0x00, 0x02, 0x02, 0x28],
        [0x15, 0x03, 0x04, 0x00, 0x02, 0x02, 0x28],
        [0x15, 0x03, 0x03, 0x00, 0x03, 0x02, 0x28],
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x03, 0x28],
    ] {
        assert_malformed_retry(&bad);
    }
    // The first hello is never taken as given up.
    assert!(
        matches!(peek(&fatal), Peek::Malformed(_)),
        "{:?}",
        peek(&fatal)
    );
}

/// A 0-RTT client that gets a HelloRetryRequest has already sent a
/// ChangeCipherSpec and its early data (application_data records); the
/// server skips them (RFC 8446 4.2.10) and reads the second hello, which is
/// judged as usual.
#[test]
fn early_data_before_the_retried_hello_is_skipped() {
    let hello = rustls_hello(HOST);
    let early = [0x17, 0x03, 0x03, 0x00, 0x03, 0xaa, 0xbb, 0xcc];
    let mut bytes = CHANGE_CIPHER_SPEC.to_vec();
    bytes.extend_from_slice(&early);
    bytes.extend_from_slice(&early);
    let before_hello = bytes.len();
    bytes.extend_from_slice(&hello);
    assert_eq!(peek_retry(&bytes), hello_peek_of(HOST));
    for n in 0..before_hello + 5 {
        assert_eq!(peek_retry(&bytes[..n]), Peek::NeedMore, "{n} bytes");
    }
    // Without a ChangeCipherSpec (no middlebox compatibility mode) too.
    let mut bytes = early.to_vec();
    bytes.extend_from_slice(&hello);
    assert_eq!(peek_retry(&bytes), hello_peek_of(HOST));
    // What follows must still be a clean hello for the same judgement.
    let mut bytes = early.to_vec();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
    assert_malformed_retry(&bytes);
    // Or the client gives up: its early data and fatal alert may pass.
    let mut bytes = early.to_vec();
    bytes.extend_from_slice(&tls_alert(ALERT_HANDSHAKE_FAILURE));
    assert_eq!(peek_retry(&bytes), Peek::Abort(early.len() + 7));
    // Bad early data records: another version, empty, too long.
    assert_malformed_retry(&[0x17, 0x03, 0x01, 0x00, 0x01, 0x00]);
    assert_malformed_retry(&[0x17, 0x03, 0x03, 0x00, 0x00]);
    let too_long = u16::try_from(MAX_RECORD_LEN + 1).unwrap().to_be_bytes();
    assert_malformed_retry(&[0x17, 0x03, 0x03, too_long[0], too_long[1]]);
}

fn hello_peek_of(name: &str) -> Peek {
    hello(Some(name), false)
}

fn assert_malformed_retry(bytes: &[u8]) {
    assert!(
        matches!(peek_retry(bytes), Peek::Malformed(_)),
        "{:?} for {:02x?}",
        peek_retry(bytes),
        bytes
    );
}

#[test]
fn the_hello_ends_where_its_records_end() {
    let message = handshake_message(real_hello());
    let framed = frame(&message, &[100, 50, 5000]);
    let mut bytes = framed.clone();
    bytes.extend_from_slice(&CHANGE_CIPHER_SPEC);
    bytes.extend_from_slice(real_hello());
    assert_eq!(hello_end(&bytes), Some(framed.len()));
    assert_eq!(hello_end(&framed), Some(framed.len()));
    assert_eq!(hello_end(&framed[..framed.len() - 1]), None);
    assert_eq!(hello_end(b"GET / HTTP/1.1\r\n"), None);
}

/// A fatal alert is a way out only in place of the second hello: after a
/// fragment of one (its name may be in it already: a lenient server could
/// act on what it has), or between two hellos' records, it is refused.
#[test]
fn a_fatal_alert_inside_the_retried_hello_is_not_giving_up() {
    let hello = rustls_hello("other.example");
    let fatal = tls_alert(ALERT_HANDSHAKE_FAILURE);
    let len = usize::from(u16::from_be_bytes([hello[3], hello[4]]));
    let payload = &hello[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
    for cut in [1, 4, 40, len - 1] {
        let (a, b) = payload.split_at(cut);
        let mut bytes = hello[..3].to_vec();
        bytes.extend_from_slice(&u16::try_from(a.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(a);
        bytes.extend_from_slice(&fatal);
        bytes.extend_from_slice(&hello[..3]);
        bytes.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(b);
        let judged = peek_retry(&bytes);
        assert!(
            !matches!(judged, Peek::Abort(_) | Peek::Hello(_)),
            "cut at {cut}: {judged:?}"
        );
        assert!(
            !matches!(peek_retry(&bytes[..bytes.len() - b.len()]), Peek::Abort(_)),
            "cut at {cut}"
        );
    }
    // A whole hello then the alert is a hello (the alert is not taken as
    // the end of it: what is judged is the hello).
    let mut bytes = hello.clone();
    bytes.extend_from_slice(&fatal);
    assert!(matches!(peek_retry(&bytes), Peek::Hello(_)));
}

/// An alert record that cannot be one fatal alert is refused as soon as
/// the byte that rules it out is there, not held (until the hello
/// time-out) for the rest of its seven bytes.
#[test]
fn a_bad_alert_after_a_retry_is_refused_at_its_first_bad_byte() {
    for bad in [
        [0x15, 0x00, 0x00, 0x00, 0x02, 0x02, 0x28],
        [0x15, 0x03, 0x04, 0x00, 0x02, 0x02, 0x28],
        [0x15, 0x03, 0x03, 0x01, 0x02, 0x02, 0x28],
        [0x15, 0x03, 0x03, 0x00, 0x03, 0x02, 0x28],
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00],
    ] {
        let first_bad = (1..bad.len())
            .find(|&i| bad[i] != [0x15, 0x03, 0x03, 0x00, 0x02, 0x02][i])
            .unwrap();
        for n in first_bad + 1..=bad.len() {
            assert_malformed_retry(&bad[..n]);
            let mut behind_ccs = CHANGE_CIPHER_SPEC.to_vec();
            behind_ccs.extend_from_slice(&bad[..n]);
            assert_malformed_retry(&behind_ccs);
        }
    }
}
