//! `container.start`: the join of the two parallel branches. It receives both
//! `network.ready` and `image.built`, and acts only when the instance row
//! says both hold — whichever arrives second does the work. Creates the
//! generation's container (or finds the one an earlier attempt made), starts
//! it, and emits `container.started`. If both arrivals race, the guarded
//! update lets one win; the other's retry sees the work done and emits
//! nothing.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{ContainerSpec, HostId, RuntimeError};
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};
use serde::Deserialize;

use crate::step::{self, creating, engine};
use crate::{Deps, names};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register(
        "container.start",
        &[ev::NetworkReady::TYPE, ev::ImageBuilt::TYPE],
        move |ctx| handle(ctx, deps.clone()),
    )?;
    Ok(())
}

/// The fields both join inputs share.
#[derive(Deserialize)]
struct Join {
    instance_id: String,
    generation: i64,
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: Join = ctx
        .envelope()
        .payload_as()
        .map_err(HandlerError::malformed)?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if step::abandoned(&inst, p.generation) {
        // An earlier attempt may have started it after the clean-up ran:
        // nothing may run for an instance that is failed or being deleted.
        if let Some(host) = inst.host.clone() {
            let name = names::container(&inst);
            deps.runtime
                .remove_container(&HostId::new(host), &name)
                .await
                .map_err(engine)?;
        }
        return Ok(ctx.done());
    }
    if !creating(&inst, p.generation)
        || !inst.conditions.holds(ConditionKind::NetworkReady)
        || !inst.conditions.holds(ConditionKind::ImageBuilt)
        || inst.conditions.holds(ConditionKind::ContainerStarted)
    {
        return Ok(ctx.done());
    }
    let (Some(host), Some(image)) = (inst.host.clone(), inst.image_tag.clone()) else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "instance {} has its conditions but no host or image recorded",
            inst.id
        ))
        .with_code("inconsistent_instance"));
    };
    let host = HostId::new(host);
    let name = names::container(&inst);
    // No lookup first: the name is the generation's, so a conflict can only
    // be the container an earlier attempt created, and it is used as is.
    let spec = ContainerSpec {
        name: name.clone(),
        image,
        labels: names::instance_labels(&inst),
        limits: deps.limits.clone(),
    };
    match deps.runtime.create_container(&host, &spec).await {
        Ok(_) | Err(RuntimeError::Conflict { .. }) => {}
        Err(e) => return Err(engine(e)),
    }
    deps.runtime
        .start_container(&host, &name)
        .await
        .map_err(engine)?;
    inst.container = Some(name.clone());
    step::save(
        &mut ctx,
        &mut inst,
        Some((ConditionKind::ContainerStarted, "Started", &name)),
        Some(InstanceStatus::Starting),
    );
    ctx.emit_payload(&ev::ContainerStarted {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        container: name,
    })?;
    Ok(ctx.done())
}
