//! `egress-proxy import squid`: Squid configurations in the shapes Squid's
//! documentation shows (tests/fixtures/squid/), translated to a catalog that
//! `check` loads and that decides as the Squid configuration did.
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/squid")
        .join(name)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run");
    (
        out.status.success(),
        String::from_utf8(out.stdout).expect("utf-8"),
        String::from_utf8(out.stderr).expect("utf-8"),
    )
}

fn import(conf: &Path) -> String {
    let (ok, stdout, stderr) = run(&["import", "squid", conf.to_str().unwrap()]);
    assert!(ok, "import failed: {stderr}");
    stdout
}

/// Write `catalog` beside a config naming it; `check` must load it.
fn checked(catalog: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("catalog.toml"), catalog).unwrap();
    let cfg = dir.path().join("egress-proxy.toml");
    std::fs::write(&cfg, "[policy]\ncatalog = \"catalog.toml\"\n").unwrap();
    let (ok, stdout, stderr) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(
        ok,
        "the imported catalog does not load:\n{stderr}\n{catalog}"
    );
    assert!(stdout.contains("configuration OK"), "{stdout}");
    (dir, cfg)
}

fn decision(cfg: &Path, target: &str) -> String {
    let (_, stdout, stderr) = run(&["explain", "--config", cfg.to_str().unwrap(), target]);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("decision:"))
        .unwrap_or_else(|| panic!("{target}: {stdout}{stderr}"))
        .trim()
        .to_string()
}

#[test]
fn an_allowlist_squid_conf_becomes_a_catalog_that_decides_alike() {
    let toml = import(&fixture("allowlist.conf"));
    // `.windowsupdate.com` (from the quoted file): the apex and subdomains.
    assert!(
        toml.contains(r#"hosts = ["windowsupdate.com", "*.windowsupdate.com", "update.microsoft.com", "clearswift.net", "*.clearswift.net"]"#),
        "{toml}"
    );
    assert!(toml.contains(r#"addresses = ["203.0.113.7/32"]"#), "{toml}");
    // `deny !Safe_ports` narrows allow rules: 80 and 443 only.
    assert!(
        toml.contains("ports = [80, 443]\naction = \"allow\""),
        "{toml}"
    );
    // The included file (conf.d/*.conf): its port ACL, narrowed by Safe_ports.
    assert!(
        toml.contains(
            r#"hosts = ["licence.example.org", "*.licence.example.org", "licence.example.com"]"#
        ) && toml.contains("ports = [443]\naction = \"allow\""),
        "{toml}"
    );
    // dstdom_regex: plain suffixes translate, the rest is a comment.
    assert!(
        toml.contains(
            r#"hosts = ["*.kaspersky-labs.com", "avira.com", "*.avira.com", "ksn.example.net"]"#
        ),
        "{toml}"
    );
    assert!(
        toml.contains("ads[0-9]+"),
        "the regex left out is named: {toml}"
    );
    assert!(toml.contains("not a plain domain or suffix"), "{toml}");
    // Deny lines become deny rules; one after an allow says Squid differs.
    assert!(toml.contains("name = \"squid: blocked_sites\""), "{toml}");
    assert!(toml.contains("name = \"squid: telemetry\""), "{toml}");
    assert!(
        toml.contains("Squid applies the first matching line"),
        "{toml}"
    );
    // What could not be translated, and why.
    assert!(toml.contains("only to clients in localnet (src)"), "{toml}");
    assert!(toml.contains("# Not translated:"), "{toml}");
    assert!(
        toml.contains("http_access allow localnet\n#   only client ACLs"),
        "{toml}"
    );
    assert!(
        toml.contains("method ACL \"GET_only\" not translated"),
        "{toml}"
    );
    assert!(toml.contains("limits tunnels to ports 443"), "{toml}");

    let (_dir, cfg) = checked(&toml);
    for (target, want) in [
        ("windowsupdate.com:443", "allow"),
        ("download.windowsupdate.com:443", "allow"),
        ("http://update.microsoft.com/x", "allow"),
        ("update.microsoft.com:8080", "deny"),
        ("ads.windowsupdate.com:443", "deny"),
        ("www.clearswift.net:443", "allow"),
        ("ksn1.kaspersky-labs.com:443", "allow"),
        ("kaspersky-labs.com:443", "deny"),
        ("licence.example.org:443", "allow"),
        ("licence.example.org:8443", "deny"),
        ("example.org:443", "deny"),
    ] {
        assert_eq!(decision(&cfg, target), want, "{target}");
    }
}

#[test]
fn squids_default_configuration_translates_to_no_rules_and_says_why() {
    let toml = import(&fixture("default.conf"));
    assert!(!toml.contains("[[rule]]"), "{toml}");
    for line in [
        "http_access allow localnet\n#   only client ACLs",
        "http_access allow localhost manager\n#   Squid's built-in ACL \"localhost\"",
        "http_access deny manager\n#   Squid's built-in ACL \"manager\"",
    ] {
        assert!(toml.contains(line), "{line}: {toml}");
    }
    checked(&toml);
}

#[test]
fn absolute_quoted_files_and_includes_are_followed() {
    let dir = tempfile::tempdir().unwrap();
    let list = fixture("allowlist.txt");
    let inc = dir.path().join("more.conf");
    std::fs::write(
        &inc,
        "acl vendor dstdomain .vendor.example\nhttp_access allow vendor\n",
    )
    .unwrap();
    let conf = dir.path().join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "acl sites dstdomain \"{}\"\nacl web port 80 443\n\
             http_access allow sites web\ninclude {}\nhttp_access allow all\n",
            list.display(),
            inc.display()
        ),
    )
    .unwrap();
    let toml = import(&conf);
    assert!(toml.contains("\"*.windowsupdate.com\""), "{toml}");
    assert!(
        toml.contains(r#"hosts = ["vendor.example", "*.vendor.example"]"#),
        "{toml}"
    );
    assert!(
        toml.contains("ports = [\"1-65535\"]"),
        "no port restriction: {toml}"
    );
    assert!(
        toml.contains("Squid's line does not restrict ports"),
        "{toml}"
    );
    assert!(
        toml.contains("http_access allow all\n#   allow all"),
        "{toml}"
    );
    assert!(
        toml.contains("does not end with `http_access deny all`"),
        "{toml}"
    );
    checked(&toml);
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let (ok, _, stderr) = run(&["import", "squid", "/no/such/squid.conf"]);
    assert!(!ok);
    assert!(stderr.contains("/no/such/squid.conf"), "{stderr}");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("squid.conf");
    std::fs::write(&conf, "acl x dstdomain \"missing.txt\"\n").unwrap();
    let (ok, _, stderr) = run(&["import", "squid", conf.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("missing.txt"), "{stderr}");
}
