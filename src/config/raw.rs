//! The raw serde structs: what the TOML file and the environment may say.
use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) clients: RawClients,
    pub(super) limits: RawLimits,
    pub(super) rates: RawRates,
    pub(super) auth: RawAuth,
    pub(super) dns: RawDns,
    pub(super) policy: RawPolicy,
    pub(super) tls: RawTls,
    pub(super) audit: RawAudit,
    pub(super) status: RawStatus,
    pub(super) upstream: RawUpstream,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: Vec<String>,
    pub(super) admin_listen: Option<String>,
    pub(super) admin_token: Option<String>,
    pub(super) admin_max_connections: u64,
    pub(super) admin_idle_timeout: String,
    pub(super) max_connections: u64,
    pub(super) splice_pipes: Option<u64>,
    pub(super) shutdown_grace: String,
    pub(super) shutdown_delay: String,
    pub(super) proxy_protocol: bool,
    pub(super) proxy_protocol_from: Vec<String>,
    pub(super) via: bool,
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
pub(super) struct RawClients {
    pub(super) allow: Vec<String>,
    /// `[clients.groups]`: name -> `["10.0.1.0/24", "user:webgw"]`.
    pub(super) groups: BTreeMap<String, Vec<String>>,
}

impl Default for RawClients {
    fn default() -> Self {
        RawClients {
            allow: vec!["127.0.0.1/32".into(), "::1/128".into()],
            groups: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) per_client_connections: u64,
    pub(super) header_read_timeout: String,
    pub(super) max_header_bytes: u64,
    pub(super) connect_timeout: String,
    pub(super) tunnel_idle_timeout: String,
    pub(super) response_timeout: String,
    pub(super) upstream_idle_timeout: String,
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
            upstream_idle_timeout: "30s".into(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRates {
    pub(super) per_client_requests: Option<String>,
    pub(super) per_client_tunnels: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAuth {
    pub(super) realm: Option<String>,
    pub(super) users: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawDns {
    pub(super) nameservers: Vec<String>,
    #[serde(rename = "static")]
    pub(super) static_hosts: BTreeMap<String, Vec<String>>,
    pub(super) allow_private: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawPolicy {
    pub(super) catalog: String,
    pub(super) default: String,
    pub(super) watch: bool,
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
pub(super) struct RawTls {
    pub(super) ca_cert: Option<String>,
    pub(super) ca_key: Option<String>,
    pub(super) extra_roots: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAudit {
    pub(super) path: String,
    pub(super) format: String,
    pub(super) syslog: Option<String>,
    pub(super) syslog_client_cert: Option<RawClientCert>,
    pub(super) log_query: Option<bool>,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            path: "-".into(),
            format: "json".into(),
            syslog: None,
            syslog_client_cert: None,
            log_query: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStatus {
    pub(super) denials_kept: u64,
}

impl Default for RawStatus {
    fn default() -> Self {
        RawStatus { denials_kept: 1000 }
    }
}

/// `[upstream]`: the parent proxy.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    pub(super) parent: Option<String>,
    pub(super) parent_resolve: Option<String>,
    pub(super) parent_user: Option<String>,
    pub(super) parent_password: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    #[serde(default)]
    pub(super) rule: Vec<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
    #[serde(default)]
    pub(super) addresses: Vec<String>,
    #[serde(default)]
    pub(super) ports: Vec<RawPort>,
    pub(super) action: Option<String>,
    pub(super) methods: Option<Vec<String>>,
    pub(super) sni: Option<String>,
    pub(super) ech: Option<String>,
    #[serde(default)]
    pub(super) ips: Vec<String>,
    #[serde(default)]
    pub(super) pin: bool,
    pub(super) rate: Option<String>,
    pub(super) client_cert: Option<RawClientCert>,
    pub(super) route: Option<String>,
    #[serde(default)]
    pub(super) clients: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawPort {
    Number(i64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClientCert {
    pub(super) cert: String,
    pub(super) key: String,
}
