//! The `egress-proxy` binary: command line, logging, configuration, signals.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use egress_proxy::audit::LineSink;
use egress_proxy::config::Settings;
use egress_proxy::operator::cli;
use egress_proxy::{reload, Proxy};
use tokio::net::TcpListener;

/// Egress allowlist forward proxy.
#[derive(Parser)]
#[command(name = "egress-proxy", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Configuration file (default: config/egress-proxy.toml, else the built-in default).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve (the default).
    Run,
    /// Validate the configuration and catalog; print a summary and warnings.
    Check,
    /// Say what the policy decides for a target: "http://host/path" or "host:port".
    Explain {
        /// Decide for this client address (its [clients.groups]).
        #[arg(long)]
        client: Option<String>,
        /// "http://host/…" (a plain request) or "host:port" (a CONNECT).
        target: String,
    },
    /// The inspection CA.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Proxy-authentication helpers.
    Auth {
        #[command(subcommand)]
        cmd: AuthCmd,
    },
    /// Print catalog rules (TOML) for the destinations an audit log shows denied.
    Suggest {
        /// The JSON-lines audit log ("-": standard input).
        #[arg(long)]
        audit: PathBuf,
        /// Only records since then: a duration back from now ("1h", "30m") or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Decide every transaction of an audit log again under a proposed catalog
    /// and print what would change; exit status 3 if something would be newly denied.
    Replay {
        /// The JSON-lines audit log ("-": standard input).
        #[arg(long)]
        audit: PathBuf,
        /// The proposed catalog file.
        #[arg(long)]
        catalog: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a CA certificate (ca.pem) and key (ca.key, mode 0600) in DIR.
    Generate {
        /// Where to write ca.pem and ca.key.
        #[arg(long)]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Read a password on standard input; print the PHC string for `[auth] users`.
    Hash,
}

/// mimalloc: fewer cycles per allocation than glibc's malloc on the
/// request path, and no arena growth per thread.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc options for a long-running server, each set unless the
/// operator already set it: freed pages go back to the OS at once
/// (`PURGE_DELAY`), and arena memory is committed as it is used rather than
/// up front (`ARENA_EAGER_COMMIT`).
const ALLOCATOR_OPTIONS: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

/// Make the serving process give freed memory back at once.
///
/// mimalloc returns freed pages to the OS after a delay (10 ms) that it
/// checks only when the thread that freed them next allocates. A proxy that
/// goes quiet after a burst (a storm of aborted connections, each with a
/// bounded but large head or body buffer) therefore keeps its peak RSS for
/// as long as it stays quiet: measured (debug build) 20 MB before, 150 MB
/// after 1,200 aborted transactions, and still 150 MB ten idle seconds
/// later; with [`ALLOCATOR_OPTIONS`], 12 MB before and 30 MB after. Options
/// are read from the environment when the allocator starts, before `main`,
/// so `run` executes itself again, once, with them set (same PID, arguments
/// and file descriptors; nothing has been opened yet). If that fails the
/// proxy runs on with mimalloc's defaults.
fn purge_freed_memory_promptly() {
    use std::os::unix::process::CommandExt;
    let missing: Vec<_> = ALLOCATOR_OPTIONS
        .iter()
        .filter(|(key, _)| std::env::var_os(key).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (key, value) in missing {
        cmd.env(key, value);
    }
    let err = cmd.exec();
    eprintln!("egress-proxy: could not re-execute with the allocator options ({err}); freed memory returns lazily");
}

/// Why a command failed: printed once by `main` as `egress-proxy: {0}`,
/// then exit 1.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

/// A configuration that does not load or validate.
fn invalid(e: impl std::fmt::Display) -> Fail {
    Fail(format!("invalid configuration:\n{e}"))
}

fn main() -> ExitCode {
    // Usage errors exit 1 (DESIGN.md); --help and --version exit 0.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if matches!(cli.cmd, None | Some(Cmd::Run)) {
        purge_freed_memory_promptly();
    }
    init_tracing();
    match command(cli) {
        Ok(code) => code,
        Err(Fail(e)) => {
            eprintln!("egress-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// Run one command.
fn command(cli: Cli) -> Result<ExitCode, Fail> {
    let load = |config: Option<&std::path::Path>| {
        Settings::load(config, std::env::vars()).map_err(invalid)
    };
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Auth { cmd: AuthCmd::Hash } => auth_hash(),
        Cmd::Ca {
            cmd: CaCmd::Generate { out, force },
        } => ca_generate(&out, force),
        Cmd::Suggest { audit, since } => {
            // Needs no configuration; with an explicit `--config`, the
            // destinations its catalog already lets through are left out.
            let settings = cli.config.as_deref().map(|c| load(Some(c))).transpose()?;
            let policy = settings.as_ref().map(|s| &*s.policy);
            let out = egress_proxy::operator::suggest::command(&audit, since.as_deref(), policy)?;
            for n in &out.notes {
                eprintln!("egress-proxy: {n}");
            }
            print!("{}", out.toml);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check => {
            let settings = load(cli.config.as_deref())?;
            print!("{}", cli::summary(&settings));
            egress_proxy::check_tls(&settings).map_err(invalid)?;
            println!("configuration OK");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain { client, target } => {
            let settings = load(cli.config.as_deref())?;
            print!(
                "{}",
                cli::explain_for(&settings.policy, &target, client.as_deref())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run => serve(load(cli.config.as_deref())?, cli.config),
        Cmd::Replay { audit, catalog } => {
            let settings = load(cli.config.as_deref())?;
            let out = egress_proxy::operator::replay::command(&settings, &audit, &catalog)?;
            for n in &out.notes {
                eprintln!("egress-proxy: {n}");
            }
            print!("{}", out.report);
            // 3: the new catalog would deny something the old one let through.
            Ok(ExitCode::from(if out.newly_denied > 0 { 3 } else { 0 }))
        }
    }
}

/// `ca generate`: write the CA and say how to trust it.
fn ca_generate(out: &std::path::Path, force: bool) -> Result<ExitCode, Fail> {
    let (cert, key) = egress_proxy::tls::ca::generate(out, force)?;
    println!(
        "wrote {} and {} (mode 0600; never commit it)",
        cert.display(),
        key.display()
    );
    println!();
    println!("To inspect `allow` tunnels, set in the config:");
    println!("  [tls]");
    println!("  ca_cert = \"{}\"", cert.display());
    println!("  ca_key  = \"{}\"", key.display());
    println!();
    println!(
        "and make the gateway trust {} as a root CA: import it into the",
        cert.display()
    );
    println!("gateway's trusted certificate store (on Debian: copy it to");
    println!("/usr/local/share/ca-certificates/egress-proxy.crt and run update-ca-certificates).");
    println!("bypass rules are never inspected, whatever the CA.");
    Ok(ExitCode::SUCCESS)
}

/// `auth hash`: the first line of standard input (without its line end).
fn auth_hash() -> Result<ExitCode, Fail> {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        return Err(Fail("cannot read the password from standard input".into()));
    }
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Fail("empty password".into()));
    }
    println!("{}", egress_proxy::auth::hash_password(password)?);
    Ok(ExitCode::SUCCESS)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

fn serve(settings: Settings, config: Option<PathBuf>) -> Result<ExitCode, Fail> {
    tracing::info!(config = %settings.source, rules = settings.policy.rules().len(), "configuration loaded");
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    if let Some(w) = cli::admin_warning(&settings) {
        tracing::warn!("{w}");
    }
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(nofile = n, "file-descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the file-descriptor limit"),
    }
    // On one core (as when pinned), a current-thread runtime skips the
    // work-stealing machinery; otherwise one worker per core.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let built = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    tracing::info!(cores, "runtime");
    let runtime = built.map_err(|e| Fail(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(run(settings, config))
}

/// Bind, start the audit writer and the reload watchers, serve until a
/// signal, then drain and let the writer finish.
async fn run(settings: Settings, config: Option<PathBuf>) -> Result<ExitCode, Fail> {
    let mut listeners = Vec::new();
    for addr in &settings.server.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| Fail(format!("cannot listen on {addr}: {e}")))?;
        listeners.push(l);
    }
    let sink = LineSink::open(settings.audit.path.clone(), settings.audit.format)
        .map_err(|e| Fail(format!("cannot open the audit log: {e}")))?;
    let (audit, writer, metrics) =
        egress_proxy::start_audit_with(Box::new(sink), settings.audit.syslog.as_deref())
            .map_err(|e| Fail(format!("cannot start the audit writer: {e}")))?;
    let admin = match settings.server.admin_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
            Fail(format!(
                "cannot listen on {addr} (server.admin_listen): {e}"
            ))
        })?),
        None => None,
    };
    let mut proxy = Proxy::new(listeners, settings, audit, metrics)?;
    if let Some(l) = admin {
        proxy = proxy.with_admin(l);
    }
    let handle = proxy.handle();
    let hup = tokio::spawn(reload::on_hangup(
        handle.clone(),
        config.clone(),
        reload::process_env,
    ));
    let watch = tokio::spawn(reload::watch(
        handle,
        config,
        reload::process_env,
        std::time::Duration::from_secs(1),
    ));
    proxy.run(signals::terminate()).await;
    hup.abort();
    watch.abort();
    tokio::task::spawn_blocking(move || writer.join())
        .await
        .ok();
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

mod signals {
    use tokio::signal::unix::{signal, SignalKind};

    /// Resolves on SIGTERM or SIGINT.
    pub async fn terminate() {
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => tracing::info!("SIGTERM"),
                    _ = i.recv() => tracing::info!("SIGINT"),
                }
            }
            _ => {
                tracing::error!("cannot install signal handlers; stopping on ctrl-c only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
