#![allow(clippy::expect_used, clippy::unwrap_used)] // tests may panic

use std::net::IpAddr;

use ipnet::IpNet;

use super::*;
use IpClass::*;

/// (case name, address, expected class)
const CASES: &[(&str, &str, IpClass)] = &[
    // --- IPv4: this network / unspecified
    ("v4 unspecified", "0.0.0.0", Unspecified),
    (
        "v4 this-network first after unspecified",
        "0.0.0.1",
        ThisNetwork,
    ),
    ("v4 this-network last", "0.255.255.255", ThisNetwork),
    ("v4 just after this-network", "1.0.0.0", Public),
    // --- 10/8
    ("v4 just before 10/8", "9.255.255.255", Public),
    ("v4 10/8 first", "10.0.0.0", Private),
    ("v4 10/8 host", "10.0.0.1", Private),
    ("v4 10/8 last", "10.255.255.255", Private),
    ("v4 just after 10/8", "11.0.0.0", Public),
    // --- 100.64/10
    ("v4 just before cgnat", "100.63.255.255", Public),
    ("v4 cgnat first", "100.64.0.0", SharedAddressSpace),
    ("v4 cgnat last", "100.127.255.255", SharedAddressSpace),
    ("v4 just after cgnat", "100.128.0.0", Public),
    // --- 127/8
    ("v4 just before loopback", "126.255.255.255", Public),
    ("v4 loopback first", "127.0.0.0", Loopback),
    ("v4 loopback usual", "127.0.0.1", Loopback),
    ("v4 loopback last", "127.255.255.255", Loopback),
    ("v4 just after loopback", "128.0.0.0", Public),
    // --- 169.254/16
    ("v4 just before link-local", "169.253.255.255", Public),
    ("v4 link-local first", "169.254.0.0", LinkLocal),
    ("v4 metadata", "169.254.169.254", Metadata),
    ("v4 metadata neighbour", "169.254.169.253", LinkLocal),
    ("v4 link-local last", "169.254.255.255", LinkLocal),
    ("v4 just after link-local", "169.255.0.0", Public),
    // --- 172.16/12
    ("v4 just before 172.16/12", "172.15.255.255", Public),
    ("v4 172.16/12 first", "172.16.0.0", Private),
    ("v4 172.16/12 last", "172.31.255.255", Private),
    ("v4 just after 172.16/12", "172.32.0.0", Public),
    // --- 192.0.0/24 and 192.0.2/24
    ("v4 just before 192.0.0/24", "191.255.255.255", Public),
    (
        "v4 protocol assignments first",
        "192.0.0.0",
        ProtocolAssignments,
    ),
    (
        "v4 protocol assignments last",
        "192.0.0.255",
        ProtocolAssignments,
    ),
    ("v4 between 192.0.0/24 and 192.0.2/24", "192.0.1.0", Public),
    ("v4 test-net-1 first", "192.0.2.0", Documentation),
    ("v4 test-net-1 last", "192.0.2.255", Documentation),
    ("v4 just after test-net-1", "192.0.3.0", Public),
    // --- 192.88.99/24
    ("v4 just before 6to4 relay", "192.88.98.255", Public),
    ("v4 6to4 relay first", "192.88.99.0", RelayAnycast),
    ("v4 6to4 relay last", "192.88.99.255", RelayAnycast),
    ("v4 just after 6to4 relay", "192.88.100.0", Public),
    // --- 192.168/16
    ("v4 just before 192.168/16", "192.167.255.255", Public),
    ("v4 192.168/16 first", "192.168.0.0", Private),
    ("v4 192.168/16 last", "192.168.255.255", Private),
    ("v4 just after 192.168/16", "192.169.0.0", Public),
    // --- 198.18/15
    ("v4 just before benchmarking", "198.17.255.255", Public),
    ("v4 benchmarking first", "198.18.0.0", Benchmarking),
    ("v4 benchmarking last", "198.19.255.255", Benchmarking),
    ("v4 just after benchmarking", "198.20.0.0", Public),
    // --- 198.51.100/24, 203.0.113/24
    ("v4 just before test-net-2", "198.51.99.255", Public),
    ("v4 test-net-2 first", "198.51.100.0", Documentation),
    ("v4 test-net-2 last", "198.51.100.255", Documentation),
    ("v4 just after test-net-2", "198.51.101.0", Public),
    ("v4 just before test-net-3", "203.0.112.255", Public),
    ("v4 test-net-3 first", "203.0.113.0", Documentation),
    ("v4 test-net-3 last", "203.0.113.255", Documentation),
    ("v4 just after test-net-3", "203.0.114.0", Public),
    // --- 224/4, 240/4, broadcast
    ("v4 just before multicast", "223.255.255.255", Public),
    ("v4 multicast first", "224.0.0.0", Multicast),
    ("v4 multicast last", "239.255.255.255", Multicast),
    ("v4 reserved first", "240.0.0.0", Reserved),
    ("v4 reserved last", "255.255.255.254", Reserved),
    ("v4 broadcast", "255.255.255.255", Broadcast),
    // --- public IPv4 examples
    ("v4 google dns", "8.8.8.8", Public),
    ("v4 cloudflare dns", "1.1.1.1", Public),
    ("v4 kaspersky ksn", "185.85.15.26", Public),
    // --- IPv6 singletons
    ("v6 unspecified", "::", Unspecified),
    ("v6 loopback", "::1", Loopback),
    (
        "v6 just after loopback (compat 0.0.0.2)",
        "::2",
        ThisNetwork,
    ),
    // --- ULA, link-local, site-local, multicast
    (
        "v6 just before ula",
        "fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        Reserved,
    ),
    ("v6 ula first", "fc00::", UniqueLocal),
    ("v6 ula fd", "fd12:3456::1", UniqueLocal),
    (
        "v6 ula last",
        "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        UniqueLocal,
    ),
    ("v6 aws metadata", "fd00:ec2::254", Metadata),
    ("v6 just after ula", "fe00::", Reserved),
    ("v6 link-local first", "fe80::", LinkLocal),
    ("v6 link-local host", "fe80::1", LinkLocal),
    (
        "v6 link-local last",
        "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        LinkLocal,
    ),
    ("v6 site-local first", "fec0::", SiteLocal),
    (
        "v6 site-local last",
        "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        SiteLocal,
    ),
    ("v6 multicast first", "ff00::", Multicast),
    ("v6 multicast all-nodes", "ff02::1", Multicast),
    (
        "v6 multicast last",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        Multicast,
    ),
    // --- discard, NAT64 local
    ("v6 discard first", "100::", Discard),
    ("v6 discard last", "100::ffff:ffff:ffff:ffff", Discard),
    ("v6 just after discard", "100:0:0:1::", Reserved),
    ("v6 local nat64 first", "64:ff9b:1::", Nat64Local),
    (
        "v6 local nat64 last",
        "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
        Nat64Local,
    ),
    ("v6 just after local nat64", "64:ff9b:2::", Reserved),
    // --- 2001::/23, benchmarking, documentation
    (
        "v6 protocol assignments (after teredo)",
        "2001:1::1",
        ProtocolAssignments,
    ),
    ("v6 benchmarking first", "2001:2::", Benchmarking),
    (
        "v6 benchmarking last",
        "2001:2:0:ffff:ffff:ffff:ffff:ffff",
        Benchmarking,
    ),
    (
        "v6 just after benchmarking",
        "2001:2:1::",
        ProtocolAssignments,
    ),
    (
        "v6 protocol assignments last",
        "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
        ProtocolAssignments,
    ),
    ("v6 just after 2001::/23", "2001:200::", Public),
    (
        "v6 just before 2001:db8::/32",
        "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff",
        Public,
    ),
    ("v6 documentation first", "2001:db8::", Documentation),
    (
        "v6 documentation last",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        Documentation,
    ),
    ("v6 just after 2001:db8::/32", "2001:db9::", Public),
    (
        "v6 just before 3fff::/20",
        "3ffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        Public,
    ),
    ("v6 documentation 3fff first", "3fff::", Documentation),
    (
        "v6 documentation 3fff last",
        "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
        Documentation,
    ),
    ("v6 just after 3fff::/20", "3fff:1000::", Public),
    // --- global unicast edges, reserved space
    ("v6 global unicast first", "2000::", Public),
    (
        "v6 global unicast last",
        "3fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        Public,
    ),
    (
        "v6 just before global unicast",
        "1fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        Reserved,
    ),
    ("v6 just after global unicast", "4000::", Reserved),
    ("v6 srv6 sid", "5f00::1", Reserved),
    ("v6 cloudflare", "2606:4700::1111", Public),
    ("v6 google dns", "2001:4860:4860::8888", Public),
    // --- embedded IPv4: mapped
    ("mapped loopback", "::ffff:127.0.0.1", Loopback),
    ("mapped loopback hex", "::ffff:7f00:1", Loopback),
    ("mapped private", "::ffff:10.0.0.1", Private),
    ("mapped metadata", "::ffff:169.254.169.254", Metadata),
    ("mapped unspecified", "::ffff:0.0.0.0", Unspecified),
    ("mapped public", "::ffff:8.8.8.8", Public),
    // --- compatible (deprecated)
    ("compat loopback", "::127.0.0.1", Loopback),
    ("compat private", "::10.0.0.1", Private),
    ("compat metadata", "::169.254.169.254", Metadata),
    ("compat public is reserved", "::8.8.8.8", Reserved),
    // --- NAT64 well-known prefix
    ("nat64 loopback", "64:ff9b::127.0.0.1", Loopback),
    ("nat64 private", "64:ff9b::10.0.0.1", Private),
    ("nat64 metadata", "64:ff9b::169.254.169.254", Metadata),
    ("nat64 public", "64:ff9b::8.8.8.8", Public),
    ("nat64 just outside /96", "64:ff9b:0:0:1::", Reserved),
    // --- 6to4
    ("6to4 loopback", "2002:7f00:1::", Loopback),
    ("6to4 loopback with host bits", "2002:7f00:1:1::1", Loopback),
    ("6to4 private", "2002:a00:1::", Private),
    ("6to4 metadata", "2002:a9fe:a9fe::", Metadata),
    ("6to4 public", "2002:808:808::1", Public),
    // --- Teredo: server in bits 32..64, client = !low 32 bits
    ("teredo server loopback", "2001:0:7f00:1::", Loopback),
    ("teredo server private", "2001:0:a00:1::", Private),
    ("teredo server metadata", "2001:0:a9fe:a9fe::", Metadata),
    (
        "teredo client loopback",
        "2001:0:808:808:0:0:80ff:fffe",
        Loopback,
    ),
    (
        "teredo client private",
        "2001:0:808:808:0:0:f5ff:fffe",
        Private,
    ),
    (
        "teredo client metadata",
        "2001:0:808:808:0:0:5601:5601",
        Metadata,
    ),
    ("teredo both public", "2001:0:808:808:0:0:f7f7:f7f7", Public),
    // client bits all zero = 255.255.255.255 after NOT
    ("teredo client broadcast", "2001:0:808:808::", Broadcast),
];

#[test]
fn classify_table() {
    assert!(CASES.len() >= 60);
    let mut failures = Vec::new();
    for &(name, addr, want) in CASES {
        let ip: IpAddr = addr
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {addr}: {e}"));
        let got = classify(ip);
        if got != want {
            failures.push(format!("{name}: {addr}: got {got:?}, want {want:?}"));
        }
        assert_eq!(got.is_public(), got == Public, "{name}");
        // Without exemptions, is_allowed is exactly "is public".
        assert_eq!(is_allowed(ip, &[]), want == Public, "{name}: is_allowed");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().expect("test cidr")).collect()
}

#[test]
fn allow_private_loopback() {
    let allow = nets(&["127.0.0.0/8", "::1/128"]);
    let cases: &[(&str, bool)] = &[
        ("127.0.0.1", true),
        ("127.255.255.254", true),
        ("::1", true),
        ("::ffff:127.0.0.1", true),
        ("64:ff9b::127.0.0.1", true),
        ("2002:7f00:1::", true),
        ("2001:0:7f00:1:0:0:f7f7:f7f7", true),
        ("8.8.8.8", true),
        ("2606:4700::1111", true),
        // not covered
        ("10.0.0.1", false),
        ("169.254.169.254", false),
        ("::ffff:10.0.0.1", false),
        ("fe80::1", false),
        ("::2", false),
        // Teredo with loopback server but a private client: not all covered
        ("2001:0:7f00:1:0:0:f5ff:fffe", false),
        // deprecated IPv4-compatible form: only an IPv6 CIDR exempts it
        ("::127.0.0.1", false),
    ];
    for &(addr, want) in cases {
        let ip: IpAddr = addr.parse().expect("test address");
        assert_eq!(is_allowed(ip, &allow), want, "{addr}");
    }
}

#[test]
fn allow_private_v6_cidr_covers_v6_only() {
    let allow = nets(&["fd00::/8", "::/96"]);
    assert!(is_allowed("fd12::1".parse().expect("addr"), &allow));
    assert!(is_allowed("::127.0.0.1".parse().expect("addr"), &allow));
    assert!(!is_allowed("10.0.0.1".parse().expect("addr"), &allow));
    assert!(!is_allowed("fe80::1".parse().expect("addr"), &allow));
}

#[test]
fn as_str_is_snake_case_and_distinct() {
    let all = [
        Public,
        Unspecified,
        ThisNetwork,
        Loopback,
        Private,
        SharedAddressSpace,
        LinkLocal,
        Metadata,
        ProtocolAssignments,
        Documentation,
        RelayAnycast,
        Benchmarking,
        Multicast,
        Broadcast,
        Reserved,
        UniqueLocal,
        SiteLocal,
        Discard,
        Nat64Local,
    ];
    let mut names: Vec<&str> = all.iter().map(|c| c.as_str()).collect();
    for name in &names {
        assert!(
            name.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "{name}"
        );
        assert_eq!(*name, name.trim_matches('_'));
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len());
    assert_eq!(Metadata.to_string(), "metadata");
}
