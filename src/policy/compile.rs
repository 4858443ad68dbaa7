//! Compiling a catalog into a [`Policy`]: the exact and wildcard indexes,
//! the address table, the rules hash, and the shadowed-rule warnings.
use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::candidates::Candidates;
use super::{
    Action, ClientGroups, DefaultAction, Entry, FastMap, Policy, PortRange, Rule, RuleSpec,
};

impl Policy {
    /// A policy with no rules (every request is a policy miss).
    pub fn empty() -> Self {
        Policy::compile(Vec::new(), DefaultAction::Deny, false)
    }

    /// Index validated rules. `inspect` says whether a CA is configured.
    /// No client groups: a rule with `clients` applies to nobody.
    pub fn compile(rules: Vec<RuleSpec>, default: DefaultAction, inspect: bool) -> Self {
        Policy::compile_with(rules, default, inspect, Arc::default())
    }

    /// [`Policy::compile`] with `[clients.groups]`, for rules with `clients`.
    pub fn compile_with(
        rules: Vec<RuleSpec>,
        default: DefaultAction,
        inspect: bool,
        groups: Arc<ClientGroups>,
    ) -> Self {
        let masks: Vec<u64> = rules.iter().map(|r| groups.mask(&r.clients)).collect();
        let mut exact: FastMap<Box<str>, Vec<Entry>> = FastMap::default();
        let mut wildcard: FastMap<Box<str>, Vec<Entry>> = FastMap::default();
        let mut addresses = Vec::new();
        for (i, r) in rules.iter().enumerate() {
            let entry = Entry {
                rule: u32::try_from(i).unwrap_or(u32::MAX),
                action: r.action,
                clients: masks[i],
            };
            for h in &r.hosts {
                let (map, key) = match h.strip_prefix("*.") {
                    Some(suffix) => (&mut wildcard, suffix),
                    None => (&mut exact, h.as_str()),
                };
                let list = map.entry(key.into()).or_default();
                if !list.iter().any(|e: &Entry| e.rule == entry.rule) {
                    list.push(entry.clone());
                }
            }
            for a in &r.addresses {
                addresses.push((*a, entry.clone()));
            }
        }
        let order = |a: &Entry, b: &Entry| b.action.cmp(&a.action).then(a.rule.cmp(&b.rule));
        exact.values_mut().for_each(|v| v.sort_by(order));
        wildcard.values_mut().for_each(|v| v.sort_by(order));
        let index = |m: FastMap<Box<str>, Vec<Entry>>| {
            m.into_iter()
                .map(|(k, v)| (k, Candidates::new(v)))
                .collect::<FastMap<_, _>>()
        };
        // Most specific first: longer prefixes, then the tie-break.
        addresses.sort_by(|a, b| {
            b.0.prefix_len()
                .cmp(&a.0.prefix_len())
                .then_with(|| order(&a.1, &b.1))
        });
        let wildcard_labels = wildcard
            .keys()
            .map(|k| k.split('.').count())
            .fold(0u64, |m, n| m | (1u64 << n.min(63)));
        let hash = hash_rules(&rules, default, &groups);
        let names = rules.iter().map(|r| Arc::from(r.name.as_str())).collect();
        Policy {
            rules,
            names,
            wildcard_labels,
            exact: index(exact),
            wildcard: index(wildcard),
            addresses,
            default,
            inspect,
            hash,
            groups,
            masks,
        }
    }
}

// === shadowed rules ===

impl Policy {
    /// Warnings for rules that other rules fully shadow (never decide anything).
    pub fn shadowed(&self) -> Vec<String> {
        let mut out = Vec::new();
        // Rules by host pattern, so each pattern is checked against the
        // rules that name it, not the whole catalog.
        let mut by_pattern: HashMap<&str, Vec<usize>> = HashMap::new();
        for (j, r) in self.rules.iter().enumerate() {
            for h in &r.hosts {
                by_pattern.entry(h.as_str()).or_default().push(j);
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let mut by = Vec::new();
            let covered = r
                .hosts
                .iter()
                .all(|h| self.pattern_covered(i, h, &r.ports, &by_pattern, &mut by))
                && r.addresses
                    .iter()
                    .all(|a| self.address_covered(i, a, &r.ports, &mut by));
            if covered && !(r.hosts.is_empty() && r.addresses.is_empty()) {
                by.sort_unstable();
                by.dedup();
                let names: Vec<String> = by
                    .iter()
                    .map(|&j| format!("#{} \"{}\"", j + 1, self.rules[j].name))
                    .collect();
                out.push(format!(
                    "warning: rule #{} \"{}\" never decides anything: every host and port it names is decided by rule {}",
                    i + 1,
                    r.name,
                    names.join(", ")
                ));
            }
        }
        out
    }

    /// Warnings for rules (other than `deny`) with a wildcard over a whole
    /// public suffix (`*.co.uk`, `*.cloudfront.net`): anyone can register or
    /// publish a name under it, so the rule admits destinations of anyone's.
    pub fn public_suffix_wildcards(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if r.action == Action::Deny {
                continue;
            }
            for h in &r.hosts {
                if let Some(s) = super::suffix::wildcard_over_public_suffix(h) {
                    out.push(format!(
                        "warning: rule #{} \"{}\" host \"{h}\" covers the whole public suffix {s} (Public Suffix List): anyone can register a name under it, so this admits anyone's servers; list the exact host names instead",
                        i + 1,
                        r.name
                    ));
                }
            }
        }
        out
    }

    /// Rule `j` wins over rule `i` wherever `i` applies: it applies to
    /// every client `i` does, and takes precedence.
    fn beats(&self, j: usize, i: usize) -> bool {
        let (a, b) = (&self.rules[j], &self.rules[i]);
        let covers = self.masks[j] & self.masks[i] == self.masks[i];
        covers && (a.action > b.action || (a.action == b.action && j < i))
    }

    fn pattern_covered(
        &self,
        i: usize,
        pattern: &str,
        ports: &[PortRange],
        by_pattern: &HashMap<&str, Vec<usize>>,
        by: &mut Vec<usize>,
    ) -> bool {
        let same: &[usize] = by_pattern.get(pattern).map_or(&[], Vec::as_slice);
        ports.iter().all(|range| {
            // The rule that decides is the one that beats every other candidate.
            let winner = same
                .iter()
                .map(|&j| (j, &self.rules[j]))
                .filter(|(j, s)| {
                    *j != i
                        && self.beats(*j, i)
                        && s.ports.iter().any(|p| p.lo <= range.lo && range.hi <= p.hi)
                })
                .reduce(|best, c| if self.beats(c.0, best.0) { c } else { best });
            winner.map(|(j, _)| by.push(j)).is_some()
        })
    }

    fn address_covered(
        &self,
        i: usize,
        net: &IpNet,
        ports: &[PortRange],
        by: &mut Vec<usize>,
    ) -> bool {
        ports.iter().all(|range| {
            // The rule that decides is the one that beats every other candidate.
            let winner = self
                .rules
                .iter()
                .enumerate()
                .filter(|(j, s)| {
                    *j != i
                        && self.beats(*j, i)
                        && s.addresses.iter().any(|a| a.contains(net))
                        && s.ports.iter().any(|p| p.lo <= range.lo && range.hi <= p.hi)
                })
                .reduce(|best, c| if self.beats(c.0, best.0) { c } else { best });
            winner.map(|(j, _)| by.push(j)).is_some()
        })
    }
}

/// FNV-1a over a canonical text of the rules: stable across runs and builds.
fn hash_rules(rules: &[Rule], default: DefaultAction, groups: &ClientGroups) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |s: &str| {
        for b in s.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(match default {
        DefaultAction::Deny => "deny",
        DefaultAction::Report => "report",
    });
    for r in rules {
        feed(&format!("{r:?}"));
    }
    // The groups decide what scoped rules admit; none leaves the hash as it was.
    for g in groups.groups() {
        feed(&format!("{g:?}"));
    }
    h
}
