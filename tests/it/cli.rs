//! The `check` and `explain` commands, run as the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

/// The shipped configuration, `config/egress-proxy.toml`.
fn shipped_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/egress-proxy.toml")
}

/// What one run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn assert_exit(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{}", self.show());
        self
    }

    fn assert_stdout(&self, want: &str) -> &Self {
        assert!(
            self.stdout.contains(want),
            "stdout lacks {want:?}\n{}",
            self.show()
        );
        self
    }

    fn assert_stderr(&self, want: &str) -> &Self {
        assert!(
            self.stderr.contains(want),
            "stderr lacks {want:?}\n{}",
            self.show()
        );
        self
    }
}

/// The packaged configuration: when it exists on this machine, discovery
/// finds it before `config/egress-proxy.toml`, so the tests of the later
/// steps cannot run (.ci/package-test.sh tests this step).
const SYSTEM_CONFIG: &str = "/etc/egress-proxy/egress-proxy.toml";

fn system_config_installed() -> bool {
    let there = Path::new(SYSTEM_CONFIG).exists();
    if there {
        println!("SKIP: {SYSTEM_CONFIG} exists here and is found first");
    }
    there
}

/// Run the binary in `cwd` with `args`, with none of the test process's
/// `EGRESS_PROXY__*` variables (nor `EGRESS_PROXY_CONFIG`) and only the
/// `extra_env` given.
fn run_in(cwd: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(cwd).env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("EGRESS_PROXY_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(extra_env.iter().copied());
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run egress-proxy");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Run with `--config` the shipped configuration, from a folder without one.
fn run_shipped(args: &[&str]) -> Run {
    let cwd = tempfile::tempdir().expect("tempdir");
    let config = shipped_config();
    let mut all = vec!["--config", config.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    run_in(cwd.path(), &all, &[])
}

/// A folder with `egress-proxy.toml` and `catalog.toml`.
fn config_dir(config: &str, catalog: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("egress-proxy.toml"), config).expect("write config");
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    dir
}

// === check ===

#[test]
fn check_accepts_the_shipped_config() {
    let run = run_shipped(&["check"]);
    run.assert_exit(0)
        .assert_stdout("rules:         12 (9 allow, 3 bypass)")
        .assert_stdout("Kaspersky KSN lookup")
        .assert_stdout("configuration OK");
    assert!(!run.stdout.contains("warning"), "{}", run.show());
}

#[test]
fn check_without_a_config_uses_the_builtin_default() {
    if system_config_installed() {
        return;
    }
    let cwd = tempfile::tempdir().expect("tempdir");
    run_in(cwd.path(), &["check"], &[])
        .assert_exit(0)
        .assert_stdout("built-in default")
        .assert_stdout("rules:         12 ")
        .assert_stdout("configuration OK")
        .assert_stderr("egress-proxy: configuration built-in default, catalog built-in\n");
}

#[test]
fn check_finds_config_egress_proxy_toml_in_the_working_directory() {
    if system_config_installed() {
        return;
    }
    let cwd = tempfile::tempdir().expect("tempdir");
    let config = cwd.path().join("config");
    std::fs::create_dir(&config).expect("mkdir");
    std::fs::write(config.join("egress-proxy.toml"), "").expect("write config");
    std::fs::write(
        config.join("catalog.toml"),
        "[[rule]]\nname = \"only\"\nhosts = [\"a.example\"]\nports = [443]\naction = \"allow\"\n",
    )
    .expect("write catalog");
    run_in(cwd.path(), &["check"], &[])
        .assert_exit(0)
        .assert_stdout("configuration: config/egress-proxy.toml")
        .assert_stdout("rules:         1 (1 allow)")
        .assert_stdout("configuration OK")
        .assert_stderr(
            "egress-proxy: configuration config/egress-proxy.toml, catalog config/catalog.toml\n",
        );
}

#[test]
fn egress_proxy_config_names_the_configuration_before_the_working_directory() {
    let dir = config_dir(
        "",
        "[[rule]]\nname = \"env\"\nhosts = [\"env.example\"]\nports = [443]\naction = \"allow\"\n",
    );
    // A config/egress-proxy.toml in the working directory that must not be read.
    std::fs::create_dir(dir.path().join("config")).expect("mkdir");
    std::fs::write(dir.path().join("config/egress-proxy.toml"), "not toml [").expect("write");
    let config = dir.path().join("egress-proxy.toml");
    let config = config.to_str().unwrap();
    let catalog = dir.path().join("catalog.toml");
    let used = format!(
        "egress-proxy: configuration {config}, catalog {}\n",
        catalog.display()
    );
    let env = [("EGRESS_PROXY_CONFIG", config)];
    run_in(dir.path(), &["check"], &env)
        .assert_exit(0)
        .assert_stdout("rules:         1 (1 allow)")
        .assert_stderr(&used);
    run_in(dir.path(), &["explain", "env.example:443"], &env)
        .assert_exit(0)
        .assert_stdout("rule:     env")
        .assert_stderr(&used);
    // --config still wins.
    let shipped = shipped_config();
    run_in(
        dir.path(),
        &["check", "--config", shipped.to_str().unwrap()],
        &env,
    )
    .assert_exit(0)
    .assert_stdout("rules:         12 ");
    // A name that is not there is an error, not a fall-back.
    run_in(
        dir.path(),
        &["check"],
        &[("EGRESS_PROXY_CONFIG", "/nonexistent/egress-proxy.toml")],
    )
    .assert_exit(1)
    .assert_stderr("/nonexistent/egress-proxy.toml");
}

#[test]
fn the_catalog_from_the_environment_is_honoured_with_the_builtin_config() {
    if system_config_installed() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("mine.toml"),
        "[[rule]]\nname = \"mine\"\nhosts = [\"mine.example\"]\nports = [443]\naction = \"allow\"\n",
    )
    .expect("write catalog");
    run_in(
        dir.path(),
        &["check"],
        &[("EGRESS_PROXY__POLICY__CATALOG", "mine.toml")],
    )
    .assert_exit(0)
    .assert_stdout("rules:         1 (1 allow)")
    .assert_stderr("egress-proxy: configuration built-in default, catalog mine.toml\n");
    run_in(
        dir.path(),
        &["check"],
        &[("EGRESS_PROXY__POLICY__CATALOG", "missing.toml")],
    )
    .assert_exit(1)
    .assert_stderr("missing.toml");
}

#[test]
fn check_into_a_closed_pipe_exits_0_without_a_panic() {
    for args in [&["check"][..], &["explain", "http://example.com/"][..]] {
        let config = shipped_config();
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        // Closed before the process writes (like `| head -0`).
        drop(child.stdout.take());
        let out = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?}\n{stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn version_names_the_version_and_the_commit() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let run = run_in(cwd.path(), &["--version"], &[]);
    run.assert_exit(0);
    let line = run.stdout.trim_end();
    let rest = line
        .strip_prefix(&format!(
            "egress-proxy {} (commit ",
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap_or_else(|| panic!("{line:?}"));
    let commit = rest.strip_suffix(')').unwrap_or_else(|| panic!("{line:?}"));
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{line:?}"
    );
}

#[test]
fn generate_writes_the_man_page_and_completions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().unwrap();
    run_in(dir.path(), &["generate", "man", "--out", out], &[]).assert_exit(0);
    let man = std::fs::read_to_string(dir.path().join("egress-proxy.1")).expect("egress-proxy.1");
    assert!(man.contains(".TH egress-proxy 1"), "{man}");
    assert!(man.contains("explain"), "{man}");
    assert!(
        !man.contains("generate"),
        "the hidden subcommand is in the man page"
    );
    for (shell, file) in [
        ("bash", "egress-proxy"),
        ("zsh", "_egress-proxy"),
        ("fish", "egress-proxy.fish"),
    ] {
        run_in(
            dir.path(),
            &["generate", "completions", shell, "--out", out],
            &[],
        )
        .assert_exit(0);
        let text = std::fs::read_to_string(dir.path().join(file)).expect(file);
        assert!(
            text.contains("explain") && text.contains("config"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn check_lists_every_error_of_a_broken_config() {
    let dir = config_dir(
        "[server]\nlisten = [\"localhost:3128\"]\n[limits]\nconnect_timeout = \"soon\"\n",
        "[[rule]]\nname = \"zero\"\nhosts = [\"a.example\"]\nports = [0]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"upper\"\nhosts = [\"Example.COM\"]\nports = [443]\naction = \"permit\"\n",
    );
    let config = dir.path().join("egress-proxy.toml");
    let run = run_in(
        dir.path(),
        &["check", "--config", config.to_str().unwrap()],
        &[],
    );
    run.assert_exit(1)
        .assert_stderr("invalid configuration")
        .assert_stderr("server.listen: \"localhost:3128\" is not an address with a port")
        .assert_stderr("limits.connect_timeout: \"soon\" is not a duration")
        .assert_stderr("rule #1 \"zero\": ports: 0 is not a port")
        .assert_stderr(
            "rule #2 \"upper\": hosts: \"Example.COM\" is not normalised; write \"example.com\"",
        )
        .assert_stderr("rule #2 \"upper\": action: unknown action \"permit\"");
    assert!(!run.stdout.contains("configuration OK"), "{}", run.show());
}

#[test]
fn check_of_a_missing_config_file_fails() {
    let cwd = tempfile::tempdir().expect("tempdir");
    run_in(cwd.path(), &["check", "--config", "no-such.toml"], &[])
        .assert_exit(1)
        .assert_stderr("no-such.toml");
}

#[test]
fn check_warns_about_a_shadowed_rule() {
    let dir = config_dir(
        "",
        "[[rule]]\nname = \"mirror\"\nhosts = [\"mirror.example\"]\nports = [80, 443]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"mirror again\"\nhosts = [\"mirror.example\"]\nports = [443]\naction = \"allow\"\n",
    );
    let config = dir.path().join("egress-proxy.toml");
    run_in(
        dir.path(),
        &["check", "--config", config.to_str().unwrap()],
        &[],
    )
    .assert_exit(0)
    .assert_stdout(
        "warning: rule #2 \"mirror again\" never decides anything: every host and port it names is decided by rule #1 \"mirror\"",
    )
    .assert_stdout("configuration OK");
}

#[test]
fn check_with_a_usage_error_exits_1() {
    // DESIGN.md: exit 1 for invalid configuration or usage.
    let run = run_shipped(&["check", "--no-such-flag"]);
    run.assert_exit(1).assert_stderr("--no-such-flag");
}

// === explain ===

#[test]
fn explain_an_uncatalogued_url() {
    run_shipped(&["explain", "http://example.com/"])
        .assert_exit(0)
        .assert_stdout("decision: deny")
        .assert_stdout("rule:     (none)")
        .assert_stdout("reason:   not_in_catalog");
}

#[test]
fn explain_a_bypassed_tunnel() {
    let run = run_shipped(&["explain", "ksn1.kaspersky-labs.com:443"]);
    run.assert_exit(0)
        .assert_stdout("CONNECT ksn1.kaspersky-labs.com:443")
        .assert_stdout("decision: bypass")
        .assert_stdout("rule:     Kaspersky KSN lookup")
        .assert_stdout("spliced untouched");
    assert!(!run.stdout.contains("reason:"), "{}", run.show());
}

#[test]
fn explain_normalises_the_target() {
    run_shipped(&["explain", "KSN1.Kaspersky-Labs.COM.:443"])
        .assert_exit(0)
        .assert_stdout("CONNECT ksn1.kaspersky-labs.com:443")
        .assert_stdout("decision: bypass");
}

#[test]
fn explain_a_catalogued_host_on_another_port() {
    run_shipped(&["explain", "http://repo.clearswift.net:8080/"])
        .assert_exit(0)
        .assert_stdout("decision: deny")
        .assert_stdout("reason:   port_not_allowed")
        .assert_stdout("also matched: \"Clearswift Update Server\": its host pattern matches, but not this port");
}

#[test]
fn explain_an_allowed_update_mirror() {
    run_shipped(&[
        "explain",
        "http://aav-update-1.clearswift.net/av/update.zip",
    ])
    .assert_exit(0)
    .assert_stdout("decision: allow")
    .assert_stdout("rule:     Avira AV Updates");
}

#[test]
fn explain_in_report_mode_from_the_environment() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let config = shipped_config();
    run_in(
        cwd.path(),
        &[
            "explain",
            "--config",
            config.to_str().unwrap(),
            "example.com:443",
        ],
        &[("EGRESS_PROXY__POLICY__DEFAULT", "report")],
    )
    .assert_exit(0)
    .assert_stdout("decision: report")
    .assert_stdout("reason:   not_in_catalog");
}

#[test]
fn explain_refuses_a_bad_target() {
    for bad in [
        "exa mple.com:443",
        "example.com",
        "ftp://example.com/",
        "https://user@example.com/",
        "user@example.com:443",
        "example.com:0",
        "[::1:443",
    ] {
        let run = run_shipped(&["explain", bad]);
        run.assert_exit(1).assert_stderr("egress-proxy: ");
        assert!(!run.stdout.contains("decision:"), "{bad}: {}", run.show());
    }
}

#[test]
fn explain_names_bad_request() {
    run_shipped(&["explain", "example.com:http"])
        .assert_exit(1)
        .assert_stderr("bad_request");
}

#[test]
fn explain_an_https_url_as_the_connect_the_gateway_sends() {
    let run = run_shipped(&["explain", "https://ksn1.kaspersky-labs.com/some/path?q=1"]);
    run.assert_exit(0)
        .assert_stdout("(CONNECT ksn1.kaspersky-labs.com:443)")
        .assert_stdout(
            "note:     an https:// URL: the gateway sends CONNECT ksn1.kaspersky-labs.com:443",
        )
        .assert_stdout("decision: bypass")
        .assert_stdout("rule:     Kaspersky KSN lookup");
    run_shipped(&["explain", "https://download.example.com/x"])
        .assert_exit(0)
        .assert_stdout("CONNECT download.example.com:443")
        .assert_stdout("reason:   not_in_catalog");
    run_shipped(&["explain", "HTTPS://repo.clearswift.net:8443/"])
        .assert_exit(0)
        .assert_stdout("CONNECT repo.clearswift.net:8443")
        .assert_stdout("reason:   port_not_allowed");
}

#[test]
fn explain_an_admitted_ip_literal_says_the_address_is_vetted() {
    let dir = config_dir(
        "",
        "[[rule]]\nname = \"literal\"\naddresses = [\"203.0.113.7/32\"]\nports = [443]\naction = \"allow\"\n\n\
         [[rule]]\nname = \"named\"\nhosts = [\"a.example\"]\nports = [443]\naction = \"allow\"\n",
    );
    let config = dir.path().join("egress-proxy.toml");
    let config = config.to_str().unwrap();
    let run = run_in(
        dir.path(),
        &["explain", "--config", config, "203.0.113.7:443"],
        &[],
    );
    run.assert_exit(0)
        .assert_stdout("decision: allow")
        .assert_stdout("then:     the address is vetted");
    assert!(!run.stdout.contains("resolved"), "{}", run.show());
    run_in(
        dir.path(),
        &["explain", "--config", config, "a.example:443"],
        &[],
    )
    .assert_exit(0)
    .assert_stdout("then:     the name is resolved and every address vetted");
}
