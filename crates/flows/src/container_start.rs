//! `container.start`: the join of the two parallel branches. It receives both
//! `network.ready` and `image.built`, and acts only when the instance row
//! says both hold, on the delivery of the branch that finished last. Creates
//! the generation's container (an earlier attempt's, on a name conflict),
//! starts it, and emits `container.started`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, Conditions, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{ContainerSpec, HostId, Limits, RuntimeError};
use berth_store::instances::Instance;
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
    let mine = if ctx.envelope().event_type == ev::ImageBuilt::TYPE {
        ConditionKind::ImageBuilt
    } else {
        ConditionKind::NetworkReady
    };
    if !creating(&inst, p.generation)
        || !joined_by(&inst.conditions, mine)
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
    let name = create_and_start(&deps, &inst, &host, image).await?;
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

/// Creates and starts the instance's container for its generation from
/// `image`; returns its name. No lookup first: the name is the
/// generation's, so a conflict can only be the container an earlier attempt
/// created, and it is used as is.
pub(crate) async fn create_and_start(
    deps: &Deps,
    inst: &Instance,
    host: &HostId,
    image: String,
) -> Result<String, HandlerError> {
    let name = names::container(inst);
    let limits = match inst.spec.limits {
        Some(l) => Limits {
            memory_bytes: Some(l.memory_bytes),
            nano_cpus: Some(l.nano_cpus),
            pids: Some(l.pids),
        },
        None => deps.limits.clone(),
    };
    let spec = ContainerSpec {
        name: name.clone(),
        image,
        labels: names::instance_labels(&deps.install, inst),
        limits,
        // The env lives here and nowhere else: no image, label or build
        // log of Berth's holds a value of it.
        env: inst
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cmd: inst.spec.cmd.clone(),
    };
    match deps.runtime.create_container(host, &spec).await {
        Ok(_) | Err(RuntimeError::Conflict { .. }) => {}
        Err(e) => return Err(engine(e)),
    }
    match deps.runtime.start_container(host, &name).await {
        Ok(()) => Ok(name),
        // The name is taken, yet nothing of that name can be started: an
        // earlier attempt's container is not there, or not yet. Docker
        // reserves the name when a create begins and registers the
        // container only when it ends, so an attempt killed mid-create
        // leaves a create the engine is still finishing (or rolls back).
        // Not fatal: the next attempt finds it made, or makes it again.
        Err(e @ RuntimeError::NotFound { .. }) => {
            Err(HandlerError::retry_after(e, NOT_READY).with_code("container_not_ready"))
        }
        Err(e) => Err(engine(e)),
    }
}

/// How long a start waits for a container whose create the engine has not
/// finished (capped by the policy's `backoff.max`).
const NOT_READY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether the delivery of `mine` (one of the two join inputs) is the one to
/// act: both branches are done and `mine` was committed last (the image on
/// a tie: both in one commit). Both deliveries may read the row after both
/// branches wrote it; they read the same times, so exactly one acts — two
/// acting would start the container twice, and one could fail for good
/// while the other goes on. The times are those of the commits (see
/// `InstancePatch::condition`), so the branch committed last is the one
/// whose delivery is sure to see both: handlers' own clocks could name the
/// other, whose delivery may have read the row before this branch landed,
/// and then neither would act.
fn joined_by(c: &Conditions, mine: ConditionKind) -> bool {
    let (Some(net), Some(img)) = (
        c.get(ConditionKind::NetworkReady).filter(|x| x.status),
        c.get(ConditionKind::ImageBuilt).filter(|x| x.status),
    ) else {
        return false;
    };
    let image_last = img.last_transition >= net.last_transition;
    (mine == ConditionKind::ImageBuilt) == image_last
}
