//! Hot reload: SIGHUP, and file changes when `policy.watch = true`.
//!
//! A reload re-reads and fully validates config and catalog, then swaps the
//! whole snapshot at once; a failed validation keeps the old one, logs every
//! error and counts a failure. The log gives the catalog diff and names the
//! changed settings that need a restart.
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{ConfigErrors, Settings};
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
    let new = match Settings::load(config, env()) {
        Ok(s) => s,
        Err(e) => {
            handle.metrics().note_reload(false);
            tracing::error!("reload failed; keeping the running configuration:\n{e}");
            return Err(e);
        }
    };
    let old = handle.settings();
    for line in diff(&old, &new) {
        tracing::info!("reload: {line}");
    }
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    if let Err(e) = handle.reload(new) {
        handle.metrics().note_reload(false);
        tracing::error!("reload failed; keeping the running configuration: {e}");
        return Err(ConfigErrors(vec![crate::config::ConfigError {
            location: "reload".into(),
            message: e.to_string(),
        }]));
    }
    handle.metrics().note_reload(true);
    tracing::info!("reload: done");
    Ok(())
}

/// What changed between two snapshots, in words for the log.
pub fn diff(old: &Settings, new: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    let (a, b) = (old.policy.rules(), new.policy.rules());
    for r in b {
        match a.iter().find(|o| o.name == r.name) {
            None => out.push(format!("rule added: \"{}\"", r.name)),
            Some(o) if o != r => out.push(format!("rule changed: \"{}\"", r.name)),
            Some(_) => {}
        }
    }
    for r in a {
        if !b.iter().any(|n| n.name == r.name) {
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
        let result = reload(&handle, config.as_deref(), env);
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
            let result = reload(&handle, config.as_deref(), env);
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
