//! Why a transaction was refused or ended abnormally: the `reason` word of
//! records, `X-Egress-Error` headers and metrics, with its HTTP status
//! (DESIGN.md "Reasons and statuses"), its sentence and its [`Class`].
//!
//! A leaf: every module names reasons, so this one names no other module.
//! Questions such as "is this a policy refusal?" or "does the record keep
//! the policy's decision?" are answered here, by [`Reason::class`], and
//! nowhere else.
use http::StatusCode;

/// Why a transaction was refused or ended abnormally (the `reason` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    BadRequest,
    NotInCatalog,
    PortNotAllowed,
    MethodNotAllowed,
    BodyNotAllowed,
    DenyRule,
    IpLiteral,
    PrivateAddress,
    PinMismatch,
    ClientNotAllowed,
    HostMismatch,
    AuthRequired,
    AuthFailed,
    RateLimited,
    HeaderTooLarge,
    DnsFailure,
    UpstreamConnectFailed,
    UpstreamTls,
    UpstreamReset,
    ConnectionLimit,
    Shutdown,
    Timeout,
    SniMismatch,
    SniRequired,
    EchDenied,
    AlpnUnsupported,
    ClientClosed,
    ParentRefused,
    ParentUnreachable,
}

impl Reason {
    /// Every reason, for metrics and documentation.
    pub const ALL: [Reason; 29] = [
        Reason::BadRequest,
        Reason::NotInCatalog,
        Reason::PortNotAllowed,
        Reason::MethodNotAllowed,
        Reason::BodyNotAllowed,
        Reason::DenyRule,
        Reason::IpLiteral,
        Reason::PrivateAddress,
        Reason::PinMismatch,
        Reason::ClientNotAllowed,
        Reason::HostMismatch,
        Reason::AuthRequired,
        Reason::AuthFailed,
        Reason::RateLimited,
        Reason::HeaderTooLarge,
        Reason::DnsFailure,
        Reason::UpstreamConnectFailed,
        Reason::UpstreamTls,
        Reason::UpstreamReset,
        Reason::ConnectionLimit,
        Reason::Shutdown,
        Reason::Timeout,
        Reason::SniMismatch,
        Reason::SniRequired,
        Reason::EchDenied,
        Reason::AlpnUnsupported,
        Reason::ClientClosed,
        Reason::ParentRefused,
        Reason::ParentUnreachable,
    ];

    /// The reason's class.
    pub const fn class(self) -> Class {
        match self {
            Reason::BadRequest | Reason::HeaderTooLarge => Class::Client,
            Reason::NotInCatalog
            | Reason::PortNotAllowed
            | Reason::MethodNotAllowed
            | Reason::BodyNotAllowed
            | Reason::DenyRule
            | Reason::IpLiteral => Class::Policy,
            Reason::PrivateAddress | Reason::PinMismatch => Class::Address,
            Reason::ClientNotAllowed
            | Reason::AuthRequired
            | Reason::AuthFailed
            | Reason::RateLimited => Class::Access,
            Reason::HostMismatch
            | Reason::SniMismatch
            | Reason::SniRequired
            | Reason::EchDenied
            | Reason::AlpnUnsupported => Class::Tunnel,
            Reason::DnsFailure
            | Reason::UpstreamConnectFailed
            | Reason::UpstreamTls
            | Reason::UpstreamReset
            | Reason::Timeout
            | Reason::ClientClosed
            | Reason::ParentRefused
            | Reason::ParentUnreachable => Class::Failure,
            Reason::ConnectionLimit | Reason::Shutdown => Class::Proxy,
        }
    }

    /// The status a refusal for this reason answers with (DESIGN.md's
    /// table); a DNS time-out answers 504 instead (`Refusal::with_status`).
    pub const fn status(self) -> StatusCode {
        match self {
            // A client that offers only HTTP/2 inside an inspected tunnel: a
            // client capability, not policy (the tunnel record keeps 200).
            Reason::BadRequest | Reason::AlpnUnsupported => StatusCode::BAD_REQUEST,
            Reason::AuthRequired | Reason::AuthFailed => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::HeaderTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            r => match r.class() {
                Class::Failure => StatusCode::BAD_GATEWAY,
                Class::Proxy => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::FORBIDDEN,
            },
        }
    }

    /// The stable snake_case name used in records, headers and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::BadRequest => "bad_request",
            Reason::NotInCatalog => "not_in_catalog",
            Reason::PortNotAllowed => "port_not_allowed",
            Reason::MethodNotAllowed => "method_not_allowed",
            Reason::BodyNotAllowed => "body_not_allowed",
            Reason::DenyRule => "deny_rule",
            Reason::IpLiteral => "ip_literal",
            Reason::PrivateAddress => "private_address",
            Reason::PinMismatch => "pin_mismatch",
            Reason::ClientNotAllowed => "client_not_allowed",
            Reason::HostMismatch => "host_mismatch",
            Reason::AuthRequired => "auth_required",
            Reason::AuthFailed => "auth_failed",
            Reason::RateLimited => "rate_limited",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::DnsFailure => "dns_failure",
            Reason::UpstreamConnectFailed => "upstream_connect_failed",
            Reason::UpstreamTls => "upstream_tls",
            Reason::UpstreamReset => "upstream_reset",
            Reason::ConnectionLimit => "connection_limit",
            Reason::Shutdown => "shutdown",
            Reason::Timeout => "timeout",
            Reason::SniMismatch => "sni_mismatch",
            Reason::SniRequired => "sni_required",
            Reason::EchDenied => "ech_denied",
            Reason::AlpnUnsupported => "alpn_unsupported",
            Reason::ClientClosed => "client_closed",
            Reason::ParentRefused => "parent_refused",
            Reason::ParentUnreachable => "parent_unreachable",
        }
    }

    /// A sentence for the refusal body and `explain`.
    pub const fn describe(self) -> &'static str {
        match self {
            Reason::BadRequest => "the request target is malformed or not an http:// URL",
            Reason::NotInCatalog => "the host is not in the catalog",
            Reason::PortNotAllowed => "the host is in the catalog, but not on this port",
            Reason::MethodNotAllowed => "the rule does not allow this method",
            Reason::BodyNotAllowed => "the rule allows this method only without a request body",
            Reason::DenyRule => "a deny rule matches",
            Reason::IpLiteral => "IP-literal targets are refused unless a rule lists the address",
            Reason::PrivateAddress => "the name resolves only to private or reserved addresses",
            Reason::PinMismatch => "the name does not resolve to the rule's pinned addresses",
            Reason::ClientNotAllowed => "this client address may not use the proxy",
            Reason::HostMismatch => "the inner request's host differs from the tunnel's host",
            Reason::AuthRequired => "proxy authentication is required",
            Reason::AuthFailed => "proxy authentication failed",
            Reason::RateLimited => "too many requests",
            Reason::HeaderTooLarge => "the request head is too large",
            Reason::DnsFailure => "the name could not be resolved",
            Reason::UpstreamConnectFailed => "the upstream server could not be reached",
            Reason::UpstreamTls => "the upstream server's TLS failed verification",
            Reason::UpstreamReset => "the upstream server closed the connection early",
            Reason::ConnectionLimit => "the proxy is at its connection limit",
            Reason::Shutdown => "the proxy is shutting down",
            Reason::Timeout => "the upstream server did not answer in time",
            Reason::SniMismatch => "the TLS server name differs from the CONNECT host",
            Reason::SniRequired => "this rule requires TLS with a server name",
            Reason::EchDenied => "this rule refuses Encrypted ClientHello",
            Reason::AlpnUnsupported => {
                "the client offered only protocols other than HTTP/1.1, which inspected tunnels speak"
            }
            Reason::ClientClosed => "the client closed the connection early",
            Reason::ParentRefused => {
                "the parent proxy refused the request (its status is in the record)"
            }
            Reason::ParentUnreachable => "the parent proxy could not be reached",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of reason a [`Reason`] is: who refused, or what failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// The request itself: malformed, or a head too large.
    Client,
    /// The catalog refused the target (host, port, method, body, a deny
    /// rule, an IP literal): decided from the record's fields alone, so an
    /// audit log can be decided again under another catalog.
    Policy,
    /// The addresses the name resolved to were refused (private, pins).
    Address,
    /// The client may not use the proxy now: ACL, authentication, rates.
    Access,
    /// A check of what a tunnel carries: the inner `Host`, the SNI, ECH, ALPN.
    Tunnel,
    /// An allowed transaction failed or ended early: DNS, the upstream, a
    /// time-out, a client gone. The record keeps the policy's decision.
    Failure,
    /// The proxy's own state: its connection cap, a shutdown.
    Proxy,
}

impl Class {
    /// A refusal by a rule of ours (policy, address vetting, access, a
    /// tunnel check): Squid's `TCP_DENIED`, as against a request never
    /// processed or one that failed.
    pub const fn is_denial(self) -> bool {
        matches!(
            self,
            Class::Policy | Class::Address | Class::Access | Class::Tunnel
        )
    }
}
