//! The delete flow: on `instance.delete.requested`, stops and removes the
//! container, drops the org's network and releases its
//! host when this was the org's last instance there, and marks the instance
//! `deleted`. Emits `instance.deleted`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::InstanceStatus;
use berth_core::events::instance as ev;
use berth_store::writes::Write;
use berth_worker::{Ctx, HandlerResult, Registry, RegistryError};

use crate::Deps;
use crate::compensate::clean_up;
use crate::step;

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register(
        "instance.delete",
        &[ev::DeleteRequested::TYPE],
        move |ctx| handle(ctx, deps.clone()),
    )?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::DeleteRequested = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if inst.status != InstanceStatus::Deleting {
        return Ok(ctx.done());
    }
    let release = clean_up(&ctx, &deps, &inst).await?;
    if let Some(host) = release {
        ctx.write(Write::ReleaseHost {
            host: host.to_string(),
            org: inst.org_id.clone(),
        });
    }
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Deleted));
    ctx.emit_payload(&ev::Deleted {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?;
    Ok(ctx.done())
}
