//! Client groups (`[clients.groups]`) and the small set a client belongs to.
//!
//! A group is named by CIDRs and, with `[auth]` on, by proxy-auth users; a
//! client is in a group when its address is in one of the CIDRs or its
//! authenticated user is listed. The set is a bitmask: bit n is group n (at
//! most [`MAX_GROUPS`]), and the top bit ([`GroupSet::EVERYONE`]) is in every
//! client's set, so a rule without `clients` (mask [`u64::MAX`]) and a
//! client-scoped rule are both checked with one AND.
use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Groups a configuration may name: the top bit is reserved for "everyone".
pub const MAX_GROUPS: usize = 63;

/// One named group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientGroup {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    pub users: Vec<String>,
}

/// The groups of a configuration, in name order (index = bit), with flat
/// lookup tables: (network, mask, bit) per CIDR by family, and user -> bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientGroups {
    groups: Vec<ClientGroup>,
    v4: Vec<(u32, u32, u64)>,
    v6: Vec<(u128, u128, u64)>,
    users: HashMap<String, u64>,
}

/// The groups one client is in, as a bitmask (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupSet(pub u64);

impl GroupSet {
    /// A client in no named group: only rules without `clients` apply.
    pub const EVERYONE: GroupSet = GroupSet(1 << 63);

    /// True when the client is in some named group.
    pub const fn any_named(self) -> bool {
        self.0 & !Self::EVERYONE.0 != 0
    }

    /// True when a rule with `mask` applies to this client.
    #[inline]
    pub const fn admits(self, mask: u64) -> bool {
        self.0 & mask != 0
    }
}

impl ClientGroups {
    /// At most [`MAX_GROUPS`] groups (more are ignored; validation refuses them).
    pub fn new(mut groups: Vec<ClientGroup>) -> Self {
        groups.truncate(MAX_GROUPS);
        let (mut v4, mut v6, mut users) = (Vec::new(), Vec::new(), HashMap::new());
        for (i, g) in groups.iter().enumerate() {
            let bit = 1u64 << i;
            for net in &g.cidrs {
                match net {
                    IpNet::V4(n) => v4.push((u32::from(n.network()), u32::from(n.netmask()), bit)),
                    IpNet::V6(n) => {
                        v6.push((u128::from(n.network()), u128::from(n.netmask()), bit))
                    }
                }
            }
            for u in &g.users {
                *users.entry(u.clone()).or_default() |= bit;
            }
        }
        ClientGroups {
            groups,
            v4,
            v6,
            users,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    pub fn groups(&self) -> &[ClientGroup] {
        &self.groups
    }

    /// The bit of group `name`.
    pub fn bit(&self, name: &str) -> Option<u32> {
        self.groups
            .iter()
            .position(|g| g.name == name)
            .and_then(|i| u32::try_from(i).ok())
    }

    /// The mask of a rule's `clients` list: [`u64::MAX`] when empty (every
    /// client); unknown names (refused by validation) add nothing.
    pub fn mask(&self, names: &[String]) -> u64 {
        if names.is_empty() {
            return u64::MAX;
        }
        names
            .iter()
            .filter_map(|n| self.bit(n))
            .fold(0, |m, b| m | (1u64 << b))
    }

    /// The groups of a client: its address, and its authenticated user if any.
    /// Costs a pass over the groups' CIDRs (a handful), never the catalog.
    pub fn resolve(&self, ip: IpAddr, user: Option<&str>) -> GroupSet {
        let mut set = GroupSet::EVERYONE.0;
        // `::ffff:10.0.1.5` is the IPv4 client (as the door records it).
        match ip.to_canonical() {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                for &(net, mask, bit) in &self.v4 {
                    set |= if a & mask == net { bit } else { 0 };
                }
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                for &(net, mask, bit) in &self.v6 {
                    set |= if a & mask == net { bit } else { 0 };
                }
            }
        }
        if let Some(bits) = user.and_then(|u| self.users.get(u)) {
            set |= bits;
        }
        GroupSet(set)
    }

    /// The set a record's `client_group` names (comma-separated); unknown
    /// names add nothing.
    pub fn set_of(&self, names: &str) -> GroupSet {
        let bits = names
            .split(',')
            .filter_map(|n| self.bit(n.trim()))
            .fold(0, |m, b| m | (1u64 << b));
        GroupSet(GroupSet::EVERYONE.0 | bits)
    }

    /// The names in `set`, comma-separated in configuration order; None when
    /// the client is in no named group.
    pub fn names(&self, set: GroupSet) -> Option<String> {
        if !set.any_named() {
            return None;
        }
        let names: Vec<&str> = self
            .groups
            .iter()
            .enumerate()
            .filter(|(i, _)| set.0 & (1u64 << i) != 0)
            .map(|(_, g)| g.name.as_str())
            .collect();
        Some(names.join(","))
    }
}
