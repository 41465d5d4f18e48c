//! One handler on one envelope, outside the dispatcher: what a step test
//! needs to see what a step decides — its declared writes and emitted
//! events — without a bus, a lease or a commit (apalis keeps its test
//! worker next to its core for the same reason).

use std::sync::Arc;

use berth_core::{Envelope, NewEvent};
use berth_store::writes::Write;
use berth_store::{Store, Tx};

use crate::handler::{Ctx, HandlerError};
use crate::registry::Registry;

/// What one successful attempt would have committed.
#[derive(Debug)]
pub struct StepOutput {
    /// The writes it declared, in order.
    pub writes: Vec<Write>,
    /// The events it emitted, in order.
    pub emitted: Vec<NewEvent>,
    /// The transaction it opened with [`Ctx::tx`], uncommitted: commit it
    /// to keep what it wrote, drop it to roll back.
    pub tx: Option<Tx>,
}

/// Runs worker `worker` of `registry` once on `env`, against `store`, as
/// the dispatcher would (the attempt is `env.attempt`): its `Ok` is what
/// the attempt would commit — nothing is applied, acknowledged or
/// published — and its `Err` the failure the framework would act on.
/// `Err` with a fatal `HandlerError` also when no such worker exists.
pub async fn run_handler(
    registry: &Registry,
    worker: &str,
    store: &Store,
    env: Envelope,
) -> Result<StepOutput, HandlerError> {
    let Some(spec) = registry.workers().iter().find(|w| &*w.name == worker) else {
        return Err(HandlerError::fatal(anyhow::anyhow!(
            "no worker named '{worker}' is registered"
        )));
    };
    let ctx = Ctx {
        env: Arc::new(env),
        worker: spec.name.clone(),
        store: store.clone(),
        tx: None,
        emitted: Vec::new(),
        writes: Vec::new(),
    };
    let done = spec.handler.call(ctx).await?;
    Ok(StepOutput {
        writes: done.writes,
        emitted: done.emitted,
        tx: done.tx,
    })
}
