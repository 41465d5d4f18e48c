//! What every step shares: reading the instance, classifying engine errors
//! for the framework, and the guarded write that ends a step.

use berth_core::domain::{Condition, ConditionKind, InstanceStatus};
use berth_runtime::RuntimeError;
use berth_store::instances::Instance;
use berth_store::writes::{InstancePatch, Write};
use berth_worker::{Ctx, HandlerError};

/// The instance the event is about (from the store's cache of rows this
/// process wrote, else the database). A missing one is fatal: retrying
/// cannot make it appear.
pub async fn load(ctx: &Ctx, id: &str) -> Result<Instance, HandlerError> {
    if let Some(i) = ctx.store().cached_instance(id) {
        return Ok(i);
    }
    ctx.store().instance(id).await?.ok_or_else(|| {
        HandlerError::fatal(anyhow::anyhow!("instance {id} does not exist"))
            .with_code("instance_not_found")
    })
}

/// Whether an event of `generation` still concerns the creation of `i`.
pub fn creating(i: &Instance, generation: i64) -> bool {
    i.generation == generation && i.status.is_creating()
}

/// An engine error as the framework should treat it: unreachable engines and
/// timeouts are retried, everything else is fatal with its stable code.
pub fn engine(e: RuntimeError) -> HandlerError {
    let code = e.code();
    if e.is_retryable() {
        HandlerError::retryable(e).with_code(code)
    } else {
        HandlerError::fatal(e).with_code(code)
    }
}

/// Records a finished step: sets the condition and (if the state machine
/// allows) the new status, and declares the row's guarded write. It commits
/// with the acknowledgement in the dispatcher's group commit; if another
/// step wrote the row first, the attempt is retried and re-reads it.
pub fn save(
    ctx: &mut Ctx,
    i: &mut Instance,
    condition: Option<(ConditionKind, &str, &str)>,
    status: Option<InstanceStatus>,
) {
    let now = ctx.store().now();
    if let Some((kind, reason, message)) = condition {
        i.conditions.set(kind, true, reason, message, now);
    }
    if let Some(s) = status
        && i.status != s
        && i.status.can_become(s)
    {
        i.status = s;
    }
    ctx.write(Write::Instance(Box::new(i.clone())));
}

/// The field a parallel step sets.
pub enum Field {
    Network(String),
    ImageTag(String),
}

/// Records a finished step of one of the parallel branches as a patch of its
/// own field and condition (and status, where the state machine allows), so
/// that the other branch writing the row first costs it no retry. `i` gets
/// the same changes. The condition's message is the field's value.
pub fn patch(
    ctx: &mut Ctx,
    i: &mut Instance,
    field: Field,
    (kind, reason): (ConditionKind, &str),
    status: Option<InstanceStatus>,
) {
    let now = ctx.store().now();
    let (network, image_tag) = match field {
        Field::Network(n) => (Some(n), None),
        Field::ImageTag(t) => (None, Some(t)),
    };
    let message = network.as_deref().or(image_tag.as_deref()).unwrap_or("");
    i.conditions.set(kind, true, reason, message, now);
    let condition = i.conditions.get(kind).cloned().unwrap_or(Condition {
        kind,
        status: true,
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition: now,
    });
    if let Some(s) = status
        && i.status.can_become(s)
    {
        i.status = s;
    }
    if network.is_some() {
        i.network.clone_from(&network);
    }
    if image_tag.is_some() {
        i.image_tag.clone_from(&image_tag);
    }
    ctx.write(Write::Patch(Box::new(InstancePatch {
        id: i.id.clone(),
        generation: i.generation,
        network,
        image_tag,
        condition,
        status,
    })));
}

/// Whether the creation of `generation` was abandoned (the other branch
/// failed, or a delete began): a step that finds this must remove what an
/// earlier attempt of its own may have made, since the clean-up may have run
/// before that existed.
pub fn abandoned(i: &Instance, generation: i64) -> bool {
    i.generation == generation
        && matches!(
            i.status,
            InstanceStatus::Failed | InstanceStatus::Deleting | InstanceStatus::Deleted
        )
}
