//! `network.attach`: on `container.started`, attaches the container to its
//! org's network with the instance name as its DNS alias, so the org's other
//! containers reach it by name; records the IP. Emits `container.attached`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::ConditionKind;
use berth_core::events::instance as ev;
use berth_runtime::HostId;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::Deps;
use crate::step::{self, creating, engine};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register(
        "network.attach",
        &[ev::ContainerStarted::TYPE],
        move |ctx| handle(ctx, deps.clone()),
    )?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::ContainerStarted = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if !creating(&inst, p.generation) || inst.conditions.holds(ConditionKind::NetworkAttached) {
        return Ok(ctx.done());
    }
    let (Some(host), Some(network)) = (inst.host.clone(), inst.network.clone()) else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "instance {} has a container but no host or network recorded",
            inst.id
        ))
        .with_code("inconsistent_instance"));
    };
    let ip = deps
        .runtime
        .connect_network(
            &HostId::new(host),
            &network,
            &p.container,
            inst.name.as_str(),
        )
        .await
        .map_err(engine)?;
    inst.ip = Some(ip.clone());
    step::save(
        &mut ctx,
        &mut inst,
        Some((ConditionKind::NetworkAttached, "Attached", &ip)),
        None,
    );
    ctx.emit_payload(&ev::ContainerAttached {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        ip,
    })?;
    Ok(ctx.done())
}
