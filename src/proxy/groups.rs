//! The client's groups (`[clients.groups]`), resolved once per client
//! connection (and once per inspected tunnel) rather than per request.
//!
//! Keyed by the policy's content hash, which covers `[clients.groups]`: a
//! reload that changes the groups (or the rules) makes later requests on an
//! older connection resolve again, each from its own snapshot, so a cached
//! set can never pair with another configuration's group numbering. A
//! request whose proxy-auth user differs from the one cached resolves on
//! its own too.
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use crate::policy::{GroupSet, Policy};

#[derive(Default)]
pub struct GroupCache(OnceLock<Cached>);

impl std::fmt::Debug for GroupCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCache")
    }
}

struct Cached {
    policy: u64,
    user: Option<Arc<str>>,
    set: GroupSet,
    /// The record's `client_group`.
    names: Option<Arc<str>>,
}

impl GroupCache {
    /// The groups of `ip` (and `user`) under `policy`, and their names for
    /// the record.
    pub fn groups(
        &self,
        policy: &Policy,
        ip: IpAddr,
        user: Option<&Arc<str>>,
    ) -> (GroupSet, Option<Arc<str>>) {
        if let Some(c) = self.0.get() {
            if c.policy == policy.hash() && c.user.as_deref() == user.map(|u| &**u) {
                return (c.set, c.names.clone());
            }
        }
        let set = policy.groups_of(ip, user.map(|u| &**u));
        let names = policy.client_groups().names(set).map(Arc::from);
        // The first resolution on this connection is kept; later ones (a
        // reload, another user) are not, and resolve again next time.
        let _ = self.0.set(Cached {
            policy: policy.hash(),
            user: user.cloned(),
            set,
            names: names.clone(),
        });
        (set, names)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
    use super::*;
    use crate::policy::{ClientGroup, ClientGroups, DefaultAction};

    fn policy(web: &str) -> Policy {
        let groups = vec![
            ClientGroup {
                name: "mail".into(),
                cidrs: vec!["10.0.2.0/24".parse().unwrap()],
                users: vec!["mailgw".into()],
            },
            ClientGroup {
                name: "web".into(),
                cidrs: vec![web.parse().unwrap()],
                users: Vec::new(),
            },
        ];
        Policy::compile_with(
            Vec::new(),
            DefaultAction::Deny,
            false,
            Arc::new(ClientGroups::new(groups)),
        )
    }

    #[test]
    fn resolved_once_and_again_after_a_reload_or_for_another_user() {
        let cache = GroupCache::default();
        let ip: IpAddr = "10.0.1.5".parse().unwrap();
        let p = policy("10.0.1.0/24");
        let (set, names) = cache.groups(&p, ip, None);
        assert_eq!(names.as_deref(), Some("web"));
        assert_eq!(cache.groups(&p, ip, None), (set, names));
        // Another user on the same connection: its own groups.
        let user: Arc<str> = Arc::from("mailgw");
        let (_, names) = cache.groups(&p, ip, Some(&user));
        assert_eq!(names.as_deref(), Some("mail,web"));
        assert_eq!(cache.groups(&p, ip, None).1.as_deref(), Some("web"));
        // A reload that moves the web gateways: the cached set is not used.
        let reloaded = policy("10.0.9.0/24");
        assert_ne!(reloaded.hash(), p.hash());
        assert_eq!(cache.groups(&reloaded, ip, None).1, None);
        assert_eq!(cache.groups(&p, ip, None).1.as_deref(), Some("web"));
    }
}
