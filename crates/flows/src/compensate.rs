//! Compensations (DESIGN §4): one worker per step's failure event, each with
//! its own retry policy. Every one leaves the same end state — the instance
//! `failed` with an error a user can act on, and nothing of it left on the
//! host: its container (stopped and removed) and, when the org has nothing
//! else there, the org's network and host claim. (Images are not the
//! instance's: a base is the user's, a build image is shared by the org's
//! instances of its context and goes with the reconciler once none is left.) Doing the whole
//! clean-up in every compensation costs a few idempotent "remove" calls and
//! makes the end state independent of which branch failed first.

use std::sync::Arc;

use berth_core::domain::{InstanceError, InstanceStatus};
use berth_core::events::WorkerFailed;
use berth_core::events::instance as ev;
use berth_runtime::{HostId, RuntimeError};
use berth_store::instances::Instance;
use berth_store::writes::Write;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::step::{self, engine};
use crate::{Deps, names};

/// (compensating worker, failure event it handles).
pub const TABLE: &[(&str, &str)] = &[
    ("compensate.host", "host.ensure.failed"),
    ("compensate.network", "network.ensure.failed"),
    ("compensate.image", "image.build.failed"),
    ("compensate.container", "container.start.failed"),
    ("compensate.attach", "network.attach.failed"),
    ("compensate.finish", "instance.finish.failed"),
    ("compensate.timeout", crate::reconciler::TIMEOUT_EVENT),
];

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    for (worker, event) in TABLE {
        let deps = deps.clone();
        reg.register(worker, &[event], move |ctx| handle(ctx, deps.clone()))?;
    }
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let f: WorkerFailed = ctx
        .envelope()
        .payload_as()
        .map_err(HandlerError::malformed)?;
    let Some(id) = ctx.envelope().subject.clone() else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "failure event {} names no instance",
            ctx.envelope().id
        )));
    };
    let mut inst = step::load(&ctx, &id).await?;
    if !inst.status.is_creating() {
        // Already failed by the other branch, or being deleted.
        return Ok(ctx.done());
    }
    let release = clean_up(&ctx, &deps, &inst).await?;
    inst.error = Some(InstanceError {
        code: f.error.code.clone(),
        message: f.error.message.clone(),
        step: f.worker.clone(),
        attempts: f.attempts,
        cause: (!f.error.chain.is_empty()).then(|| f.error.chain.join(": ")),
    });
    if let Some(host) = release {
        ctx.write(Write::ReleaseHost {
            host: host.to_string(),
            org: inst.org_id.clone(),
        });
    }
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Failed));
    ctx.emit_payload(&ev::Failed {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        code: f.error.code,
        step: f.worker,
    })?;
    Ok(ctx.done())
}

/// Removes what the instance has on its host; returns the host if the org's
/// claim on it should be released (nothing else of the org there, and a
/// provider that releases).
pub async fn clean_up(
    ctx: &Ctx,
    deps: &Deps,
    inst: &Instance,
) -> Result<Option<HostId>, HandlerError> {
    let Some(host) = inst.host.clone().map(HostId::new) else {
        return Ok(None);
    };
    let rt = &deps.runtime;
    let mut containers = vec![names::container(inst)];
    containers.extend(inst.container.clone());
    containers.dedup();
    for c in &containers {
        rt.remove_container(&host, c).await.map_err(engine)?;
    }
    let others = ctx
        .store()
        .others_on_host(&inst.org_id, host.as_str(), &inst.id)
        .await?;
    if others > 0 {
        return Ok(None);
    }
    match rt
        .remove_network(&host, &names::network(&inst.org_id))
        .await
    {
        Ok(()) => {}
        Err(e @ RuntimeError::InUse { .. }) => {
            // Still in use. If another instance of the org is being deleted
            // too, its container may not be gone yet: that delete removes
            // its container before it tries the network, so the last one
            // to go finds it free and removes it (and releases the host).
            // Retrying here instead could exhaust this delete's attempts
            // while the other's container is slow to go.
            let deleting = ctx
                .store()
                .deleting_on_host(&inst.org_id, host.as_str(), &inst.id)
                .await?;
            if deleting > 0 {
                return Ok(None);
            }
            // Otherwise another instance is being attached right now; its
            // record will keep the network, and this retry will see it.
            return Err(HandlerError::retryable(e).with_code("network_in_use"));
        }
        Err(e) => return Err(engine(e)),
    }
    Ok(deps.hosts.releases_when_empty().then_some(host))
}
