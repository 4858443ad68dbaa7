//! Generated catalogs for the benches (`#[path]`-included by each bench that
//! needs one, so every bench measures the same shapes).
#![allow(dead_code)] // each bench uses some of these

use std::fmt::Write as _;

/// A catalog of `n` rules: half exact names (`api{i}.svc{i/10}.example{i/100}.com`),
/// half wildcards (`*.zone{i}.example{i/100}.com`), allow and bypass alternating.
pub fn generated_catalog(n: usize) -> String {
    let mut text = String::new();
    for i in 0..n {
        let host = if i % 2 == 0 {
            format!("api{i}.svc{}.example{}.com", i / 10, i / 100)
        } else {
            format!("*.zone{i}.example{}.com", i / 100)
        };
        let action = if i % 4 < 2 { "allow" } else { "bypass" };
        let _ = write!(
            text,
            "[[rule]]\nname = \"generated {i}\"\nhosts = [\"{host}\"]\nports = [443]\naction = \"{action}\"\n\n"
        );
    }
    text
}

/// A catalog of `n` rules shaped like a vendor's connection table: one to
/// three host names per rule (exact names, wildcards and both), port 443,
/// 80 and 443, or a range; mostly `bypass` (cloud look-ups) and `allow`,
/// one in 16 a `deny` carving a name out of a wildcard; some with the
/// vendor's published addresses (`ips`), some with `sni = "require"`.
/// Every rule decides something (no shadowed-rule warnings), no two are
/// duplicates, and the file validates.
pub fn vendor_catalog(n: usize) -> String {
    let mut text = String::with_capacity(n * 160);
    for i in 0..n {
        let (v, p) = (i / 100, i / 10);
        let mut hosts = vec![];
        let action = match i % 16 {
            15 => {
                // An exception under the wildcard of rule i - 1 (an allow).
                hosts.push(format!("\"blocked.dl{}.vendor{v}.net\"", i - 1));
                "deny"
            }
            k if k % 3 == 0 => {
                hosts.push(format!("\"ksn{i}.svc{p}.vendor{v}.com\""));
                hosts.push(format!("\"ksn{i}-geo.svc{p}.vendor{v}.com\""));
                "bypass"
            }
            k if k % 3 == 1 => {
                hosts.push(format!("\"*.zone{i}.vendor{v}.com\""));
                "bypass"
            }
            _ => {
                hosts.push(format!("\"update{i}.svc{p}.vendor{v}.com\""));
                hosts.push(format!("\"*.dl{i}.vendor{v}.net\""));
                hosts.push(format!("\"dl{i}.vendor{v}.net\""));
                "allow"
            }
        };
        // The deny rule must cover the ports of the wildcard it carves from.
        let ports = match (i % 16 == 15, i % 5) {
            (true, _) => "[80, 443]",
            (false, 0..=2) => "[443]",
            (false, 3) => "[80, 443]",
            _ => "[\"8000-8010\", 443]",
        };
        let _ = write!(
            text,
            "[[rule]]\nname = \"vendor {i}\"\nhosts = [{}]\nports = {ports}\naction = \"{action}\"\n",
            hosts.join(", ")
        );
        if action == "bypass" && i % 4 == 0 {
            let _ = writeln!(text, "sni = \"require\"");
        }
        if i % 7 == 0 {
            let _ = writeln!(text, "ips = [\"198.51.{}.{}\"]", i / 250 % 256, i % 250);
        }
        text.push('\n');
    }
    text
}
