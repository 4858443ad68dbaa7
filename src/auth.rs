//! Optional proxy authentication: `Proxy-Authorization: Basic` checked
//! against argon2 PHC hashes from `[auth] users`.
//!
//! Verifying a hash costs milliseconds, so a verified credential is cached
//! (bounded, short TTL, like Squid's `credentialsttl`) under a keyed hash of
//! the header value, never the password itself. Failures are not cached.
//!
//! An unknown user name costs the same as a wrong password: its password is
//! verified against a dummy hash made once with the configured users'
//! argon2 parameters, so the time of an `auth_failed` does not tell which
//! user names exist.
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::Engine;

use crate::config::AuthSettings;
use crate::reason::Reason;

/// How long a verified credential is trusted without verifying again.
pub const CACHE_TTL: Duration = Duration::from_secs(300);
/// Hash verifications allowed to run at once.
pub const VERIFY_AT_ONCE: usize = 4;
/// How many verified credentials are kept.
pub const CACHE_MAX: usize = 4096;

/// The `[auth]` users, parsed once per snapshot.
pub struct Auth {
    users: HashMap<String, String>,
    /// What an unknown user's password is verified against (never matched:
    /// the user is refused whatever the result).
    dummy: String,
    /// Hash verifications run so far (tests check that an unknown user
    /// costs one, like a wrong password).
    verifications: AtomicU64,
    keys: std::collections::hash_map::RandomState,
    cache: Mutex<HashMap<u64, (Arc<str>, Instant)>>,
    /// Bounds the hash verifications running at once (each costs CPU and
    /// ~19 MiB with argon2's defaults): many clients guessing at once queue.
    pub verifying: tokio::sync::Semaphore,
}

impl Auth {
    /// None when no users are configured (auth off).
    pub fn new(settings: &AuthSettings) -> Option<Self> {
        if settings.users.is_empty() {
            return None;
        }
        Some(Auth {
            users: settings
                .users
                .iter()
                .map(|(u, h)| (u.clone(), h.clone()))
                .collect(),
            dummy: dummy_hash(settings.users.values().next().map(String::as_str)),
            verifications: AtomicU64::new(0),
            keys: std::collections::hash_map::RandomState::new(),
            cache: Mutex::new(HashMap::new()),
            verifying: tokio::sync::Semaphore::new(VERIFY_AT_ONCE),
        })
    }

    fn key(&self, header: &[u8]) -> u64 {
        let mut h = self.keys.build_hasher();
        h.write(header);
        h.finish()
    }

    /// A cached verification, if fresh.
    pub fn cached(&self, header: &[u8]) -> Option<Arc<str>> {
        let key = self.key(header);
        let cache = self.cache.lock().ok()?;
        match cache.get(&key) {
            Some((user, at)) if at.elapsed() < CACHE_TTL => Some(Arc::clone(user)),
            _ => None,
        }
    }

    /// Verify a `Proxy-Authorization` value (slow: run it off the runtime).
    ///
    /// # Errors
    /// `auth_failed` for anything but a valid Basic credential of a known user.
    pub fn verify(&self, header: &[u8]) -> Result<Arc<str>, Reason> {
        let value = std::str::from_utf8(header).map_err(|_| Reason::AuthFailed)?;
        let (scheme, b64) = value.trim().split_once(' ').ok_or(Reason::AuthFailed)?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(Reason::AuthFailed);
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| Reason::AuthFailed)?;
        let text = String::from_utf8(raw).map_err(|_| Reason::AuthFailed)?;
        let (user, password) = text.split_once(':').ok_or(Reason::AuthFailed)?;
        let known = self.users.get(user);
        // Unknown users pay for one verification too (see the module docs).
        let matched = self.matches(password, known.unwrap_or(&self.dummy));
        if known.is_none() || !matched {
            return Err(Reason::AuthFailed);
        }
        let user: Arc<str> = Arc::from(user);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
            }
            cache.insert(self.key(header), (Arc::clone(&user), Instant::now()));
        }
        Ok(user)
    }
}

impl Auth {
    /// Whether `password` matches the PHC string `phc` (one verification).
    fn matches(&self, password: &str, phc: &str) -> bool {
        self.verifications.fetch_add(1, Ordering::Relaxed);
        PasswordHash::new(phc).is_ok_and(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
    }

    /// Hash verifications run so far.
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }
}

/// A hash with the algorithm, parameters and output length of `like` (a
/// configured user's PHC string), a random salt and a random output, so
/// verifying against it costs what verifying against that user's hash does
/// and matches nothing. Made without hashing (no start-up or reload cost);
/// with no usable `like`, a real hash with argon2's defaults.
fn dummy_hash(like: Option<&str>) -> String {
    use password_hash::rand_core::{OsRng, RngCore};
    let salt = password_hash::SaltString::generate(&mut OsRng);
    let made = like.and_then(|phc| {
        let mut h = PasswordHash::new(phc).ok()?;
        let mut out = vec![0u8; h.hash?.len()];
        OsRng.fill_bytes(&mut out);
        h.hash = Some(password_hash::Output::new(&out).ok()?);
        h.salt = Some(salt.as_salt());
        Some(h.to_string())
    });
    made.unwrap_or_else(|| {
        Argon2::default()
            .hash_password(salt.as_str().as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

/// Hash a password into a PHC string for `[auth] users` (`egress-proxy auth hash`).
///
/// # Errors
/// The hasher failed (it does not, for valid input).
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = password_hash::SaltString::generate(&mut password_hash::rand_core::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(user: &str, password: &str) -> AuthSettings {
        let mut users = std::collections::BTreeMap::new();
        users.insert(
            user.to_string(),
            hash_password(password).unwrap_or_default(),
        );
        AuthSettings {
            realm: "egress-proxy".into(),
            users,
        }
    }

    fn basic(user: &str, password: &str) -> Vec<u8> {
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b}").into_bytes()
    }

    #[test]
    fn right_password_passes_and_is_cached() {
        let auth = Auth::new(&settings("gateway", "pw1")).expect("auth on");
        let h = basic("gateway", "pw1");
        assert!(auth.cached(&h).is_none());
        assert_eq!(auth.verify(&h).as_deref().ok(), Some("gateway"));
        assert_eq!(auth.cached(&h).as_deref(), Some("gateway"));
    }

    #[test]
    fn wrong_password_unknown_user_and_garbage_fail() {
        let auth = Auth::new(&settings("gateway", "pw1")).expect("auth on");
        for h in [
            basic("gateway", "nope"),
            basic("other", "pw1"),
            b"Basic !!!".to_vec(),
            b"Bearer abc".to_vec(),
            b"Basic".to_vec(),
        ] {
            assert_eq!(auth.verify(&h), Err(Reason::AuthFailed));
            assert!(auth.cached(&h).is_none(), "failures are not cached");
        }
    }

    #[test]
    fn an_unknown_user_costs_one_verification_like_a_wrong_password() {
        let auth = Auth::new(&settings("gateway", "pw1")).expect("auth on");
        assert_eq!(auth.verifications(), 0);
        let dummy = PasswordHash::new(&auth.dummy).expect("the dummy is a PHC string");
        assert_eq!(
            dummy.algorithm,
            argon2::ARGON2ID_IDENT,
            "an argon2 hash: it costs a hash"
        );
        assert_eq!(
            auth.verify(&basic("gateway", "nope")),
            Err(Reason::AuthFailed)
        );
        assert_eq!(
            auth.verifications(),
            1,
            "a wrong password: one verification"
        );
        assert_eq!(
            auth.verify(&basic("other", "nope")),
            Err(Reason::AuthFailed)
        );
        assert_eq!(
            auth.verifications(),
            2,
            "an unknown user: one verification too"
        );
        // Even with a known user's password, an unknown name never passes.
        assert_eq!(auth.verify(&basic("other", "pw1")), Err(Reason::AuthFailed));
        assert_eq!(
            auth.verify(&basic("gateway", "pw1")).as_deref().ok(),
            Some("gateway")
        );
        assert_eq!(auth.verifications(), 4);
    }

    #[test]
    fn the_dummy_hash_has_the_users_parameters() {
        let phc = "$argon2id$v=19$m=8192,t=3,p=2$c2FsdHNhbHRzYWx0$wWKIMhR9lyDFvRz9YTZweHKfbftvj+qf+YFY4NeBbtA";
        let dummy = dummy_hash(Some(phc));
        let (want, got) = (
            PasswordHash::new(phc).expect("phc"),
            PasswordHash::new(&dummy).expect("dummy"),
        );
        assert_eq!(got.algorithm, want.algorithm);
        assert_eq!(got.version, want.version);
        assert_eq!(got.params, want.params);
        assert_eq!(got.hash.map(|o| o.len()), want.hash.map(|o| o.len()));
        assert_ne!(got.salt, want.salt);
        assert!(
            PasswordHash::new(&dummy_hash(None)).is_ok(),
            "defaults without a user hash"
        );
    }

    #[test]
    fn no_users_means_auth_off() {
        assert!(Auth::new(&AuthSettings::default()).is_none());
    }
}
