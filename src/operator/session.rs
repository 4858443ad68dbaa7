//! Browser sessions for the status page when `server.admin_token` is set.
//!
//! A browser cannot send `Authorization: Bearer`, so `/` answers a sign-in
//! form that posts the token once to `/signin`. A right token starts a
//! session: a random 128-bit id, kept here with its expiry, and a cookie
//! holding the id and an HMAC-SHA256 of it under a per-process random key
//! (never the token). The cookie is `HttpOnly` and `SameSite=Strict`;
//! `Secure` is set only when the listener is TLS, which the admin listener
//! is not today (plain HTTP: keep it on loopback or a management network).
//! Sessions are bounded in number ([`MAX_SESSIONS`], the oldest is dropped
//! for a new one) and in lifetime ([`LIFETIME`]); a session also ends when
//! the admin token changes (reload), and at `/signout`. Comparisons of the
//! token and of the HMAC are constant-time.
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The cookie's name.
pub const COOKIE: &str = "egress_admin_session";
/// Sessions kept at once; a new one past this replaces the oldest.
pub const MAX_SESSIONS: usize = 64;
/// How long a session lasts from sign-in.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);
const ID_LEN: usize = 16;

struct Session {
    expires: Instant,
    /// HMAC of the token the session was started with: a changed token
    /// ends every session.
    token_tag: hmac::Tag,
}

/// The sessions of one admin listener.
pub struct Sessions {
    key: hmac::Key,
    rng: SystemRandom,
    live: Mutex<HashMap<[u8; ID_LEN], Session>>,
}

impl Sessions {
    /// A fresh per-process random key and no sessions.
    ///
    /// # Panics
    /// The system's random source fails (nothing else would be safe).
    #[must_use]
    pub fn new() -> Sessions {
        let rng = SystemRandom::new();
        #[allow(clippy::expect_used)]
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system random source");
        Sessions {
            key,
            rng,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// Start a session for a browser that gave `token`; returns the cookie
    /// value, or `None` when the random source fails.
    pub fn start(&self, token: &str) -> Option<String> {
        let mut id = [0u8; ID_LEN];
        self.rng.fill(&mut id).ok()?;
        let now = Instant::now();
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|_, s| s.expires > now);
        while live.len() >= MAX_SESSIONS {
            let oldest = live
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)?;
            live.remove(&oldest);
        }
        live.insert(
            id,
            Session {
                expires: now + LIFETIME,
                token_tag: hmac::sign(&self.key, token.as_bytes()),
            },
        );
        let tag = hmac::sign(&self.key, &id);
        Some(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(id),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// The session id a cookie value names, when its HMAC is right.
    fn id(&self, value: &str) -> Option<[u8; ID_LEN]> {
        let (id, tag) = value.split_once('.')?;
        let id: [u8; ID_LEN] = URL_SAFE_NO_PAD.decode(id).ok()?.try_into().ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        // Constant-time comparison of the tag.
        hmac::verify(&self.key, &id, &tag).ok()?;
        Some(id)
    }

    /// Is the cookie value a live session started with `token`?
    pub fn valid(&self, value: &str, token: &str) -> bool {
        let Some(id) = self.id(value) else {
            return false;
        };
        let mut live = self
            .live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(s) = live.get(&id) else {
            return false;
        };
        let ok = s.expires > Instant::now()
            && hmac::verify(&self.key, token.as_bytes(), s.token_tag.as_ref()).is_ok();
        if !ok {
            live.remove(&id);
        }
        ok
    }

    /// End the session the cookie value names (if any).
    pub fn end(&self, value: &str) {
        if let Some(id) = self.id(value) {
            self.live
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&id);
        }
    }

    /// Sessions alive now (tests).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .filter(|s| s.expires > now)
            .count()
    }

    /// No session alive.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new()
    }
}

/// The value of our cookie in a request's `Cookie` headers.
pub fn cookie_value(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for a new session (`secure`: the listener is TLS).
pub fn set_cookie(value: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// `Set-Cookie` that clears the cookie.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_valid_until_it_ends_or_the_token_changes() {
        let s = Sessions::new();
        let c = s.start("tok").unwrap();
        assert!(s.valid(&c, "tok"));
        assert!(!s.valid(&c, "other"), "a changed token ends it");
        assert!(!s.valid(&c, "tok"), "and it stays ended");
        let c = s.start("tok").unwrap();
        s.end(&c);
        assert!(!s.valid(&c, "tok"));
    }

    #[test]
    fn forged_cookies_are_refused() {
        let s = Sessions::new();
        let c = s.start("tok").unwrap();
        let (id, tag) = c.split_once('.').unwrap();
        let mut bad = tag.to_string();
        bad.replace_range(0..1, if bad.starts_with('A') { "B" } else { "A" });
        assert!(!s.valid(&format!("{id}.{bad}"), "tok"));
        assert!(!s.valid(id, "tok"));
        assert!(!s.valid("", "tok"));
        assert!(!s.valid("tok", "tok"));
        // Another process's key does not verify this one's cookie.
        assert!(!Sessions::new().valid(&c, "tok"));
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::new();
        let first = s.start("tok").unwrap();
        for _ in 0..MAX_SESSIONS {
            s.start("tok").unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(!s.valid(&first, "tok"), "the oldest made way");
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            http::HeaderValue::from_static("a=b; egress_admin_session=x.y; c=d"),
        );
        assert_eq!(cookie_value(&h), Some("x.y"));
        assert!(set_cookie("v", false).contains("HttpOnly; SameSite=Strict"));
        assert!(!set_cookie("v", false).contains("Secure"));
        assert!(set_cookie("v", true).ends_with("; Secure"));
    }
}
