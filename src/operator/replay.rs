//! `egress-proxy replay`: decide every transaction of an audit log again
//! under a proposed catalog, with the proxy's own [`Policy::decide`], and
//! say what would change.
//!
//! The proposed catalog is compiled with the running configuration's
//! `policy.default` and inspection setting, exactly as a reload would.
//! Each record's outcome is compared at the policy level:
//!
//! - `allow`/`inspect`, `bypass` and `report` records are re-decided, also
//!   when they then failed upstream (`dns_failure`, `timeout`, …): the record
//!   keeps the policy's decision, and that is what is compared;
//! - `deny` records are re-decided when the policy refused them
//!   (`not_in_catalog`, `port_not_allowed`, `method_not_allowed`,
//!   `deny_rule`, `ip_literal`);
//! - every other refusal depended on DNS, the upstream, the tunnel's bytes or
//!   the client (`private_address`, `pin_mismatch`, `sni_mismatch`,
//!   `auth_required`, `rate_limited`, …) and is reported as unchanged.
//!
//! Exit status (see `main`): 0 when nothing would be newly denied, 3 when
//! something would, 1 on bad input.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::audit::read::{self, Logged};
use crate::audit::Decided;
use crate::config::{self, Settings};
use crate::policy::{Policy, Verdict};
use crate::reason::{self, Reason};

/// A policy-level outcome class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    Allow,
    Bypass,
    Report,
    Deny,
}

impl Class {
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Allow => "allow",
            Class::Bypass => "bypass",
            Class::Report => "report",
            Class::Deny => "deny",
        }
    }
}

/// One side of a comparison: the class, the deciding rule, the reason.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Side {
    pub class: Class,
    pub rule: Option<String>,
    pub reason: Option<&'static str>,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.class.as_str())?;
        if let Some(r) = self.reason {
            write!(f, " {r}")?;
        }
        if let Some(r) = &self.rule {
            write!(f, " \"{r}\"")?;
        }
        Ok(())
    }
}

/// What kind of change a transaction would see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Change {
    /// Permitted before (allow, bypass, report), refused now.
    NewlyDenied,
    /// Refused or only reported before, let through by a rule now (or
    /// refused before and reported now).
    NewlyAllowed,
    AllowToBypass,
    BypassToAllow,
    /// Let through by a rule before, a policy miss let through by
    /// `policy.default = "report"` now.
    NowReported,
    /// Same decision, another rule.
    RuleChanged,
}

impl Change {
    pub const fn title(self) -> &'static str {
        match self {
            Change::NewlyDenied => "newly denied",
            Change::NewlyAllowed => "newly allowed",
            Change::AllowToBypass => "allow -> bypass (no longer inspected)",
            Change::BypassToAllow => "bypass -> allow (inspected when a CA is set)",
            Change::NowReported => {
                "no longer matched by a rule (let through by policy.default = \"report\")"
            }
            Change::RuleChanged => "same decision, another rule",
        }
    }
}

/// The recorded policy outcome, or `Err(why)` when the record is not re-decided.
fn recorded(l: &Logged) -> Result<Side, String> {
    let reason = l.reason_code();
    let class = match l.decided() {
        Some(Decided::Allow | Decided::Inspect) => Class::Allow,
        Some(Decided::Bypass) => Class::Bypass,
        Some(Decided::Report) => Class::Report,
        Some(Decided::Deny) => match reason {
            // Policy reasons are re-decided; others need what the record lacks.
            Some(r) if r.class() == reason::Class::Policy => Class::Deny,
            Some(r) => return Err(r.as_str().to_string()),
            None if l.squid => {
                return Err(l
                    .reason
                    .clone()
                    .unwrap_or_else(|| "Squid TCP_DENIED/403, reason not logged".into()))
            }
            None => {
                return Err(l
                    .reason
                    .clone()
                    .unwrap_or_else(|| "deny without a reason".into()))
            }
        },
        None => return Err(format!("decision {:?}", l.decision)),
    };
    Ok(Side {
        class,
        rule: l.rule.clone(),
        reason: match class {
            Class::Deny | Class::Report => reason.map(Reason::as_str),
            _ => None,
        },
    })
}

fn decided(policy: &Policy, l: &Logged) -> Option<Side> {
    let target = l.target()?;
    // Each record's own client: its address and user give its groups.
    let groups = l
        .client_ip()
        .map_or(crate::policy::GroupSet::EVERYONE, |ip| {
            policy.groups_of(ip, l.user.as_deref())
        });
    let d = policy.decide_for(&target, &l.method(), groups);
    Some(Side {
        class: match d.verdict {
            Verdict::Allow => Class::Allow,
            Verdict::Bypass => Class::Bypass,
            Verdict::Report => Class::Report,
            Verdict::Deny => Class::Deny,
        },
        rule: d.rule.and_then(|i| policy.rule(i)).map(|r| r.name.clone()),
        reason: match d.verdict {
            Verdict::Deny | Verdict::Report => d.reason.map(Reason::as_str),
            _ => None,
        },
    })
}

fn classify(old: &Side, new: &Side) -> Option<Change> {
    use Class::{Allow, Bypass, Deny, Report};
    match (old.class, new.class) {
        (Allow | Bypass | Report, Deny) => Some(Change::NewlyDenied),
        (Deny | Report, Allow | Bypass) | (Deny, Report) => Some(Change::NewlyAllowed),
        (Allow, Bypass) => Some(Change::AllowToBypass),
        (Bypass, Allow) => Some(Change::BypassToAllow),
        (Allow | Bypass, Report) => Some(Change::NowReported),
        (a, b) if a == b && matches!(a, Allow | Bypass) && old.rule != new.rule => {
            Some(Change::RuleChanged)
        }
        _ => None,
    }
}

/// (change, recorded side, replayed side).
type ChangeKey = (Change, Side, Side);
/// (destination, method).
type DestKey = (String, String);

#[derive(Clone, Copy, Debug)]
struct Seen {
    count: u64,
    last: SystemTime,
}

/// The result of a replay.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records read.
    pub records: u64,
    /// Records decided again.
    pub redecided: u64,
    /// Records with the same decision and rule.
    pub unchanged: u64,
    /// Records not re-decided, by reason.
    pub not_redecided: BTreeMap<String, u64>,
    /// (change, old, new) -> (destination, method) -> count and last time.
    changes: BTreeMap<ChangeKey, BTreeMap<DestKey, Seen>>,
    /// Rule name (None: no rule) -> transactions decided (recorded, replayed).
    per_rule: BTreeMap<Option<String>, (u64, u64)>,
}

impl Replay {
    /// Decide `l` again under `policy`.
    pub fn add(&mut self, policy: &Policy, l: &Logged) {
        self.records += 1;
        let old = match recorded(l) {
            Ok(s) => s,
            Err(why) => {
                *self.not_redecided.entry(why).or_default() += 1;
                return;
            }
        };
        let Some(new) = decided(policy, l) else {
            *self
                .not_redecided
                .entry("no target in the record".into())
                .or_default() += 1;
            return;
        };
        self.redecided += 1;
        self.per_rule.entry(old.rule.clone()).or_default().0 += 1;
        self.per_rule.entry(new.rule.clone()).or_default().1 += 1;
        let Some(change) = classify(&old, &new) else {
            self.unchanged += 1;
            return;
        };
        let dest = l.target().map(|t| t.to_string()).unwrap_or_default();
        let method = l.method().to_string();
        let t = l.time.unwrap_or(SystemTime::UNIX_EPOCH);
        let e = self
            .changes
            .entry((change, old, new))
            .or_default()
            .entry((dest, method))
            .or_insert(Seen { count: 0, last: t });
        e.count += 1;
        e.last = e.last.max(t);
    }

    /// Transactions that would see `change`.
    pub fn count(&self, change: Change) -> u64 {
        self.changes
            .iter()
            .filter(|((c, _, _), _)| *c == change)
            .flat_map(|(_, d)| d.values())
            .map(|s| s.count)
            .sum()
    }

    /// Transactions that would be newly denied (exit status 3 when > 0).
    pub fn newly_denied(&self) -> u64 {
        self.count(Change::NewlyDenied)
    }

    /// The report for people.
    pub fn render(&self, header: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{header}");
        self.render_summary(&mut out);
        let changes = [
            Change::NewlyDenied,
            Change::NewlyAllowed,
            Change::AllowToBypass,
            Change::BypassToAllow,
            Change::NowReported,
            Change::RuleChanged,
        ];
        for change in changes {
            self.render_change(&mut out, change);
        }
        self.render_per_rule(&mut out);
        self.render_result(&mut out);
        out
    }

    /// Counts, and what was not re-decided.
    fn render_summary(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "records: {}; re-decided: {}; unchanged: {}",
            self.records, self.redecided, self.unchanged
        );
        if !self.not_redecided.is_empty() {
            let n: u64 = self.not_redecided.values().sum();
            let list: Vec<String> = self
                .not_redecided
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "not re-decided, reported as unchanged (the outcome depended on DNS, the upstream, the tunnel or the client): {n} ({})",
                list.join(", ")
            );
        }
    }

    /// One kind of change: its destinations, most frequent first.
    fn render_change(&self, out: &mut String, change: Change) {
        const SHOWN: usize = 20;
        let groups: Vec<_> = self
            .changes
            .iter()
            .filter(|((c, _, _), _)| *c == change)
            .collect();
        if groups.is_empty() {
            return;
        }
        let dests: usize = groups.iter().map(|(_, d)| d.len()).sum();
        let n = self.count(change);
        let _ = writeln!(
            out,
            "\n{}: {n} transaction{} ({dests} destination{})",
            change.title(),
            if n == 1 { "" } else { "s" },
            if dests == 1 { "" } else { "s" }
        );
        for ((_, old, new), d) in groups {
            let total: u64 = d.values().map(|s| s.count).sum();
            let _ = writeln!(out, "  {old} -> {new}: {total}");
            let mut list: Vec<_> = d.iter().collect();
            list.sort_by(|a, b| b.1.count.cmp(&a.1.count).then_with(|| a.0.cmp(b.0)));
            for ((dest, method), s) in list.iter().take(SHOWN) {
                let _ = writeln!(
                    out,
                    "    {dest:<40} {method:<8} {:>6}  last {}",
                    s.count,
                    humantime::format_rfc3339_seconds(s.last)
                );
            }
            if list.len() > SHOWN {
                let _ = writeln!(out, "    ... and {} more destinations", list.len() - SHOWN);
            }
        }
    }

    /// Rules whose share of transactions changed.
    fn render_per_rule(&self, out: &mut String) {
        let changed: Vec<_> = self.per_rule.iter().filter(|(_, (a, b))| a != b).collect();
        if !changed.is_empty() {
            let _ = writeln!(
                out,
                "\nper rule (transactions decided: recorded -> replayed):"
            );
            for (rule, (a, b)) in changed {
                let name = rule
                    .as_ref()
                    .map_or_else(|| "(no rule)".to_string(), |r| format!("\"{r}\""));
                let _ = writeln!(out, "  {name}: {a} -> {b}");
            }
        }
    }

    /// The closing line (and the "no changes" note).
    fn render_result(&self, out: &mut String) {
        if self.changes.is_empty() {
            let _ = writeln!(
                out,
                "\nno changes: every re-decided transaction gets the same decision and rule"
            );
        }
        let denied = self.newly_denied();
        if denied > 0 {
            let _ = writeln!(
                out,
                "\nresult: {denied} transaction{} would be newly denied (exit status 3)",
                if denied == 1 { "" } else { "s" }
            );
        } else {
            let _ = writeln!(out, "\nresult: nothing would be newly denied");
        }
    }
}

/// What `replay` prints and how it ends.
pub struct Outcome {
    pub report: String,
    pub notes: Vec<String>,
    pub newly_denied: u64,
}

/// Compile `catalog` as a reload would under `settings` (same default,
/// same inspection setting).
///
/// # Errors
/// The catalog cannot be read or does not validate; every error, one a line.
pub fn compile_catalog(settings: &Settings, catalog: &Path) -> Result<Policy, String> {
    let name = catalog.display().to_string();
    let text = std::fs::read_to_string(catalog).map_err(|e| format!("cannot read {name}: {e}"))?;
    let base = catalog.parent().map(Path::to_path_buf).unwrap_or_default();
    let specs = config::parse_catalog(&name, &text, &base).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        format!("invalid catalog:\n{}", lines.join("\n"))
    })?;
    let groups = &settings.client_groups;
    let unknown: Vec<String> = specs
        .iter()
        .flat_map(|s| s.clients.iter().map(move |g| (s, g)))
        .filter(|(_, g)| groups.bit(g).is_none())
        .map(|(s, g)| format!("{name}: rule \"{}\": clients: unknown client group {g:?}; name it in [clients.groups]", s.name))
        .collect();
    if !unknown.is_empty() {
        return Err(format!("invalid catalog:\n{}", unknown.join("\n")));
    }
    Ok(Policy::compile_with(
        specs,
        settings.policy_settings.default,
        settings.tls.inspection_enabled(),
        std::sync::Arc::clone(groups),
    ))
}

/// `egress-proxy replay --audit FILE... --catalog NEW` under `settings`.
/// Squid lines get what they lack (rule, reason, bypass or report) from
/// the configuration's catalog, which wrote them ([`Logged::fill_from`]).
///
/// # Errors
/// Bad input: the catalog or a log cannot be read, or no line of a
/// non-empty log is an audit record.
pub fn command(settings: &Settings, audit: &[PathBuf], catalog: &Path) -> Result<Outcome, String> {
    let policy = compile_catalog(settings, catalog)?;
    let files = read::expand(audit)?;
    let source = crate::operator::suggest::source_label(&files);
    let mut replay = Replay::default();
    let current = &*settings.policy;
    let stats = read::read_logs(&files, None, |mut l| {
        l.fill_from(current);
        replay.add(&policy, &l);
    })?;
    let notes = vec![stats.summary()];
    if stats.records == 0 && stats.skipped > 0 {
        return Err(format!(
            "no audit records in {source}: {}",
            notes.join("; ")
        ));
    }
    let header =
        format!(
        "replay of {source} under {} ({} rules, hash {:016x}; policy.default = {}, inspection {})",
        catalog.display(),
        policy.rules().len(),
        policy.hash(),
        match policy.default_action() {
            config::DefaultAction::Deny => "deny",
            config::DefaultAction::Report => "report",
        },
        if policy.inspection_enabled() { "on" } else { "off" }
    );
    Ok(Outcome {
        report: replay.render(&header),
        notes,
        newly_denied: replay.newly_denied(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn policy(catalog: &str) -> Policy {
        let specs = config::parse_catalog("t", catalog, Path::new(".")).unwrap();
        Policy::compile(specs, config::DefaultAction::Deny, false)
    }

    fn line(json: &str) -> Logged {
        let mut got = Vec::new();
        read::read_log(json.as_bytes(), None, |l| got.push(l)).unwrap();
        got.pop().unwrap()
    }

    #[test]
    fn classifies_changes() {
        let p = policy(
            "[[rule]]\nname = \"A\"\nhosts = [\"a.example.com\"]\nports = [443]\naction = \"bypass\"\n\
             [[rule]]\nname = \"N\"\nhosts = [\"new.example.com\"]\nports = [443]\naction = \"allow\"\n",
        );
        let mut r = Replay::default();
        // allow under "A" -> bypass under "A"
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.0.1:1","method":"CONNECT","host":"a.example.com","port":443,"decision":"allow","rule":"A","status":200}"#));
        // denied before, allowed now
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.0.1:1","method":"CONNECT","host":"new.example.com","port":443,"decision":"deny","reason":"not_in_catalog","status":403}"#));
        // allowed before (and failed upstream), denied now
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.0.1:1","method":"GET","url":"http://gone.example.com/x","host":"gone.example.com","port":80,"decision":"allow","rule":"Old","reason":"dns_failure","status":502}"#));
        // private address: not re-decided
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.0.1:1","method":"CONNECT","host":"gone.example.com","port":443,"decision":"deny","rule":"Old","reason":"private_address","status":403}"#));
        // a plain HTTP record without host/port: the URL gives the target
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.0.1:1","method":"GET","url":"http://new.example.com:443/","decision":"deny","reason":"not_in_catalog","status":403}"#));
        assert_eq!(r.records, 5);
        assert_eq!(r.redecided, 4);
        assert_eq!(r.count(Change::AllowToBypass), 1);
        assert_eq!(r.count(Change::NewlyAllowed), 2);
        assert_eq!(r.newly_denied(), 1);
        assert_eq!(r.not_redecided.get("private_address"), Some(&1));
        let text = r.render("t");
        assert!(
            text.contains("allow \"Old\" -> deny not_in_catalog: 1"),
            "{text}"
        );
        assert!(text.contains("\"Old\": 1 -> 0"), "{text}");
        assert!(text.contains("exit status 3"), "{text}");
    }

    #[test]
    fn squid_lines_take_what_they_lack_from_the_current_catalog() {
        let current = policy(
            "[[rule]]\nname = \"A\"\nhosts = [\"a.example.com\"]\nports = [443]\naction = \"bypass\"\n",
        );
        let new = policy(
            "[[rule]]\nname = \"B\"\nhosts = [\"b.example.com\"]\nports = [443]\naction = \"allow\"\n",
        );
        let mut r = Replay::default();
        for line in [
            "1767323047.178   1500 192.0.2.10 TCP_TUNNEL/200 4242 CONNECT a.example.com:443 - HIER_DIRECT/203.0.113.7 -",
            "1767323047.178      0 192.0.2.10 TCP_DENIED/403 0 CONNECT b.example.com:443 - HIER_NONE/- -",
            "1767323047.178      0 192.0.2.10 TCP_DENIED/407 0 CONNECT b.example.com:443 - HIER_NONE/- -",
        ] {
            let mut l = read::squid_record(line).unwrap();
            l.fill_from(&current);
            r.add(&new, &l);
        }
        assert_eq!(r.newly_denied(), 1);
        assert_eq!(r.count(Change::NewlyAllowed), 1);
        assert_eq!(r.not_redecided.get("squid TCP_DENIED/407"), Some(&1));
        let text = r.render("t");
        assert!(
            text.contains("bypass \"A\" -> deny not_in_catalog: 1"),
            "{text}"
        );
        assert!(
            text.contains("deny not_in_catalog -> allow \"B\": 1"),
            "{text}"
        );
    }

    #[test]
    fn each_record_is_decided_for_its_own_client() {
        let net = |c: &str| c.parse::<ipnet::IpNet>().unwrap();
        let groups = crate::policy::ClientGroups::new(vec![crate::policy::ClientGroup {
            name: "web".into(),
            cidrs: vec![net("10.0.1.0/24")],
            users: vec!["webgw".into()],
        }]);
        let specs = config::parse_catalog(
            "t",
            "[[rule]]\nname = \"W\"\nhosts = [\"w.example.com\"]\nports = [443]\naction = \"allow\"\nclients = [\"web\"]\n",
            Path::new("."),
        )
        .unwrap();
        let p = Policy::compile_with(
            specs,
            config::DefaultAction::Deny,
            false,
            std::sync::Arc::new(groups),
        );
        let mut r = Replay::default();
        // The web gateway (by address, then by user): allowed before and now.
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.1.5:1","method":"CONNECT","host":"w.example.com","port":443,"decision":"allow","rule":"W","status":200}"#));
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.9.5:1","user":"webgw","method":"CONNECT","host":"w.example.com","port":443,"decision":"allow","rule":"W","status":200}"#));
        assert_eq!(r.newly_denied(), 0);
        // Another client: the rule is not in its catalog.
        r.add(&p, &line(r#"{"ts":"2025-01-01T00:00:00Z","client":"10.0.9.5:1","method":"CONNECT","host":"w.example.com","port":443,"decision":"allow","rule":"W","status":200}"#));
        assert_eq!(r.newly_denied(), 1);
    }
}
