#![allow(clippy::expect_used, clippy::unwrap_used)] // tests may panic

use std::net::IpAddr;

use proptest::prelude::*;

use super::*;

/// What a case expects.
#[derive(Debug)]
enum Want {
    /// `Host::Name` with this text.
    Name(&'static str),
    /// `Host::Ip` with this address.
    Ip(&'static str),
    /// This error.
    Fail(TargetError),
}

fn want_host(want: &Want) -> Result<Host, TargetError> {
    match want {
        Want::Name(n) => Ok(Host::Name((*n).into())),
        Want::Ip(ip) => Ok(Host::Ip(ip.parse::<IpAddr>().expect("test address"))),
        Want::Fail(e) => Err(e.clone()),
    }
}

fn name(n: &'static str) -> Want {
    Want::Name(n)
}

fn ip(a: &'static str) -> Want {
    Want::Ip(a)
}

fn fail(e: TargetError) -> Want {
    Want::Fail(e)
}

fn bad_port(p: &str) -> TargetError {
    TargetError::InvalidPort(p.into())
}

fn normalize_cases() -> Vec<(&'static str, String, Want)> {
    use TargetError::*;
    let label63 = "a".repeat(63);
    let label64 = "a".repeat(64);
    // 4 × 63 + 3 dots = 255; trim to exactly 253 and 254.
    let long = [label63.as_str(); 4].join(".");
    let name253 = long[..253].to_string();
    let name254 = long[..254].to_string();
    let s = |x: &str| x.to_string();
    vec![
        // --- plain names, case, trailing dots, empty labels
        (
            "lower-case name",
            s("ksn1.kaspersky-labs.com"),
            name("ksn1.kaspersky-labs.com"),
        ),
        ("upper-case name", s("EXAMPLE.COM"), name("example.com")),
        (
            "mixed case",
            s("Ksn1.Kaspersky-Labs.COM"),
            name("ksn1.kaspersky-labs.com"),
        ),
        ("single label", s("localhost"), name("localhost")),
        ("one trailing dot", s("example.com."), name("example.com")),
        (
            "one trailing dot, upper case",
            s("EXAMPLE.COM."),
            name("example.com"),
        ),
        ("two trailing dots", s("example.com.."), fail(EmptyLabel)),
        ("empty", s(""), fail(EmptyHost)),
        ("only a dot", s("."), fail(EmptyHost)),
        ("two dots", s(".."), fail(EmptyLabel)),
        ("empty label", s("a..b"), fail(EmptyLabel)),
        ("leading dot", s(".example.com"), fail(EmptyLabel)),
        (
            "underscore label",
            s("_dmarc.example.com"),
            name("_dmarc.example.com"),
        ),
        (
            "underscore inside",
            s("a_b.example.com"),
            name("a_b.example.com"),
        ),
        (
            "edge hyphens (CheckHyphens=false)",
            s("-a-.com"),
            name("-a-.com"),
        ),
        (
            "hyphens in 3-4, not xn",
            s("ab--cd.example"),
            name("ab--cd.example"),
        ),
        (
            "digits then name",
            s("1.2.3.example"),
            name("1.2.3.example"),
        ),
        ("hex-looking last label", s("a.0x1g"), name("a.0x1g")),
        // --- lengths
        (
            "63-byte label",
            format!("{label63}.com"),
            Want::Name(leak(format!("{label63}.com"))),
        ),
        (
            "64-byte label",
            format!("{label64}.com"),
            fail(LabelTooLong),
        ),
        (
            "253-byte name",
            name253.clone(),
            Want::Name(leak(name253.clone())),
        ),
        (
            "253-byte name + dot",
            format!("{name253}."),
            Want::Name(leak(name253.clone())),
        ),
        ("254-byte name", name254.clone(), fail(NameTooLong)),
        (
            "254-byte name, upper case",
            name254.to_uppercase(),
            fail(NameTooLong),
        ),
        // --- characters
        ("wildcard", s("*.example.com"), fail(InvalidCharacter)),
        ("bang", s("ex!ample.com"), fail(InvalidCharacter)),
        ("space", s("ex ample.com"), fail(InvalidCharacter)),
        ("slash", s("example.com/x"), fail(InvalidCharacter)),
        ("at sign", s("user@example.com"), fail(InvalidCharacter)),
        (
            "colon, not ipv6",
            s("example.com:80"),
            fail(InvalidCharacter),
        ),
        ("nul", s("exa\0mple.com"), fail(InvalidCharacter)),
        (
            "percent-encoded dot (WHATWG decodes)",
            s("a%2eb.com"),
            name("a.b.com"),
        ),
        ("percent-encoded percent", s("a%25b.com"), fail(InvalidIdn)),
        ("stray percent", s("a%zz.com"), fail(InvalidIdn)),
        // --- IDNA / UTS-46
        (
            "idna upper case",
            s("BÜCHER.example"),
            name("xn--bcher-kva.example"),
        ),
        (
            "idna lower case",
            s("bücher.example"),
            name("xn--bcher-kva.example"),
        ),
        (
            "punycode as is",
            s("xn--bcher-kva.example"),
            name("xn--bcher-kva.example"),
        ),
        (
            "punycode upper case",
            s("XN--BCHER-KVA.EXAMPLE"),
            name("xn--bcher-kva.example"),
        ),
        (
            "full-width punycode prefix",
            s("ＸＮ--bcher-kva.example"),
            name("xn--bcher-kva.example"),
        ),
        ("invalid punycode", s("xn--abc.example"), fail(InvalidIdn)),
        ("empty punycode", s("xn--.example"), fail(InvalidIdn)),
        (
            "full-width first letter",
            s("Ｅxample.COM"),
            name("example.com"),
        ),
        (
            "full-width everything",
            s("ｅｘａｍｐｌｅ．ｃｏｍ"),
            name("example.com"),
        ),
        (
            "ideographic full stop",
            s("example。com"),
            name("example.com"),
        ),
        (
            "trailing ideographic full stop",
            s("example.com。"),
            name("example.com"),
        ),
        (
            "dot and ideographic full stop",
            s("example.com.。"),
            fail(EmptyLabel),
        ),
        ("circled letter", s("ⓔxample.com"), name("example.com")),
        (
            "zero-width space ignored",
            s("exa\u{200b}mple.com"),
            name("example.com"),
        ),
        ("emoji", s("💩.la"), name("xn--ls8h.la")),
        ("disallowed code point", s("⒈com"), fail(InvalidIdn)),
        // --- IPv4 in every spelling
        ("dotted quad", s("127.0.0.1"), ip("127.0.0.1")),
        (
            "dotted quad, trailing dot",
            s("127.0.0.1."),
            ip("127.0.0.1"),
        ),
        (
            "dotted quad, two trailing dots",
            s("127.0.0.1.."),
            fail(EmptyLabel),
        ),
        (
            "dotted quad, ideographic dot",
            s("127.0.0.1。"),
            ip("127.0.0.1"),
        ),
        ("decimal", s("2130706433"), ip("127.0.0.1")),
        ("hex", s("0x7f000001"), ip("127.0.0.1")),
        ("hex upper", s("0X7F000001"), ip("127.0.0.1")),
        ("hex short", s("0x7f.1"), ip("127.0.0.1")),
        ("hex parts", s("0x7f.0x0.0x0.0x1"), ip("127.0.0.1")),
        ("octal part", s("0177.0.0.1"), ip("127.0.0.1")),
        ("octal whole", s("017700000001"), ip("127.0.0.1")),
        ("octal short", s("0177.1"), ip("127.0.0.1")),
        ("two parts", s("127.1"), ip("127.0.0.1")),
        ("three parts", s("127.0.1"), ip("127.0.0.1")),
        ("full-width digits", s("１２７.０.０.１"), ip("127.0.0.1")),
        (
            "full-width digits and dots",
            s("１２７．０．０．１"),
            ip("127.0.0.1"),
        ),
        (
            "percent-encoded digits",
            s("%31%32%37.0.0.1"),
            ip("127.0.0.1"),
        ),
        ("zero", s("0"), ip("0.0.0.0")),
        ("bare 0x is zero", s("0x"), ip("0.0.0.0")),
        ("metadata decimal", s("2852039166"), ip("169.254.169.254")),
        ("metadata hex", s("0xa9fea9fe"), ip("169.254.169.254")),
        (
            "metadata mixed",
            s("0xa9.0376.43518"),
            ip("169.254.169.254"),
        ),
        ("octet too big", s("256.0.0.1"), fail(InvalidIpv4)),
        ("five parts", s("1.2.3.4.5"), fail(InvalidIpv4)),
        ("bad octal", s("08.0.0.1"), fail(InvalidIpv4)),
        ("over 32 bits", s("4294967296"), fail(InvalidIpv4)),
        (
            "name ending in a number",
            s("example.123"),
            fail(InvalidIpv4),
        ),
        ("name ending in 0x", s("a.b.c.0x"), fail(InvalidIpv4)),
        // --- IPv6
        ("bracketed loopback", s("[::1]"), ip("::1")),
        ("bare loopback (accepted)", s("::1"), ip("::1")),
        (
            "bracketed upper case",
            s("[2001:DB8::1]"),
            ip("2001:db8::1"),
        ),
        (
            "mapped dotted stays v6",
            s("[::ffff:127.0.0.1]"),
            ip("::ffff:7f00:1"),
        ),
        (
            "mapped hex stays v6",
            s("[::ffff:7f00:1]"),
            ip("::ffff:127.0.0.1"),
        ),
        ("unclosed bracket", s("[::1"), fail(InvalidIpv6)),
        ("bracketed ipv4", s("[127.0.0.1]"), fail(InvalidIpv6)),
        ("bracketed name", s("[example.com]"), fail(InvalidIpv6)),
        ("zone id", s("[fe80::1%25eth0]"), fail(InvalidIpv6)),
        ("bracket then dot", s("[::1]."), fail(InvalidIpv6)),
        ("bare colon junk", s("1:2"), fail(InvalidCharacter)),
    ]
}

/// Test-only: a `&'static str` for a computed expectation.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

#[test]
fn normalize_table() {
    let mut failures = Vec::new();
    for (case, input, want) in normalize_cases() {
        let got = normalize_host(&input);
        if got != want_host(&want) {
            failures.push(format!("{case}: {input:?}: got {got:?}, want {want:?}"));
        }
        // Whatever the fast path accepts, the slow path agrees with.
        if let Some(fast) = fast_name(&input) {
            let slow = slow_normalize(&input);
            if slow != Ok(Host::Name(fast.clone())) {
                failures.push(format!("{case}: fast {fast:?} but slow {slow:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn fast_path_never_takes_numeric_or_punycode() {
    for input in [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "example.123",
        "example.0x7f",
        "example.0X7F",
        "example.0x",
        "a.0",
        "xn--bcher-kva.example",
        "XN--bcher-kva.example",
        "example.xn--p1ai",
        "a..b",
        ".a",
        "a..",
        "",
        ".",
    ] {
        assert_eq!(fast_name(input), None, "{input:?}");
    }
    assert_eq!(
        fast_name("ksn1.kaspersky-labs.com").as_deref(),
        Some("ksn1.kaspersky-labs.com")
    );
    assert_eq!(fast_name("Example.COM.").as_deref(), Some("example.com"));
}

/// (case name, input, expected host and port or error)
type TargetCase = (&'static str, &'static str, Result<(Want, u16), TargetError>);

fn absolute_cases() -> Vec<TargetCase> {
    use TargetError::*;
    vec![
        (
            "plain",
            "http://example.com/",
            Ok((name("example.com"), 80)),
        ),
        (
            "no path",
            "http://example.com",
            Ok((name("example.com"), 80)),
        ),
        (
            "query",
            "http://example.com/a?b=c",
            Ok((name("example.com"), 80)),
        ),
        (
            "upper-case scheme and host",
            "HTTP://Example.COM/x",
            Ok((name("example.com"), 80)),
        ),
        (
            "mixed-case scheme",
            "Http://example.com/",
            Ok((name("example.com"), 80)),
        ),
        (
            "trailing dot",
            "http://example.com./",
            Ok((name("example.com"), 80)),
        ),
        (
            "punycode",
            "http://xn--bcher-kva.example/",
            Ok((name("xn--bcher-kva.example"), 80)),
        ),
        (
            "explicit port",
            "http://example.com:8080/x",
            Ok((name("example.com"), 8080)),
        ),
        (
            "port 1",
            "http://example.com:1/",
            Ok((name("example.com"), 1)),
        ),
        (
            "port 65535",
            "http://example.com:65535/",
            Ok((name("example.com"), 65535)),
        ),
        (
            "leading zeros",
            "http://example.com:00080/",
            Ok((name("example.com"), 80)),
        ),
        (
            "port 65536",
            "http://example.com:65536/",
            Err(bad_port("65536")),
        ),
        (
            "port 70000",
            "http://example.com:70000/",
            Err(bad_port("70000")),
        ),
        ("port 0", "http://example.com:0/", Err(bad_port("0"))),
        ("port abc", "http://example.com:abc/", Err(bad_port("abc"))),
        ("port +80", "http://example.com:+80/", Err(bad_port("+80"))),
        ("port -1", "http://example.com:-1/", Err(bad_port("-1"))),
        ("empty port", "http://example.com:/", Err(bad_port(""))),
        ("userinfo", "http://user@example.com/", Err(Userinfo)),
        (
            "userinfo with password",
            "http://user:pw@example.com/",
            Err(Userinfo),
        ),
        ("empty userinfo", "http://@example.com/", Err(Userinfo)),
        (
            "https",
            "https://example.com/",
            Err(UnsupportedScheme("https".into())),
        ),
        (
            "ftp",
            "ftp://example.com/",
            Err(UnsupportedScheme("ftp".into())),
        ),
        ("origin-form", "/path", Err(NotAbsolute)),
        ("asterisk", "*", Err(NotAbsolute)),
        ("authority-form", "example.com:80", Err(NotAbsolute)),
        ("empty host", "http://:80/", Err(EmptyHost)),
        ("empty label", "http://a..b/", Err(EmptyLabel)),
        (
            "bang in host",
            "http://ex!ample.com/",
            Err(InvalidCharacter),
        ),
        ("ipv6", "http://[::1]/", Ok((ip("::1"), 80))),
        (
            "ipv6 with port",
            "http://[::1]:8080/",
            Ok((ip("::1"), 8080)),
        ),
        ("ipv6 port 0", "http://[::1]:0/", Err(bad_port("0"))),
        (
            "mapped ipv6",
            "http://[::ffff:127.0.0.1]/",
            Ok((ip("::ffff:127.0.0.1"), 80)),
        ),
        ("ipv4", "http://127.0.0.1/", Ok((ip("127.0.0.1"), 80))),
        ("ipv4 short", "http://127.1/", Ok((ip("127.0.0.1"), 80))),
        (
            "ipv4 decimal",
            "http://2130706433/",
            Ok((ip("127.0.0.1"), 80)),
        ),
        (
            "ipv4 hex with port",
            "http://0x7f.1:8080/",
            Ok((ip("127.0.0.1"), 8080)),
        ),
        (
            "ipv4 octal",
            "http://0177.0.0.1/",
            Ok((ip("127.0.0.1"), 80)),
        ),
        (
            "ipv4 trailing dot",
            "http://127.0.0.1./",
            Ok((ip("127.0.0.1"), 80)),
        ),
    ]
}

#[test]
fn parse_absolute_table() {
    let mut failures = Vec::new();
    for (case, input, want) in absolute_cases() {
        let uri: http::Uri = match input.parse() {
            Ok(uri) => uri,
            Err(e) => {
                failures.push(format!("{case}: {input:?} is not an http::Uri: {e}"));
                continue;
            }
        };
        let want = want.and_then(|(h, port)| {
            Ok(Target {
                host: want_host(&h)?,
                port,
            })
        });
        let got = parse_absolute(&uri);
        if got != want {
            failures.push(format!("{case}: {input:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Forms `http::Uri` already refuses (hyper answers 400 before we see them);
/// if that ever changes, `parse_absolute` must refuse them instead.
#[test]
fn parse_absolute_refused_by_uri_or_us() {
    for input in [
        "http://example.com:80:80/",
        "http://[::1]:80:80/",
        "http:///x",
        "http://a b/",
    ] {
        if let Ok(uri) = input.parse::<http::Uri>() {
            assert!(parse_absolute(&uri).is_err(), "{input:?}");
        }
    }
}

fn authority_cases() -> Vec<TargetCase> {
    use TargetError::*;
    vec![
        ("name", "example.com:443", Ok((name("example.com"), 443))),
        (
            "normalised name",
            "EXAMPLE.com.:443",
            Ok((name("example.com"), 443)),
        ),
        (
            "idn",
            "bücher.example:443",
            Ok((name("xn--bcher-kva.example"), 443)),
        ),
        ("port 1", "example.com:1", Ok((name("example.com"), 1))),
        (
            "port 65535",
            "example.com:65535",
            Ok((name("example.com"), 65535)),
        ),
        ("no port", "example.com", Err(MissingPort)),
        ("empty port", "example.com:", Err(bad_port(""))),
        ("port 0", "example.com:0", Err(bad_port("0"))),
        ("port 65536", "example.com:65536", Err(bad_port("65536"))),
        ("port 70000", "example.com:70000", Err(bad_port("70000"))),
        ("port abc", "example.com:abc", Err(bad_port("abc"))),
        ("port +443", "example.com:+443", Err(bad_port("+443"))),
        (
            "doubled port",
            "example.com:443:443",
            Err(bad_port("443:443")),
        ),
        ("space before port", "example.com: 443", Err(NotAuthority)),
        ("leading space", " example.com:443", Err(NotAuthority)),
        ("crlf", "example.com:443\r\n", Err(NotAuthority)),
        ("path", "example.com:443/path", Err(NotAuthority)),
        ("root path", "example.com:443/", Err(NotAuthority)),
        ("query", "example.com:443?q", Err(NotAuthority)),
        ("fragment", "example.com:443#f", Err(NotAuthority)),
        ("absolute uri", "http://example.com:443", Err(NotAuthority)),
        ("userinfo", "user@example.com:443", Err(Userinfo)),
        (
            "userinfo with password",
            "user:pw@example.com:443",
            Err(Userinfo),
        ),
        ("empty", "", Err(EmptyHost)),
        ("empty host", ":443", Err(EmptyHost)),
        ("empty brackets", "[]:443", Err(InvalidIpv6)),
        ("empty label", "a..b:443", Err(EmptyLabel)),
        ("ipv4", "127.0.0.1:443", Ok((ip("127.0.0.1"), 443))),
        ("ipv4 decimal", "2130706433:443", Ok((ip("127.0.0.1"), 443))),
        (
            "ipv4 full-width",
            "１２７.０.０.１:443",
            Ok((ip("127.0.0.1"), 443)),
        ),
        ("bracketed ipv6", "[::1]:443", Ok((ip("::1"), 443))),
        (
            "bracketed ipv6 upper",
            "[2001:DB8::1]:443",
            Ok((ip("2001:db8::1"), 443)),
        ),
        (
            "bracketed mapped",
            "[::ffff:127.0.0.1]:443",
            Ok((ip("::ffff:127.0.0.1"), 443)),
        ),
        ("bracketed without port", "[::1]", Err(MissingPort)),
        (
            "unbracketed ipv6 with port",
            "::1:443",
            Err(UnbracketedIpv6),
        ),
        ("unbracketed ipv6", "2001:db8::1", Err(UnbracketedIpv6)),
        (
            "unbracketed full ipv6 with port",
            "2001:db8:0:0:0:0:0:1:443",
            Err(UnbracketedIpv6),
        ),
        ("junk after bracket", "[::1]443", Err(NotAuthority)),
        ("unclosed bracket", "[::1:443", Err(InvalidIpv6)),
        ("bracketed ipv4", "[127.0.0.1]:443", Err(InvalidIpv6)),
        ("zone id", "[fe80::1%25eth0]:443", Err(InvalidIpv6)),
    ]
}

#[test]
fn parse_authority_table() {
    let mut failures = Vec::new();
    for (case, input, want) in authority_cases() {
        let want = want.and_then(|(h, port)| {
            Ok(Target {
                host: want_host(&h)?,
                port,
            })
        });
        let got = parse_authority(input);
        if got != want {
            failures.push(format!("{case}: {input:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn display() {
    let t = |host: Host, port| Target { host, port };
    let v6: IpAddr = "::1".parse().expect("addr");
    let v4: IpAddr = "127.0.0.1".parse().expect("addr");
    assert_eq!(Host::Ip(v6).to_string(), "::1");
    assert_eq!(t(Host::Ip(v6), 443).to_string(), "[::1]:443");
    assert_eq!(t(Host::Ip(v6), 443).authority(), "[::1]:443");
    assert_eq!(t(Host::Ip(v4), 80).to_string(), "127.0.0.1:80");
    assert_eq!(
        t(Host::Name("example.com".into()), 80).to_string(),
        "example.com:80"
    );
    assert_eq!(
        Host::Name("example.com".into()).as_name(),
        Some("example.com")
    );
    assert_eq!(Host::Ip(v4).ip(), Some(v4));
    assert_eq!(Host::Ip(v4).as_name(), None);
    // Display round-trips through the parsers.
    let target = parse_authority("[::ffff:127.0.0.1]:8443").expect("parses");
    assert_eq!(parse_authority(&target.to_string()), Ok(target));
}

#[test]
fn error_messages_are_lower_case_without_period() {
    for e in [
        TargetError::NotAbsolute,
        TargetError::UnsupportedScheme("https".into()),
        TargetError::InvalidPort("x".repeat(100).into()),
        TargetError::UnbracketedIpv6,
        TargetError::InvalidIpv4,
        TargetError::NameTooLong,
    ] {
        let msg = e.to_string();
        assert!(!msg.ends_with('.'), "{msg}");
        assert!(!msg.chars().next().is_some_and(char::is_uppercase), "{msg}");
    }
    // Client input is cut short in error values.
    let long = format!("example.com:{}", "9".repeat(1000));
    match parse_authority(&long) {
        Err(TargetError::InvalidPort(p)) => assert!(p.chars().count() <= 33, "{p}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn is_normalized_name_cases() {
    for (input, want) in [
        ("example.com", true),
        ("ksn1.kaspersky-labs.com", true),
        ("xn--bcher-kva.example", true),
        ("_srv.example.com", true),
        ("Example.com", false),
        ("example.com.", false),
        ("bücher.example", false),
        ("127.0.0.1", false),
        ("::1", false),
        ("*.example.com", false),
        ("", false),
        ("a..b", false),
    ] {
        assert_eq!(is_normalized_name(input), want, "{input:?}");
    }
}

// === properties ===

/// Full-width form of an ASCII letter, digit, `-` or `.` (UTS-46 maps it back).
fn full_width(c: char) -> char {
    match c {
        'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' => {
            char::from_u32(u32::from(c) - 0x20 + 0xFF00).unwrap_or(c)
        }
        _ => c,
    }
}

fn config() -> ProptestConfig {
    // No regression files written into the source tree.
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn never_panics_on_arbitrary_strings(s in any::<String>()) {
        let _ = normalize_host(&s);
        let _ = parse_authority(&s);
        let _ = is_normalized_name(&s);
    }

    #[test]
    fn never_panics_and_idempotent_on_host_like_strings(
        s in "[a-zA-Z0-9._%:\\[\\]\\-ÜüＥ０１２７。．ⓔ\u{200b}]{0,40}",
    ) {
        let _ = parse_authority(&s);
        if let Ok(host) = normalize_host(&s) {
            // Normalising a normal form changes nothing.
            prop_assert_eq!(normalize_host(&host.to_string()), Ok(host.clone()));
            if let Host::Name(n) = &host {
                prop_assert!(is_normalized_name(n));
            }
        }
    }

    #[test]
    fn fast_path_agrees_with_slow_path(s in "[a-zA-Z0-9_.\\-]{1,80}") {
        if let Some(fast) = fast_name(&s) {
            prop_assert_eq!(slow_normalize(&s), Ok(Host::Name(fast)));
        }
    }

    #[test]
    fn spelling_variants_normalise_alike(
        labels in prop::collection::vec("[a-z][a-z0-9-]{0,10}", 1..5),
        upper in prop::collection::vec(any::<bool>(), 64),
        wide in prop::collection::vec(any::<bool>(), 64),
        trailing_dot in any::<bool>(),
    ) {
        let base = labels.join(".");
        let mut variant: String = base
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let c = if upper[i % upper.len()] { c.to_ascii_uppercase() } else { c };
                if wide[i % wide.len()] { full_width(c) } else { c }
            })
            .collect();
        if trailing_dot {
            variant.push('.');
        }
        let want = normalize_host(&base);
        if let Ok(host) = &want {
            // The base is already normal unless a label is bad punycode.
            prop_assert_eq!(host, &Host::Name(base.as_str().into()));
        }
        prop_assert_eq!(normalize_host(&variant), want);
    }
}
