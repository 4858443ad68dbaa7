//! Target parsing and host normalisation: absolute-form `http://` URIs and
//! CONNECT authorities become a [`Target`] or a `bad_request` refusal.
//!
//! This is the only place hosts are normalised: TLS SNI values and catalog
//! host names go through [`normalize_host`] too, so that the policy compares
//! like with like. Normalisation follows the WHATWG URL host parser (UTS-46
//! mapping, lower case, punycode, IPv4 literals in every spelling) plus the
//! stricter rules of a DNS name (one trailing dot removed, no empty label,
//! letters, digits, `-` and `_` only, 63-byte labels, 253-byte names).
//!
//! It does no I/O, no DNS and no policy; the `Host` header is never read here.
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

#[cfg(test)]
mod tests;

/// Longest accepted name, in bytes, without the trailing dot (RFC 1035).
const MAX_NAME_LEN: usize = 253;
/// Longest accepted label, in bytes (RFC 1035).
const MAX_LABEL_LEN: usize = 63;
/// Longest excerpt of client input kept in an error value.
const MAX_EXCERPT_CHARS: usize = 32;

/// A normalised host: a lower-case ASCII (punycode) DNS name without a
/// trailing dot, or an IP literal in any of its spellings.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: non-empty labels of `a-z`, `0-9`, `-`, `_`, joined by
    /// `.`; IDNs as `xn--` labels; never an IPv4 literal.
    Name(Box<str>),
    /// An IP literal. IPv4-mapped IPv6 (`::ffff:127.0.0.1`) stays IPv6;
    /// [`crate::policy::ip`] judges the embedded IPv4 address.
    Ip(IpAddr),
}

/// Where a request wants to go, after normalisation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The normalised host.
    pub host: Host,
    /// The port, 1–65535 (80 when an `http://` URI names none).
    pub port: u16,
}

/// Why a target was refused; every variant is a `bad_request` (400).
///
/// Values quoted from the client are cut to a short excerpt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Origin-form (`/path`), asterisk-form (`*`) or authority-form where an
    /// absolute `http://` URI was expected.
    #[error("request target is not an absolute http:// uri")]
    NotAbsolute,
    /// An absolute URI with another scheme (`https://`, `ftp://`, …).
    #[error("scheme {0:?} is not supported, only http")]
    UnsupportedScheme(Box<str>),
    /// `user@` or `user:password@` in the authority.
    #[error("userinfo is not allowed in the target")]
    Userinfo,
    /// The authority carries something other than `host:port` (a path, a
    /// query, a fragment, whitespace or control characters).
    #[error("authority must be host:port only")]
    NotAuthority,
    /// No host at all.
    #[error("empty host")]
    EmptyHost,
    /// A CONNECT authority without a port.
    #[error("missing port")]
    MissingPort,
    /// A port that is not 1–65535 in decimal digits.
    #[error("invalid port {0:?}")]
    InvalidPort(Box<str>),
    /// An IPv6 literal without the brackets an authority needs.
    #[error("ipv6 address must be in brackets")]
    UnbracketedIpv6,
    /// A bracketed host that is not an IPv6 address.
    #[error("invalid ipv6 address")]
    InvalidIpv6,
    /// A name that ends in a number but is not a valid IPv4 address.
    #[error("invalid ipv4 address")]
    InvalidIpv4,
    /// A name that UTS-46 processing rejects (bad punycode, bidi rules, …).
    #[error("invalid international domain name")]
    InvalidIdn,
    /// A character not allowed in a DNS name.
    #[error("host contains a character not allowed in a dns name")]
    InvalidCharacter,
    /// `a..b`, a leading dot, or more than one trailing dot.
    #[error("empty label in host name")]
    EmptyLabel,
    /// A label longer than 63 bytes.
    #[error("label longer than 63 bytes in host name")]
    LabelTooLong,
    /// A name longer than 253 bytes.
    #[error("host name longer than 253 bytes")]
    NameTooLong,
}

// === impl Host ===

impl Host {
    /// The DNS name, when the host is one.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(name) => Some(name),
            Host::Ip(_) => None,
        }
    }

    /// The IP literal, when the host is one.
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Host::Name(_) => None,
            Host::Ip(ip) => Some(*ip),
        }
    }
}

/// The name, or the address with IPv6 shown bare (`::1`): the audit `host`.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

// === impl Target ===

impl Target {
    /// `host:port`, with IPv6 in brackets (`[::1]:443`): the form to dial,
    /// to put in a `Host` header (with the port), or to show to an operator.
    pub fn authority(&self) -> String {
        self.to_string()
    }
}

/// `host:port`, `[v6]:port`.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            ref host => write!(f, "{host}:{}", self.port),
        }
    }
}

// === parsing ===

/// The target of a proxy request: the authority of a CONNECT
/// (authority-form), or the absolute-form `http://` URI of any other method.
///
/// # Errors
/// Anything else: origin-form, another scheme, a `CONNECT` with a scheme or
/// a path, a malformed or non-normalisable host, port 0.
pub fn from_request<B>(req: &http::Request<B>) -> Result<Target, TargetError> {
    let uri = req.uri();
    if req.method() != http::Method::CONNECT {
        return parse_absolute(uri);
    }
    if uri.scheme().is_some() {
        // `CONNECT http://host:port/` is not authority-form.
        return Err(TargetError::NotAuthority);
    }
    let bare = uri
        .path_and_query()
        .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
    match uri.authority() {
        Some(a) if bare => parse_authority(a.as_str()),
        _ => parse_authority(&uri.to_string()),
    }
}

/// Parse the absolute-form request target of a plain HTTP proxy request
/// (`http://host[:port]/path`); the port defaults to 80.
///
/// # Errors
///
/// Any scheme but `http` (in any case), a URI without a scheme (origin-form,
/// asterisk-form), userinfo, an empty or invalid host, or a port that is not
/// 1–65535. The port is read from the raw authority, because `http::Uri`
/// reports an out-of-range port as no port.
pub fn parse_absolute(uri: &http::Uri) -> Result<Target, TargetError> {
    let Some(scheme) = uri.scheme_str() else {
        return Err(TargetError::NotAbsolute);
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(TargetError::UnsupportedScheme(excerpt(scheme)));
    }
    let authority = uri.authority().map_or("", |a| a.as_str());
    parse_host_port(authority, Some(80))
}

/// Parse a CONNECT authority: `host:port` or `[v6]:port`, the port required.
///
/// # Errors
///
/// No port, a port that is not 1–65535 in digits, an unbracketed IPv6
/// address, an empty or invalid host, userinfo, or anything beyond
/// `host:port` (a path, query, fragment, whitespace).
pub fn parse_authority(authority: &str) -> Result<Target, TargetError> {
    if authority.contains('@') {
        return Err(TargetError::Userinfo);
    }
    let stray =
        |c: char| matches!(c, '/' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control();
    if authority.contains(stray) {
        return Err(TargetError::NotAuthority);
    }
    parse_host_port(authority, None)
}

/// Parse a `Host` header value or a URL authority: `host[:port]` or
/// `[v6][:port]`, `default_port` when none is written. Used to hold the
/// requests inside an inspected tunnel to the CONNECT target.
///
/// # Errors
///
/// As [`parse_authority`], except that the port may be left out.
pub fn parse_host_header(raw: &str, default_port: u16) -> Result<Target, TargetError> {
    if raw.contains('@') {
        return Err(TargetError::Userinfo);
    }
    let stray =
        |c: char| matches!(c, '/' | '?' | '#' | '\\') || c.is_whitespace() || c.is_control();
    if raw.contains(stray) {
        return Err(TargetError::NotAuthority);
    }
    parse_host_port(raw, Some(default_port))
}

/// Split and check `host[:port]`, then normalise the host.
fn parse_host_port(raw: &str, default_port: Option<u16>) -> Result<Target, TargetError> {
    if raw.contains('@') {
        return Err(TargetError::Userinfo);
    }
    let (host, port) = split_host_port(raw)?;
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    let port = match port {
        Some(text) => parse_port(text)?,
        None => default_port.ok_or(TargetError::MissingPort)?,
    };
    let host = normalize_host(host)?;
    Ok(Target { host, port })
}

/// `host[:port]` → (host, port text). A bracketed host keeps its brackets.
fn split_host_port(raw: &str) -> Result<(&str, Option<&str>), TargetError> {
    if raw.starts_with('[') {
        let end = raw.find(']').ok_or(TargetError::InvalidIpv6)?;
        let (host, rest) = raw.split_at(end + 1);
        if rest.is_empty() {
            return Ok((host, None));
        }
        let port = rest.strip_prefix(':').ok_or(TargetError::NotAuthority)?;
        return Ok((host, Some(port)));
    }
    let Some((host, port)) = raw.split_once(':') else {
        return Ok((raw, None));
    };
    if port.contains(':') {
        // `::1:443` or `2001:db8::1` without brackets is ambiguous; `a:80:80`
        // is just a bad port.
        let before_last = raw.rsplit_once(':').map_or(raw, |(h, _)| h);
        if raw.parse::<Ipv6Addr>().is_ok() || before_last.parse::<Ipv6Addr>().is_ok() {
            return Err(TargetError::UnbracketedIpv6);
        }
        return Err(TargetError::InvalidPort(excerpt(port)));
    }
    Ok((host, Some(port)))
}

/// Decimal digits only, 1–65535 (leading zeros tolerated); an empty port
/// (`host:`) is refused rather than read as the default.
fn parse_port(text: &str) -> Result<u16, TargetError> {
    let invalid = || TargetError::InvalidPort(excerpt(text));
    if text.is_empty() {
        return Err(invalid());
    }
    let mut port: u32 = 0;
    for b in text.bytes() {
        if !b.is_ascii_digit() {
            return Err(invalid());
        }
        port = port * 10 + u32::from(b - b'0');
        if port > u32::from(u16::MAX) {
            return Err(invalid());
        }
    }
    match u16::try_from(port) {
        Ok(0) | Err(_) => Err(invalid()),
        Ok(port) => Ok(port),
    }
}

// === normalisation ===

/// Normalise a host as written by a client (or in an SNI, or a catalog).
///
/// * `[v6]` → [`Host::Ip`]; a bare IPv6 address (`::1`) is accepted too,
///   since `:` cannot occur in a name (authorities still need brackets).
///   IPv4-mapped IPv6 stays IPv6.
/// * IPv4 in every WHATWG spelling (`2130706433`, `0x7f.1`, `0177.0.0.1`,
///   `127.1`, full-width digits, percent-encoded) → [`Host::Ip`].
/// * Names: UTS-46 mapped, lower case, `xn--` punycode, one trailing dot
///   removed. Already lower-case-able ASCII LDH names whose last label
///   starts with a letter skip the `url` machinery (same result).
///
/// # Errors
///
/// Empty host, empty labels (`a..b`, `.a`, `a..`), characters other than
/// letters, digits, `-` and `_` after mapping, a label over 63 or a name over
/// 253 bytes, invalid punycode or IDN, an invalid IPv4 or IPv6 literal.
pub fn normalize_host(raw: &str) -> Result<Host, TargetError> {
    if let Some(name) = fast_name(raw) {
        return Ok(Host::Name(name));
    }
    slow_normalize(raw)
}

/// True when `name` is a DNS name already in normal form (what a catalog
/// host must be): [`normalize_host`] returns it unchanged as a
/// [`Host::Name`]. For a wildcard pattern, check the part after `*.`.
pub fn is_normalized_name(name: &str) -> bool {
    matches!(normalize_host(name), Ok(Host::Name(n)) if *n == *name)
}

/// The fast path: ASCII letters, digits, `-`, `_` in non-empty labels of at
/// most 63 bytes, one optional trailing dot, at most 253 bytes, no label with
/// `--` in positions 3–4 (`xn--` punycode needs validating), and a last label
/// that starts with a letter, so that WHATWG could never read the name as an
/// IPv4 address (an all-digit or `0x…` last label). `None` sends the input
/// to the slow path, which decides.
fn fast_name(raw: &str) -> Option<Box<str>> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let bytes = name.as_bytes();
    if bytes.len() > MAX_NAME_LEN {
        return None;
    }
    let mut upper = false;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
            b'A'..=b'Z' => upper = true,
            b'.' if fast_label(bytes.get(start..i)?) => start = i + 1,
            _ => return None,
        }
    }
    let last = bytes.get(start..)?;
    if !fast_label(last) || !last.first()?.is_ascii_alphabetic() {
        return None;
    }
    Some(if upper {
        name.to_ascii_lowercase().into_boxed_str()
    } else {
        Box::from(name)
    })
}

/// A label the fast path may take: 1–63 bytes, not `??--…` (`xn--`).
fn fast_label(label: &[u8]) -> bool {
    !label.is_empty() && label.len() <= MAX_LABEL_LEN && label.get(2..4) != Some(b"--")
}

/// The general path: IPv6 literals, then the WHATWG host parser, then the
/// DNS-name checks.
fn slow_normalize(raw: &str) -> Result<Host, TargetError> {
    if raw.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if let Some(inner) = raw.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(TargetError::InvalidIpv6)?;
        let ip = inner
            .parse::<Ipv6Addr>()
            .map_err(|_| TargetError::InvalidIpv6)?;
        return Ok(Host::Ip(IpAddr::V6(ip)));
    }
    if raw.contains(':') {
        return match raw.parse::<Ipv6Addr>() {
            Ok(ip) => Ok(Host::Ip(IpAddr::V6(ip))),
            Err(_) => Err(TargetError::InvalidCharacter),
        };
    }
    // ASCII that can never be part of a name (after mapping, ASCII stays
    // ASCII): refuse it before the IDNA machinery. `%` is kept, because the
    // WHATWG parser percent-decodes the host first.
    let name_ascii = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'%');
    if raw.bytes().any(|b| b.is_ascii() && !name_ascii(b)) {
        return Err(TargetError::InvalidCharacter);
    }
    // The trailing dot is left to the WHATWG parser, which drops exactly one
    // from an IPv4 literal (`127.0.0.1.`) and keeps it on a name, also when
    // it was spelt as a full-width or ideographic full stop.
    match url::Host::parse(raw) {
        Ok(url::Host::Domain(name)) => finish_name(name),
        Ok(url::Host::Ipv4(ip)) => Ok(Host::Ip(IpAddr::V4(ip))),
        Ok(url::Host::Ipv6(ip)) => Ok(Host::Ip(IpAddr::V6(ip))),
        Err(e) => Err(map_url_error(e)),
    }
}

fn map_url_error(e: url::ParseError) -> TargetError {
    match e {
        url::ParseError::EmptyHost => TargetError::EmptyHost,
        url::ParseError::InvalidIpv4Address => TargetError::InvalidIpv4,
        url::ParseError::InvalidIpv6Address => TargetError::InvalidIpv6,
        url::ParseError::InvalidDomainCharacter => TargetError::InvalidCharacter,
        _ => TargetError::InvalidIdn,
    }
}

/// Drop one trailing dot from the parser's output and enforce the DNS rules.
fn finish_name(mut name: String) -> Result<Host, TargetError> {
    if name.ends_with('.') {
        name.pop();
    }
    check_name(&name)?;
    Ok(Host::Name(name.into_boxed_str()))
}

fn check_name(name: &str) -> Result<(), TargetError> {
    if name.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(TargetError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(TargetError::LabelTooLong);
        }
        let ldh = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
        if !label.bytes().all(ldh) {
            return Err(TargetError::InvalidCharacter);
        }
    }
    if name.len() > MAX_NAME_LEN {
        return Err(TargetError::NameTooLong);
    }
    Ok(())
}

/// A short copy of client input for an error value.
fn excerpt(s: &str) -> Box<str> {
    match s.char_indices().nth(MAX_EXCERPT_CHARS) {
        Some((end, _)) => format!("{}…", &s[..end]).into_boxed_str(),
        None => Box::from(s),
    }
}
