//! `[upstream]`: egress through a parent proxy (Squid's `cache_peer …
//! parent` with `never_direct`). The allowlist and the audit trail stay
//! here; the bytes leave through the parent.
use std::fmt;

use super::raw::RawUpstream;
use super::validate::Validator;

/// Who resolves a target's name when it goes through the parent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParentResolve {
    /// The parent resolves; no address vetting here (the record's
    /// `upstream` names the parent).
    #[default]
    Parent,
    /// Resolve and vet here, and ask the parent for the vetted address.
    Local,
}

/// The parent proxy: where it is and how to sign in to it.
#[derive(Clone, PartialEq, Eq)]
pub struct Parent {
    /// `host` (a name or an IP literal, IPv6 without brackets).
    pub host: String,
    pub port: u16,
    /// The `Proxy-Authorization` value sent to the parent (`Basic …`).
    /// Never logged and never recorded: `Debug` leaves it out.
    pub authorization: Option<http::HeaderValue>,
    pub resolve: ParentResolve,
    /// `https://`: TLS to the parent, verified against the system roots
    /// plus `[tls] extra_roots` for the parent's host name.
    pub tls: bool,
}

impl fmt::Debug for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parent")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("credentials", &self.authorization.is_some())
            .field("resolve", &self.resolve)
            .field("tls", &self.tls)
            .finish()
    }
}

impl fmt::Display for Parent {
    /// `http://host:port` (or `https://`), without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl Validator<'_> {
    /// `[upstream]`: `parent` (an `http://` or `https://` URL, credentials
    /// in it or in `parent_user`/`parent_password`), `parent_resolve`.
    pub(super) fn parent(&mut self, raw: RawUpstream) -> Option<Parent> {
        let resolve = self.parent_resolve(raw.parent_resolve.as_deref());
        let text = raw.parent.filter(|p| !p.trim().is_empty())?;
        let (url, host) = self.parent_url(text.trim())?;
        let authorization = self.parent_authorization(&url, raw.parent_user, raw.parent_password);
        Some(Parent {
            host,
            port: url.port_or_known_default().unwrap_or(3128),
            authorization,
            resolve,
            tls: url.scheme() == "https",
        })
    }

    /// `upstream.parent_resolve`: who resolves the destination's name.
    fn parent_resolve(&mut self, value: Option<&str>) -> ParentResolve {
        match value {
            None | Some("parent") => ParentResolve::Parent,
            Some("local") => ParentResolve::Local,
            Some(other) => {
                self.err(
                    "upstream.parent_resolve",
                    format!("unknown value {other:?}; write \"parent\" or \"local\""),
                );
                ParentResolve::Parent
            }
        }
    }

    /// The parent URL and its host; `None` (with the error recorded) when
    /// it is not an `http://` or `https://` URL with a host.
    fn parent_url(&mut self, text: &str) -> Option<(url::Url, String)> {
        let url = match url::Url::parse(text) {
            Ok(u) => u,
            // The error text never repeats the URL: it may carry a password.
            Err(e) => {
                self.err(
                    "upstream.parent",
                    format!("not a URL ({e}); write e.g. \"http://proxy.corp.example:8080\""),
                );
                return None;
            }
        };
        match url.scheme() {
            "http" | "https" => {}
            other => {
                self.err(
                    "upstream.parent",
                    format!("unknown scheme {other:?}; write an http:// or https:// URL"),
                );
                return None;
            }
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => {
                self.err("upstream.parent", "the URL has no host".into());
                return None;
            }
        };
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            self.err(
                "upstream.parent",
                "a parent URL names only scheme, host and port; remove the path".into(),
            );
        }
        Some((url, host))
    }

    /// The `Proxy-Authorization` value (Basic) from `parent_user` and
    /// `parent_password`, or the credentials in the URL.
    fn parent_authorization(
        &mut self,
        url: &url::Url,
        user: Option<String>,
        password: Option<String>,
    ) -> Option<http::HeaderValue> {
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let in_url = (!url.username().is_empty()).then(|| {
            (
                decode(url.username()),
                url.password().map(decode).unwrap_or_default(),
            )
        });
        let user = user.or(in_url.as_ref().map(|c| c.0.clone()));
        let password = password.or(in_url.map(|c| c.1));
        match (user, password) {
            (Some(u), p) if !u.is_empty() => {
                if u.contains(':') {
                    self.err(
                        "upstream.parent_user",
                        "a user name for Basic authentication cannot contain ':'".into(),
                    );
                }
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(format!("{u}:{}", p.unwrap_or_default()));
                let mut v = http::HeaderValue::from_str(&format!("Basic {token}")).ok();
                if let Some(v) = v.as_mut() {
                    v.set_sensitive(true);
                }
                v
            }
            (_, Some(_)) => {
                self.err(
                    "upstream.parent_password",
                    "a password without a user; set upstream.parent_user too".into(),
                );
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
    use super::super::{ConfigSource, Settings};
    use super::*;
    use crate::policy::Route;

    fn load(upstream: &str, route: &str, env: &[(&str, &str)]) -> Result<Settings, String> {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("egress-proxy.toml");
        let text = format!("[upstream]\n{upstream}\n");
        std::fs::write(&cfg, &text).unwrap();
        std::fs::write(
            dir.path().join("catalog.toml"),
            format!("[[rule]]\nname = \"a\"\nhosts = [\"a.example\"]\nports = [443]\naction = \"allow\"\n{route}\n"),
        )
        .unwrap();
        let env = env.iter().map(|(k, v)| ((*k).into(), (*v).into()));
        Settings::from_toml(ConfigSource::File(cfg), &text, env).map_err(|e| e.to_string())
    }

    #[test]
    fn parent_with_credentials_in_the_url_or_the_environment() {
        let s = load(
            r#"parent = "http://u%40x:p%3Aw@Proxy.Corp.Example:8080""#,
            "",
            &[],
        )
        .unwrap();
        let p = s.parent.clone().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp.example", 8080));
        assert_eq!(p.resolve, ParentResolve::Parent);
        // base64("u@x:p:w")
        assert_eq!(p.authorization.unwrap(), "Basic dUB4OnA6dw==");
        let debug = format!("{p:?} {p}", p = s.parent.as_ref().unwrap());
        assert!(!debug.contains("dUB4") && !debug.contains("p:w"), "{debug}");

        let s = load(
            "parent = \"http://10.0.0.1:3128\"\nparent_resolve = \"local\"",
            "route = \"direct\"",
            &[
                ("EGRESS_PROXY__UPSTREAM__PARENT_USER", "svc"),
                ("EGRESS_PROXY__UPSTREAM__PARENT_PASSWORD", "1234"),
            ],
        )
        .unwrap();
        let p = s.parent.as_ref().unwrap();
        assert_eq!(p.resolve, ParentResolve::Local);
        assert_eq!(p.authorization.as_ref().unwrap(), "Basic c3ZjOjEyMzQ=");
        assert_eq!(s.policy.rule(0).unwrap().route, Some(Route::Direct));
    }

    #[test]
    fn an_https_parent_is_tls_on_port_443_unless_named() {
        let s = load(r#"parent = "https://u:secret@Proxy.Corp:8443""#, "", &[]).unwrap();
        let p = s.parent.as_ref().unwrap();
        assert!(p.tls);
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 8443));
        assert_eq!(p.to_string(), "https://proxy.corp:8443");
        let s = load(r#"parent = "https://[2001:db8::1]""#, "", &[]).unwrap();
        let p = s.parent.as_ref().unwrap();
        assert_eq!(p.to_string(), "https://[2001:db8::1]:443");
        let s = load(r#"parent = "http://p""#, "", &[]).unwrap();
        assert!(!s.parent.as_ref().unwrap().tls);
    }

    #[test]
    fn bad_parent_settings_are_named_and_never_echo_a_password() {
        let e = load(r#"parent = "socks5://u:secret@p:1080""#, "", &[]).unwrap_err();
        assert!(
            e.contains("upstream.parent") && e.contains("unknown scheme"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
        let e = load(
            "parent = \"http://p:3128\"\nparent_resolve = \"nowhere\"",
            "",
            &[],
        )
        .unwrap_err();
        assert!(e.contains("upstream.parent_resolve"), "{e}");
        let e = load(r#"parent = "http://p:3128""#, "route = \"sideways\"", &[]).unwrap_err();
        assert!(e.contains("route") && e.contains("\"direct\""), "{e}");
        let e = load(
            r#"parent = "http://p:3128""#,
            "",
            &[("EGRESS_PROXY__UPSTREAM__PARENT_PASSWORD", "x")],
        )
        .unwrap_err();
        assert!(e.contains("upstream.parent_user"), "{e}");
    }

    #[test]
    fn no_parent_by_default() {
        let s = load("", "", &[]).unwrap();
        assert!(s.parent.is_none());
    }
}
