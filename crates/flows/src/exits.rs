//! Containers that stop on their own. A listener per host turns the engine's
//! die/oom events for Berth's containers into `engine.container.died`
//! events; `instance.exit` records the instance `exited` with the exit code
//! (and whether the kernel killed it for memory; or, when the reconciler
//! found the container gone, a `ContainerGone` condition); `restart.policy`
//! applies the instance's restart policy (`no`, `on-failure[:max]`,
//! `always`) with back-off between restarts.

use std::sync::Arc;
use std::time::Duration;

use berth_core::domain::{ConditionKind, InstanceStatus, RestartPolicy};
use berth_core::events::instance as ev;
use berth_core::{EventPayload, NewEvent, Timestamp};
use berth_runtime::{ContainerState, EngineEventKind, HostId, label};
use berth_store::{Cause, Store};
use berth_worker::{Bus, Ctx, HandlerError, HandlerResult, Registry, RegistryError};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Deps;
use crate::step;

pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    reg.register("instance.exit", &[ev::ContainerDied::TYPE], move |ctx| {
        exit(ctx, deps.clone())
    })?;
    reg.register("restart.policy", &[ev::Exited::TYPE], restart)?;
    Ok(())
}

async fn exit(mut ctx: Ctx, deps: Arc<Deps>) -> HandlerResult {
    let p: ev::ContainerDied = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if inst.generation != p.generation {
        return Ok(ctx.done());
    }
    // A death while the instance is being started (by its creation flow,
    // or by a start or restart) is not lost: it is applied once the start
    // is recorded, which is soon — meanwhile this delivery backs off and
    // is retried. (The creation's last step also asks the engine, so an
    // instance whose container ended at once is never reported running.)
    if inst.status == InstanceStatus::Starting
        && inst
            .container
            .as_deref()
            .is_none_or(|c| c == p.container.as_str())
    {
        return Err(HandlerError::retryable(anyhow::anyhow!(
            "container {} ended while its instance was starting; applied once the start is recorded",
            p.container
        ))
        .with_code("instance_starting"));
    }
    // Only the current generation's container, and only while it should be
    // running: a stop or restart we asked for also makes the engine say "die".
    if inst.status != InstanceStatus::Running
        || inst.container.as_deref() != Some(p.container.as_str())
    {
        return Ok(ctx.done());
    }
    let mut p = p;
    if p.at < inst.updated_at && !p.gone {
        // From before the instance last became running: either one we
        // caused (the stop of a restart), seen late, or a death during its
        // start that waited above. The engine tells which: a container
        // that runs now was started again after it.
        let Some(host) = inst.host.clone() else {
            return Ok(ctx.done());
        };
        match deps
            .runtime
            .find_container(&HostId::new(host), &p.container)
            .await
            .map_err(step::engine)?
            .map(|c| c.state)
        {
            Some(ContainerState::Exited {
                exit_code,
                oom_killed,
            }) => {
                p.exit_code = exit_code;
                p.oom_killed |= oom_killed;
            }
            // Running again (a stale death), or gone (the reconciler's).
            _ => return Ok(ctx.done()),
        }
    }
    inst.oom_killed = p.oom_killed;
    if p.gone {
        // No exit code to show; the condition says what happened, and the
        // container is made again when the instance starts.
        inst.exit_code = None;
        inst.conditions.set(
            ConditionKind::ContainerStarted,
            false,
            "ContainerGone",
            &format!("container {} was removed outside Berth", p.container),
            ctx.store().now(),
        );
    } else {
        inst.exit_code = Some(p.exit_code);
    }
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Exited));
    ctx.emit_payload(&ev::Exited {
        instance_id: inst.id.clone(),
        generation: inst.generation,
        exit_code: p.exit_code,
        oom_killed: p.oom_killed,
        gone: p.gone,
    })?;
    Ok(ctx.done())
}

/// Delay before restart number `n` (from 0): 100 ms doubling to at most a
/// minute, as Docker backs off a crash-looping container.
pub fn restart_delay(n: i64) -> Duration {
    let exp = u32::try_from(n.clamp(0, 20)).unwrap_or(20);
    Duration::from_millis(100u64 << exp).min(Duration::from_secs(60))
}

async fn restart(mut ctx: Ctx) -> HandlerResult {
    let p: ev::Exited = ctx.payload()?;
    let mut inst = step::load(&ctx, &p.instance_id).await?;
    if inst.generation != p.generation || inst.status != InstanceStatus::Exited {
        return Ok(ctx.done());
    }
    let wanted = match inst.spec.restart {
        RestartPolicy::No => false,
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure { max } => {
            (p.gone || p.exit_code != 0) && max.is_none_or(|m| inst.restarts < i64::from(m))
        }
    };
    if !wanted {
        return Ok(ctx.done());
    }
    let delay = restart_delay(inst.restarts);
    inst.restarts += 1;
    step::save(&mut ctx, &mut inst, None, Some(InstanceStatus::Starting));
    let at = ctx.store().now().plus(delay);
    ctx.emit(
        NewEvent::of(&ev::StartRequested {
            instance_id: inst.id.clone(),
            generation: inst.generation,
            restart: false,
        })?
        .not_before(at),
    );
    Ok(ctx.done())
}

/// Follows `host`'s engine events until cancelled, publishing a
/// `engine.container.died` event for each death of a Berth container. After a
/// dropped connection it resubscribes from the last event seen, so nothing
/// is missed; a repeated event is harmless (the worker checks the row).
pub async fn listen(bus: Bus, deps: Arc<Deps>, host: HostId, cancel: CancellationToken) {
    let store: Store = bus.store().clone();
    let mut since: Timestamp = store.now();
    let mut pause = Duration::from_millis(100);
    // Engines report an OOM kill as its own event just before the die.
    let mut oom_pending: std::collections::HashSet<String> = Default::default();
    loop {
        let mut events = deps.runtime.events(&host, label::INSTANCE, Some(since));
        loop {
            let next = berth_core::sched::idle(async {
                tokio::select! {
                    _ = cancel.cancelled() => None,
                    n = events.next() => Some(n),
                }
            })
            .await;
            let Some(next) = next else {
                return;
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    warn!(%host, error = %e, "engine event stream failed; resubscribing");
                    break;
                }
                Some(Ok(e)) => {
                    pause = Duration::from_millis(100);
                    since = since.max(e.at);
                    let exit_code = match e.kind {
                        EngineEventKind::Oom => {
                            oom_pending.insert(e.container.clone());
                            continue;
                        }
                        EngineEventKind::Die { exit_code } => exit_code,
                        EngineEventKind::Start => {
                            debug!(%host, container = %e.container, "container started");
                            continue;
                        }
                    };
                    let oom_killed = oom_pending.remove(&e.container);
                    // Another installation's container, on a shared engine.
                    if e.labels.get(label::INSTALL) != Some(&deps.install) {
                        continue;
                    }
                    let (Some(id), Some(org)) =
                        (e.labels.get(label::INSTANCE), e.labels.get(label::ORG))
                    else {
                        continue;
                    };
                    let generation = e
                        .labels
                        .get(label::GENERATION)
                        .and_then(|g| g.parse().ok())
                        .unwrap_or(0);
                    let event = match NewEvent::of(&ev::ContainerDied {
                        instance_id: id.clone(),
                        generation,
                        exit_code,
                        oom_killed,
                        container: e.container.clone(),
                        at: e.at,
                        gone: false,
                    }) {
                        Ok(ev) => ev.org(org.clone()).subject(id.clone()),
                        Err(err) => {
                            warn!(error = %err, "cannot encode an engine event");
                            continue;
                        }
                    };
                    let flow_id = store.ids().flow_id();
                    if let Err(err) = bus.publish(event, Cause::Root { flow_id }).await {
                        warn!(%host, error = %format!("{err:#}"), "cannot publish an engine event; resubscribing");
                        break;
                    }
                    info!(%host, container = %e.container, exit_code, "container died");
                }
            }
        }
        let stop = berth_core::sched::idle(async {
            tokio::select! {
                _ = cancel.cancelled() => true,
                _ = tokio::time::sleep(pause) => false,
            }
        })
        .await;
        if stop {
            return;
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}
