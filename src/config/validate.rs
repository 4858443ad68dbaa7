//! The [`Validator`]: raw configuration into typed settings, collecting every error.
use super::*;

pub(super) struct Validator<'a> {
    pub(super) file: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl<'a> Validator<'a> {
    pub(super) fn new(file: &'a str) -> Self {
        Validator {
            file,
            errors: Vec::new(),
        }
    }

    pub(super) fn err(&mut self, key: &str, message: String) {
        let location = if key.starts_with(self.file) {
            key.to_string()
        } else {
            format!("{}: {key}", self.file)
        };
        self.errors.push(ConfigError { location, message });
    }

    pub(super) fn duration(&mut self, key: &str, value: &str) -> Duration {
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
    pub(super) fn positive(&mut self, key: &str, value: &str) -> Duration {
        let d = self.duration(key, value);
        if d.is_zero() && parse_duration(value).is_ok() {
            self.err(key, "must be more than zero; write e.g. \"10s\"".into());
        }
        d
    }

    pub(super) fn at_least_one(&mut self, key: &str, n: u64) -> usize {
        if n == 0 {
            self.err(
                key,
                "0 would refuse every connection; write 1 or more".into(),
            );
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    pub(super) fn socket(&mut self, key: &str, value: &str) -> Option<SocketAddr> {
        match value.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(key, format!("{value:?} is not an address with a port; write \"127.0.0.1:3128\" or \"[::1]:3128\""));
                None
            }
        }
    }

    pub(super) fn cidr(&mut self, key: &str, value: &str) -> Option<IpNet> {
        parse_cidr(value).map_err(|m| self.err(key, m)).ok()
    }

    pub(super) fn settings(
        &mut self,
        raw: RawConfig,
        source: &ConfigSource,
        base: &Path,
    ) -> Settings {
        let server = self.server(raw.server);
        let clients: Vec<IpNet> = raw
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
        let (client_groups, group_warnings) =
            self.client_groups(&raw.clients.groups, &clients, &auth);
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
        let audit = self.audit(raw.audit, base, &tls.extra_roots);
        let parent = self.parent(raw.upstream);
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
            parent,
            policy: Arc::new(Policy::empty()),
            client_groups: Arc::new(client_groups),
            warnings: group_warnings,
        }
    }

    /// `[clients.groups]`: `name = ["10.0.1.0/24", "user:webgw"]`. Names are
    /// letters, digits, `.`, `_`, `-`; entries are CIDRs (or bare addresses)
    /// and, with `[auth]` users set, `user:NAME` for a configured user. The
    /// warnings name CIDRs outside `clients.allow` (no client there connects).
    pub(super) fn client_groups(
        &mut self,
        raw: &BTreeMap<String, Vec<String>>,
        allow: &[IpNet],
        auth: &AuthSettings,
    ) -> (ClientGroups, Vec<String>) {
        if raw.len() > MAX_GROUPS {
            self.err(
                "clients.groups",
                format!("{} groups; at most {MAX_GROUPS} may be named", raw.len()),
            );
        }
        let mut groups = Vec::with_capacity(raw.len());
        let mut warnings = Vec::new();
        for (name, entries) in raw {
            let key = format!("clients.groups.{name}");
            let name_ok = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            if !name_ok {
                self.err(
                    &key,
                    "a group name is letters, digits, '.', '_' and '-', e.g. web-gateways".into(),
                );
            }
            if entries.is_empty() {
                self.err(
                    &key,
                    "empty; list CIDRs and users, e.g. [\"10.0.1.0/24\", \"user:webgw\"]".into(),
                );
            }
            let mut group = ClientGroup {
                name: name.clone(),
                cidrs: Vec::new(),
                users: Vec::new(),
            };
            for e in entries {
                if let Some(user) = e.strip_prefix("user:") {
                    if !auth.users.contains_key(user) {
                        self.err(&key, format!("{e:?}: no such user in [auth] users; a user entry needs proxy auth on and the user configured"));
                    }
                    group.users.push(user.to_string());
                } else if let Some(net) = self.cidr(&key, e) {
                    let overlaps = allow
                        .iter()
                        .any(|a| a.contains(&net.network()) || net.contains(&a.network()));
                    if !overlaps {
                        warnings.push(format!("{}: warning: {key}: {net} is outside clients.allow; no client from it can connect", self.file));
                    }
                    group.cidrs.push(net);
                }
            }
            groups.push(group);
        }
        (ClientGroups::new(groups), warnings)
    }

    pub(super) fn server(&mut self, raw: RawServer) -> ServerSettings {
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
    pub(super) fn proxy_protocol_from(&mut self, on: bool, raw: &[String]) -> Vec<IpNet> {
        let key = "server.proxy_protocol_from";
        if on && raw.is_empty() {
            self.err(
                key,
                "required with proxy_protocol = true: list the load balancers allowed to send the PROXY header, e.g. proxy_protocol_from = [\"10.0.0.2/32\"]".into(),
            );
        }
        raw.iter().filter_map(|c| self.cidr(key, c)).collect()
    }

    pub(super) fn limits(&mut self, raw: RawLimits) -> Limits {
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
            upstream_idle_timeout: self
                .duration("limits.upstream_idle_timeout", &raw.upstream_idle_timeout),
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

    pub(super) fn rate(&mut self, key: &str, value: &str) -> Option<Rate> {
        parse_rate(value).map_err(|m| self.err(key, m)).ok()
    }

    pub(super) fn auth(&mut self, raw: RawAuth) -> AuthSettings {
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

    pub(super) fn dns(&mut self, raw: RawDns) -> DnsSettings {
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

    pub(super) fn tls(&mut self, raw: RawTls, base: &Path) -> TlsSettings {
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

    pub(super) fn audit(
        &mut self,
        raw: RawAudit,
        base: &Path,
        extra_roots: &[PathBuf],
    ) -> AuditSettings {
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
            if !["udp://", "tcp://", "tls://"]
                .iter()
                .any(|p| s.starts_with(p))
            {
                self.err("audit.syslog", format!("{s:?} is not a syslog address; write \"udp://host:514\", \"tcp://host:514\" or \"tls://host:6514\""));
            } else if let Err(e) = crate::audit::syslog::Destination::parse(s) {
                self.err("audit.syslog", e);
            }
        }
        let client_cert = raw.syslog_client_cert.map(|c| {
            let cert = resolve(base, &c.cert);
            let key = resolve(base, &c.key);
            if !raw.syslog.as_deref().is_some_and(|s| s.starts_with("tls://")) {
                self.err(
                    "audit.syslog_client_cert",
                    "only presented to a tls:// syslog server; set audit.syslog = \"tls://host:6514\" or remove it".into(),
                );
            }
            for (what, p) in [("cert", &cert), ("key", &key)] {
                if let Err(e) = std::fs::metadata(p) {
                    self.err(
                        &format!("audit.syslog_client_cert.{what}"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                }
            }
            (cert, key)
        });
        AuditSettings {
            path,
            format,
            log_query: raw.log_query.unwrap_or(format == AuditFormat::Json),
            syslog: raw.syslog.map(|url| {
                Box::new(SyslogSettings {
                    url,
                    extra_roots: extra_roots.to_vec(),
                    client_cert,
                })
            }),
        }
    }
}
