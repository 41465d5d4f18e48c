//! The instance lifecycle (DESIGN §4) as workers on the bus: one module per
//! step, the compensations for each step's failure event, and the delete
//! flow. Every worker is idempotent: engine resources have deterministic
//! names and are looked up before being created, and instance rows change
//! only through guarded (versioned) updates, so a replayed event changes
//! nothing. A worker that sees its event is stale (another generation, or an
//! instance no longer being created) acknowledges it and emits nothing.

mod compensate;
mod container_start;
mod delete;
pub mod exits;
mod host_ensure;
pub mod image_build;
mod instance_finish;
mod lifecycle;
pub mod names;
mod network_attach;
mod network_ensure;
pub mod notify;
pub mod reconciler;
mod step;

use std::sync::Arc;

use anyhow::Context;
use berth_core::domain::{Conditions, InstanceName, InstanceStatus};
use berth_core::events::instance as ev;
use berth_core::{Envelope, NewEvent};
use berth_runtime::hosts::HostProvider;
use berth_runtime::{ContainerRuntime, Limits};
use berth_store::instances::{self, Instance, InstanceSpec};
use berth_store::writes::Write;
use berth_store::{Cause, Store};
use berth_worker::{Bus, Registry, RegistryError};

/// What the workers need besides the store.
pub struct Deps {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub hosts: Arc<dyn HostProvider>,
    /// Defaults for every container.
    pub limits: Limits,
    /// This installation's id (`Store::install_id`), on every label set.
    pub install: String,
    /// Builds under way in this process, one per image.
    pub builds: Arc<image_build::BuildLocks>,
}

impl Deps {
    /// The same runtime, hosts and limits for the installation `install`.
    pub fn with_install(&self, install: &str) -> Deps {
        Deps {
            runtime: self.runtime.clone(),
            hosts: self.hosts.clone(),
            limits: self.limits.clone(),
            install: install.to_owned(),
            builds: self.builds.clone(),
        }
    }
}

/// The steps and compensations, in the order of the flow.
pub const WORKERS: &[&str] = &[
    "host.ensure",
    "network.ensure",
    "image.build",
    "container.start",
    "network.attach",
    "instance.finish",
    "compensate.host",
    "compensate.network",
    "compensate.image",
    "compensate.container",
    "compensate.attach",
    "compensate.finish",
    "compensate.timeout",
    "instance.delete",
    "instance.stop",
    "instance.start",
    "instance.exit",
    "restart.policy",
];

/// Registers every worker of the instance lifecycle.
pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    host_ensure::register(reg, deps.clone())?;
    network_ensure::register(reg, deps.clone())?;
    image_build::register(reg, deps.clone())?;
    container_start::register(reg, deps.clone())?;
    network_attach::register(reg, deps.clone())?;
    instance_finish::register(reg, deps.clone())?;
    compensate::register(reg, deps.clone())?;
    delete::register(reg, deps.clone())?;
    lifecycle::register(reg, deps.clone())?;
    exits::register(reg, deps)?;
    Ok(())
}

/// A fresh instance record (not yet saved): `requested`, generation 1, a new
/// flow id.
pub fn new_instance(store: &Store, org: &str, name: InstanceName, spec: InstanceSpec) -> Instance {
    let now = store.now();
    Instance {
        id: store.ids().unpredictable().to_string().to_ascii_lowercase(),
        org_id: org.to_owned(),
        name,
        spec,
        status: InstanceStatus::Requested,
        version: 1,
        generation: 1,
        host: None,
        network: None,
        image_tag: None,
        container: None,
        ip: None,
        conditions: Conditions::default(),
        error: None,
        exit_code: None,
        oom_killed: false,
        restarts: 0,
        flow_id: store.ids().flow_id(),
        created_at: now,
        updated_at: now,
    }
}

/// A new instance row and the `instance.requested` event that starts its
/// flow (the flow's root, under the instance's flow id).
fn requested(
    store: &Store,
    org: &str,
    name: InstanceName,
    spec: InstanceSpec,
) -> anyhow::Result<(Instance, Envelope)> {
    let inst = new_instance(store, org, name, spec);
    let event = NewEvent::of(&ev::Requested {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?
    .org(org)
    .subject(&inst.id);
    let env = store.stamp(
        event,
        Cause::Root {
            flow_id: inst.flow_id,
        },
    );
    Ok((inst, env))
}

/// [`create_instance`] through the bus: the instance row and its event are
/// written in the dispatcher's group commit, so concurrent creations share
/// commits. Same result and errors.
/// With `quota`, the org's live instances must stay at most that many
/// (checked in the same statement as the insert, so concurrent creations
/// cannot pass it together): past it, [`QuotaExceeded`].
pub async fn create_instance_on(
    bus: &Bus,
    org: &str,
    name: InstanceName,
    spec: InstanceSpec,
    quota: Option<u32>,
) -> anyhow::Result<(Instance, Envelope)> {
    let (inst, env) = requested(bus.store(), org, name, spec)?;
    match bus
        .publish_with(
            vec![env.clone()],
            vec![Write::InsertInstance(Box::new(inst.clone()), quota)],
        )
        .await
    {
        Ok(_) => Ok((inst, env)),
        Err(e) if e.downcast_ref::<berth_worker::Rejected>().is_some() => {
            // Refused by one of two guards; which one is told by counting
            // (a count under the quota now means the name was the reason).
            if let Some(max) = quota
                && bus.store().live_instances(org).await? >= i64::from(max)
            {
                return Err(QuotaExceeded { max }.into());
            }
            Err(instances::NameTaken(inst.name.to_string()).into())
        }
        Err(e) => Err(e),
    }
}

/// A creation refused because the org has its quota of live instances.
#[derive(Debug, thiserror::Error)]
#[error("the org has {max} instances, its quota; delete one first")]
pub struct QuotaExceeded {
    pub max: u32,
}

/// Records a new instance and its `instance.requested` event in one
/// transaction; returns the row and the event (whose flow id identifies the
/// whole creation). Fails with [`instances::NameTaken`] on a duplicate name.
pub async fn create_instance(
    store: &Store,
    org: &str,
    name: InstanceName,
    spec: InstanceSpec,
) -> anyhow::Result<(Instance, Envelope)> {
    let (inst, env) = requested(store, org, name, spec)?;
    let mut tx = store.begin().await?;
    tx.insert_instance(&inst).await?;
    tx.publish(std::slice::from_ref(&env)).await?;
    tx.commit().await?;
    Ok((inst, env))
}

/// Why a user action on an instance was refused.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// No such instance in this org (another org's ids are reported the same).
    #[error("no such instance")]
    NotFound,
    /// The action does not apply to the instance's current status.
    #[error("cannot {action} an instance that is {status}")]
    InvalidState {
        status: InstanceStatus,
        action: &'static str,
    },
    /// Another action changed the instance at the same moment; the caller
    /// may simply try again.
    #[error("the instance changed meanwhile; try again")]
    Conflict,
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Moves an instance of `org` to `to` and publishes `event`, in one
/// transaction, when `from(status)` allows the action; a new flow id marks
/// the action. `Ok(None)` when the instance is already where the action leads.
async fn act(
    store: &Store,
    org: &str,
    id: &str,
    action: &'static str,
    to: InstanceStatus,
    already: &[InstanceStatus],
    event: impl FnOnce(&Instance) -> anyhow::Result<NewEvent>,
) -> Result<Option<Envelope>, FlowError> {
    let mut tx = store.begin().await?;
    let Some(mut inst) = tx.instance(id).await? else {
        return Err(FlowError::NotFound);
    };
    if inst.org_id != org {
        return Err(FlowError::NotFound);
    }
    if already.contains(&inst.status) {
        return Ok(None);
    }
    if !inst.status.can_become(to) {
        return Err(FlowError::InvalidState {
            status: inst.status,
            action,
        });
    }
    inst.status = to;
    let flow_id = store.ids().flow_id();
    inst.flow_id = flow_id;
    let env = store.stamp(
        event(&inst)?.org(org).subject(&inst.id),
        Cause::Root { flow_id },
    );
    if !tx.update_instance(&mut inst, store.now()).await? {
        return Err(FlowError::Conflict);
    }
    tx.publish(std::slice::from_ref(&env)).await?;
    tx.commit().await.context("failed to record the action")?;
    Ok(Some(env))
}

/// Marks an instance `deleting` and starts the delete flow. `Ok(None)` if it
/// is already being deleted or deleted.
pub async fn delete_instance(
    store: &Store,
    org: &str,
    id: &str,
) -> Result<Option<Envelope>, FlowError> {
    act(
        store,
        org,
        id,
        "delete",
        InstanceStatus::Deleting,
        &[InstanceStatus::Deleting, InstanceStatus::Deleted],
        |i| {
            Ok(NewEvent::of(&ev::DeleteRequested {
                instance_id: i.id.clone(),
                generation: i.generation,
            })?)
        },
    )
    .await
}

/// Stops a running (or exited) instance's container. `Ok(None)` if it is
/// already stopping or stopped.
pub async fn stop_instance(
    store: &Store,
    org: &str,
    id: &str,
) -> Result<Option<Envelope>, FlowError> {
    act(
        store,
        org,
        id,
        "stop",
        InstanceStatus::Stopping,
        &[InstanceStatus::Stopping, InstanceStatus::Stopped],
        |i| {
            Ok(NewEvent::of(&ev::StopRequested {
                instance_id: i.id.clone(),
                generation: i.generation,
            })?)
        },
    )
    .await
}

/// Starts a stopped or exited instance's container again. `Ok(None)` if it
/// is already starting or running.
pub async fn start_instance(
    store: &Store,
    org: &str,
    id: &str,
) -> Result<Option<Envelope>, FlowError> {
    act(
        store,
        org,
        id,
        "start",
        InstanceStatus::Starting,
        &[InstanceStatus::Starting, InstanceStatus::Running],
        |i| {
            Ok(NewEvent::of(&ev::StartRequested {
                instance_id: i.id.clone(),
                generation: i.generation,
                restart: false,
            })?)
        },
    )
    .await
}

/// Stops and starts a running instance's container (or starts a stopped or
/// exited one).
pub async fn restart_instance(
    store: &Store,
    org: &str,
    id: &str,
) -> Result<Option<Envelope>, FlowError> {
    act(
        store,
        org,
        id,
        "restart",
        InstanceStatus::Stopping,
        &[],
        |i| {
            Ok(NewEvent::of(&ev::StartRequested {
                instance_id: i.id.clone(),
                generation: i.generation,
                restart: true,
            })?)
        },
    )
    .await
}
