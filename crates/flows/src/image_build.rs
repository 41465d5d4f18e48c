//! `image.build`: on `host.ready`, builds the instance's image from its base
//! image (which must be on the host; nothing is pulled) with its env, command
//! and its org's labels (the tag names the instance, so that instances of
//! the same spec share the build). A missing base is fatal
//! (`image_not_found`), with the image name and the build's last lines in
//! the error. Emits `image.built`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{HostId, ImageSpec, RuntimeError};
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::step::{self, creating, engine};
use crate::{Deps, names};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register("image.build", &[ev::HostReady::TYPE], move |ctx| {
        handle(ctx, deps.clone())
    })?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::HostReady = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    let host = HostId::new(p.host.clone());
    let tag = names::image(&inst);
    if step::abandoned(&inst, p.generation) {
        // An earlier attempt may have built it after the clean-up ran.
        deps.runtime
            .remove_image(&host, &tag)
            .await
            .map_err(engine)?;
        return Ok(ctx.done());
    }
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    // Only a retry (or a step already recorded) can find an image made
    // earlier; a first attempt saves the engine a round trip on the
    // critical path. Rebuilding an existing tag would be harmless anyway.
    let look = ctx.attempt() > 1 || inst.conditions.holds(ConditionKind::ImageBuilt);
    if !look
        || deps
            .runtime
            .find_image(&host, &tag)
            .await
            .map_err(engine)?
            .is_none()
    {
        let spec = ImageSpec {
            tag: tag.clone(),
            base: inst.spec.image.clone(),
            env: inst
                .spec
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cmd: inst.spec.cmd.clone(),
            labels: names::org_labels(&deps.install, &inst.org_id),
        };
        match deps.runtime.build_image(&host, &spec).await {
            Ok(_) => {}
            Err(RuntimeError::NotFound { what, name, .. }) if what == "image" => {
                return Err(HandlerError::fatal(anyhow::anyhow!(
                    "base image '{name}' not found on host {host}; load it there first (no registry is used)"
                ))
                .with_code("image_not_found"));
            }
            Err(e) => return Err(engine(e)),
        }
    }
    step::patch(
        &mut ctx,
        &mut inst,
        step::Field::ImageTag(tag.clone()),
        (ConditionKind::ImageBuilt, "Built"),
        Some(InstanceStatus::Building),
    );
    ctx.emit_payload(&ev::ImageBuilt {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        image: tag,
    })?;
    Ok(ctx.done())
}
