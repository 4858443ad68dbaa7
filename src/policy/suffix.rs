//! The Public Suffix List (compiled in by the `psl` crate, ICANN and private
//! sections; no network): which names anyone can register or publish under.
//! `suggest` groups hosts by registrable domain with it and never offers a
//! wildcard over a public suffix; `check` warns about a rule that does.

/// The registrable domain of a normalised host name under the list
/// (`www.bbc.co.uk` → `bbc.co.uk`, `d1a.cloudfront.net` →
/// `d1a.cloudfront.net`); the host itself when it is a public suffix or a
/// single label.
pub fn registrable_domain(host: &str) -> &str {
    psl::domain_str(host).unwrap_or(host)
}

/// Whether `name` is itself a suffix listed explicitly in the Public Suffix
/// List (`com`, `co.uk`, `cloudfront.net`, `s3.amazonaws.com`, `github.io`).
/// A name under an unlisted top-level label (`corp`, `internal`) is not.
pub fn is_public_suffix(name: &str) -> bool {
    psl::suffix(name.as_bytes()).is_some_and(|s| s.is_known() && s.as_bytes() == name.as_bytes())
}

/// The shared platform `host` is published under: its public suffix when
/// that comes from the list's private section (`cloudfront.net`,
/// `s3.amazonaws.com`, `herokuapp.com`, …), where anyone can publish a name.
pub fn shared_platform(host: &str) -> Option<&str> {
    let s = psl::suffix(host.as_bytes())?;
    if s.typ() != Some(psl::Type::Private) {
        return None;
    }
    std::str::from_utf8(s.as_bytes()).ok()
}

/// For a catalog host pattern `*.X` where `X` is a public suffix: `X`.
pub fn wildcard_over_public_suffix(pattern: &str) -> Option<&str> {
    let rest = pattern.strip_prefix("*.")?;
    is_public_suffix(rest).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domains_follow_the_list() {
        assert_eq!(registrable_domain("a.b.example.com"), "example.com");
        assert_eq!(registrable_domain("www.bbc.co.uk"), "bbc.co.uk");
        assert_eq!(registrable_domain("co.uk"), "co.uk");
        assert_eq!(registrable_domain("localhost"), "localhost");
        assert_eq!(
            registrable_domain("d1a.cloudfront.net"),
            "d1a.cloudfront.net"
        );
        assert_eq!(
            registrable_domain("foo.s3.amazonaws.com"),
            "foo.s3.amazonaws.com"
        );
        assert_eq!(registrable_domain("x.y.example.com.au"), "example.com.au");
    }

    #[test]
    fn public_suffixes_icann_and_private() {
        for s in [
            "com",
            "co.uk",
            "cloudfront.net",
            "s3.amazonaws.com",
            "github.io",
            "herokuapp.com",
            "azurewebsites.net",
        ] {
            assert!(is_public_suffix(s), "{s}");
        }
        for s in [
            "example.com",
            "amazonaws.com",
            "corp",
            "kaspersky-labs.com",
            "d1a.cloudfront.net",
        ] {
            assert!(!is_public_suffix(s), "{s}");
        }
        assert_eq!(
            shared_platform("d1a.cloudfront.net"),
            Some("cloudfront.net")
        );
        assert_eq!(shared_platform("www.bbc.co.uk"), None);
        assert_eq!(wildcard_over_public_suffix("*.co.uk"), Some("co.uk"));
        assert_eq!(
            wildcard_over_public_suffix("*.cloudfront.net"),
            Some("cloudfront.net")
        );
        assert_eq!(wildcard_over_public_suffix("*.example.co.uk"), None);
        assert_eq!(wildcard_over_public_suffix("cloudfront.net"), None);
    }
}
