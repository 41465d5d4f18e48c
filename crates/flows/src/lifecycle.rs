//! Stop, start and restart of an existing instance's container. The API
//! moved the instance to `stopping` (stop, restart) or `starting` (start) in
//! the same transaction as the request event; these workers do the engine
//! side and record where the instance ended. Starting an instance whose
//! container was removed outside Berth makes the container again from the
//! instance's image and attaches it to the org's network, as Kubernetes
//! recreates a pod's container.

use std::sync::Arc;
use std::time::Duration;

use berth_core::EventPayload;
use berth_core::Timestamp;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{HostId, RuntimeError};
use berth_store::instances::Instance;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};
use tracing::warn;

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
    match deps
        .runtime
        .stop_container(&host, &container, STOP_GRACE)
        .await
    {
        // Removed outside Berth: nothing runs, which is what a stop is for
        // (a later start makes the container again). Failing here left the
        // instance `stopping` for good (found by `berth-bench chaos`).
        Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
        Err(e) => return Err(engine(e)),
    }
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
        match deps
            .runtime
            .stop_container(&host, &container, STOP_GRACE)
            .await
        {
            // Gone: nothing to stop; made again below.
            Ok(()) | Err(RuntimeError::NotFound { .. }) => {}
            Err(e) => return Err(engine(e)),
        }
        inst.status = InstanceStatus::Starting;
    }
    match deps.runtime.start_container(&host, &container).await {
        Ok(()) => {}
        Err(RuntimeError::NotFound { what, .. }) if what == "container" => {
            remake(&deps, &mut inst, &host, ctx.store().now()).await?;
        }
        Err(e) => return Err(engine(e)),
    }
    inst.exit_code = None;
    inst.oom_killed = false;
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Running));
    ctx.emit_payload(&ev::Running {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?;
    Ok(ctx.done())
}

/// Makes the instance's container again (it was removed outside Berth) from
/// its image, and attaches it to the org's network under the instance's
/// name, as the creation flow did. Each step is idempotent, so a retry
/// after a partial attempt goes on from where it stopped.
async fn remake(
    deps: &Deps,
    inst: &mut Instance,
    host: &HostId,
    now: Timestamp,
) -> Result<(), HandlerError> {
    let (Some(image), Some(network)) = (inst.image_tag.clone(), inst.network.clone()) else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "instance {} has no image or network recorded to make its container again",
            inst.id
        ))
        .with_code("inconsistent_instance"));
    };
    warn!(instance = %inst.id, "the container is gone; making it again");
    let container = crate::container_start::create_and_start(deps, inst, host, image).await?;
    let ip = deps
        .runtime
        .connect_network(host, &network, &container, inst.name.as_str())
        .await
        .map_err(engine)?;
    inst.conditions.set(
        ConditionKind::ContainerStarted,
        true,
        "Started",
        &container,
        now,
    );
    inst.conditions
        .set(ConditionKind::NetworkAttached, true, "Attached", &ip, now);
    inst.container = Some(container);
    inst.ip = Some(ip);
    Ok(())
}
