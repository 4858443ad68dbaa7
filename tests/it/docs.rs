//! The reference pages in docs/ against the code they describe: every
//! `--help` block of docs/cli.md is what the binary prints, every reason
//! is in docs/audit.md's table, and every key the shipped configuration
//! names is in docs/configuration.md.
use std::path::Path;
use std::process::Command;

use egress_proxy::audit::Reason;

const BIN: &str = env!("CARGO_BIN_EXE_egress-proxy");

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn every_help_block_in_cli_md_is_what_the_binary_prints() {
    let doc = read("docs/cli.md");
    let mut blocks = 0;
    let mut rest = doc.as_str();
    while let Some(start) = rest.find("```text\n$ egress-proxy ") {
        let block = &rest[start + "```text\n$ ".len()..];
        let end = block.find("\n```").expect("a closed block");
        let (command, shown) = block[..end].split_once('\n').expect("a command line");
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(BIN).args(&args).output().expect("run");
        assert!(out.status.success(), "{command}: {out:?}");
        let printed = String::from_utf8(out.stdout).expect("utf-8");
        assert_eq!(
            printed.trim_end(),
            shown,
            "docs/cli.md shows `{command}` differently from the binary: update the block"
        );
        blocks += 1;
        rest = &block[end..];
    }
    assert!(blocks >= 10, "docs/cli.md has {blocks} help blocks");
}

#[test]
fn audit_md_lists_every_reason() {
    let doc = read("docs/audit.md");
    for r in Reason::ALL {
        assert!(
            doc.contains(&format!("| `{}` |", r.as_str())),
            "docs/audit.md has no row for {}",
            r.as_str()
        );
    }
}

#[test]
fn configuration_md_lists_every_key_of_the_shipped_config() {
    let doc = read("docs/configuration.md");
    let shipped = read("config/egress-proxy.toml");
    let mut section = String::new();
    let mut keys = 0;
    for line in shipped.lines() {
        let line = line.trim();
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        // `key = value` and commented-out `# key = value` (keys with a
        // default of "unset"); a value starts like TOML, not like prose.
        let entry = line.strip_prefix('#').map_or(line, str::trim_start);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim_start());
        let is_key = !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
        let is_value = value.starts_with(['"', '[', '{', 't', 'f'])
            || value.starts_with(|c: char| c.is_ascii_digit());
        if !(is_key && is_value) {
            continue;
        }
        let heading = format!("## `[{section}]`");
        let at = doc
            .find(&heading)
            .unwrap_or_else(|| panic!("docs/configuration.md has no {heading} section"));
        let body = &doc[at + heading.len()..];
        let body = &body[..body.find("\n## ").unwrap_or(body.len())];
        assert!(
            body.contains(&format!("| `{key}` |")),
            "docs/configuration.md: no row for {section}.{key} under {heading}"
        );
        keys += 1;
    }
    assert!(
        keys >= 35,
        "only {keys} keys found in config/egress-proxy.toml"
    );
}
