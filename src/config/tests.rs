//! Unit tests of configuration loading: one named case per error (each
//! message must name the fault and say what to write), every error of a load
//! reported at once, environment overrides, paths, the built-in default, and
//! the catalogs in `tests/fixtures/bad/` that must fail to load (each names
//! the error it expects in `# expect:` lines at its top).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::Path;
use std::time::Duration;

use super::*;

const BAD_FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bad");

/// A valid one-rule catalog.
const CATALOG: &str = r#"
[[rule]]
name   = "example"
hosts  = ["a.example"]
ports  = [443]
action = "allow"
"#;

type Env = Vec<(String, String)>;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

/// A config and catalog written into a fresh folder, loaded as `run` would.
struct Loaded {
    result: Result<Settings, ConfigErrors>,
    dir: tempfile::TempDir,
}

impl Loaded {
    fn errors(&self) -> Vec<String> {
        match &self.result {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    fn settings(&self) -> &Settings {
        match &self.result {
            Ok(s) => s,
            Err(e) => panic!("must load:\n{e}"),
        }
    }
}

/// Write `egress-proxy.toml` and `catalog.toml` (plus `files`, relative to
/// the folder) and load the config with `env`.
fn load_with(config: &str, catalog: &str, files: &[&str], env: Env) -> Loaded {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("egress-proxy.toml");
    std::fs::write(&cfg, config).expect("write config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    for f in files {
        std::fs::write(dir.path().join(f), "placeholder").expect("write file");
    }
    let result = Settings::from_toml(ConfigSource::File(cfg), config, env);
    Loaded { result, dir }
}

fn load(config: &str, catalog: &str) -> Loaded {
    load_with(config, catalog, &[], Vec::new())
}

// === one case per error ===

/// A config (with its catalog and environment) that must fail, and the
/// substrings its errors must contain.
struct Bad {
    name: &'static str,
    config: &'static str,
    catalog: &'static str,
    files: &'static [&'static str],
    env: Env,
    expect: &'static [&'static str],
}

fn bad(name: &'static str, config: &'static str, expect: &'static [&'static str]) -> Bad {
    Bad {
        name,
        config,
        catalog: CATALOG,
        files: &[],
        env: Vec::new(),
        expect,
    }
}

impl Bad {
    fn catalog(mut self, catalog: &'static str) -> Self {
        self.catalog = catalog;
        self
    }

    fn files(mut self, files: &'static [&'static str]) -> Self {
        self.files = files;
        self
    }

    fn env(mut self, pairs: &[(&str, &str)]) -> Self {
        self.env = env(pairs);
        self
    }
}

const CLIENT_CERT_BYPASS: &str = r#"
[[rule]]
name        = "licence"
hosts       = ["applianceupdate.example"]
ports       = [443]
action      = "bypass"
client_cert = { cert = "client.pem", key = "client.key" }
"#;

const CLIENT_CERT_ALLOW: &str = r#"
[[rule]]
name        = "licence"
hosts       = ["applianceupdate.example"]
ports       = [443]
action      = "allow"
client_cert = { cert = "client.pem", key = "client.key" }
"#;

const WITH_CA: &str = "[tls]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n";

fn bad_cases() -> Vec<Bad> {
    vec![
        bad(
            "unknown key in a section",
            "[server]\nlisen = [\"127.0.0.1:3128\"]\n",
            &["egress-proxy.toml", "unknown field `lisen`", "expected one of `listen`", "for key `server`"],
        ),
        bad(
            "unknown section",
            "[srever]\nlisten = [\"127.0.0.1:3128\"]\n",
            &["egress-proxy.toml", "unknown field `srever`", "expected one of `server`"],
        ),
        bad("unknown key from the environment", "", &["unknown field `bogus`", "for key `server`"])
            .env(&[("EGRESS_PROXY__SERVER__BOGUS", "1")]),
        bad(
            "badly typed value from the environment",
            "",
            &["limits.max_header_bytes", "in the environment", "expected an integer"],
        )
        .env(&[("EGRESS_PROXY__LIMITS__MAX_HEADER_BYTES", "lots")]),
        bad(
            "bad CIDR in clients.allow",
            "[clients]\nallow = [\"10.0.0.0/33\"]\n",
            &["egress-proxy.toml: clients.allow: \"10.0.0.0/33\" is not an address or CIDR; write e.g. \"10.0.0.0/8\""],
        ),
        bad(
            "host bits in clients.allow",
            "[clients]\nallow = [\"10.1.2.3/8\"]\n",
            &["clients.allow: \"10.1.2.3/8\" has host bits set; write \"10.0.0.0/8\""],
        ),
        bad(
            "proxy_protocol without proxy_protocol_from",
            "[server]\nproxy_protocol = true\n",
            &["egress-proxy.toml: server.proxy_protocol_from: required with proxy_protocol = true", "proxy_protocol_from = [\"10.0.0.2/32\"]"],
        ),
        bad(
            "bad CIDR in server.proxy_protocol_from",
            "[server]\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.300\"]\n",
            &["server.proxy_protocol_from: \"10.0.0.300\" is not an address or CIDR"],
        ),
        bad(
            "bad CIDR in dns.allow_private",
            "[dns]\nallow_private = [\"fd00::/129\"]\n",
            &["dns.allow_private: \"fd00::/129\" is not an address or CIDR; write e.g."],
        ),
        bad(
            "bad IP in dns.static",
            "[dns]\nstatic = { \"repo.example\" = [\"10.0.0\"] }\n",
            &["dns.static.\"repo.example\": \"10.0.0\" is not an IP address; write e.g. \"127.0.0.1\""],
        ),
        bad(
            "no addresses in dns.static",
            "[dns]\nstatic = { \"repo.example\" = [] }\n",
            &["dns.static.\"repo.example\": no addresses; give at least one"],
        ),
        bad(
            "wildcard name in dns.static",
            "[dns]\nstatic = { \"*.example\" = [\"127.0.0.1\"] }\n",
            &["dns.static.\"*.example\": not a host name; write a DNS name such as"],
        ),
        bad(
            "bad nameserver",
            "[dns]\nnameservers = [\"resolver.example\"]\n",
            &["dns.nameservers: \"resolver.example\" is not an address with a port"],
        ),
        bad(
            "listen address is a name",
            "[server]\nlisten = [\"localhost:3128\"]\n",
            &["server.listen: \"localhost:3128\" is not an address with a port; write \"127.0.0.1:3128\" or \"[::1]:3128\""],
        ),
        bad(
            "listen address without a port",
            "[server]\nlisten = [\"127.0.0.1\"]\n",
            &["server.listen: \"127.0.0.1\" is not an address with a port"],
        ),
        bad(
            "no listen address",
            "[server]\nlisten = []\n",
            &["server.listen: no listen address; write listen = [\"127.0.0.1:3128\"]"],
        ),
        bad(
            "bad admin listen address",
            "[server]\nadmin_listen = \"9090\"\n",
            &["server.admin_listen: \"9090\" is not an address with a port"],
        ),
        bad(
            "bad duration",
            "[limits]\nconnect_timeout = \"10 parsecs\"\n",
            &["limits.connect_timeout: \"10 parsecs\" is not a duration", "write a duration such as \"10s\", \"5m\" or \"1h\""],
        ),
        bad(
            "duration without a unit",
            "[server]\nshutdown_grace = \"30\"\n",
            &["server.shutdown_grace: \"30\" is not a duration", "write a duration such as"],
        ),
        bad(
            "zero duration",
            "[limits]\ntunnel_idle_timeout = \"0s\"\n",
            &["limits.tunnel_idle_timeout: must be more than zero; write e.g. \"10s\""],
        ),
        bad(
            "zero connections per client",
            "[limits]\nper_client_connections = 0\n",
            &["limits.per_client_connections: must be at least 1"],
        ),
        bad(
            "header limit out of range",
            "[limits]\nmax_header_bytes = 1024\n",
            &["limits.max_header_bytes: 1024 is out of range; write a value from 8192 to 1048576"],
        ),
        bad(
            "bad rate",
            "[rates]\nper_client_requests = \"fast\"\n",
            &["rates.per_client_requests: \"fast\" is not a rate; write e.g. \"50/s\", \"600/m\" or \"10/5s\""],
        ),
        bad(
            "zero rate",
            "[rates]\nper_client_tunnels = \"0/s\"\n",
            &["rates.per_client_tunnels: \"0/s\" is not a rate"],
        ),
        bad(
            "unknown policy.default",
            "[policy]\ndefault = \"allow\"\n",
            &["policy.default: unknown value \"allow\"; write \"deny\" or \"report\""],
        ),
        bad(
            "unknown policy.default from the environment",
            "",
            &["policy.default: unknown value \"permissive\"; write \"deny\" or \"report\""],
        )
        .env(&[("EGRESS_PROXY__POLICY__DEFAULT", "permissive")]),
        bad(
            "unknown audit format",
            "[audit]\nformat = \"csv\"\n",
            &["audit.format: unknown format \"csv\"; write \"json\" or \"squid\""],
        ),
        bad(
            "bad syslog address",
            "[audit]\nsyslog = \"127.0.0.1:514\"\n",
            &["audit.syslog: \"127.0.0.1:514\" is not a syslog address; write \"udp://host:514\", \"tcp://host:514\" or \"tls://host:6514\""],
        ),
        bad(
            "syslog client certificate without tls://",
            "[audit]\nsyslog = \"tcp://127.0.0.1:514\"\nsyslog_client_cert = { cert = \"c.pem\", key = \"c.key\" }\n",
            &["audit.syslog_client_cert: only presented to a tls:// syslog server"],
        ),
        bad(
            "CA certificate without its key",
            "[tls]\nca_cert = \"ca.pem\"\n",
            &["tls: set both ca_cert and ca_key to enable inspection, or neither"],
        ),
        bad(
            "auth user without a PHC hash",
            "[auth]\nusers = { gateway = \"hunter2\" }\n",
            &["auth.users.gateway: not a PHC hash string; generate one with `egress-proxy auth hash`"],
        ),
        bad(
            "missing catalog file",
            "[policy]\ncatalog = \"no-such-catalog.toml\"\n",
            &["policy.catalog: cannot read", "no-such-catalog.toml", "point policy.catalog at the catalog TOML file"],
        ),
        bad("unparsable catalog", "", &["catalog.toml: cannot parse the catalog"]).catalog("[[rule]\nname = \"x\"\n"),
        bad("catalog rule error through the config", "", &["catalog.toml: rule #1 \"zero\": ports: 0 is not a port"])
            .catalog("[[rule]]\nname = \"zero\"\nhosts = [\"a.example\"]\nports = [0]\naction = \"allow\"\n"),
        bad(
            "client_cert on a bypass rule",
            WITH_CA,
            &["catalog.toml: rule #1 \"licence\"", "client_cert is only presented when the proxy inspects the tunnel", "set action = \"allow\""],
        )
        .catalog(CLIENT_CERT_BYPASS)
        .files(&["client.pem", "client.key"]),
        bad(
            "client_cert without a CA",
            "",
            &["catalog.toml: rule #1 \"licence\"", "client_cert is only presented when the proxy inspects the tunnel", "configure the CA"],
        )
        .catalog(CLIENT_CERT_ALLOW)
        .files(&["client.pem", "client.key"]),
        bad(
            "a rule naming an unknown client group",
            "[clients.groups]\nweb = [\"127.0.0.1/32\"]\n",
            &["catalog.toml: rule #1 \"example\": clients", "unknown client group \"mail\"", "[clients.groups]"],
        )
        .catalog(SCOPED_TO_MAIL),
        bad(
            "a client group with a bad name, no entries, a bad CIDR",
            "[clients.groups]\n\"web gw\" = [\"127.0.0.1/32\"]\nempty = []\nbad = [\"10.0.0.1/8\"]\n",
            &["clients.groups.web gw: a group name is letters", "clients.groups.empty: empty", "clients.groups.bad: \"10.0.0.1/8\" has host bits set"],
        ),
        bad(
            "a client group naming a user without [auth]",
            "[clients.groups]\nweb = [\"user:webgw\"]\n",
            &["clients.groups.web", "\"user:webgw\": no such user in [auth] users"],
        ),
    ]
}

const SCOPED_TO_MAIL: &str = r#"
[[rule]]
name    = "example"
hosts   = ["a.example"]
ports   = [443]
action  = "allow"
clients = ["mail"]
"#;

#[test]
fn client_groups_load_and_compile_into_the_policy() {
    let config = "[auth]\nusers = { mailgw = \"$argon2id$x\" }\n[clients.groups]\nmail = [\"127.0.0.2/32\", \"user:mailgw\"]\nfar = [\"10.9.0.0/16\"]\n";
    let loaded = load(config, SCOPED_TO_MAIL);
    let s = loaded.settings();
    let g = s.policy.client_groups();
    assert_eq!(g.groups().len(), 2);
    let mail = s.policy.groups_of("127.0.0.2".parse().unwrap(), None);
    assert_eq!(g.names(mail).as_deref(), Some("mail"));
    let by_user = s
        .policy
        .groups_of("127.0.0.1".parse().unwrap(), Some("mailgw"));
    assert_eq!(g.names(by_user).as_deref(), Some("mail"));
    // A CIDR outside clients.allow can never match a connected client.
    assert!(
        s.warnings
            .iter()
            .any(|w| w.contains("clients.groups.far: 10.9.0.0/16 is outside clients.allow")),
        "{:?}",
        s.warnings
    );
    // A reload that recompiles (inspection kept as running) keeps the groups.
    let again = load(config, SCOPED_TO_MAIL).result.unwrap();
    let kept = again.keeping_restart_only(s);
    assert_eq!(kept.policy.client_groups().groups().len(), 2);
}

#[test]
fn each_error_names_the_fault_and_the_fix() {
    let cases = bad_cases();
    let mut failures = Vec::new();
    for c in cases {
        let loaded = load_with(c.config, c.catalog, c.files, c.env.clone());
        let errors = loaded.errors();
        if errors.is_empty() {
            failures.push(format!("{}: loaded, but must fail", c.name));
            continue;
        }
        let text = errors.join("\n");
        for want in c.expect {
            if !text.contains(want) {
                failures.push(format!("{}: no {want:?} in:\n{text}", c.name));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn error_locations_name_each_file_once() {
    // A catalog error is located in the catalog, not "config: catalog: …".
    let loaded = load_with(
        WITH_CA,
        CLIENT_CERT_BYPASS,
        &["client.pem", "client.key"],
        Vec::new(),
    );
    let errors = loaded.errors();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &loaded.result.as_ref().expect_err("must fail").0[0];
    assert!(
        e.location
            .ends_with("catalog.toml: rule #1 \"licence\": client_cert"),
        "{e:?}"
    );
    assert!(!e.location.contains("egress-proxy.toml"), "{e:?}");
}

#[test]
fn client_cert_on_an_inspected_allow_rule_loads() {
    let loaded = load_with(
        WITH_CA,
        CLIENT_CERT_ALLOW,
        &["client.pem", "client.key"],
        Vec::new(),
    );
    let s = loaded.settings();
    let rule = &s.policy.rules()[0];
    let (cert, key) = rule.client_cert.clone().expect("client_cert kept");
    assert_eq!(cert, loaded.dir.path().join("client.pem"));
    assert_eq!(key, loaded.dir.path().join("client.key"));
}

// === every error in one load ===

#[test]
fn every_error_is_reported_in_one_load() {
    let config = r#"
[server]
listen = ["localhost:3128"]
[clients]
allow = ["10.0.0.0/33"]
[limits]
connect_timeout = "soon"
[policy]
default = "allow"
"#;
    let catalog = r#"
[[rule]]
name   = "zero"
hosts  = ["a.example"]
ports  = [0]
action = "allow"

[[rule]]
name   = "upper"
hosts  = ["Example.COM"]
ports  = [443]
action = "permit"
"#;
    let loaded = load(config, catalog);
    let errors = loaded.errors();
    let want = [
        "server.listen: \"localhost:3128\"",
        "clients.allow: \"10.0.0.0/33\"",
        "limits.connect_timeout: \"soon\"",
        "policy.default: unknown value \"allow\"",
        "rule #1 \"zero\": ports: 0 is not a port",
        "rule #2 \"upper\": hosts: \"Example.COM\" is not normalised",
        "rule #2 \"upper\": action: unknown action \"permit\"",
    ];
    for w in want {
        assert!(
            errors.iter().any(|e| e.contains(w)),
            "no {w:?} in {errors:#?}"
        );
    }
    assert_eq!(errors.len(), want.len(), "{errors:#?}");
}

#[test]
fn config_errors_are_kept_when_the_catalog_is_missing() {
    let loaded = load(
        "[server]\nlisten = [\"nowhere\"]\n[policy]\ncatalog = \"missing.toml\"\n",
        CATALOG,
    );
    let errors = loaded.errors();
    assert!(
        errors.iter().any(|e| e.contains("server.listen")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("policy.catalog: cannot read")),
        "{errors:#?}"
    );
}

#[test]
fn client_cert_errors_are_reported_with_other_errors() {
    let config = "[server]\nlisten = [\"nowhere\"]\n";
    let loaded = load_with(
        config,
        CLIENT_CERT_BYPASS,
        &["client.pem", "client.key"],
        Vec::new(),
    );
    let errors = loaded.errors();
    assert!(
        errors.iter().any(|e| e.contains("server.listen")),
        "{errors:#?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.contains("client_cert is only presented")),
        "{errors:#?}"
    );
}

#[test]
fn errors_display_one_per_line() {
    let loaded = load("[server]\nlisten = [\"a\", \"b\"]\n", CATALOG);
    let e = loaded.result.as_ref().expect_err("must fail");
    assert_eq!(e.0.len(), 2);
    assert_eq!(e.to_string().lines().count(), 2, "{e}");
}

// === catalogs that must fail to load ===

/// The `# expect:` lines at the top of a fixture.
fn expectations(text: &str) -> Vec<&str> {
    text.lines()
        .map_while(|l| l.strip_prefix("# expect:"))
        .map(str::trim)
        .collect()
}

fn bad_fixtures() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(BAD_FIXTURES)
        .expect("tests/fixtures/bad")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let name = p
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            let text = std::fs::read_to_string(&p).expect("read fixture");
            (name, text)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_bad_fixture_fails_with_its_expected_error() {
    let fixtures = bad_fixtures();
    assert!(
        fixtures.len() >= 30,
        "only {} fixtures in {BAD_FIXTURES}",
        fixtures.len()
    );
    let mut failures = Vec::new();
    for (name, text) in &fixtures {
        let expect = expectations(text);
        if expect.is_empty() {
            failures.push(format!("{name}: no `# expect: …` line at the top"));
            continue;
        }
        match parse_catalog(name, text, Path::new(BAD_FIXTURES)) {
            Ok(specs) => failures.push(format!(
                "{name}: loaded {} rules, but must fail",
                specs.len()
            )),
            Err(errors) => {
                let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
                let shown = shown.join("\n");
                if !shown.starts_with(name.as_str()) {
                    failures.push(format!("{name}: error does not name the file:\n{shown}"));
                }
                for want in &expect {
                    if !shown.contains(want) {
                        failures.push(format!("{name}: no {want:?} in:\n{shown}"));
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn bad_fixtures_fail_through_the_config_too() {
    for (name, text) in bad_fixtures() {
        let path = Path::new(BAD_FIXTURES).join(&name);
        let config = format!("[policy]\ncatalog = {:?}\n", path.display().to_string());
        let loaded = load(&config, CATALOG);
        let errors = loaded.errors().join("\n");
        for want in expectations(&text) {
            assert!(errors.contains(want), "{name}: no {want:?} in:\n{errors}");
        }
    }
}

// === environment overrides ===

#[test]
fn environment_overrides_scalars() {
    let loaded = load_with(
        "",
        CATALOG,
        &[],
        env(&[
            ("EGRESS_PROXY__LIMITS__CONNECT_TIMEOUT", "3s"),
            ("EGRESS_PROXY__POLICY__DEFAULT", "report"),
            ("EGRESS_PROXY__SERVER__VIA", "true"),
            ("EGRESS_PROXY__SERVER__SPLICE_PIPES", "0"),
            ("EGRESS_PROXY__STATUS__DENIALS_KEPT", "7"),
            ("UNRELATED", "ignored"),
        ]),
    );
    let s = loaded.settings();
    assert_eq!(s.limits.connect_timeout, Duration::from_secs(3));
    assert_eq!(s.policy_settings.default, DefaultAction::Report);
    assert_eq!(s.policy.default_action(), DefaultAction::Report);
    assert!(s.server.via);
    assert_eq!(s.server.splice_pipes, Some(0));
    assert_eq!(s.denials_kept, 7);
}

#[test]
fn environment_overrides_beat_the_file() {
    let loaded = load_with(
        "[limits]\nconnect_timeout = \"20s\"\n[policy]\ndefault = \"deny\"\n",
        CATALOG,
        &[],
        env(&[
            ("EGRESS_PROXY__LIMITS__CONNECT_TIMEOUT", "3s"),
            ("EGRESS_PROXY__POLICY__DEFAULT", "report"),
        ]),
    );
    let s = loaded.settings();
    assert_eq!(s.limits.connect_timeout, Duration::from_secs(3));
    assert_eq!(s.policy.default_action(), DefaultAction::Report);
}

#[test]
fn environment_lists_are_comma_separated() {
    let loaded = load_with(
        "",
        CATALOG,
        &[],
        env(&[
            ("EGRESS_PROXY__SERVER__LISTEN", "127.0.0.1:1,127.0.0.1:2"),
            ("EGRESS_PROXY__CLIENTS__ALLOW", "10.0.0.0/8"),
        ]),
    );
    let s = loaded.settings();
    let want: Vec<SocketAddr> = vec![
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    ];
    assert_eq!(s.server.listen, want);
    assert_eq!(s.clients, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
}

#[test]
fn proxy_protocol_from_takes_cidrs_from_the_file_or_the_environment() {
    let loaded = load(
        "[server]\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.2\", \"10.0.1.0/24\"]\n",
        CATALOG,
    );
    let want: Vec<IpNet> = vec![
        "10.0.0.2/32".parse().unwrap(),
        "10.0.1.0/24".parse().unwrap(),
    ];
    assert_eq!(loaded.settings().server.proxy_protocol_from, want);
    let loaded = load_with(
        "[server]\nproxy_protocol = true\n",
        CATALOG,
        &[],
        env(&[(
            "EGRESS_PROXY__SERVER__PROXY_PROTOCOL_FROM",
            "10.0.0.2/32,10.0.1.0/24",
        )]),
    );
    assert_eq!(loaded.settings().server.proxy_protocol_from, want);
}

#[test]
fn a_reload_keeps_the_running_ca_and_proxy_protocol() {
    let with_ca = load_with(WITH_CA, CATALOG, &["ca.pem", "ca.key"], Vec::new());
    let plain = load(
        "[server]\nproxy_protocol = true\nproxy_protocol_from = [\"10.0.0.2/32\"]\n",
        CATALOG,
    );
    let (with_ca, plain) = (with_ca.settings(), plain.settings());
    // Running with a CA, reloading a file without one (and with PROXY on).
    let kept = plain.clone().keeping_restart_only(with_ca);
    assert_eq!(kept.tls.ca_cert, with_ca.tls.ca_cert);
    assert!(kept.tls.inspection_enabled() && kept.policy.inspection_enabled());
    assert!(!kept.server.proxy_protocol && kept.server.proxy_protocol_from.is_empty());
    // And the other way round.
    let kept = with_ca.clone().keeping_restart_only(plain);
    assert!(!kept.tls.inspection_enabled() && !kept.policy.inspection_enabled());
    assert!(kept.server.proxy_protocol);
    assert_eq!(
        kept.server.proxy_protocol_from,
        plain.server.proxy_protocol_from
    );
    assert_eq!(kept.policy.rules(), plain.policy.rules());
}

#[test]
fn environment_string_that_looks_like_a_number_stays_a_string() {
    let loaded = load_with(
        "",
        CATALOG,
        &[],
        env(&[("EGRESS_PROXY__AUDIT__PATH", "1234")]),
    );
    let s = loaded.settings();
    assert_eq!(
        s.audit.path,
        AuditPath::File(loaded.dir.path().join("1234"))
    );
}

// === paths, defaults, the built-in configuration ===

#[test]
fn relative_catalog_path_is_resolved_against_the_config_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc");
    let rules = dir.path().join("rules");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(rules.join("mine.toml"), CATALOG).unwrap();
    let config = "[policy]\ncatalog = \"../rules/mine.toml\"\n";
    let cfg = etc.join("egress-proxy.toml");
    std::fs::write(&cfg, config).unwrap();
    let s = Settings::from_toml(ConfigSource::File(cfg), config, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        s.policy_settings.catalog,
        Some(etc.join("../rules/mine.toml"))
    );
    assert_eq!(s.policy.rules().len(), 1);
    assert_eq!(s.policy.rules()[0].name, "example");
}

#[test]
fn absolute_catalog_path_is_kept() {
    let other = tempfile::tempdir().expect("tempdir");
    let catalog = other.path().join("abs.toml");
    std::fs::write(&catalog, CATALOG).unwrap();
    let config = format!("[policy]\ncatalog = {:?}\n", catalog.display().to_string());
    let loaded = load(&config, "this catalog is not read");
    assert_eq!(loaded.settings().policy_settings.catalog, Some(catalog));
}

#[test]
fn other_relative_paths_are_resolved_against_the_config_folder() {
    let loaded = load(
        "[tls]\nca_cert = \"certs/ca.pem\"\nca_key = \"/abs/ca.key\"\nextra_roots = [\"roots.pem\"]\n[audit]\npath = \"log/audit.log\"\n",
        CATALOG,
    );
    let s = loaded.settings();
    let d = loaded.dir.path();
    assert_eq!(s.tls.ca_cert, Some(d.join("certs/ca.pem")));
    assert_eq!(s.tls.ca_key, Some(PathBuf::from("/abs/ca.key")));
    assert_eq!(s.tls.extra_roots, vec![d.join("roots.pem")]);
    assert_eq!(s.audit.path, AuditPath::File(d.join("log/audit.log")));
    assert!(s.tls.inspection_enabled());
    assert!(s.policy.inspection_enabled());
}

#[test]
fn an_empty_config_file_gets_the_defaults() {
    let loaded = load("", CATALOG);
    let s = loaded.settings();
    assert_eq!(
        s.server.listen,
        vec!["127.0.0.1:3128".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        s.server.admin_listen,
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(s.server.shutdown_grace, Duration::from_secs(30));
    assert_eq!(s.server.shutdown_delay, Duration::ZERO);
    assert_eq!(s.server.splice_pipes, None, "derived at start");
    assert_eq!(s.clients.len(), 2);
    assert_eq!(s.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(s.limits.tunnel_idle_timeout, Duration::from_secs(3600));
    assert_eq!(s.limits.max_header_bytes, 65_536);
    assert_eq!(s.rates, Rates::default());
    assert_eq!(s.policy_settings.default, DefaultAction::Deny);
    assert_eq!(
        s.policy_settings.catalog,
        Some(loaded.dir.path().join("catalog.toml"))
    );
    assert_eq!(s.audit.path, AuditPath::Stdout);
    assert_eq!(s.audit.format, AuditFormat::Json);
    assert_eq!(s.denials_kept, 1000);
    assert!(!s.tls.inspection_enabled());
}

#[test]
fn builtin_default_loads_with_the_shipped_catalog() {
    let s = Settings::from_toml(ConfigSource::Builtin, BUILTIN_CONFIG, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.source, ConfigSource::Builtin);
    assert_eq!(s.policy_settings.catalog, None);
    assert_eq!(s.policy.rules().len(), 12);
    assert!(s.warnings.is_empty(), "{:#?}", s.warnings);
    let want = parse_catalog("catalog.toml", BUILTIN_CATALOG, Path::new("."))
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(s.policy.rules(), want.as_slice());
}

#[test]
fn shipped_config_file_loads_the_same_rules_as_the_builtin() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
    let text = std::fs::read_to_string(&path).expect("shipped config");
    assert_eq!(text, BUILTIN_CONFIG);
    let file = Settings::from_toml(ConfigSource::File(path), &text, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let builtin = Settings::from_toml(ConfigSource::Builtin, BUILTIN_CONFIG, Vec::new())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(file.policy.hash(), builtin.policy.hash());
    assert_eq!(file.policy.rules().len(), 12);
}

#[test]
fn load_with_a_path_reads_that_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("proxy.toml");
    std::fs::write(&cfg, "[policy]\ndefault = \"report\"\n").unwrap();
    std::fs::write(dir.path().join("catalog.toml"), CATALOG).unwrap();
    let s = Settings::load(Some(&cfg), Vec::new()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.source, ConfigSource::File(cfg));
    assert_eq!(s.policy.default_action(), DefaultAction::Report);
}

#[test]
fn load_of_a_missing_file_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope.toml");
    let e = Settings::load(Some(&missing), Vec::new()).expect_err("must fail");
    assert!(e.to_string().contains("nope.toml"), "{e}");
}

#[test]
fn shadowed_rules_become_warnings_naming_the_catalog() {
    let catalog = r#"
[[rule]]
name   = "first"
hosts  = ["a.example"]
ports  = [443]
action = "allow"

[[rule]]
name   = "second"
hosts  = ["a.example"]
ports  = [443]
action = "deny"
"#;
    let loaded = load("", catalog);
    let w = &loaded.settings().warnings;
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(
        w[0].contains("catalog.toml: warning: rule #1 \"first\" never decides anything"),
        "{w:#?}"
    );
}

#[test]
fn a_wildcard_over_a_public_suffix_is_a_warning() {
    let catalog = r#"
[[rule]]
name   = "cdn"
hosts  = ["*.cloudfront.net", "*.example.co.uk"]
ports  = [443]
action = "allow"

[[rule]]
name   = "uk"
hosts  = ["*.co.uk"]
ports  = [443]
action = "bypass"

[[rule]]
name   = "never github pages"
hosts  = ["*.github.io"]
ports  = [443]
action = "deny"
"#;
    let loaded = load("", catalog);
    let w = &loaded.settings().warnings;
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w[0].contains("rule #1 \"cdn\" host \"*.cloudfront.net\" covers the whole public suffix cloudfront.net")
            && w[0].contains("anyone can register a name under it"),
        "{w:#?}"
    );
    assert!(w[1].contains("rule #2 \"uk\" host \"*.co.uk\""), "{w:#?}");
}

#[test]
fn log_query_defaults_by_format() {
    let s = load("[audit]\nformat = \"squid\"\n", "");
    assert!(!s.settings().audit.log_query);
    let s = load("[audit]\nformat = \"squid\"\nlog_query = true\n", "");
    assert!(s.settings().audit.log_query);
    let s = load("", "");
    assert!(s.settings().audit.log_query);
    let s = load("[audit]\nlog_query = false\n", "");
    assert!(!s.settings().audit.log_query);
}

// === durations and rates ===

#[test]
fn durations_parse() {
    for (text, want) in [
        ("10s", Duration::from_secs(10)),
        ("5m", Duration::from_secs(300)),
        ("1h", Duration::from_secs(3600)),
        ("250ms", Duration::from_millis(250)),
        (" 30s ", Duration::from_secs(30)),
        ("1m 30s", Duration::from_secs(90)),
    ] {
        assert_eq!(parse_duration(text), Ok(want), "{text:?}");
    }
    for text in ["", "10", "ten seconds", "-1s", "10x"] {
        let e = parse_duration(text).expect_err(text);
        assert!(e.contains("is not a duration"), "{text:?}: {e}");
    }
}

#[test]
fn rates_parse() {
    let rate = |count, secs| Rate {
        count,
        per: Duration::from_secs(secs),
    };
    for (text, want) in [
        ("50/s", rate(50, 1)),
        ("600/m", rate(600, 60)),
        ("1000/h", rate(1000, 3600)),
        ("10/5s", rate(10, 5)),
        (" 7 / s ", rate(7, 1)),
    ] {
        assert_eq!(parse_rate(text), Ok(want), "{text:?}");
    }
    for text in [
        "0/s",
        "x/s",
        "5",
        "5/",
        "/s",
        "5/0s",
        "5/fortnight",
        "-5/s",
        "5/s/s",
    ] {
        let e = parse_rate(text).expect_err(text);
        assert!(
            e.contains("is not a rate; write e.g. \"50/s\""),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn cidrs_parse() {
    assert_eq!(parse_cidr("10.0.0.0/8"), Ok("10.0.0.0/8".parse().unwrap()));
    assert_eq!(parse_cidr("192.0.2.7"), Ok("192.0.2.7/32".parse().unwrap()));
    assert_eq!(parse_cidr("::1"), Ok("::1/128".parse().unwrap()));
    assert!(parse_cidr("10.0.0.1/8")
        .unwrap_err()
        .contains("write \"10.0.0.0/8\""));
    assert!(parse_cidr("ten")
        .unwrap_err()
        .contains("is not an address or CIDR"));
}
