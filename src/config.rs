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
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::policy::{Action, EchMode, Policy, PortRange, RuleSpec, SniMode};
pub use crate::policy::{DefaultAction, Rate};
use crate::target::{self, Host};

/// The shipped default configuration, used when no file is found.
pub const BUILTIN_CONFIG: &str = include_str!("../config/egress-proxy.toml");
/// The shipped catalog, used with the built-in configuration.
pub const BUILTIN_CATALOG: &str = include_str!("../config/catalog.toml");
/// Where `run` looks for a configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/egress-proxy.toml";

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

// === raw configuration ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    clients: RawClients,
    limits: RawLimits,
    rates: RawRates,
    auth: RawAuth,
    dns: RawDns,
    policy: RawPolicy,
    tls: RawTls,
    audit: RawAudit,
    status: RawStatus,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: Vec<String>,
    admin_listen: Option<String>,
    admin_token: Option<String>,
    admin_max_connections: u64,
    admin_idle_timeout: String,
    max_connections: u64,
    splice_pipes: Option<u64>,
    shutdown_grace: String,
    shutdown_delay: String,
    proxy_protocol: bool,
    proxy_protocol_from: Vec<String>,
    via: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: vec!["127.0.0.1:3128".into()],
            admin_listen: Some("127.0.0.1:9090".into()),
            admin_token: None,
            admin_max_connections: 64,
            admin_idle_timeout: "10s".into(),
            max_connections: 0,
            splice_pipes: None,
            shutdown_grace: "30s".into(),
            shutdown_delay: "0s".into(),
            proxy_protocol: false,
            proxy_protocol_from: Vec::new(),
            via: false,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawClients {
    allow: Vec<String>,
}

impl Default for RawClients {
    fn default() -> Self {
        RawClients {
            allow: vec!["127.0.0.1/32".into(), "::1/128".into()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    per_client_connections: u64,
    header_read_timeout: String,
    max_header_bytes: u64,
    connect_timeout: String,
    tunnel_idle_timeout: String,
    response_timeout: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            per_client_connections: 10_000,
            header_read_timeout: "10s".into(),
            max_header_bytes: 65_536,
            connect_timeout: "10s".into(),
            tunnel_idle_timeout: "1h".into(),
            response_timeout: "60s".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRates {
    per_client_requests: Option<String>,
    per_client_tunnels: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAuth {
    realm: Option<String>,
    users: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDns {
    nameservers: Vec<String>,
    #[serde(rename = "static")]
    static_hosts: BTreeMap<String, Vec<String>>,
    allow_private: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    catalog: String,
    default: String,
    watch: bool,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            catalog: "catalog.toml".into(),
            default: "deny".into(),
            watch: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    ca_cert: Option<String>,
    ca_key: Option<String>,
    extra_roots: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAudit {
    path: String,
    format: String,
    syslog: Option<String>,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            path: "-".into(),
            format: "json".into(),
            syslog: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStatus {
    denials_kept: u64,
}

impl Default for RawStatus {
    fn default() -> Self {
        RawStatus { denials_kept: 1000 }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    ports: Vec<RawPort>,
    action: Option<String>,
    methods: Option<Vec<String>>,
    sni: Option<String>,
    ech: Option<String>,
    #[serde(default)]
    ips: Vec<String>,
    #[serde(default)]
    pin: bool,
    rate: Option<String>,
    client_cert: Option<RawClientCert>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientCert {
    cert: String,
    key: String,
}

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
    pub syslog: Option<String>,
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
    /// The compiled catalog, ready for `decide`.
    pub policy: Arc<Policy>,
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
    /// Load from `path`, or when it is None from [`DEFAULT_CONFIG_PATH`] if it
    /// exists, else the built-in default; `env` supplies the environment
    /// (normally `std::env::vars()`).
    ///
    /// # Errors
    /// Every problem found, each naming file and key or rule.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigErrors> {
        let (source, text) = match path {
            Some(p) => (ConfigSource::File(p.to_path_buf()), read_file(p)?),
            None => {
                let p = Path::new(DEFAULT_CONFIG_PATH);
                if p.exists() {
                    (ConfigSource::File(p.to_path_buf()), read_file(p)?)
                } else {
                    (ConfigSource::Builtin, BUILTIN_CONFIG.to_string())
                }
            }
        };
        Settings::from_toml(source, &text, env)
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
        let file_name = source.to_string();
        let raw = read_raw(&file_name, text, env)?;
        let base = match &source {
            ConfigSource::File(p) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ConfigSource::Builtin => PathBuf::new(),
        };
        let mut v = Validator::new(&file_name);
        let settings = v.settings(raw, &source, &base);
        let (catalog_name, catalog_text) = match &settings.policy_settings.catalog {
            Some(p) if source != ConfigSource::Builtin => match std::fs::read_to_string(p) {
                Ok(t) => (p.display().to_string(), t),
                Err(e) => {
                    v.err(
                        "policy.catalog",
                        format!(
                            "cannot read {}: {e}; point policy.catalog at the catalog TOML file",
                            p.display()
                        ),
                    );
                    return Err(ConfigErrors(v.errors));
                }
            },
            _ => ("built-in catalog".to_string(), BUILTIN_CATALOG.to_string()),
        };
        let specs = parse_catalog(&catalog_name, &catalog_text, &base);
        let specs = match specs {
            Ok(s) => s,
            Err(mut e) => {
                v.errors.append(&mut e);
                return Err(ConfigErrors(v.errors));
            }
        };
        let mut settings = settings;
        let inspect = settings.tls.inspection_enabled();
        for (i, s) in specs.iter().enumerate() {
            if s.client_cert.is_some() && (!inspect || s.action != Action::Allow) {
                // Located in the catalog, not under the config file's name.
                v.errors.push(ConfigError {
                    location: format!("{}: client_cert", rule_location(&catalog_name, i, &s.name)),
                    message: "client_cert is only presented when the proxy inspects the tunnel (an allow rule with [tls] ca_cert and ca_key set); remove it, or set action = \"allow\" and configure the CA".into(),
                });
            }
        }
        if !v.errors.is_empty() {
            return Err(ConfigErrors(v.errors));
        }
        let policy = Policy::compile(specs, settings.policy_settings.default, inspect);
        settings.warnings = policy
            .shadowed()
            .into_iter()
            .map(|w| format!("{catalog_name}: {w}"))
            .collect();
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
            self.policy = Arc::new(Policy::compile(rules, default, inspect));
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

// === validation ===

struct Validator<'a> {
    file: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Validator<'a> {
    fn new(file: &'a str) -> Self {
        Validator {
            file,
            errors: Vec::new(),
        }
    }

    fn err(&mut self, key: &str, message: String) {
        let location = if key.starts_with(self.file) {
            key.to_string()
        } else {
            format!("{}: {key}", self.file)
        };
        self.errors.push(ConfigError { location, message });
    }

    fn duration(&mut self, key: &str, value: &str) -> Duration {
        match parse_duration(value) {
            Ok(d) => d,
            Err(e) => {
                self.err(
                    key,
                    format!("{e}; write a duration such as \"10s\", \"5m\" or \"1h\""),
                );
                Duration::ZERO
            }
        }
    }

    /// A duration that must be more than zero.
    fn positive(&mut self, key: &str, value: &str) -> Duration {
        let d = self.duration(key, value);
        if d.is_zero() && parse_duration(value).is_ok() {
            self.err(key, "must be more than zero; write e.g. \"10s\"".into());
        }
        d
    }

    fn at_least_one(&mut self, key: &str, n: u64) -> usize {
        if n == 0 {
            self.err(
                key,
                "0 would refuse every connection; write 1 or more".into(),
            );
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    fn socket(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(key, format!("{value:?} is not an address with a port; write \"127.0.0.1:3128\" or \"[::1]:3128\""));
                None
            }
        }
    }

    fn cidr(&mut self, key: &str, value: &str) -> Option<IpNet> {
        parse_cidr(value).map_err(|m| self.err(key, m)).ok()
    }

    fn settings(&mut self, raw: RawConfig, source: &ConfigSource, base: &Path) -> Settings {
        let server = self.server(raw.server);
        let clients = raw
            .clients
            .allow
            .iter()
            .filter_map(|c| self.cidr("clients.allow", c))
            .collect();
        let limits = self.limits(raw.limits);
        let rates = Rates {
            per_client_requests: raw
                .rates
                .per_client_requests
                .and_then(|r| self.rate("rates.per_client_requests", &r)),
            per_client_tunnels: raw
                .rates
                .per_client_tunnels
                .and_then(|r| self.rate("rates.per_client_tunnels", &r)),
        };
        let auth = self.auth(raw.auth);
        let dns = self.dns(raw.dns);
        let policy_settings = PolicySettings {
            catalog: match source {
                ConfigSource::Builtin => None,
                ConfigSource::File(_) => Some(resolve(base, &raw.policy.catalog)),
            },
            default: match raw.policy.default.as_str() {
                "deny" => DefaultAction::Deny,
                "report" => DefaultAction::Report,
                other => {
                    self.err(
                        "policy.default",
                        format!("unknown value {other:?}; write \"deny\" or \"report\""),
                    );
                    DefaultAction::Deny
                }
            },
            watch: raw.policy.watch,
        };
        let tls = self.tls(raw.tls, base);
        let audit = self.audit(raw.audit, base);
        Settings {
            source: source.clone(),
            server,
            clients,
            limits,
            rates,
            auth,
            dns,
            policy_settings,
            tls,
            audit,
            denials_kept: usize::try_from(raw.status.denials_kept).unwrap_or(usize::MAX),
            policy: Arc::new(Policy::empty()),
            warnings: Vec::new(),
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerSettings {
        if raw.listen.is_empty() {
            self.err(
                "server.listen",
                "no listen address; write listen = [\"127.0.0.1:3128\"]".into(),
            );
        }
        let listen = raw
            .listen
            .iter()
            .filter_map(|l| self.socket("server.listen", l))
            .collect();
        let admin_listen = raw
            .admin_listen
            .filter(|a| !a.is_empty())
            .and_then(|a| self.socket("server.admin_listen", &a));
        ServerSettings {
            listen,
            admin_listen,
            admin_token: raw.admin_token.filter(|t| !t.is_empty()),
            admin_max_connections: self
                .at_least_one("server.admin_max_connections", raw.admin_max_connections),
            admin_idle_timeout: self.positive("server.admin_idle_timeout", &raw.admin_idle_timeout),
            max_connections: usize::try_from(raw.max_connections).unwrap_or(usize::MAX),
            splice_pipes: raw
                .splice_pipes
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            shutdown_grace: self.duration("server.shutdown_grace", &raw.shutdown_grace),
            shutdown_delay: self.duration("server.shutdown_delay", &raw.shutdown_delay),
            proxy_protocol: raw.proxy_protocol,
            proxy_protocol_from: self
                .proxy_protocol_from(raw.proxy_protocol, &raw.proxy_protocol_from),
            via: raw.via,
        }
    }

    /// `server.proxy_protocol_from`: required with `proxy_protocol = true`,
    /// or any client could claim to be any other.
    fn proxy_protocol_from(&mut self, on: bool, raw: &[String]) -> Vec<IpNet> {
        let key = "server.proxy_protocol_from";
        if on && raw.is_empty() {
            self.err(
                key,
                "required with proxy_protocol = true: list the load balancers allowed to send the PROXY header, e.g. proxy_protocol_from = [\"10.0.0.2/32\"]".into(),
            );
        }
        raw.iter().filter_map(|c| self.cidr(key, c)).collect()
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let limits = Limits {
            per_client_connections: usize::try_from(raw.per_client_connections)
                .unwrap_or(usize::MAX),
            header_read_timeout: self
                .duration("limits.header_read_timeout", &raw.header_read_timeout),
            max_header_bytes: usize::try_from(raw.max_header_bytes).unwrap_or(usize::MAX),
            connect_timeout: self.duration("limits.connect_timeout", &raw.connect_timeout),
            tunnel_idle_timeout: self
                .duration("limits.tunnel_idle_timeout", &raw.tunnel_idle_timeout),
            response_timeout: self.duration("limits.response_timeout", &raw.response_timeout),
        };
        for (key, d) in [
            ("limits.header_read_timeout", limits.header_read_timeout),
            ("limits.connect_timeout", limits.connect_timeout),
            ("limits.tunnel_idle_timeout", limits.tunnel_idle_timeout),
            ("limits.response_timeout", limits.response_timeout),
        ] {
            if d.is_zero() && !self.errors.iter().any(|e| e.location.ends_with(key)) {
                self.err(key, "must be more than zero; write e.g. \"10s\"".into());
            }
        }
        if limits.per_client_connections == 0 {
            self.err(
                "limits.per_client_connections",
                "must be at least 1; the default is 10000".into(),
            );
        }
        // hyper cannot read a head below 8 KiB; keep heads bounded above.
        if !(8192..=1_048_576).contains(&limits.max_header_bytes) {
            self.err(
                "limits.max_header_bytes",
                format!(
                    "{} is out of range; write a value from 8192 to 1048576 (default 65536)",
                    limits.max_header_bytes
                ),
            );
        }
        limits
    }

    fn rate(&mut self, key: &str, value: &str) -> Option<Rate> {
        parse_rate(value).map_err(|m| self.err(key, m)).ok()
    }

    fn auth(&mut self, raw: RawAuth) -> AuthSettings {
        for (user, hash) in &raw.users {
            if !hash.starts_with('$') {
                self.err(
                    &format!("auth.users.{user}"),
                    "not a PHC hash string; generate one with `egress-proxy auth hash`".into(),
                );
            }
            if user.is_empty() || user.contains(':') {
                self.err(
                    "auth.users",
                    format!("user name {user:?} must be non-empty and contain no ':'"),
                );
            }
        }
        AuthSettings {
            realm: raw.realm.unwrap_or_else(|| "egress-proxy".into()),
            users: raw.users,
        }
    }

    fn dns(&mut self, raw: RawDns) -> DnsSettings {
        let nameservers = raw
            .nameservers
            .iter()
            .filter_map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Some(SocketAddr::new(ip, 53)),
                Err(_) => self.socket("dns.nameservers", n),
            })
            .collect();
        let mut static_hosts = HashMap::new();
        for (name, addrs) in &raw.static_hosts {
            let key = format!("dns.static.{name:?}");
            let host = match target::normalize_host(name) {
                Ok(Host::Name(n)) => n,
                _ => {
                    self.err(
                        &key,
                        "not a host name; write a DNS name such as \"repo.clearswift.net\"".into(),
                    );
                    continue;
                }
            };
            let mut ips = Vec::with_capacity(addrs.len());
            for a in addrs {
                match a.parse::<IpAddr>() {
                    Ok(ip) => ips.push(ip),
                    Err(_) => self.err(
                        &key,
                        format!("{a:?} is not an IP address; write e.g. \"127.0.0.1\""),
                    ),
                }
            }
            if ips.is_empty() {
                self.err(&key, "no addresses; give at least one".into());
            }
            static_hosts.insert(host, ips);
        }
        let allow_private = raw
            .allow_private
            .iter()
            .filter_map(|c| self.cidr("dns.allow_private", c))
            .collect();
        DnsSettings {
            nameservers,
            static_hosts,
            allow_private,
        }
    }

    fn tls(&mut self, raw: RawTls, base: &Path) -> TlsSettings {
        if raw.ca_cert.is_some() != raw.ca_key.is_some() {
            self.err(
                "tls",
                "set both ca_cert and ca_key to enable inspection, or neither".into(),
            );
        }
        TlsSettings {
            ca_cert: raw.ca_cert.map(|p| resolve(base, &p)),
            ca_key: raw.ca_key.map(|p| resolve(base, &p)),
            extra_roots: raw.extra_roots.iter().map(|p| resolve(base, p)).collect(),
        }
    }

    fn audit(&mut self, raw: RawAudit, base: &Path) -> AuditSettings {
        let path = match raw.path.as_str() {
            "-" => AuditPath::Stdout,
            "" => {
                self.err(
                    "audit.path",
                    "empty; write \"-\" for stdout or a file path".into(),
                );
                AuditPath::Stdout
            }
            p => AuditPath::File(resolve(base, p)),
        };
        let format = match raw.format.as_str() {
            "json" => AuditFormat::Json,
            "squid" => AuditFormat::Squid,
            other => {
                self.err(
                    "audit.format",
                    format!("unknown format {other:?}; write \"json\" or \"squid\""),
                );
                AuditFormat::Json
            }
        };
        if let Some(s) = &raw.syslog {
            if !(s.starts_with("udp://") || s.starts_with("tcp://")) {
                self.err("audit.syslog", format!("{s:?} is not a syslog address; write \"udp://host:514\" or \"tcp://host:514\""));
            }
        }
        AuditSettings {
            path,
            format,
            syslog: raw.syslog,
        }
    }
}

// === the catalog ===

/// Parse and validate catalog text into rule specs.
///
/// # Errors
/// Every problem found, each naming the rule by index and name.
pub fn parse_catalog(
    file: &str,
    text: &str,
    base: &Path,
) -> Result<Vec<RuleSpec>, Vec<ConfigError>> {
    let raw: RawCatalog = toml::from_str(text).map_err(|e| {
        vec![ConfigError {
            location: file.to_string(),
            message: format!("cannot parse the catalog: {}", e.message().trim_end()),
        }]
    })?;
    let mut errors = Vec::new();
    let mut specs = Vec::with_capacity(raw.rule.len());
    for (i, r) in raw.rule.into_iter().enumerate() {
        let name = r.name.clone().unwrap_or_default();
        let loc = rule_location(file, i, &name);
        let mut err = |key: &str, message: String| {
            errors.push(ConfigError {
                location: format!("{loc}: {key}"),
                message,
            });
        };
        if let Some(spec) = validate_rule(r, base, &mut err) {
            specs.push(spec);
        }
    }
    let mut seen: HashMap<u64, Vec<usize>> = HashMap::with_capacity(specs.len());
    for (i, a) in specs.iter().enumerate() {
        let same = seen.entry(a.effect_hash()).or_default();
        let dup = same.iter().copied().find(|&j| specs[j].same_effect(a));
        same.push(i);
        if let Some(j) = dup {
            errors.push(ConfigError {
                location: rule_location(file, i, &a.name),
                message: format!(
                    "exact duplicate of rule #{} \"{}\"; remove one of them",
                    j + 1,
                    specs[j].name
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}

fn validate_rule(r: RawRule, base: &Path, err: &mut impl FnMut(&str, String)) -> Option<RuleSpec> {
    let mut bad = false;
    let mut fail = |key: &str, message: String| {
        bad = true;
        err(key, message);
    };
    let name = match r.name {
        Some(n) if !n.trim().is_empty() => n,
        _ => {
            fail(
                "name",
                "missing; every rule needs a name = \"...\" (it is shown in every audit record)"
                    .into(),
            );
            String::new()
        }
    };
    if r.hosts.is_empty() && r.addresses.is_empty() {
        fail(
            "hosts",
            "a rule needs hosts = [\"name\", \"*.domain\"] or addresses = [\"203.0.113.7/32\"]"
                .into(),
        );
    }
    let mut hosts = Vec::with_capacity(r.hosts.len());
    for h in &r.hosts {
        match validate_host_pattern(h) {
            Ok(p) => hosts.push(p),
            Err(m) => fail("hosts", m),
        }
    }
    let mut addresses = Vec::with_capacity(r.addresses.len());
    for a in &r.addresses {
        match parse_cidr(a) {
            Ok(n) => addresses.push(n),
            Err(m) => fail("addresses", m),
        }
    }
    if r.ports.is_empty() {
        fail("ports", "missing; write ports = [443], ports = [\"8000-8010\"], or [\"1-65535\"] for every port".into());
    }
    let mut ports = Vec::with_capacity(r.ports.len());
    for p in &r.ports {
        match parse_port(p) {
            Ok(range) => ports.push(range),
            Err(m) => fail("ports", m),
        }
    }
    let action = match r.action.as_deref() {
        Some("allow") => Action::Allow,
        Some("bypass") => Action::Bypass,
        Some("deny") => Action::Deny,
        Some(other) => {
            fail(
                "action",
                format!("unknown action {other:?}; write \"allow\", \"bypass\" or \"deny\""),
            );
            Action::Deny
        }
        None => {
            fail(
                "action",
                "missing; write action = \"allow\", \"bypass\" or \"deny\"".into(),
            );
            Action::Deny
        }
    };
    let methods = r.methods.map(|ms| {
        let mut out = Vec::with_capacity(ms.len());
        for m in ms {
            match http::Method::from_bytes(m.as_bytes()) {
                Ok(method) if m.bytes().all(|b| b.is_ascii_uppercase()) => out.push(method),
                _ => fail("methods", format!("{m:?} is not an HTTP method; write upper-case names such as \"GET\", \"HEAD\"")),
            }
        }
        out
    });
    if methods.as_ref().is_some_and(Vec::is_empty) {
        fail(
            "methods",
            "empty list; remove the key to allow every method".into(),
        );
    }
    let sni = match r.sni.as_deref() {
        None | Some("match-if-tls") => SniMode::MatchIfTls,
        Some("off") => SniMode::Off,
        Some("require") => SniMode::Require,
        Some(other) => {
            fail(
                "sni",
                format!("unknown mode {other:?}; write \"off\", \"match-if-tls\" or \"require\""),
            );
            SniMode::MatchIfTls
        }
    };
    let ech = match r.ech.as_deref() {
        None | Some("allow") => EchMode::Allow,
        Some("deny") => EchMode::Deny,
        Some(other) => {
            fail(
                "ech",
                format!("unknown mode {other:?}; write \"allow\" or \"deny\""),
            );
            EchMode::Allow
        }
    };
    let mut ips = Vec::with_capacity(r.ips.len());
    for ip in &r.ips {
        match ip.parse::<IpAddr>() {
            Ok(a) => ips.push(a),
            Err(_) => fail(
                "ips",
                format!("{ip:?} is not an IP address; write e.g. \"185.155.104.24\""),
            ),
        }
    }
    if r.pin && ips.is_empty() {
        fail(
            "pin",
            "pin = true needs the addresses in ips = [...]".into(),
        );
    }
    let rate = r
        .rate
        .and_then(|v| parse_rate(&v).map_err(|m| fail("rate", m)).ok());
    let client_cert = r.client_cert.map(|c| {
        let cert = resolve(base, &c.cert);
        let key = resolve(base, &c.key);
        for (what, p) in [("cert", &cert), ("key", &key)] {
            if let Err(e) = std::fs::metadata(p) {
                fail(
                    &format!("client_cert.{what}"),
                    format!("cannot read {}: {e}", p.display()),
                );
            }
        }
        (cert, key)
    });
    if bad {
        return None;
    }
    Some(RuleSpec {
        name,
        hosts,
        addresses,
        ports,
        action,
        methods,
        sni,
        ech,
        ips,
        pin: r.pin,
        rate,
        client_cert,
    })
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

/// Validate one catalog host pattern: an exact normalised name, or `*.` plus one.
fn validate_host_pattern(h: &str) -> Result<String, String> {
    if h == "*" || h == "*." {
        return Err(format!(
            "{h:?} would match every host; list the domains, e.g. \"*.example.com\""
        ));
    }
    let (wild, name) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h),
    };
    if name.contains('*') {
        return Err(format!(
            "{h:?}: a wildcard may only be a leading \"*.\"; write \"*.example.com\""
        ));
    }
    match target::normalize_host(name) {
        Ok(Host::Name(n)) if *n == *name => Ok(h.to_string()),
        Ok(Host::Name(n)) => {
            let suggestion = if wild {
                format!("*.{n}")
            } else {
                n.to_string()
            };
            Err(format!("{h:?} is not normalised; write {suggestion:?}"))
        }
        Ok(Host::Ip(ip)) => Err(format!(
            "{h:?} is an IP address; list it in addresses = [\"{ip}/{}\"]",
            if ip.is_ipv4() { 32 } else { 128 }
        )),
        Err(e) => Err(format!("{h:?} is not a host name ({e})")),
    }
}

fn parse_port(p: &RawPort) -> Result<PortRange, String> {
    let check = |n: i64| -> Result<u16, String> {
        u16::try_from(n)
            .ok()
            .filter(|&n| n != 0)
            .ok_or_else(|| format!("{n} is not a port; ports are 1-65535"))
    };
    match p {
        RawPort::Number(n) => {
            let n = check(*n)?;
            Ok(PortRange { lo: n, hi: n })
        }
        RawPort::Text(t) => {
            let (lo, hi) = match t.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (t.trim(), t.trim()),
            };
            let num = |s: &str| -> Result<u16, String> {
                let n: i64 = s.parse().map_err(|_| {
                    format!("{t:?} is not a port or range; write 443 or \"8000-8010\"")
                })?;
                check(n)
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("{t:?} is an inverted range; write \"{hi}-{lo}\""));
            }
            Ok(PortRange { lo, hi })
        }
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
