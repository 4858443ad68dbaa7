//! The `egress-proxy` binary: command line, logging, configuration, signals.
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use egress_proxy::audit::LineSink;
use egress_proxy::config::Settings;
use egress_proxy::operator::cli;
use egress_proxy::{reload, Proxy};
use tokio::net::TcpListener;

/// `--version`: the version and the git commit it was built from.
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EGRESS_PROXY_COMMIT"),
    ")"
);

/// Egress allowlist forward proxy.
#[derive(Parser)]
// Help is never wrapped to a terminal's width: the same text whatever
// features a build unifies into clap (a test build's dev-dependencies turn
// on its `wrap_help`), so docs/cli.md can quote it exactly.
#[command(name = "egress-proxy", version = VERSION, about, term_width = 0)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Configuration file (default: $EGRESS_PROXY_CONFIG, else
    /// /etc/egress-proxy/egress-proxy.toml, else config/egress-proxy.toml, if
    /// present, else the built-in default).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve (the default).
    Run,
    /// Validate the configuration and catalog; print a summary and warnings.
    Check,
    /// Say what the policy decides for a target: "http://host/path", "https://host/path" or "host:port".
    Explain {
        /// Decide for this client address (its [clients.groups]).
        #[arg(long)]
        client: Option<String>,
        /// "http://host/…" (a plain request), "https://host/…" (the CONNECT a
        /// gateway sends for it: host, port 443 or the URL's) or "host:port"
        /// (a CONNECT).
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
        /// Audit logs: files, globs ('audit.log*'), .gz, "-" for standard input;
        /// JSON or Squid lines. Repeat for more.
        #[arg(long, required = true)]
        audit: Vec<PathBuf>,
        /// Only records since then: a duration back from now ("1h", "30m") or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
    /// Print a catalog (TOML) translated from another proxy's configuration.
    Import {
        #[command(subcommand)]
        cmd: ImportCmd,
    },
    /// Decide every transaction of an audit log again under a proposed catalog
    /// and print what would change; exit status 3 if something would be newly denied.
    Replay {
        /// Audit logs: files, globs ('audit.log*'), .gz, "-" for standard input;
        /// JSON or Squid lines. Repeat for more.
        #[arg(long, required = true)]
        audit: Vec<PathBuf>,
        /// The proposed catalog file.
        #[arg(long)]
        catalog: PathBuf,
    },
    /// The man page or shell completions, from these definitions (packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: GenerateCmd,
    },
}

#[derive(Subcommand)]
enum GenerateCmd {
    /// egress-proxy.1 in DIR.
    Man {
        #[arg(long)]
        out: PathBuf,
    },
    /// The completion script for SHELL in DIR, named as SHELL looks it up.
    Completions {
        shell: Shell,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Subcommand)]
enum ImportCmd {
    /// From a Squid configuration: its dstdomain, dstdom_regex and port ACLs and http_access lines
    /// (and the files they include); comments say what was not translated.
    Squid {
        /// The Squid configuration file (squid.conf).
        file: PathBuf,
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
/// operator already set it: arena memory is committed as it is used rather
/// than up front (`ARENA_EAGER_COMMIT`): a smaller resident baseline (17 MB
/// instead of 31 MB in a debug build), no throughput cost measured.
const ALLOCATOR_OPTIONS: [(&str, &str); 1] = [("MIMALLOC_ARENA_EAGER_COMMIT", "0")];

/// Start the serving process with [`ALLOCATOR_OPTIONS`].
///
/// Options are read from the environment when the allocator starts, before
/// `main`, so `run` executes itself again, once, with them set (same PID,
/// arguments and file descriptors; nothing has been opened yet). If that
/// fails the proxy runs on with mimalloc's defaults. (Freed memory going
/// back to the OS after a burst is the job of the allocator nudge in
/// `lib.rs`.)
fn start_with_allocator_options() {
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
        start_with_allocator_options();
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

/// Write `text` to standard output through one lock; a closed pipe
/// (`egress-proxy check | head -1`) is not an error.
fn out(text: &str) -> Result<(), Fail> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Fail(format!("cannot write to standard output: {e}")))
        }
        _ => Ok(()),
    }
}

/// Load the configuration and say on standard error which one (and which
/// catalog) it is.
fn load(config: Option<&Path>) -> Result<Settings, Fail> {
    let settings = Settings::load(config, std::env::vars()).map_err(invalid)?;
    eprintln!("egress-proxy: {}", cli::used(&settings));
    Ok(settings)
}

/// Run one command.
fn command(cli: Cli) -> Result<ExitCode, Fail> {
    // Found once (--config, $EGRESS_PROXY_CONFIG, /etc, ./config), so a
    // reload reads the same file.
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = cli
        .config
        .clone()
        .or_else(|| egress_proxy::config::discover(&env));
    match cli.cmd.unwrap_or(Cmd::Run) {
        Cmd::Auth { cmd: AuthCmd::Hash } => auth_hash(),
        Cmd::Ca {
            cmd: CaCmd::Generate { out, force },
        } => ca_generate(&out, force),
        Cmd::Generate { what } => generate(what),
        Cmd::Suggest { audit, since } => {
            // Needs no configuration; with `--config` or $EGRESS_PROXY_CONFIG,
            // the destinations its catalog already lets through are left out.
            let explicit = cli.config.clone().or_else(|| {
                env.iter()
                    .find(|(k, v)| k == egress_proxy::config::CONFIG_ENV && !v.is_empty())
                    .map(|(_, v)| PathBuf::from(v))
            });
            let settings = explicit.as_deref().map(|c| load(Some(c))).transpose()?;
            let policy = settings.as_ref().map(|s| &*s.policy);
            let result =
                egress_proxy::operator::suggest::command(&audit, since.as_deref(), policy)?;
            for n in &result.notes {
                eprintln!("egress-proxy: {n}");
            }
            out(&result.toml)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check => {
            let settings = load(config.as_deref())?;
            out(&cli::summary(&settings))?;
            egress_proxy::check_tls(&settings).map_err(invalid)?;
            out("configuration OK\n")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain { client, target } => {
            let settings = load(config.as_deref())?;
            out(&cli::explain_routed(&settings, &target, client.as_deref())?.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Import {
            cmd: ImportCmd::Squid { file },
        } => {
            out(&egress_proxy::operator::import::squid(&file)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run => serve(load(config.as_deref())?, config),
        Cmd::Replay { audit, catalog } => {
            let settings = load(config.as_deref())?;
            let result = egress_proxy::operator::replay::command(&settings, &audit, &catalog)?;
            for n in &result.notes {
                eprintln!("egress-proxy: {n}");
            }
            out(&result.report)?;
            // 3: the new catalog would deny something the old one let through.
            Ok(ExitCode::from(if result.newly_denied > 0 { 3 } else { 0 }))
        }
    }
}

/// `generate man|completions`: files for the package, from the clap
/// definitions above.
fn generate(what: GenerateCmd) -> Result<ExitCode, Fail> {
    let mut cmd = Cli::command();
    let (dir, name) = match &what {
        GenerateCmd::Man { out } => (out, "egress-proxy.1"),
        GenerateCmd::Completions { shell, out } => (
            out,
            match shell {
                Shell::Bash => "egress-proxy",
                Shell::Zsh => "_egress-proxy",
                Shell::Fish => "egress-proxy.fish",
            },
        ),
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| Fail(format!("cannot create {}: {e}", dir.display())))?;
    let path = dir.join(name);
    let mut buf = Vec::new();
    match what {
        GenerateCmd::Man { .. } => clap_mangen::Man::new(cmd).render(&mut buf)?,
        GenerateCmd::Completions { shell, .. } => {
            let bin = "egress-proxy";
            match shell {
                Shell::Bash => {
                    clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, bin, &mut buf)
                }
                Shell::Zsh => {
                    clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, bin, &mut buf)
                }
                Shell::Fish => {
                    clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, bin, &mut buf)
                }
            }
        }
    }
    std::fs::write(&path, buf)
        .map_err(|e| Fail(format!("cannot write {}: {e}", path.display())))?;
    eprintln!("egress-proxy: wrote {}", path.display());
    Ok(ExitCode::SUCCESS)
}

/// `ca generate`: write the CA and say how to trust it.
fn ca_generate(dir: &Path, force: bool) -> Result<ExitCode, Fail> {
    let (cert, key) = egress_proxy::tls::ca::generate(dir, force)?;
    let (cert, key) = (cert.display(), key.display());
    out(&format!(
        "wrote {cert} and {key} (mode 0600; never commit it)

To inspect `allow` tunnels, set in the config:
  [tls]
  ca_cert = \"{cert}\"
  ca_key  = \"{key}\"

and make the gateway trust {cert} as a root CA: import it into the
gateway's trusted certificate store (on Debian: copy it to
/usr/local/share/ca-certificates/egress-proxy.crt and run update-ca-certificates).
bypass rules are never inspected, whatever the CA.
"
    ))?;
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
    out(&format!(
        "{}\n",
        egress_proxy::auth::hash_password(password)?
    ))?;
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
        .map(|s| s.log_query(settings.audit.log_query))
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
    // Bound (the ports answer: the kernel queues connections): READY=1.
    reload::notify::ready(&handle, "none");
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
    proxy
        .run(async {
            signals::terminate().await;
            reload::notify::stopping();
        })
        .await;
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
