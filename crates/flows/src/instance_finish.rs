//! `instance.finish`: on `container.attached`, the instance is `running`.
//! Emits `instance.running` (what notifiers and the user's stream follow).

use berth_core::EventPayload;
use berth_core::domain::InstanceStatus;
use berth_core::events::instance as ev;
use berth_worker::{Ctx, HandlerResult, Registry, RegistryError};

use crate::step::{self, creating};

pub fn register(reg: &mut Registry) -> Result<(), RegistryError> {
    reg.register("instance.finish", &[ev::ContainerAttached::TYPE], handle)?;
    Ok(())
}

async fn handle(mut ctx: Ctx) -> HandlerResult {
    let p: ev::ContainerAttached = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Running));
    ctx.emit_payload(&ev::Running {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?;
    Ok(ctx.done())
}
