//! `host.ensure`: on `instance.requested`, gives the instance a host — the
//! org's existing one, or a new claim from the provider — and checks that its
//! engine answers. Emits `host.ready`.

use std::collections::BTreeMap;
use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::HostId;
use berth_store::writes::Write;
use berth_worker::{Ctx, HandlerError, HandlerResult, Registry, RegistryError};

use crate::Deps;
use crate::step::{self, creating, engine};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register("host.ensure", &[ev::Requested::TYPE], move |ctx| {
        handle(ctx, deps.clone())
    })?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::Requested = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    let host = match &inst.host {
        Some(h) => HostId::new(h.clone()),
        None => {
            // The claims are read only to choose; the guarded write below
            // settles any race with another org choosing at the same time.
            let claims: BTreeMap<HostId, Vec<String>> = {
                ctx.store()
                    .host_claims()
                    .await?
                    .into_iter()
                    .map(|(h, orgs)| (HostId::new(h), orgs))
                    .collect()
            };
            deps.hosts.choose(&inst.org_id, &claims).ok_or_else(|| {
                HandlerError::retryable(anyhow::anyhow!(
                    "no host is free for org {} (every pool host is claimed)",
                    inst.org_id
                ))
                .with_code("no_host_available")
            })?
        }
    };
    deps.runtime.ping(&host).await.map_err(engine)?;

    // The claim is guarded: with dedicated hosts, a host another org took
    // since we chose makes this attempt a retry, which chooses again.
    ctx.write(Write::ClaimHost {
        host: host.to_string(),
        org: inst.org_id.clone(),
        exclusive: deps.hosts.releases_when_empty(),
    });
    inst.host = Some(host.to_string());
    step::save(
        &mut ctx,
        &mut inst,
        Some((
            ConditionKind::HostReady,
            "HostClaimed",
            &format!("on host {host}"),
        )),
        Some(InstanceStatus::Provisioning),
    );
    ctx.emit_payload(&ev::HostReady {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        host: host.to_string(),
    })?;
    Ok(ctx.done())
}
