//! Deterministic names and labels of engine resources: a retry finds what an
//! earlier attempt made instead of making it again.

use berth_runtime::{Labels, label};
use berth_store::instances::Instance;

/// The org's private network on a host.
pub fn network(org: &str) -> String {
    format!("berth-{org}")
}

/// The image of one generation of an instance.
pub fn image(i: &Instance) -> String {
    format!("berth/{}/{}:g{}", i.org_id, i.name, i.generation)
}

/// The container of one generation of an instance: at most one can exist.
pub fn container(i: &Instance) -> String {
    format!("berth-{}-{}-g{}", i.org_id, i.name, i.generation)
}

/// Labels of everything made for an instance.
pub fn instance_labels(i: &Instance) -> Labels {
    let mut l = Labels::new();
    l.insert(label::MANAGED.into(), "true".into());
    l.insert(label::ORG.into(), i.org_id.clone());
    l.insert(label::INSTANCE.into(), i.id.clone());
    l.insert(label::GENERATION.into(), i.generation.to_string());
    l.insert(label::FLOW.into(), i.flow_id.to_string());
    l
}

/// Labels of an org's network.
pub fn network_labels(org: &str) -> Labels {
    let mut l = Labels::new();
    l.insert(label::MANAGED.into(), "true".into());
    l.insert(label::ORG.into(), org.to_owned());
    l
}
