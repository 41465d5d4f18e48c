//! `image.build`: on `host.ready`, settles which image the instance's
//! container is made from and pins it by id. With a base image and nothing
//! to build (the common case), no build runs: the reference is resolved on
//! the host *by name* and checked against the org. With a build context, the
//! org's uploaded archive is built once per org and digest (instances of the
//! same context share the image), each `FROM` checked the same way and
//! pinned to its id first. Env values never go into an image: they are the
//! container's configuration. Emits `image.built` with the image id.
//!
//! A reference counts only if the host has an image by that name and it is
//! not an image Berth made for another org; both failures read the same
//! (`image_not_found`), so that no org can learn whether another's image
//! exists.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{BuildSpec, HostId, ImageInfo, RuntimeError, label};
use berth_store::instances::{BuildRef, Instance};
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::step::{self, creating, engine};
use crate::{Deps, names};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register("image.build", &[ev::HostReady::TYPE], move |ctx| {
        handle(ctx, deps.clone())
    })?;
    Ok(())
}

/// One lock per image being built in this process, so that instances of
/// the same context created together wait for one build and then find its
/// image, instead of each building it.
#[derive(Debug, Default)]
pub struct BuildLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl BuildLocks {
    fn of(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Locks nobody holds or waits for are dropped as others are made.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        map.entry(key.to_owned()).or_default().clone()
    }
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::HostReady = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    // Nothing this step makes belongs to one instance (a base is the
    // user's, a build is shared by the org's instances of its context), so
    // an abandoned creation leaves nothing here to remove.
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    let host = HostId::new(p.host.clone());
    let (image, reason) = match inst.spec.build.clone() {
        None => (
            resolve(&deps, &host, &inst.org_id, &inst.spec.image).await?,
            "Resolved",
        ),
        Some(b) => (build(&ctx, &deps, &host, &inst, &b).await?, "Built"),
    };
    step::patch(
        &mut ctx,
        &mut inst,
        step::Field::ImageTag(image.id.clone()),
        (ConditionKind::ImageBuilt, reason),
        Some(InstanceStatus::Building),
    );
    ctx.emit_payload(&ev::ImageBuilt {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        image: image.id,
    })?;
    Ok(ctx.done())
}

/// Whether `org` may use the image: anything Berth made (or that claims an
/// org) only by that org.
pub(crate) fn usable_by(image: &ImageInfo, org: &str) -> bool {
    let claimed =
        image.labels.contains_key(label::MANAGED) || image.labels.contains_key(label::ORG);
    !claimed || image.labels.get(label::ORG).map(String::as_str) == Some(org)
}

/// The same words whether the host has no such image or has one the org may
/// not use.
fn not_found(reference: &str, host: &HostId) -> HandlerError {
    HandlerError::fatal(anyhow::anyhow!(
        "image '{reference}' not found on host {host}; load it there first (no registry is used)"
    ))
    .with_code("image_not_found")
}

/// The image `reference` names on `host`, if `org` may use it.
async fn resolve(
    deps: &Deps,
    host: &HostId,
    org: &str,
    reference: &str,
) -> Result<ImageInfo, HandlerError> {
    match deps
        .runtime
        .find_image(host, reference)
        .await
        .map_err(engine)?
    {
        Some(i) if usable_by(&i, org) && !i.id.is_empty() => Ok(i),
        _ => Err(not_found(reference, host)),
    }
}

/// The org's image of build `b`, built now if the host does not have it.
async fn build(
    ctx: &Ctx,
    deps: &Deps,
    host: &HostId,
    inst: &Instance,
    b: &BuildRef,
) -> Result<ImageInfo, HandlerError> {
    let tag = names::build_image(&inst.org_id, &b.digest);
    let lock = deps.builds.of(&format!("{host}/{tag}"));
    let _one_at_a_time = lock.lock().await;
    if let Some(i) = deps.runtime.find_image(host, &tag).await.map_err(engine)?
        && usable_by(&i, &inst.org_id)
    {
        return Ok(i);
    }
    let context = ctx.store().build_context(&inst.org_id, &b.id).await?;
    let Some(context) = context else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "build {} no longer exists; upload the context again",
            b.id
        ))
        .with_code("build_not_found"));
    };
    let bad = |e: berth_runtime::context::ContextError| {
        HandlerError::fatal(anyhow::anyhow!("build {}: {e}", b.id)).with_code("invalid_build")
    };
    let dockerfile = berth_runtime::context::dockerfile_of(&context).map_err(bad)?;
    // Every base checked against the org and pinned to the id checked, so
    // that the builder cannot be pointed at another image in between.
    let mut pins = BTreeMap::new();
    for base in berth_runtime::context::base_images(&dockerfile).map_err(bad)? {
        let image = resolve(deps, host, &inst.org_id, &base).await?;
        pins.insert(base, image.id);
    }
    let pinned = berth_runtime::context::with_dockerfile(
        &context,
        &berth_runtime::context::pin(&dockerfile, &pins),
    )
    .map_err(bad)?;
    let mut labels = names::org_labels(&deps.install, &inst.org_id);
    labels.insert(label::BUILD.into(), b.id.clone());
    let spec = BuildSpec {
        tag,
        context: pinned.into(),
        labels,
    };
    match deps.runtime.build_image(host, &spec).await {
        Ok(out) => Ok(out.image),
        Err(RuntimeError::NotFound { what, name, .. }) if what == "image" => {
            // A pinned base removed between the check and the build: name
            // it as the user wrote it.
            let written = pins
                .iter()
                .find(|(_, id)| **id == name)
                .map_or(name.as_str(), |(r, _)| r.as_str());
            Err(not_found(written, host))
        }
        Err(RuntimeError::BuildFailed {
            step,
            message,
            log_tail,
            ..
        }) => Err(HandlerError::fatal(anyhow::anyhow!(
            "the build failed at {step}: {message}\n{}",
            log_tail.join("\n")
        ))
        .with_code("build_failed")),
        Err(e) => Err(engine(e)),
    }
}
