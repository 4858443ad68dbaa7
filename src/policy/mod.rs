//! The compiled, immutable policy: catalog rules indexed for a decision on
//! (host, port[, method]) whose cost does not grow with the catalog.
//!
//! Pure: no I/O, no logging, no allocation in [`Policy::decide`]. Address
//! vetting after DNS lives in [`ip`]; the proxy calls both.
//!
//! Matching (DESIGN.md "Policy"): the candidates are the rules whose host
//! pattern matches and whose ports contain the port; the most specific pattern
//! wins (exact, then wildcards with more labels); ties go deny > bypass >
//! allow, then to the rule written first. A rule with `clients` is a
//! candidate only for a client in one of those groups ([`GroupSet`]): for
//! any other client it does not exist, so a host only another group's rule
//! names is `not_in_catalog` for this client, not `port_not_allowed`.
mod candidates;
mod clients;
mod compile;
pub mod ip;
pub mod suffix;

pub use clients::{ClientGroup, ClientGroups, GroupSet, MAX_GROUPS};

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use ipnet::IpNet;

use crate::reason::Reason;
use crate::target::{Host, Target};

/// What happens to a request that no rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    Deny,
    Report,
}

/// A rate such as `"50/s"`: `count` events per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    pub count: u32,
    pub per: std::time::Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

/// The index maps: read-only after compile, keyed by host names the
/// catalog chose (not attacker-chosen insertions), so a fast seeded hasher
/// is safe here.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A rule's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    // Declaration order is precedence on a tie: deny > bypass > allow.
    Allow,
    Bypass,
    Deny,
}

impl Action {
    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Bypass => "bypass",
            Action::Deny => "deny",
        }
    }
}

/// How a spliced tunnel's ClientHello is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SniMode {
    Off,
    MatchIfTls,
    Require,
}

impl SniMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            SniMode::Off => "off",
            SniMode::MatchIfTls => "match-if-tls",
            SniMode::Require => "require",
        }
    }
}

/// What to do with an Encrypted ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EchMode {
    Allow,
    Deny,
}

/// Which way a rule's traffic leaves (`route`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// Straight to the vetted address.
    Direct,
    /// Through `[upstream] parent` (direct when none is set).
    Parent,
}

impl Route {
    pub const fn as_str(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Parent => "parent",
        }
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    #[inline]
    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One validated catalog rule, as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub name: String,
    /// Exact normalised names, or `*.` followed by one.
    pub hosts: Vec<String>,
    pub addresses: Vec<IpNet>,
    pub ports: Vec<PortRange>,
    pub action: Action,
    /// None: every method.
    pub methods: Option<Vec<http::Method>>,
    pub sni: SniMode,
    pub ech: EchMode,
    pub ips: Vec<IpAddr>,
    pub pin: bool,
    pub rate: Option<Rate>,
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `route`; None: through the parent when one is set.
    pub route: Option<Route>,
    /// Client group names (`[clients.groups]`); empty: every client.
    pub clients: Vec<String>,
}

impl RuleSpec {
    /// Equal in everything but the name: an exact duplicate.
    pub fn same_effect(&self, other: &RuleSpec) -> bool {
        let mut a = self.clone();
        a.name.clone_from(&other.name);
        a == *other
    }

    /// A hash of everything but the name (for finding exact duplicates
    /// without comparing every pair).
    pub fn effect_hash(&self) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = foldhash::fast::FixedState::default().build_hasher();
        self.hosts.hash(&mut h);
        self.addresses.hash(&mut h);
        self.ports.hash(&mut h);
        self.action.hash(&mut h);
        self.methods.hash(&mut h);
        self.sni.hash(&mut h);
        self.ech.hash(&mut h);
        self.ips.hash(&mut h);
        self.pin.hash(&mut h);
        self.rate.hash(&mut h);
        self.client_cert.hash(&mut h);
        self.route.hash(&mut h);
        self.clients.hash(&mut h);
        h.finish()
    }

    fn allows_port(&self, port: u16) -> bool {
        self.ports.iter().any(|r| r.contains(port))
    }

    /// True when `method` is allowed (rules without `methods` allow all).
    pub fn allows_method(&self, method: &http::Method) -> bool {
        self.methods.as_ref().is_none_or(|ms| ms.contains(method))
    }

    /// True when a request with `method` may carry a body under this rule.
    ///
    /// A rule that limits `methods` (an update mirror with `GET`/`HEAD`)
    /// must not receive a body under cover of a method that has none: that
    /// is what exfiltrated data would look like. On such a rule `GET` and
    /// `HEAD` never carry one, whatever else the rule lists. Rules without
    /// `methods` allow bodies on every method.
    pub fn allows_body(&self, method: &http::Method) -> bool {
        self.methods.is_none() || !matches!(*method, http::Method::GET | http::Method::HEAD)
    }
}

/// A rule in a compiled policy.
pub type Rule = RuleSpec;

/// The policy's verdict before dialing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Allow,
    Bypass,
    Deny,
    /// A policy miss let through because `policy.default = "report"`.
    Report,
}

impl Verdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Bypass => "bypass",
            Verdict::Deny => "deny",
            Verdict::Report => "report",
        }
    }

    pub const fn is_permitted(self) -> bool {
        !matches!(self, Verdict::Deny)
    }
}

/// The outcome of [`Policy::decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    /// Index of the rule that decided, if any (see [`Policy::rule`]).
    pub rule: Option<usize>,
    /// Why refused, or for `report`, which miss was let through.
    pub reason: Option<Reason>,
    /// The CONNECT is inspected: an `allow` rule's tunnel with a CA
    /// configured (DESIGN.md: each inner request is decided again).
    pub inspect: bool,
}

impl Decision {
    const fn deny(rule: Option<usize>, reason: Reason) -> Self {
        Decision {
            verdict: Verdict::Deny,
            rule,
            reason: Some(reason),
            inspect: false,
        }
    }
}

/// One (rule, ports) pair under a host pattern, ordered for the tie-break.
#[derive(Clone, Debug)]
struct Entry {
    rule: u32,
    action: Action,
    /// The client groups it applies to ([`GroupSet::admits`]).
    clients: u64,
}

/// The compiled catalog.
#[derive(Debug)]
pub struct Policy {
    rules: Vec<Rule>,
    /// Rule names, shared into audit records without copying.
    names: Vec<Arc<str>>,
    /// Exact host -> entries, best first.
    exact: FastMap<Box<str>, candidates::Candidates>,
    /// Suffix of `*.suffix` -> entries, best first.
    wildcard: FastMap<Box<str>, candidates::Candidates>,
    /// Bit n set when some wildcard suffix has n labels: lookups skip
    /// suffix lengths no rule uses (a miss then costs no hashing at all
    /// in a catalog without wildcards).
    wildcard_labels: u64,
    /// Rules admitting IP-literal targets.
    addresses: Vec<(IpNet, Entry)>,
    default: DefaultAction,
    inspect: bool,
    /// Stable hash of the rules, for metrics and the status page.
    hash: u64,
    /// `[clients.groups]`, and each rule's client mask (by rule index).
    groups: Arc<ClientGroups>,
    masks: Vec<u64>,
}

/// Why a matching rule lost, for `explain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The host pattern matched, the port did not.
    Port,
    /// A more specific host pattern decided.
    LessSpecific,
    /// Same pattern specificity, but the winner's action takes precedence.
    Precedence,
    /// Same pattern specificity and action; the winner is written first.
    LaterInFile,
    /// The rule is scoped to client groups this client is not in.
    OtherClients,
}

impl Loss {
    pub const fn describe(self) -> &'static str {
        match self {
            Loss::Port => "its host pattern matches, but not this port",
            Loss::LessSpecific => "a more specific host pattern decided",
            Loss::Precedence => "same host pattern specificity; deny beats bypass beats allow",
            Loss::LaterInFile => "same pattern and action; the rule written first wins",
            Loss::OtherClients => "its `clients` are groups this client is not in",
        }
    }
}

/// A decision with the rules that matched the host but lost.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub decision: Decision,
    pub losers: Vec<(usize, Loss)>,
}

// === impl Policy ===

impl Policy {
    /// The rules, in catalog order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// One rule by the index a [`Decision`] carries.
    pub fn rule(&self, index: usize) -> Option<&Rule> {
        self.rules.get(index)
    }

    /// The name of rule `index`, for audit records.
    pub fn rule_name(&self, index: usize) -> Option<Arc<str>> {
        self.names.get(index).cloned()
    }

    /// True when a CA is configured: `allow` tunnels are inspected.
    pub fn inspection_enabled(&self) -> bool {
        self.inspect
    }

    /// The policy for misses.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// A stable hash of the rules and default (hex in the status page).
    pub fn hash(&self) -> u64 {
        self.hash
    }

    /// `[clients.groups]` as compiled into this policy.
    pub fn client_groups(&self) -> &Arc<ClientGroups> {
        &self.groups
    }

    /// The groups of a client (address, and authenticated user if any).
    pub fn groups_of(&self, ip: IpAddr, user: Option<&str>) -> GroupSet {
        self.groups.resolve(ip, user)
    }

    /// Decide a target for a client in no named group (only rules without
    /// `clients` apply). `method` is the request method (`CONNECT` for a tunnel).
    pub fn decide(&self, target: &Target, method: &http::Method) -> Decision {
        self.decide_for(target, method, GroupSet::EVERYONE)
    }

    /// Decide a target for a client in `groups` ([`Policy::groups_of`]).
    ///
    /// Does not allocate. Address vetting after DNS is separate ([`ip`]).
    pub fn decide_for(&self, target: &Target, method: &http::Method, groups: GroupSet) -> Decision {
        let found = match &target.host {
            Host::Name(name) => self.lookup_name(name, target.port, groups),
            Host::Ip(ip) => self.lookup_ip(*ip, target.port, groups),
        };
        let rule = match found {
            Lookup::Rule(r) => r,
            // An IP literal outside its rule's ports is refused, never reported.
            Lookup::PortMiss if matches!(target.host, Host::Ip(_)) => {
                return Decision::deny(None, Reason::PortNotAllowed)
            }
            Lookup::PortMiss => return self.miss(Reason::PortNotAllowed),
            Lookup::None if matches!(target.host, Host::Ip(_)) => {
                return Decision::deny(None, Reason::IpLiteral)
            }
            Lookup::None => return self.miss(Reason::NotInCatalog),
        };
        let spec = &self.rules[rule];
        let index = Some(rule);
        match spec.action {
            Action::Deny => Decision::deny(index, Reason::DenyRule),
            _ if !self.method_allowed(spec, method) => {
                Decision::deny(index, Reason::MethodNotAllowed)
            }
            Action::Allow => Decision {
                verdict: Verdict::Allow,
                rule: index,
                reason: None,
                inspect: self.inspect && *method == http::Method::CONNECT,
            },
            Action::Bypass => Decision {
                verdict: Verdict::Bypass,
                rule: index,
                reason: None,
                inspect: false,
            },
        }
    }

    /// `methods` limits plain HTTP (and inspected requests). A CONNECT to a
    /// rule with `methods` is refused unless the rule lists CONNECT or the
    /// tunnel will be inspected (where each inner request is checked):
    /// otherwise a tunnel would carry any method past the limit.
    fn method_allowed(&self, spec: &Rule, method: &http::Method) -> bool {
        if spec.allows_method(method) {
            return true;
        }
        *method == http::Method::CONNECT && self.inspect && spec.action == Action::Allow
    }

    fn miss(&self, reason: Reason) -> Decision {
        match self.default {
            DefaultAction::Deny => Decision::deny(None, reason),
            DefaultAction::Report => Decision {
                verdict: Verdict::Report,
                rule: None,
                reason: Some(reason),
                inspect: false,
            },
        }
    }

    fn lookup_name(&self, name: &str, port: u16, groups: GroupSet) -> Lookup {
        let mut matched = false;
        if let Some(entries) = self.exact.get(name) {
            if let Some(r) = self.first_with_port(entries, port, groups, &mut matched) {
                return Lookup::Rule(r);
            }
        }
        // Wildcards from the longest suffix (most labels) to the shortest;
        // `*.example.com` matches any subdomain, not the apex.
        let mut rest = name;
        let mut labels = name.bytes().filter(|&b| b == b'.').count() + 1;
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            labels -= 1;
            if self.wildcard_labels & (1u64 << labels.min(63)) == 0 {
                continue;
            }
            if let Some(entries) = self.wildcard.get(rest) {
                if let Some(r) = self.first_with_port(entries, port, groups, &mut matched) {
                    return Lookup::Rule(r);
                }
            }
        }
        if matched {
            Lookup::PortMiss
        } else {
            Lookup::None
        }
    }

    fn lookup_ip(&self, ip: IpAddr, port: u16, groups: GroupSet) -> Lookup {
        let mut matched = false;
        for (net, entry) in &self.addresses {
            if groups.admits(entry.clients) && net.contains(&ip) {
                matched = true;
                if self.rules[entry.rule as usize].allows_port(port) {
                    return Lookup::Rule(entry.rule as usize);
                }
            }
        }
        if matched {
            Lookup::PortMiss
        } else {
            Lookup::None
        }
    }

    /// The first entry for this client whose ports contain `port`;
    /// `matched` is set when any entry applies to this client.
    #[inline]
    fn first_with_port(
        &self,
        entries: &candidates::Candidates,
        port: u16,
        groups: GroupSet,
        matched: &mut bool,
    ) -> Option<usize> {
        entries
            .for_client(groups)
            .iter()
            .filter(|e| groups.admits(e.clients))
            .find(|e| {
                *matched = true;
                self.rules[e.rule as usize].allows_port(port)
            })
            .map(|e| e.rule as usize)
    }

    /// The decision plus every other rule that matched the host, and why it lost.
    pub fn explain(&self, target: &Target, method: &http::Method) -> Explanation {
        self.explain_for(target, method, GroupSet::EVERYONE)
    }

    /// [`Policy::explain`] for a client in `groups`.
    pub fn explain_for(
        &self,
        target: &Target,
        method: &http::Method,
        groups: GroupSet,
    ) -> Explanation {
        let decision = self.decide_for(target, method, groups);
        let winner = decision
            .rule
            .map(|w| (w, self.specificity(w, &target.host)));
        let mut losers = Vec::new();
        for (i, r) in self.rules.iter().enumerate() {
            if Some(i) == decision.rule {
                continue;
            }
            let Some(spec) = self.specificity(i, &target.host) else {
                continue;
            };
            let loss = if !groups.admits(self.masks[i]) {
                Loss::OtherClients
            } else if !r.allows_port(target.port) {
                Loss::Port
            } else {
                match winner {
                    Some((_, Some(ws))) if ws > spec => Loss::LessSpecific,
                    Some((w, _)) if self.rules[w].action != r.action => Loss::Precedence,
                    _ => Loss::LaterInFile,
                }
            };
            losers.push((i, loss));
        }
        Explanation { decision, losers }
    }

    /// How specifically rule `i` matches `host`: None when it does not;
    /// exact names and addresses rank above every wildcard.
    fn specificity(&self, i: usize, host: &Host) -> Option<usize> {
        let r = &self.rules[i];
        match host {
            Host::Ip(ip) => r
                .addresses
                .iter()
                .filter(|n| n.contains(ip))
                .map(|n| usize::from(n.prefix_len()) + 1000)
                .max(),
            Host::Name(name) => r
                .hosts
                .iter()
                .filter_map(|p| match p.strip_prefix("*.") {
                    None => (**name == **p).then_some(usize::MAX),
                    Some(suffix) => {
                        let sub = name.strip_suffix(suffix)?;
                        (sub.len() > 1 && sub.ends_with('.')).then(|| suffix.split('.').count())
                    }
                })
                .max(),
        }
    }
}

enum Lookup {
    Rule(usize),
    PortMiss,
    None,
}

#[cfg(test)]
mod tests;
