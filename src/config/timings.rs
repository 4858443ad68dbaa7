//! How long each phase of loading a configuration took (a reload logs it).
use std::time::{Duration, Instant};

/// How long each phase of [`Settings::load_timed`](super::Settings::load_timed) took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadTimings {
    /// Reading the configuration and catalog files.
    pub read: Duration,
    /// Parsing their TOML (and the environment overrides).
    pub parse: Duration,
    /// Checking every setting and rule, and the catalog for duplicates.
    pub validate: Duration,
    /// Compiling the rules into the policy's indexes.
    pub compile: Duration,
    /// Finding shadowed rules and public-suffix wildcards (the warnings).
    pub warnings: Duration,
}

/// The time since `clock`, which moves to now.
pub(super) fn lap(clock: &mut Instant) -> Duration {
    let now = Instant::now();
    let d = now.duration_since(*clock);
    *clock = now;
    d
}
