//! What every step shares: reading the instance, classifying engine errors
//! for the framework, and the guarded write that ends a step.

use berth_core::domain::{ConditionKind, InstanceStatus};
use berth_runtime::RuntimeError;
use berth_store::instances::{self, Instance};
use berth_worker::{Ctx, HandlerError};

/// The instance the event is about. A missing one is fatal: retrying cannot
/// make it appear.
pub async fn load(ctx: &Ctx, id: &str) -> Result<Instance, HandlerError> {
    let mut conn = ctx.store().pool().acquire().await?;
    instances::get(&mut conn, id).await?.ok_or_else(|| {
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

/// What became of a step's write.
#[derive(Debug, PartialEq, Eq)]
pub enum Saved {
    Yes,
    /// The instance left creation meanwhile (failed by the other branch, or
    /// being deleted): the step must undo what it made and emit nothing.
    Stale,
}

/// [`save`] for a creation step: a lost race against something that ended
/// the creation is [`Saved::Stale`] rather than an error.
pub async fn save_step(
    ctx: &mut Ctx,
    i: &mut Instance,
    generation: i64,
    condition: (ConditionKind, &str, &str),
    status: Option<InstanceStatus>,
) -> Result<Saved, HandlerError> {
    match save(ctx, i, Some(condition), status).await {
        Ok(()) => Ok(Saved::Yes),
        Err(e) => {
            let now = load(ctx, &i.id).await?;
            if creating(&now, generation) {
                Err(e)
            } else {
                Ok(Saved::Stale)
            }
        }
    }
}

/// Records a finished step: the condition, an optional new status, in the
/// handler's transaction, guarded by the version read. A lost race is
/// retryable: the next attempt re-reads and sees what the winner did.
pub async fn save(
    ctx: &mut Ctx,
    i: &mut Instance,
    condition: Option<(ConditionKind, &str, &str)>,
    status: Option<InstanceStatus>,
) -> Result<(), HandlerError> {
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
    let tx = ctx.tx().await?;
    if instances::update(tx.conn(), i, now).await? {
        Ok(())
    } else {
        Err(HandlerError::retryable(anyhow::anyhow!(
            "instance {} changed concurrently; re-reading",
            i.id
        ))
        .with_code("concurrent_update"))
    }
}
