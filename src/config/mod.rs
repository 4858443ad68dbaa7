//! Configuration: the raw serde structs read with the `config` crate (one TOML
//! file plus `EGRESS_PROXY__SECTION__KEY` environment overrides), the catalog
//! file, and their validation into typed [`Settings`].
//!
//! Nothing else reads raw configuration. Validation reports every error it
//! finds, each naming the file, the key or rule, and what to write instead.
//! The environment is passed in (never read from a global in tests).
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::policy::{
    Action, ClientGroup, ClientGroups, EchMode, Policy, PortRange, Route, RuleSpec, SniMode,
    MAX_GROUPS,
};
pub use crate::policy::{DefaultAction, Rate};
use crate::target::{self, Host};

/// The shipped default configuration, used when no file is found.
pub const BUILTIN_CONFIG: &str = include_str!("../../config/egress-proxy.toml");
/// The shipped catalog, used with the built-in configuration.
pub const BUILTIN_CATALOG: &str = include_str!("../../config/catalog.toml");
/// Where every command looks for a configuration, relative to the working
/// directory, when `--config`, `$EGRESS_PROXY_CONFIG` and
/// [`SYSTEM_CONFIG_PATH`] are not there ([`discover`]).
pub const DEFAULT_CONFIG_PATH: &str = "config/egress-proxy.toml";
/// The packaged configuration, used when it exists and neither `--config`
/// nor `$EGRESS_PROXY_CONFIG` names another ([`discover`]).
pub const SYSTEM_CONFIG_PATH: &str = "/etc/egress-proxy/egress-proxy.toml";
/// The environment variable naming the configuration file ([`discover`]).
pub const CONFIG_ENV: &str = "EGRESS_PROXY_CONFIG";

/// The configuration file to use without `--config`: `$EGRESS_PROXY_CONFIG`
/// (taken from `env`; a missing file is then an error when loading), else
/// [`SYSTEM_CONFIG_PATH`] when it exists, else [`DEFAULT_CONFIG_PATH`] under
/// the working directory when it exists, else None (the built-in default).
pub fn discover<'a>(env: impl IntoIterator<Item = &'a (String, String)>) -> Option<PathBuf> {
    if let Some((_, v)) = env
        .into_iter()
        .find(|(k, v)| k == CONFIG_ENV && !v.is_empty())
    {
        return Some(PathBuf::from(v));
    }
    [SYSTEM_CONFIG_PATH, DEFAULT_CONFIG_PATH]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

/// One configuration error: where it is and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// File, then key or rule, e.g. `catalog.toml: rule #3 "Kaspersky": ports`.
    pub location: String,
    /// What is wrong and what to write instead.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// All errors of one load, in the order found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", display_errors(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn display_errors(errors: &[ConfigError]) -> String {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    lines.join("\n")
}

mod catalog;
mod parent;
mod raw;
mod timings;
mod validate;

pub use catalog::parse_catalog;
pub use parent::{Parent, ParentResolve};
use raw::*;
use timings::lap;
pub use timings::LoadTimings;
use validate::Validator;

// === typed settings ===

/// Where the configuration came from (logged at start).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk; relative paths in it are relative to its folder.
    File(PathBuf),
    /// The defaults compiled into the binary (config and catalog).
    Builtin,
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Builtin => f.write_str("built-in default (config and catalog)"),
        }
    }
}

/// `[server]`.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub listen: Vec<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<String>,
    /// Admin connections open at once; past it, a 503 and a close.
    pub admin_max_connections: usize,
    /// How long an admin connection may take to send a request head, and
    /// stay idle between requests.
    pub admin_idle_timeout: Duration,
    /// 0: derived from the file-descriptor limit at start.
    pub max_connections: usize,
    /// Pipes bulk tunnels may splice through at once; `None`: derived from
    /// the file-descriptor limit at start, 0: never splice.
    pub splice_pipes: Option<usize>,
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long to keep accepting while `/readyz` answers
    /// 503, so a load balancer takes the replica out of its pool before its
    /// listener closes (a connection in a closed listener's backlog is
    /// reset, and a TCP balancer cannot retry it). Then the grace begins.
    pub shutdown_delay: Duration,
    pub proxy_protocol: bool,
    /// The peers (load balancers) trusted to send a PROXY header; required
    /// when `proxy_protocol` is on. Others are served as direct clients.
    pub proxy_protocol_from: Vec<IpNet>,
    pub via: bool,
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub per_client_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub connect_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    /// How long an upstream may take to send a response head (then 504 `timeout`).
    pub response_timeout: Duration,
    /// How long an inspected tunnel's upstream connection is kept, idle, for
    /// the next inspected tunnel to the same host under the same rule; zero
    /// keeps none.
    pub upstream_idle_timeout: Duration,
}

/// `[rates]`: off unless set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rates {
    pub per_client_requests: Option<Rate>,
    pub per_client_tunnels: Option<Rate>,
}

/// `[auth]`: off unless users are set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthSettings {
    pub realm: String,
    /// user -> PHC hash string.
    pub users: BTreeMap<String, String>,
}

/// `[dns]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsSettings {
    pub nameservers: Vec<SocketAddr>,
    /// Normalised host name -> addresses, answered without asking DNS.
    pub static_hosts: HashMap<Box<str>, Vec<IpAddr>>,
    pub allow_private: Vec<IpNet>,
}

/// `[policy]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicySettings {
    /// None for the built-in catalog.
    pub catalog: Option<PathBuf>,
    pub default: DefaultAction,
    pub watch: bool,
}

/// `[tls]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub extra_roots: Vec<PathBuf>,
}

impl TlsSettings {
    /// Inspection is on when both CA files are set.
    pub fn inspection_enabled(&self) -> bool {
        self.ca_cert.is_some() && self.ca_key.is_some()
    }
}

/// Where audit records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditPath {
    Stdout,
    File(PathBuf),
}

/// Audit line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditFormat {
    Json,
    Squid,
}

/// `[audit]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: AuditPath,
    pub format: AuditFormat,
    /// `audit.syslog`, with what a `tls://` destination needs.
    pub syslog: Option<Box<SyslogSettings>>,
    /// Keep URL query strings in the `audit.path` lines: `log_query`, by
    /// default true for JSON and false for Squid (Squid's `strip_query_terms`).
    pub log_query: bool,
}

/// `audit.syslog` and the TLS material for `tls://` (RFC 5425).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogSettings {
    /// `udp://`, `tcp://` or `tls://host:port`.
    pub url: String,
    /// `[tls] extra_roots`, trusted beside the system roots for `tls://`.
    pub extra_roots: Vec<PathBuf>,
    /// `audit.syslog_client_cert` (cert, key): presented to a `tls://` server.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// Validated configuration and the compiled policy.
#[derive(Clone, Debug)]
pub struct Settings {
    pub source: ConfigSource,
    pub server: ServerSettings,
    pub clients: Vec<IpNet>,
    pub limits: Limits,
    pub rates: Rates,
    pub auth: AuthSettings,
    pub dns: DnsSettings,
    pub policy_settings: PolicySettings,
    pub tls: TlsSettings,
    pub audit: AuditSettings,
    pub denials_kept: usize,
    /// `[upstream] parent`: egress through a parent proxy.
    pub parent: Option<Parent>,
    /// The compiled catalog, ready for `decide`.
    pub policy: Arc<Policy>,
    /// `[clients.groups]` (also compiled into `policy`).
    pub client_groups: Arc<ClientGroups>,
    /// Non-fatal findings (shadowed rules and the like).
    pub warnings: Vec<String>,
}

// === loading ===

/// Which keys take comma-separated lists from the environment.
const LIST_KEYS: [&str; 6] = [
    "server.listen",
    "server.proxy_protocol_from",
    "clients.allow",
    "dns.nameservers",
    "dns.allow_private",
    "tls.extra_roots",
];

impl Settings {
    /// Load from `path`, or when it is None from the file [`discover`] finds,
    /// else the built-in default; `env` supplies the environment (normally
    /// `std::env::vars()`).
    ///
    /// # Errors
    /// Every problem found, each naming file and key or rule.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigErrors> {
        Settings::load_timed(path, env).0
    }

    /// [`Settings::load`], and how long each phase took (a reload logs
    /// them; `benches/reload.rs` reports them).
    pub fn load_timed(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> (Result<Settings, ConfigErrors>, LoadTimings) {
        let mut times = LoadTimings::default();
        let env: Vec<(String, String)> = env.into_iter().collect();
        let path = path.map(Path::to_path_buf).or_else(|| discover(&env));
        let start = Instant::now();
        let (source, text) = match path {
            Some(p) => match read_file(&p) {
                Ok(text) => (ConfigSource::File(p), text),
                Err(e) => return (Err(e), times),
            },
            None => (ConfigSource::Builtin, BUILTIN_CONFIG.to_string()),
        };
        times.read = start.elapsed();
        let settings = Settings::from_toml_timed(source, &text, env, &mut times);
        (settings, times)
    }

    /// Parse and validate configuration text from `source`.
    ///
    /// # Errors
    /// Every problem found.
    pub fn from_toml(
        source: ConfigSource,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigErrors> {
        Settings::from_toml_timed(source, text, env, &mut LoadTimings::default())
    }

    fn from_toml_timed(
        source: ConfigSource,
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        times: &mut LoadTimings,
    ) -> Result<Settings, ConfigErrors> {
        let file_name = source.to_string();
        let env: Vec<(String, String)> = env.into_iter().collect();
        // The built-in configuration brings the built-in catalog, unless the
        // environment names a catalog file (relative to the working directory).
        let env_catalog = env
            .iter()
            .find(|(k, v)| k == "EGRESS_PROXY__POLICY__CATALOG" && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v));
        let mut clock = Instant::now();
        let raw = read_raw(&file_name, text, env)?;
        times.parse += lap(&mut clock);
        let base = match &source {
            ConfigSource::File(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ConfigSource::Builtin => PathBuf::new(),
        };
        let mut v = Validator::new(&file_name);
        let mut settings = v.settings(raw, &source, &base);
        if source == ConfigSource::Builtin {
            settings.policy_settings.catalog = env_catalog;
        }
        times.validate += lap(&mut clock);
        let Some((catalog_name, catalog_text)) =
            read_catalog(&mut v, settings.policy_settings.catalog.as_deref())
        else {
            return Err(ConfigErrors(v.errors));
        };
        times.read += lap(&mut clock);
        let raw = catalog::parse_raw_catalog(&catalog_name, &catalog_text);
        times.parse += lap(&mut clock);
        let specs = raw.and_then(|raw| catalog::validate_catalog(&catalog_name, raw, &base));
        let specs = match specs {
            Ok(s) => s,
            Err(mut e) => {
                v.errors.append(&mut e);
                return Err(ConfigErrors(v.errors));
            }
        };
        let inspect = settings.tls.inspection_enabled();
        check_rule_refs(&mut v, &specs, &settings, &catalog_name);
        if !v.errors.is_empty() {
            return Err(ConfigErrors(v.errors));
        }
        times.validate += lap(&mut clock);
        let policy = Policy::compile_with(
            specs,
            settings.policy_settings.default,
            inspect,
            Arc::clone(&settings.client_groups),
        );
        times.compile = lap(&mut clock);
        settings.warnings.extend(
            policy
                .shadowed()
                .into_iter()
                .chain(policy.public_suffix_wildcards())
                .map(|w| format!("{catalog_name}: {w}")),
        );
        times.warnings = lap(&mut clock);
        settings.policy = Arc::new(policy);
        Ok(settings)
    }
}

impl Settings {
    /// These settings as a reload applies them over `running`: the settings
    /// that need a restart keep their running values, so the new snapshot
    /// says what the proxy really does.
    ///
    /// The CA is loaded once at start, so the running inspection setting is
    /// kept whole: the CA paths are the running ones and the policy is
    /// compiled again when the file's setting differs (`methods` on an
    /// `allow` rule admits a CONNECT only when the tunnel is inspected).
    /// `server.proxy_protocol` is read per connection, so it and its
    /// `proxy_protocol_from` are kept as a pair when the file turns it on or
    /// off; with it unchanged, `proxy_protocol_from` reloads like `clients`.
    #[must_use]
    pub fn keeping_restart_only(mut self, running: &Settings) -> Settings {
        self.tls.ca_cert.clone_from(&running.tls.ca_cert);
        self.tls.ca_key.clone_from(&running.tls.ca_key);
        let inspect = self.tls.inspection_enabled();
        if self.policy.inspection_enabled() != inspect {
            let rules = self.policy.rules().to_vec();
            let default = self.policy.default_action();
            let groups = Arc::clone(self.policy.client_groups());
            self.policy = Arc::new(Policy::compile_with(rules, default, inspect, groups));
        }
        if self.server.proxy_protocol != running.server.proxy_protocol {
            self.server.proxy_protocol = running.server.proxy_protocol;
            self.server
                .proxy_protocol_from
                .clone_from(&running.server.proxy_protocol_from);
        }
        self
    }
}

fn read_file(p: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(p).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            location: p.display().to_string(),
            message: format!("cannot read the configuration file: {e}"),
        }])
    })
}

fn read_raw(
    file_name: &str,
    text: &str,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<RawConfig, ConfigErrors> {
    let env_map: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with("EGRESS_PROXY__"))
        .collect();
    let mut environment = config::Environment::with_prefix("EGRESS_PROXY")
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .source(Some(env_map));
    for key in LIST_KEYS {
        environment = environment.with_list_parse_key(key);
    }
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(environment)
        .build()
        .map_err(|e| one_error(file_name, format!("cannot parse: {e}")))?;
    built
        .try_deserialize::<RawConfig>()
        .map_err(|e| one_error(file_name, format!("{e}")))
}

fn one_error(location: &str, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        location: location.to_string(),
        message,
    }])
}

fn rule_location(file: &str, index: usize, name: &str) -> String {
    format!("{file}: rule #{} \"{name}\"", index + 1)
}

/// The catalog's name and text: the file `policy.catalog` names, or the
/// built-in catalog. `None` (with the error recorded) when it cannot be read.
fn read_catalog(v: &mut Validator<'_>, catalog: Option<&Path>) -> Option<(String, String)> {
    match catalog {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(t) => Some((p.display().to_string(), t)),
            Err(e) => {
                v.err(
                    "policy.catalog",
                    format!(
                        "cannot read {}: {e}; point policy.catalog at the catalog TOML file",
                        p.display()
                    ),
                );
                None
            }
        },
        _ => Some(("built-in catalog".to_string(), BUILTIN_CATALOG.to_string())),
    }
}

/// What a rule names outside the catalog: a `client_cert` needs inspection
/// and an allow rule; `clients` must be groups of the configuration.
fn check_rule_refs(
    v: &mut Validator<'_>,
    specs: &[RuleSpec],
    settings: &Settings,
    catalog_name: &str,
) {
    let inspect = settings.tls.inspection_enabled();
    for (i, s) in specs.iter().enumerate() {
        if s.client_cert.is_some() && (!inspect || s.action != Action::Allow) {
            // Located in the catalog, not under the config file's name.
            v.errors.push(ConfigError {
                location: format!("{}: client_cert", rule_location(catalog_name, i, &s.name)),
                message: "client_cert is only presented when the proxy inspects the tunnel (an allow rule with [tls] ca_cert and ca_key set); remove it, or set action = \"allow\" and configure the CA".into(),
            });
        }
    }
    for (i, s) in specs.iter().enumerate() {
        for g in s
            .clients
            .iter()
            .filter(|g| settings.client_groups.bit(g).is_none())
        {
            v.errors.push(ConfigError {
                location: format!("{}: clients", rule_location(catalog_name, i, &s.name)),
                message: format!("unknown client group {g:?}; name it in [clients.groups] of the configuration, or remove it"),
            });
        }
    }
}

/// A path from the config, relative to the config file's folder.
fn resolve(base: &Path, value: &str) -> PathBuf {
    let p = Path::new(value);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// Parse a CIDR (`10.0.0.0/8`) or a bare address (a /32 or /128).
///
/// # Errors
/// A message saying what to write instead.
pub fn parse_cidr(value: &str) -> Result<IpNet, String> {
    if let Ok(net) = value.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "{value:?} has host bits set; write {:?}",
                net.trunc().to_string()
            ));
        }
        return Ok(net);
    }
    match value.parse::<IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!(
            "{value:?} is not an address or CIDR; write e.g. \"10.0.0.0/8\" or \"::1/128\""
        )),
    }
}

/// Parse `"10s"`, `"5m"`, `"1h"`, `"250ms"`.
///
/// # Errors
/// A message naming the bad value.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("{value:?} is not a duration ({e})"))
}

/// Parse a rate: `"50/s"`, `"600/m"`, `"1000/h"`, or `"10/5s"`.
///
/// # Errors
/// A message saying what to write.
pub fn parse_rate(value: &str) -> Result<Rate, String> {
    let bad = || format!("{value:?} is not a rate; write e.g. \"50/s\", \"600/m\" or \"10/5s\"");
    let (count, per) = value.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match per.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => humantime::parse_duration(other).map_err(|_| bad())?,
    };
    if count == 0 || per.is_zero() {
        return Err(bad());
    }
    Ok(Rate { count, per })
}

#[cfg(test)]
mod tests;
