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
mod host_ensure;
mod image_build;
mod instance_finish;
pub mod names;
mod network_attach;
mod network_ensure;
mod step;

use std::sync::Arc;

use anyhow::Context;
use berth_core::domain::{Conditions, InstanceName, InstanceStatus};
use berth_core::events::instance as ev;
use berth_core::{Envelope, NewEvent};
use berth_runtime::hosts::HostProvider;
use berth_runtime::{ContainerRuntime, Limits};
use berth_store::instances::{self, Instance, InstanceSpec};
use berth_store::{Cause, Store};
use berth_worker::{Registry, RegistryError};

/// What the workers need besides the store.
pub struct Deps {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub hosts: Arc<dyn HostProvider>,
    /// Defaults for every container.
    pub limits: Limits,
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
    "instance.delete",
];

/// Registers every worker of the instance lifecycle.
pub fn register(reg: &mut Registry, deps: Arc<Deps>) -> Result<(), RegistryError> {
    host_ensure::register(reg, deps.clone())?;
    network_ensure::register(reg, deps.clone())?;
    image_build::register(reg, deps.clone())?;
    container_start::register(reg, deps.clone())?;
    network_attach::register(reg, deps.clone())?;
    instance_finish::register(reg)?;
    compensate::register(reg, deps.clone())?;
    delete::register(reg, deps)?;
    Ok(())
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
    let now = store.now();
    let flow_id = store.ids().flow_id();
    let inst = Instance {
        id: store.ids().ulid().to_string().to_ascii_lowercase(),
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
        flow_id,
        created_at: now,
        updated_at: now,
    };
    let event = NewEvent::of(&ev::Requested {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?
    .org(org)
    .subject(&inst.id);
    let env = store.stamp(event, Cause::Root { flow_id });
    let mut tx = store.begin().await?;
    instances::insert(tx.conn(), &inst).await?;
    tx.publish(std::slice::from_ref(&env)).await?;
    tx.commit().await?;
    Ok((inst, env))
}

/// Marks an instance `deleting` and starts the delete flow, in one
/// transaction. Deleting an instance already deleting or deleted is a no-op
/// that returns `None`.
pub async fn delete_instance(
    store: &Store,
    org: &str,
    id: &str,
) -> anyhow::Result<Option<Envelope>> {
    let mut tx = store.begin().await?;
    let Some(mut inst) = instances::get(tx.conn(), id).await? else {
        anyhow::bail!("no instance {id}");
    };
    if inst.org_id != org {
        anyhow::bail!("no instance {id}");
    }
    if !inst.status.can_become(InstanceStatus::Deleting) {
        return Ok(None);
    }
    inst.status = InstanceStatus::Deleting;
    let flow_id = store.ids().flow_id();
    inst.flow_id = flow_id;
    let event = NewEvent::of(&ev::DeleteRequested {
        instance_id: inst.id.clone(),
        generation: inst.generation,
    })?
    .org(org)
    .subject(&inst.id);
    let env = store.stamp(event, Cause::Root { flow_id });
    if !instances::update(tx.conn(), &mut inst, store.now()).await? {
        anyhow::bail!("instance {id} changed while being deleted; try again");
    }
    tx.publish(std::slice::from_ref(&env)).await?;
    tx.commit().await.context("failed to record the delete")?;
    Ok(Some(env))
}
