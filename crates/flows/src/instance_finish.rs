//! `instance.finish`: on `container.attached`, the instance is `running` —
//! if its container still runs. A container that ends at once (`exit 1`)
//! dies while the flow is still starting it, and the engine's `die` then
//! finds an instance that is not yet running; so the last step asks the
//! engine, and an ended container makes the instance `exited` with its exit
//! code (its restart policy applies) instead of `running` with no address.
//! A death after this look is `instance.exit`'s (see `exits`). Emits
//! `instance.running` (what notifiers and the user's stream follow), or
//! `instance.exited`.

use std::sync::Arc;

use berth_core::EventPayload;
use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_core::events::instance as ev;
use berth_runtime::{ContainerState, HostId};
use berth_worker::{Ctx, HandlerResult, Registry, RegistryError};

use crate::Deps;
use crate::step::{self, creating, engine};

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register(
        "instance.finish",
        &[ev::ContainerAttached::TYPE],
        move |ctx| handle(ctx, deps.clone()),
    )?;
    Ok(())
}

async fn handle(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::ContainerAttached = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if !creating(&inst, p.generation) {
        return Ok(ctx.done());
    }
    let ended = match (&inst.host, &inst.container) {
        (Some(host), Some(container)) => {
            match deps
                .runtime
                .find_container(&HostId::new(host.clone()), container)
                .await
                .map_err(engine)?
            {
                Some(c) => match c.state {
                    ContainerState::Exited {
                        exit_code,
                        oom_killed,
                    } => Some((Some(exit_code), oom_killed)),
                    _ => None,
                },
                // Removed behind Berth's back already.
                None => Some((None, false)),
            }
        }
        _ => None,
    };
    let Some((exit_code, oom_killed)) = ended else {
        step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Running));
        ctx.emit_payload(&ev::Running {
            instance_id: inst.id.clone(),
            generation: inst.generation,
        })?;
        return Ok(ctx.done());
    };
    inst.exit_code = exit_code;
    inst.oom_killed = oom_killed;
    if exit_code.is_none() {
        inst.conditions.set(
            ConditionKind::ContainerStarted,
            false,
            "ContainerGone",
            "the container was removed outside Berth",
            ctx.store().now(),
        );
    }
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Exited));
    ctx.emit_payload(&ev::Exited {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        exit_code: exit_code.unwrap_or(-1),
        oom_killed,
        gone: exit_code.is_none(),
    })?;
    Ok(ctx.done())
}
