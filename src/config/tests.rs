#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

fn load(config: &str, catalog: &str, env: Vec<(String, String)>) -> Result<Settings, ConfigErrors> {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("egress-proxy.toml");
    std::fs::write(&cfg, config).unwrap();
    std::fs::write(dir.path().join("catalog.toml"), catalog).unwrap();
    Settings::from_toml(ConfigSource::File(cfg), config, env)
}

const CAT: &str = "[[rule]]\nname = \"a\"\nhosts = [\"a.test\"]\nports = [443]\naction = \"allow\"\n";

#[test]
fn probe() {
    for (cfg, cat, env) in [
        ("[server]\nlisen = []\n", CAT, vec![]),
        ("[serverx]\n", CAT, vec![]),
        ("", "[[rule]]\nname = \"a\"\nhots = [\"a.test\"]\nports = [443]\naction = \"allow\"\n", vec![]),
        ("", "[[rule]]\nname = \"a\"\nhosts = [\"a.test\"]\nports = [443.5]\naction = \"allow\"\n", vec![]),
        ("", "[[rule]]\nname = \"a\"\nhosts = [\"a.test\"]\nports = [true]\naction = \"allow\"\n", vec![]),
        ("", "[[rule]]\nname = \"a\"\nhosts = \"a.test\"\nports = [443]\naction = \"allow\"\n", vec![]),
        ("", "[[rule]\nname = \"a\"\n", vec![]),
        ("", CAT, vec![("EGRESS_PROXY__SERVER__BOGUS".into(), "1".into())]),
        ("", CAT, vec![("EGRESS_PROXY__LIMITS__MAX_HEADER_BYTES".into(), "lots".into())]),
        ("", CAT, vec![("EGRESS_PROXY__AUDIT__PATH".into(), "1234".into())]),
        ("", CAT, vec![("EGRESS_PROXY__DNS__STATIC".into(), "x".into())]),
        ("[limits]\nconnect_timeout = 10\n", CAT, vec![]),
        ("[tls]\nca_cert = \"ca.pem\"\nca_key = \"ca.key\"\n", "[[rule]]\nname = \"a\"\nhosts = [\"a.test\"]\nports = [443]\naction = \"bypass\"\nclient_cert = { cert = \"catalog.toml\", key = \"catalog.toml\" }\n", vec![]),
        ("", "[[rule]]\nname = \"a\"\nhosts = [\"*.Example.com\", \"bücher.example\", \"a.*.com\", \"example.*\", \"*\", \"1.2.3.4\", \"[::1]\", \"a..b\", \"-a.test\"]\nports = [443]\naction = \"allow\"\n", vec![]),
    ] {
        match load(cfg, cat, env) {
            Ok(s) => println!("OK {:?} {:?}", s.audit.path, s.warnings),
            Err(e) => println!("ERR\n{e}\n"),
        }
    }
}
