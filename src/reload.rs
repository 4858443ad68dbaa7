//! Hot reload: SIGHUP, and file changes when `policy.watch = true`.
//!
//! A reload re-reads and fully validates config and catalog, then swaps the
//! whole snapshot at once; a failed validation keeps the old one, logs every
//! error and counts a failure. The log gives the catalog diff and names the
//! changed settings that need a restart.
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::config::{ConfigErrors, LoadTimings, Settings};
use crate::policy::RuleSpec;
use crate::Handle;

/// The environment a reload reads overrides from.
pub type EnvFn = fn() -> Vec<(String, String)>;

/// The process environment.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().collect()
}

/// Reload once.
///
/// # Errors
/// The new configuration did not validate; the old one stays in force.
pub fn reload(handle: &Handle, config: Option<&Path>, env: EnvFn) -> Result<(), ConfigErrors> {
    reload_timed(handle, config, env).0
}

/// How long each phase of one reload took ([`reload_timed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// Reading, parsing, validating and compiling the new configuration.
    pub load: LoadTimings,
    /// Comparing it with the running one, for the log.
    pub diff: Duration,
    /// Building the snapshot's guards and swapping it in.
    pub swap: Duration,
    /// The whole reload.
    pub total: Duration,
}

/// [`reload`], and how long each phase took (also logged with
/// `reload: done`; `benches/reload.rs` reports them).
pub fn reload_timed(
    handle: &Handle,
    config: Option<&Path>,
    env: EnvFn,
) -> (Result<(), ConfigErrors>, Timings) {
    let start = Instant::now();
    let (loaded, load) = Settings::load_timed(config, env());
    let mut times = Timings {
        load,
        ..Timings::default()
    };
    let new = match loaded {
        Ok(s) => s,
        Err(e) => {
            handle.metrics().note_reload(false);
            tracing::error!("reload failed; keeping the running configuration:\n{e}");
            return (Err(e), times);
        }
    };
    let old = handle.settings();
    let clock = Instant::now();
    for line in diff(&old, &new) {
        tracing::info!("reload: {line}");
    }
    times.diff = clock.elapsed();
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    let clock = Instant::now();
    let swapped = handle.reload(new);
    times.swap = clock.elapsed();
    times.total = start.elapsed();
    if let Err(e) = swapped {
        handle.metrics().note_reload(false);
        tracing::error!("reload failed; keeping the running configuration: {e}");
        let e = ConfigErrors(vec![crate::config::ConfigError {
            location: "reload".into(),
            message: e.to_string(),
        }]);
        return (Err(e), times);
    }
    handle.metrics().note_reload(true);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        total_ms = ms(times.total),
        read_ms = ms(load.read),
        parse_ms = ms(load.parse),
        validate_ms = ms(load.validate),
        compile_ms = ms(load.compile),
        warnings_ms = ms(load.warnings),
        diff_ms = ms(times.diff),
        swap_ms = ms(times.swap),
        "reload: done"
    );
    (Ok(()), times)
}

/// [`reload`] on a thread of its own at the audit writer's lower priority
/// ([`crate::audit::yield_to_traffic`]), awaited without blocking the
/// runtime: a reload of a large catalog takes a core for a while (0.7 s
/// for 100,000 rules in `benches/reload.rs`), and on a worker thread, or on
/// the one thread of a pinned proxy, it stalled every connection until done.
///
/// # Errors
/// As [`reload`]; also when the thread cannot be started or panics (the
/// running configuration then stays, and the failure is counted).
pub async fn reload_in_background(
    handle: &Handle,
    config: Option<&Path>,
    env: EnvFn,
) -> Result<(), ConfigErrors> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (h, path) = (handle.clone(), config.map(Path::to_path_buf));
    let spawned = std::thread::Builder::new()
        .name("reload".into())
        .spawn(move || {
            crate::audit::yield_to_traffic();
            let _ = tx.send(reload(&h, path.as_deref(), env));
        });
    let failed = |why: String| {
        handle.metrics().note_reload(false);
        tracing::error!("reload failed; keeping the running configuration: {why}");
        Err(ConfigErrors(vec![crate::config::ConfigError {
            location: "reload".into(),
            message: why,
        }]))
    };
    match spawned {
        Err(e) => failed(format!("cannot start the reload thread: {e}")),
        Ok(_) => match rx.await {
            Ok(result) => result,
            Err(_) => failed("the reload thread panicked".into()),
        },
    }
}

/// What changed between two snapshots, in words for the log.
pub fn diff(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (old.policy.rules(), new.policy.rules());
    // By name, the first rule of each name (names need not be unique):
    // linear, where a scan per rule took minutes for 100,000 rules.
    let mut olds: HashMap<&str, &RuleSpec> = HashMap::with_capacity(a.len());
    for o in a {
        olds.entry(o.name.as_str()).or_insert(o);
    }
    let news: HashSet<&str> = b.iter().map(|r| r.name.as_str()).collect();
    for r in b {
        match olds.get(r.name.as_str()) {
            None => out.push(format!("rule added: \"{}\"", r.name)),
            Some(&o) if o != r => out.push(format!("rule changed: \"{}\"", r.name)),
            Some(_) => {}
        }
    }
    for r in a {
        if !news.contains(r.name.as_str()) {
            out.push(format!("rule removed: \"{}\"", r.name));
        }
    }
    if old.policy_settings.default != new.policy_settings.default {
        out.push(format!(
            "policy.default is now {:?}",
            new.policy_settings.default
        ));
    }
    let restart = [
        ("server.listen", old.server.listen != new.server.listen),
        (
            "server.admin_listen",
            old.server.admin_listen != new.server.admin_listen,
        ),
        (
            "server.max_connections",
            old.server.max_connections != new.server.max_connections,
        ),
        (
            "server.splice_pipes",
            old.server.splice_pipes != new.server.splice_pipes,
        ),
        (
            "server.proxy_protocol",
            old.server.proxy_protocol != new.server.proxy_protocol,
        ),
        (
            "tls.ca_cert/ca_key",
            old.tls.ca_cert != new.tls.ca_cert || old.tls.ca_key != new.tls.ca_key,
        ),
        ("audit.path", old.audit.path != new.audit.path),
        ("audit.format", old.audit.format != new.audit.format),
        ("audit.syslog", old.audit.syslog != new.audit.syslog),
        (
            "dns.nameservers",
            old.dns.nameservers != new.dns.nameservers,
        ),
    ];
    for (key, changed) in restart {
        if changed {
            out.push(format!(
                "{key} changed: takes effect after a restart; the running value stays"
            ));
        }
    }
    out
}

/// SIGHUP: reopen the audit file, then reload.
pub async fn on_hangup(handle: Handle, config: Option<PathBuf>, env: EnvFn) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler; reload by signal is off");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reopening the audit file and reloading");
        notify::reloading();
        handle.reopen_audit();
        let result = reload_in_background(&handle, config.as_deref(), env).await;
        notify::ready(&handle, notify::outcome(&result));
    }
}

/// With `policy.watch = true`, reload when the config or catalog file
/// changes (checked every `every`; cheap `stat` calls, no extra crate).
pub async fn watch(handle: Handle, config: Option<PathBuf>, env: EnvFn, every: Duration) {
    let mut last = stamps(&handle, config.as_deref());
    loop {
        tokio::time::sleep(every).await;
        if !handle.settings().policy_settings.watch {
            continue;
        }
        let now = stamps(&handle, config.as_deref());
        if now != last {
            tracing::info!("configuration files changed; reloading");
            notify::reloading();
            let result = reload_in_background(&handle, config.as_deref(), env).await;
            notify::ready(&handle, notify::outcome(&result));
            last = stamps(&handle, config.as_deref());
        }
    }
}

fn stamps(handle: &Handle, config: Option<&Path>) -> Vec<Option<(SystemTime, u64)>> {
    let s = handle.settings();
    let mut files: Vec<PathBuf> = config.map(Path::to_path_buf).into_iter().collect();
    files.extend(s.policy_settings.catalog.clone());
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

/// systemd notifications for `Type=notify-reload` (sd_notify(3)): no-ops
/// unless systemd set `$NOTIFY_SOCKET`.
pub mod notify {
    use sd_notify::NotifyState;

    use super::ConfigErrors;
    use crate::Handle;

    fn send(states: &[NotifyState<'_>]) {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "cannot notify systemd");
        }
    }

    /// How a reload ended, for the `STATUS=` line.
    pub fn outcome(result: &Result<(), ConfigErrors>) -> &'static str {
        match result {
            Ok(()) => "ok",
            Err(_) => "failed, the running configuration stays",
        }
    }

    /// `READY=1` with a `STATUS=` line: the catalog hash now in force and
    /// the last reload's result ("none" at start).
    pub fn ready(handle: &Handle, last_reload: &str) {
        let status = format!(
            "serving; catalog {:016x} ({} rules); last reload: {last_reload}",
            handle.settings().policy.hash(),
            handle.settings().policy.rules().len()
        );
        send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=`, as `Type=notify-reload` requires.
    pub fn reloading() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for systemd"),
        }
    }

    /// `STOPPING=1`: the drain begins.
    pub fn stopping() {
        send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }
}
