//! Fuzz target parsing and host normalisation.
//!
//! Arbitrary bytes go to `parse_authority` and `normalize_host` (as a str
//! when they are UTF-8) and, through `http::Uri`, to `parse_absolute`. None
//! may panic, and what they accept must be a fixed point:
//!
//! * `normalize_host(s) == Ok(h)` ⇒ `normalize_host(h.to_string()) == Ok(h)`
//!   (a normalised name is its own normal form; an address prints in a
//!   spelling that parses back to itself);
//! * a name that comes out is what a catalog may hold
//!   (`is_normalized_name`);
//! * a target accepted as a CONNECT authority or an absolute URI prints
//!   (`host:port`, `[v6]:port`) as an authority that parses back to itself.
//!
//! Otherwise the policy, which compares normalised strings, could be made
//! to see one host where the dialler sees another.
#![no_main]

use egress_proxy::target::{self, Host, Target};
use libfuzzer_sys::fuzz_target;

fn check_host(h: &Host, from: &str) {
    let printed = h.to_string();
    assert_eq!(
        target::normalize_host(&printed).as_ref(),
        Ok(h),
        "normalize_host({from:?}) = {h:?}, which does not normalise to itself"
    );
    if let Host::Name(n) = h {
        assert!(
            target::is_normalized_name(n),
            "normalize_host({from:?}) = {n:?}, not a catalog-normal name"
        );
        assert!(!n.is_empty() && n.len() <= 253, "{from:?} -> {n:?}");
    }
}

fn check_target(t: &Target, from: &str) {
    check_host(&t.host, from);
    assert_ne!(t.port, 0, "{from:?} -> port 0");
    let printed = t.authority();
    assert_eq!(
        target::parse_authority(&printed).as_ref(),
        Ok(t),
        "{from:?} -> {t:?}, whose authority {printed:?} does not parse back"
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(h) = target::normalize_host(s) {
            check_host(&h, s);
        }
        if let Ok(t) = target::parse_authority(s) {
            check_target(&t, s);
        }
    }
    if let Ok(uri) = http::Uri::try_from(data) {
        if let Ok(t) = target::parse_absolute(&uri) {
            let from = uri.to_string();
            check_target(&t, &from);
            let again = http::Uri::try_from(format!("http://{}/", t.authority()))
                .unwrap_or_else(|e| panic!("{from:?} -> {t:?}: not a URI again: {e}"));
            assert_eq!(target::parse_absolute(&again).as_ref(), Ok(&t), "{from:?}");
        }
    }
});
