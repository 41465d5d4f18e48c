//! Stop, start and restart of an existing instance's container. The API
//! moved the instance to `stopping` (stop, restart) or `starting` (start) in
//! the same transaction as the request event; these workers do the engine
//! side and record where the instance ended.

use std::sync::Arc;
use std::time::Duration;

use berth_core::EventPayload;
use berth_core::domain::InstanceStatus;
use berth_core::events::instance as ev;
use berth_runtime::HostId;
use berth_store::instances::Instance;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::Deps;
use crate::step::{self, engine};

/// How long a container gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    let d = deps.clone();
    reg.register("instance.stop", &[ev::StopRequested::TYPE], move |ctx| {
        stop(ctx, d.clone())
    })?;
    reg.register("instance.start", &[ev::StartRequested::TYPE], move |ctx| {
        start(ctx, deps.clone())
    })?;
    Ok(())
}

fn placed(inst: &Instance) -> Result<(HostId, String), HandlerError> {
    match (&inst.host, &inst.container) {
        (Some(h), Some(c)) => Ok((HostId::new(h.clone()), c.clone())),
        _ => Err(HandlerError::fatal(anyhow::anyhow!(
            "instance {} has no container to act on",
            inst.id
        ))
        .with_code("no_container")),
    }
}

async fn stop(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::StopRequested = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if inst.status != InstanceStatus::Stopping || inst.generation != p.generation {
        return Ok(ctx.done());
    }
    let (host, container) = placed(&inst)?;
    deps.runtime
        .stop_container(&host, &container, STOP_GRACE)
        .await
        .map_err(engine)?;
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Stopped));
    ctx.emit_payload(&ev::Stopped {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?;
    Ok(ctx.done())
}

async fn start(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::StartRequested = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    let expected = if p.restart {
        InstanceStatus::Stopping
    } else {
        InstanceStatus::Starting
    };
    if inst.status != expected || inst.generation != p.generation {
        return Ok(ctx.done());
    }
    let (host, container) = placed(&inst)?;
    if p.restart {
        deps.runtime
            .stop_container(&host, &container, STOP_GRACE)
            .await
            .map_err(engine)?;
        inst.status = InstanceStatus::Starting;
    }
    deps.runtime
        .start_container(&host, &container)
        .await
        .map_err(engine)?;
    inst.exit_code = None;
    inst.oom_killed = false;
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Running));
    ctx.emit_payload(&ev::Running {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?;
    Ok(ctx.done())
}
