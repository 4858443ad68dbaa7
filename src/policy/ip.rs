//! Address vetting: is a resolved (or literal) address one the proxy may dial?
//!
//! This module owns the table of special-purpose IPv4 and IPv6 ranges
//! (loopback, private, link-local and the cloud metadata address, CGNAT,
//! documentation, multicast, NAT64, …) and the rule that an IPv6 address which
//! embeds an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4, Teredo)
//! is judged by the IPv4 address it carries, so that `::ffff:127.0.0.1` or
//! `2002:7f00:1::` cannot smuggle a dial to loopback.
//!
//! Pure functions over addresses: no I/O, no DNS, no logging, no
//! configuration loading (the `dns.allow_private` CIDRs are passed in).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[cfg(test)]
mod tests;

/// The class of an address, from the point of view of egress.
///
/// Everything except [`IpClass::Public`] is refused as `private_address`
/// unless `dns.allow_private` covers it (see [`is_allowed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpClass {
    /// Globally routable unicast: may be dialed.
    Public,
    /// `0.0.0.0`, `::`.
    Unspecified,
    /// `0.0.0.0/8` other than `0.0.0.0` ("this network").
    ThisNetwork,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918: `10/8`, `172.16/12`, `192.168/16`.
    Private,
    /// `100.64.0.0/10`, carrier-grade NAT (RFC 6598).
    SharedAddressSpace,
    /// `169.254.0.0/16`, `fe80::/10` (other than the metadata address).
    LinkLocal,
    /// Cloud instance metadata: `169.254.169.254`, `fd00:ec2::254`.
    Metadata,
    /// `192.0.0.0/24` and `2001::/23` (other than Teredo and benchmarking).
    ProtocolAssignments,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `192.88.99.0/24`, the deprecated 6to4 relay anycast.
    RelayAnycast,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4`, IPv6 outside `2000::/3` not listed elsewhere (including
    /// `5f00::/16` SRv6 SIDs), and IPv4-compatible `::a.b.c.d` of a public address.
    Reserved,
    /// `fc00::/7` unique local addresses.
    UniqueLocal,
    /// `fec0::/10`, the deprecated site-local range.
    SiteLocal,
    /// `100::/64`, the discard-only prefix.
    Discard,
    /// `64:ff9b:1::/48`, local-use NAT64.
    Nat64Local,
}

// === impl IpClass ===

impl IpClass {
    /// The snake_case name, as written to logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            IpClass::Public => "public",
            IpClass::Unspecified => "unspecified",
            IpClass::ThisNetwork => "this_network",
            IpClass::Loopback => "loopback",
            IpClass::Private => "private",
            IpClass::SharedAddressSpace => "shared_address_space",
            IpClass::LinkLocal => "link_local",
            IpClass::Metadata => "metadata",
            IpClass::ProtocolAssignments => "protocol_assignments",
            IpClass::Documentation => "documentation",
            IpClass::RelayAnycast => "relay_anycast",
            IpClass::Benchmarking => "benchmarking",
            IpClass::Multicast => "multicast",
            IpClass::Broadcast => "broadcast",
            IpClass::Reserved => "reserved",
            IpClass::UniqueLocal => "unique_local",
            IpClass::SiteLocal => "site_local",
            IpClass::Discard => "discard",
            IpClass::Nat64Local => "nat64_local",
        }
    }

    /// True for [`IpClass::Public`], the only class dialed without an exemption.
    pub fn is_public(self) -> bool {
        self == IpClass::Public
    }
}

impl std::fmt::Display for IpClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classify one address.
///
/// An IPv6 address that embeds an IPv4 address (IPv4-mapped `::ffff:0:0/96`,
/// IPv4-compatible `::/96`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo
/// `2001::/32` with both its server and its client address) takes the class
/// of the embedded address when that is not public.
pub fn classify(ip: IpAddr) -> IpClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// True when the address may be dialed: it is public, or `allow_private`
/// exempts it.
///
/// An exemption covers an address when a CIDR contains the address itself,
/// or, for the embedded-IPv4 forms listed at [`classify`], when the IPv6
/// prefix is one that is public in its own right (mapped, NAT64, 6to4,
/// Teredo) and every non-public embedded IPv4 address is contained in a CIDR.
/// So `127.0.0.0/8` also admits `::ffff:127.0.0.1`.
pub fn is_allowed(ip: IpAddr, allow_private: &[IpNet]) -> bool {
    if classify(ip).is_public() || covered(ip, allow_private) {
        return true;
    }
    let IpAddr::V6(v6) = ip else {
        return false;
    };
    match embedded_v4(v6) {
        Embedded::None => false,
        // The prefix itself is not public (deprecated IPv4-compatible form):
        // only a CIDR containing the IPv6 address exempts it.
        Embedded::One { outer, .. } if !outer.is_public() => false,
        Embedded::One { v4, .. } => v4_allowed(v4, allow_private),
        Embedded::Teredo { server, client } => {
            v4_allowed(server, allow_private) && v4_allowed(client, allow_private)
        }
    }
}

fn covered(ip: IpAddr, allow_private: &[IpNet]) -> bool {
    allow_private.iter().any(|net| net.contains(&ip))
}

fn v4_allowed(v4: Ipv4Addr, allow_private: &[IpNet]) -> bool {
    classify_v4(v4).is_public() || covered(IpAddr::V4(v4), allow_private)
}

// === IPv4 ===

/// True when `addr` lies in `net/len` (all as host-order `u32`).
const fn in_v4(addr: u32, net: u32, len: u32) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    addr & mask == net & mask
}

const fn v4(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_be_bytes([a, b, c, d])
}

/// The special-purpose IPv4 ranges, most specific first.
const V4_TABLE: &[(u32, u32, IpClass)] = &[
    (v4(0, 0, 0, 0), 32, IpClass::Unspecified),
    (v4(0, 0, 0, 0), 8, IpClass::ThisNetwork),
    (v4(10, 0, 0, 0), 8, IpClass::Private),
    (v4(100, 64, 0, 0), 10, IpClass::SharedAddressSpace),
    (v4(127, 0, 0, 0), 8, IpClass::Loopback),
    (v4(169, 254, 169, 254), 32, IpClass::Metadata),
    (v4(169, 254, 0, 0), 16, IpClass::LinkLocal),
    (v4(172, 16, 0, 0), 12, IpClass::Private),
    (v4(192, 0, 0, 0), 24, IpClass::ProtocolAssignments),
    (v4(192, 0, 2, 0), 24, IpClass::Documentation),
    (v4(192, 88, 99, 0), 24, IpClass::RelayAnycast),
    (v4(192, 168, 0, 0), 16, IpClass::Private),
    (v4(198, 18, 0, 0), 15, IpClass::Benchmarking),
    (v4(198, 51, 100, 0), 24, IpClass::Documentation),
    (v4(203, 0, 113, 0), 24, IpClass::Documentation),
    (v4(224, 0, 0, 0), 4, IpClass::Multicast),
    (v4(255, 255, 255, 255), 32, IpClass::Broadcast),
    (v4(240, 0, 0, 0), 4, IpClass::Reserved),
];

fn classify_v4(ip: Ipv4Addr) -> IpClass {
    let addr = u32::from(ip);
    V4_TABLE
        .iter()
        .find(|&&(net, len, _)| in_v4(addr, net, len))
        .map_or(IpClass::Public, |&(_, _, class)| class)
}

// === IPv6 ===

/// True when `addr` lies in `net/len` (all as `u128`).
const fn in_v6(addr: u128, net: u128, len: u32) -> bool {
    let mask = if len == 0 {
        0
    } else {
        u128::MAX << (128 - len)
    };
    addr & mask == net & mask
}

/// Build a `u128` from the first (up to) four 16-bit groups; the rest are zero.
const fn v6(groups: [u16; 4]) -> u128 {
    ((groups[0] as u128) << 112)
        | ((groups[1] as u128) << 96)
        | ((groups[2] as u128) << 80)
        | ((groups[3] as u128) << 64)
}

/// Ranges without an embedded IPv4 address, most specific first; checked
/// after the embedded forms.
const V6_TABLE: &[(u128, u32, IpClass)] = &[
    (v6([0x64, 0xff9b, 1, 0]), 48, IpClass::Nat64Local),
    (v6([0x100, 0, 0, 0]), 64, IpClass::Discard),
    (v6([0x2001, 2, 0, 0]), 48, IpClass::Benchmarking),
    (v6([0x2001, 0, 0, 0]), 23, IpClass::ProtocolAssignments),
    (v6([0x2001, 0xdb8, 0, 0]), 32, IpClass::Documentation),
    (v6([0x3fff, 0, 0, 0]), 20, IpClass::Documentation),
    (v6([0x2000, 0, 0, 0]), 3, IpClass::Public),
    (v6([0x5f00, 0, 0, 0]), 16, IpClass::Reserved),
    (v6([0xfd00, 0xec2, 0, 0]) | 0x254, 128, IpClass::Metadata),
    (v6([0xfc00, 0, 0, 0]), 7, IpClass::UniqueLocal),
    (v6([0xfe80, 0, 0, 0]), 10, IpClass::LinkLocal),
    (v6([0xfec0, 0, 0, 0]), 10, IpClass::SiteLocal),
    (v6([0xff00, 0, 0, 0]), 8, IpClass::Multicast),
];

/// The IPv4 address(es) an IPv6 address carries, if it is one of the
/// embedding forms.
enum Embedded {
    None,
    /// Mapped, compatible, NAT64 or 6to4; `outer` is the class of the address
    /// when the embedded IPv4 address is public.
    One {
        v4: Ipv4Addr,
        outer: IpClass,
    },
    /// Teredo: the server address and the (de-obfuscated) client address.
    Teredo {
        server: Ipv4Addr,
        client: Ipv4Addr,
    },
}

fn embedded_v4(ip: Ipv6Addr) -> Embedded {
    let addr = u128::from(ip);
    let low32 = Ipv4Addr::from(addr as u32);
    if in_v6(addr, 0xffff_0000_0000, 96) {
        return Embedded::One {
            v4: low32,
            outer: IpClass::Public,
        };
    }
    // `::` and `::1` are classified before this is consulted.
    if in_v6(addr, 0, 96) {
        return Embedded::One {
            v4: low32,
            outer: IpClass::Reserved,
        };
    }
    if in_v6(addr, v6([0x64, 0xff9b, 0, 0]), 96) {
        return Embedded::One {
            v4: low32,
            outer: IpClass::Public,
        };
    }
    if in_v6(addr, v6([0x2002, 0, 0, 0]), 16) {
        let v4 = Ipv4Addr::from((addr >> 80) as u32);
        return Embedded::One {
            v4,
            outer: IpClass::Public,
        };
    }
    if in_v6(addr, v6([0x2001, 0, 0, 0]), 32) {
        let server = Ipv4Addr::from((addr >> 64) as u32);
        let client = Ipv4Addr::from(!(addr as u32));
        return Embedded::Teredo { server, client };
    }
    Embedded::None
}

fn classify_v6(ip: Ipv6Addr) -> IpClass {
    let addr = u128::from(ip);
    if addr == 0 {
        return IpClass::Unspecified;
    }
    if addr == 1 {
        return IpClass::Loopback;
    }
    match embedded_v4(ip) {
        Embedded::One { v4, outer } => {
            let inner = classify_v4(v4);
            if inner.is_public() {
                outer
            } else {
                inner
            }
        }
        Embedded::Teredo { server, client } => {
            let (server, client) = (classify_v4(server), classify_v4(client));
            if !server.is_public() {
                server
            } else {
                client
            }
        }
        Embedded::None => V6_TABLE
            .iter()
            .find(|&&(net, len, _)| in_v6(addr, net, len))
            .map_or(IpClass::Reserved, |&(_, _, class)| class),
    }
}
