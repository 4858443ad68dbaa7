//! The rules indexed under one host name (or wildcard suffix), in
//! precedence order, with a shortcut past the rules of other client groups.
//!
//! Without client groups every entry applies to every client and the list is
//! a rule or two. A name that many groups' rules share (one vendor host,
//! each appliance its own rule) would make a client walk past the other
//! groups' entries; for such a list, each group bit remembers where its
//! first entry is, and a client starts at the earliest of its groups'.
use super::clients::GroupSet;
use super::Entry;

/// Lists longer than this get the per-group shortcut.
const SHORTCUT_FROM: usize = 8;

#[derive(Debug)]
pub(super) struct Candidates {
    entries: Box<[Entry]>,
    /// Per group bit: the index of the first entry that admits it (`len`
    /// when none does). Only for lists longer than [`SHORTCUT_FROM`].
    first: Option<Box<[u32; 64]>>,
}

impl Candidates {
    /// `entries` sorted in precedence order.
    pub(super) fn new(entries: Vec<Entry>) -> Self {
        let first = (entries.len() > SHORTCUT_FROM).then(|| {
            let len = u32::try_from(entries.len()).unwrap_or(u32::MAX);
            let mut first = Box::new([len; 64]);
            for (i, e) in entries.iter().enumerate().rev() {
                let i = u32::try_from(i).unwrap_or(u32::MAX);
                let mut bits = e.clients;
                while bits != 0 {
                    first[bits.trailing_zeros() as usize] = i;
                    bits &= bits - 1;
                }
            }
            first
        });
        Candidates {
            entries: entries.into_boxed_slice(),
            first,
        }
    }

    /// The entries from the first one that can apply to a client in
    /// `groups` (later ones still need [`GroupSet::admits`]).
    #[inline]
    pub(super) fn for_client(&self, groups: GroupSet) -> &[Entry] {
        let Some(first) = &self.first else {
            return &self.entries;
        };
        let mut start = self.entries.len();
        let mut bits = groups.0;
        while bits != 0 {
            start = start.min(first[bits.trailing_zeros() as usize] as usize);
            bits &= bits - 1;
        }
        self.entries.get(start..).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Action;

    fn entry(rule: u32, clients: u64) -> Entry {
        Entry {
            rule,
            action: Action::Allow,
            clients,
        }
    }

    #[test]
    fn a_client_starts_at_its_groups_first_entry() {
        // Twenty rules, one per group; then one for everyone.
        let mut list: Vec<Entry> = (0..20).map(|g| entry(g, 1u64 << g)).collect();
        list.push(entry(20, u64::MAX));
        let c = Candidates::new(list);
        let everyone = GroupSet::EVERYONE;
        let in_19 = GroupSet(GroupSet::EVERYONE.0 | 1 << 19);
        let in_3_and_7 = GroupSet(GroupSet::EVERYONE.0 | 1 << 3 | 1 << 7);
        let rules = |s: &[Entry]| s.iter().map(|e| e.rule).collect::<Vec<_>>();
        assert_eq!(rules(c.for_client(everyone)), vec![20]);
        assert_eq!(rules(c.for_client(in_19)), vec![19, 20]);
        assert_eq!(rules(c.for_client(in_3_and_7))[0], 3);
        // No entry for a client in no group but another's: nothing.
        let c = Candidates::new((0..20).map(|g| entry(g, 1u64 << g)).collect());
        assert!(c.for_client(everyone).is_empty());
    }

    #[test]
    fn short_lists_are_walked_whole() {
        let c = Candidates::new(vec![entry(0, 1), entry(1, u64::MAX)]);
        assert_eq!(c.for_client(GroupSet::EVERYONE).len(), 2);
    }
}
