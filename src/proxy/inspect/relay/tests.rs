#![allow(clippy::expect_used, clippy::unwrap_used)] // tests may panic

use super::*;

fn target(authority: &str) -> Target {
    target::parse_authority(authority).expect("test target")
}

#[test]
fn host_spellings_that_name_the_tunnel() {
    let t = target("allowed.test:443");
    for ok in [
        "allowed.test",
        "ALLOWED.test",
        "allowed.test.",
        "allowed.test:443",
        "Allowed.Test.:0443",
    ] {
        assert!(names(&t, ok), "{ok} names allowed.test:443");
    }
    for bad in [
        "evil.test",
        "allowed.test:8443",
        "allowed.test:",
        "user@allowed.test",
        "allowed.test/x",
        "allowed.test evil.test",
        "",
    ] {
        assert!(!names(&t, bad), "{bad:?} does not name allowed.test:443");
    }
    let other_port = target("allowed.test:8443");
    assert!(names(&other_port, "allowed.test:8443"));
    assert!(
        !names(&other_port, "allowed.test"),
        "no port means 443, not the tunnel's port"
    );
    let v6 = target("[::1]:443");
    assert!(names(&v6, "[::1]") && names(&v6, "[0:0::1]:443"));
}

#[test]
fn host_value_leaves_out_443_and_brackets_ipv6() {
    assert_eq!(host_value(&target("allowed.test:443")), "allowed.test");
    assert_eq!(
        host_value(&target("allowed.test:8443")),
        "allowed.test:8443"
    );
    assert_eq!(host_value(&target("[::1]:443")), "[::1]");
    assert_eq!(host_value(&target("[::1]:8443")), "[::1]:8443");
}
