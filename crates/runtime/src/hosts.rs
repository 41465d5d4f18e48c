//! Host providers: where an org's resources live. `local` puts every org on
//! the one local engine (isolation by network); `pool` gives each org a host
//! of its own from a configured list, claimed on first use and released when
//! the org's last instance goes. A provider only *chooses*; the claim itself
//! is recorded durably by the worker that asks (in its transaction), so the
//! choice is made from the current claims it is given.

use std::collections::BTreeMap;

use crate::HostId;

/// Chooses hosts for orgs.
pub trait HostProvider: Send + Sync + 'static {
    /// Every host this provider may hand out (for the reconciler and the
    /// engine-event listeners).
    fn hosts(&self) -> Vec<HostId>;

    /// The host for `org`, given `claims` (host → orgs on it). `None` when
    /// no host is free.
    fn choose(&self, org: &str, claims: &BTreeMap<HostId, Vec<String>>) -> Option<HostId>;

    /// Whether a host should be released when its org has nothing left on it
    /// (pool hosts are; the shared local host is not).
    fn releases_when_empty(&self) -> bool;
}

/// One engine shared by all orgs.
#[derive(Debug, Clone, Default)]
pub struct LocalProvider;

pub const LOCAL: &str = "local";

impl HostProvider for LocalProvider {
    fn hosts(&self) -> Vec<HostId> {
        vec![HostId::new(LOCAL)]
    }

    fn choose(&self, _org: &str, _claims: &BTreeMap<HostId, Vec<String>>) -> Option<HostId> {
        Some(HostId::new(LOCAL))
    }

    fn releases_when_empty(&self) -> bool {
        false
    }
}

/// A configured list of engines; each org gets a dedicated one.
#[derive(Debug, Clone)]
pub struct PoolProvider {
    hosts: Vec<HostId>,
}

impl PoolProvider {
    pub fn new(hosts: Vec<HostId>) -> Self {
        PoolProvider { hosts }
    }
}

impl HostProvider for PoolProvider {
    fn hosts(&self) -> Vec<HostId> {
        self.hosts.clone()
    }

    fn choose(&self, org: &str, claims: &BTreeMap<HostId, Vec<String>>) -> Option<HostId> {
        // The org's existing host first (idempotent), else the first free one.
        if let Some((h, _)) = claims
            .iter()
            .find(|(_, orgs)| orgs.iter().any(|o| o == org))
        {
            return Some(h.clone());
        }
        self.hosts
            .iter()
            .find(|h| claims.get(*h).is_none_or(|orgs| orgs.is_empty()))
            .cloned()
    }

    fn releases_when_empty(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_gives_each_org_its_own_host_and_keeps_it() {
        let p = PoolProvider::new(vec![HostId::new("h1"), HostId::new("h2")]);
        let mut claims = BTreeMap::new();
        let a = p.choose("a", &claims).unwrap();
        claims.insert(a.clone(), vec!["a".to_owned()]);
        let b = p.choose("b", &claims).unwrap();
        assert_ne!(a, b);
        claims.insert(b.clone(), vec!["b".to_owned()]);
        assert_eq!(p.choose("a", &claims), Some(a), "same host again");
        assert_eq!(p.choose("c", &claims), None, "pool exhausted");
    }

    #[test]
    fn local_is_shared() {
        let p = LocalProvider;
        assert_eq!(p.choose("a", &BTreeMap::new()), Some(HostId::new(LOCAL)));
        assert!(!p.releases_when_empty());
    }
}
