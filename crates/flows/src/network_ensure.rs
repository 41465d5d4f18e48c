//! `network.ensure`: on `host.ready`, makes sure the org's private network
//! exists on the host (found, or created with Berth's labels). Emits
//! `network.ready`. Runs in parallel with `image.build`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::ConditionKind;
use berth_core::events::instance as ev;
use berth_runtime::{HostId, NetworkSpec, RuntimeError};
use berth_worker::{Ctx, HandlerResult, Registry, RegistryError};

use crate::step::{self, creating, engine};
use crate::{Deps, names};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register("network.ensure", &[ev::HostReady::TYPE], move |ctx| {
        handle(ctx, deps.clone())
    })?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::HostReady = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    let host = HostId::new(p.host.clone());
    let name = names::network(&inst.org_id);
    if step::abandoned(&inst, p.generation) {
        // The other branch failed first: its clean-up may have looked for the
        // network before an earlier attempt of ours created it. Remove it
        // unless the org has something else on the host.
        let others = ctx
            .store()
            .others_on_host(&inst.org_id, host.as_str(), &inst.id)
            .await?;
        if others == 0 {
            match deps.runtime.remove_network(&host, &name).await {
                Ok(()) | Err(RuntimeError::Conflict { .. }) => {}
                Err(e) => return Err(engine(e)),
            }
        }
        return Ok(ctx.done());
    }
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    if deps
        .runtime
        .find_network(&host, &name)
        .await
        .map_err(engine)?
        .is_none()
    {
        let spec = NetworkSpec {
            name: name.clone(),
            labels: names::org_labels(&deps.install, &inst.org_id),
        };
        match deps.runtime.create_network(&host, &spec).await {
            // Another instance of the org created it at the same moment.
            Ok(_) | Err(RuntimeError::Conflict { .. }) => {}
            Err(e) => return Err(engine(e)),
        }
    }
    step::patch(
        &mut ctx,
        &mut inst,
        step::Field::Network(name.clone()),
        (ConditionKind::NetworkReady, "NetworkReady"),
        None,
    );
    ctx.emit_payload(&ev::NetworkReady {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        network: name,
    })?;
    Ok(ctx.done())
}
