//! Deterministic names and labels of engine resources: a retry finds what an
//! earlier attempt made instead of making it again.

use berth_runtime::{Labels, label};
use berth_store::instances::Instance;

/// The org's private network on a host.
pub fn network(org: &str) -> String {
    format!("berth-{org}")
}

/// The image built from an org's build context (`digest`: `sha256:<hex>`):
/// one per org and context, shared by every instance made from it.
pub fn build_image(org: &str, digest: &str) -> String {
    format!(
        "berth/{org}/build:{}",
        digest.strip_prefix("sha256:").unwrap_or(digest)
    )
}

/// The org and digest (`sha256:<hex>`) a tag of [`build_image`] names.
pub fn parse_build_image(tag: &str) -> Option<(&str, String)> {
    let rest = tag.strip_prefix("berth/")?;
    let (org, hex) = rest.split_once("/build:")?;
    Some((org, format!("sha256:{hex}")))
}

/// The org, instance name and generation an image tag of earlier versions
/// names (`berth/<org>/<name>:g<generation>`, one image per instance with
/// its env inside; an upgraded database may still run on such images).
pub fn parse_image(tag: &str) -> Option<(&str, &str, i64)> {
    let rest = tag.strip_prefix("berth/")?;
    let (org, rest) = rest.split_once('/')?;
    let (name, generation) = rest.split_once(":g")?;
    Some((org, name, generation.parse().ok()?))
}

/// The container of one generation of an instance: at most one can exist.
pub fn container(i: &Instance) -> String {
    format!("berth-{}-{}-g{}", i.org_id, i.name, i.generation)
}

/// Labels of an instance's container.
pub fn instance_labels(install: &str, i: &Instance) -> Labels {
    let mut l = org_labels(install, &i.org_id);
    l.insert(label::INSTANCE.into(), i.id.clone());
    l.insert(label::GENERATION.into(), i.generation.to_string());
    l.insert(label::FLOW.into(), i.flow_id.to_string());
    l
}

/// Labels of an org's network and images.
pub fn org_labels(install: &str, org: &str) -> Labels {
    let mut l = Labels::new();
    l.insert(label::MANAGED.into(), "true".into());
    l.insert(label::INSTALL.into(), install.to_owned());
    l.insert(label::ORG.into(), org.to_owned());
    l
}

#[cfg(test)]
mod tests {
    #[test]
    fn build_tags_name_their_org_and_digest() {
        let tag = super::build_image("o1", "sha256:ab12");
        assert_eq!(tag, "berth/o1/build:ab12");
        assert_eq!(
            super::parse_build_image(&tag),
            Some(("o1", "sha256:ab12".to_owned()))
        );
        assert_eq!(super::parse_build_image("berth/o1/web:g1"), None);
    }

    #[test]
    fn image_tags_name_their_instance() {
        assert_eq!(
            super::parse_image("berth/o1/web-2:g3"),
            Some(("o1", "web-2", 3))
        );
        for other in [
            "berth/o1/web",
            "busybox:latest",
            "berth/o1/web:latest",
            "sha256:ab",
        ] {
            assert_eq!(super::parse_image(other), None, "{other}");
        }
    }
}
