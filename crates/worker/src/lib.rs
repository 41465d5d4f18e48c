//! Berth's worker framework. A worker is a named handler subscribed to event
//! types; the framework owns delivery, acknowledgement, timeouts, back-off,
//! dead-lettering, failure events and tracing, with retry policies declared in
//! configuration. The bus here is the embedded one: the event table itself,
//! dispatched in-process by one group-committing task.

pub mod clock;
mod dispatcher;
pub mod handler;
pub mod policy;
pub mod registry;
pub mod testing;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_core::{Envelope, EventId, NewEvent, SeededRng};
use berth_store::{Cause, Redrive, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span};

pub use dispatcher::Stats;
pub use handler::{
    Ctx, Done, FailureKind, Handler, HandlerError, HandlerResult, fatal, retry_after, retryable,
};
pub use policy::{Backoff, Jitter, Policies, Policy, PolicyConfig, PolicyError, WorkersConfig};
pub use registry::{Registry, RegistryError, WorkerSpec};

use dispatcher::{Conns, Dispatcher, DispatcherConfig, PublishReq};

/// A publish whose guarded write did not hold (e.g. the name was taken):
/// nothing of it was written.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("a guarded write of the publish did not hold; nothing was written")]
pub struct Rejected;

/// Knobs of the embedded dispatcher that are not per-worker policy.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Added to a worker's timeout to make its lease: a lease outliving its
    /// attempt means only a dead process lets work be handed out again.
    pub lease_grace: Duration,
    /// How long shutdown waits for in-flight attempts before returning them.
    pub shutdown_grace: Duration,
    /// Most events and completions in one group commit.
    pub max_batch: usize,
    /// How often an idle dispatcher looks for work committed by another
    /// process; work committed in this process wakes it at once.
    pub poll_interval: Duration,
    /// How often the WAL is checkpointed in the background while this
    /// process commits (never while it does not); `None` leaves it to
    /// SQLite's automatic checkpoint (tests on a paused clock, where an
    /// ever-armed timer would make time jump during database IO).
    pub checkpoint_interval: Option<Duration>,
    /// The generator for back-off jitter.
    pub rng: Arc<SeededRng>,
}

impl Default for BusOptions {
    fn default() -> Self {
        BusOptions {
            lease_grace: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            max_batch: 4096,
            poll_interval: Duration::from_secs(1),
            checkpoint_interval: Some(Duration::from_millis(50)),
            rng: Arc::new(SeededRng::from_entropy()),
        }
    }
}

/// A handle for publishing onto the bus; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    store: Store,
    /// The dispatcher's queue; `None` in a process without one (see
    /// [`Bus::without_dispatcher`]).
    tx: Option<mpsc::Sender<PublishReq>>,
    stats: Arc<Stats>,
    committed: tokio::sync::broadcast::Sender<Arc<Envelope>>,
    retried: tokio::sync::broadcast::Sender<Arc<Retried>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// A bus for a process that dispatches nothing (`berth serve --role
    /// api`): each publish commits in a transaction of its own, and the
    /// dispatchers of other processes find the work (the poll, on SQLite).
    /// Nothing is ever broadcast on [`Bus::committed`] or
    /// [`Bus::retried`], so listeners rely on reading the log.
    pub fn without_dispatcher(store: Store) -> Bus {
        Bus {
            store,
            tx: None,
            stats: Arc::new(Stats::default()),
            committed: tokio::sync::broadcast::channel(1).0,
            retried: tokio::sync::broadcast::channel(1).0,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Every event the dispatcher commits from now on, as it commits it
    /// (events committed by other transactions are not included). A
    /// listener that falls more than [`COMMITTED_BACKLOG`] events behind is
    /// told how many it missed (`RecvError::Lagged`) and must look in the
    /// log for them.
    pub fn committed(&self) -> tokio::sync::broadcast::Receiver<Arc<Envelope>> {
        self.committed.subscribe()
    }

    /// Every failed attempt that will be retried, from now on, once its
    /// turn committed (a lagging listener is told how many it missed).
    pub fn retried(&self) -> tokio::sync::broadcast::Receiver<Arc<Retried>> {
        self.retried.subscribe()
    }

    /// Publishes one event (group-committed with others) and returns its
    /// envelope once it is durable.
    pub async fn publish(&self, event: NewEvent, cause: Cause<'_>) -> anyhow::Result<Envelope> {
        let env = self.store.stamp(event, cause);
        self.publish_all(vec![env.clone()]).await?;
        Ok(env)
    }

    /// Publishes envelopes (already stamped) in one group commit; returns the
    /// ids that were new (an id already in the log is a duplicate: ignored).
    pub async fn publish_all(&self, envs: Vec<Envelope>) -> anyhow::Result<HashSet<EventId>> {
        self.publish_with(envs, Vec::new()).await
    }

    /// Publishes envelopes together with `writes`, in the same group commit:
    /// the way to record state and the event announcing it at the price of a
    /// share of one commit. If a guarded write's guard fails, nothing of the
    /// request is written and the error is [`Rejected`].
    pub async fn publish_with(
        &self,
        envs: Vec<Envelope>,
        writes: Vec<berth_store::writes::Write>,
    ) -> anyhow::Result<HashSet<EventId>> {
        let Some(queue) = &self.tx else {
            return self.publish_direct(envs, writes).await;
        };
        let (reply, rx) = oneshot::channel();
        // The dispatcher commits it: in the simulator, its turn.
        berth_core::sched::idle(async {
            queue
                .send(PublishReq {
                    envs,
                    writes,
                    reply,
                })
                .await
                .map_err(|_| anyhow::anyhow!("the bus has shut down"))?;
            rx.await
                .map_err(|_| anyhow::anyhow!("the bus shut down before the publish committed"))?
        })
        .await
    }

    /// A publish in a transaction of its own: the writes, then the events,
    /// or nothing if a guard fails.
    async fn publish_direct(
        &self,
        envs: Vec<Envelope>,
        writes: Vec<berth_store::writes::Write>,
    ) -> anyhow::Result<HashSet<EventId>> {
        let mut tx = self.store.begin().await?;
        if !tx.apply(&writes, self.store.now()).await? {
            return Err(anyhow::Error::new(Rejected));
        }
        let new = tx.publish(&envs).await?;
        tx.commit().await?;
        self.stats
            .published
            .fetch_add(new.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(new)
    }

    /// Re-drives a dead letter (see [`Store::redrive`]), refusing ones whose
    /// worker no longer exists, which would wait forever.
    pub async fn redrive(&self, dead_letter_id: &str) -> anyhow::Result<Redrive> {
        if let Some(dl) = self.store.dead_letter(dead_letter_id).await?
            && self
                .store
                .subscriptions()
                .workers_for_any(&dl.worker)
                .is_none()
        {
            anyhow::bail!(
                "dead letter {dead_letter_id} belongs to worker '{}', which is not registered",
                dl.worker
            );
        }
        self.store.redrive(dead_letter_id).await
    }
}

/// How far a [`Bus::committed`] listener may fall behind.
pub const COMMITTED_BACKLOG: usize = 65_536;

/// How far a [`Bus::retried`] listener may fall behind.
pub const RETRIED_BACKLOG: usize = 4_096;

/// A failed attempt that will be retried, as told to in-process listeners
/// once its turn committed. Not in the event log: attempts are history,
/// not events, and a retry changes no state a flow reacts to.
#[derive(Debug, Clone)]
pub struct Retried {
    /// The event whose handling failed.
    pub event_id: EventId,
    /// The org of that event (listeners must scope by it).
    pub org_id: Option<String>,
    pub flow_id: berth_core::FlowId,
    pub subject: Option<String>,
    pub worker: String,
    /// The attempt that failed (1 for the first).
    pub attempt: u32,
    pub max_attempts: u32,
    pub error: berth_core::ErrorInfo,
    /// When the next attempt is due.
    pub next_attempt_at: berth_core::Timestamp,
}

/// The running worker framework: the dispatcher task and its handlers.
pub struct Workers {
    bus: Bus,
    cancel: CancellationToken,
    kill: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    checkpointer: tokio::task::JoinHandle<()>,
    _lock: Option<std::fs::File>,
}

/// Checkpoints the WAL every `every` while this process commits, and waits
/// for a commit while it does not (no timer ticks on an idle server), until
/// cancelled: the dispatcher's commits then never stall on one. Small and
/// frequent is the point: a checkpoint's writes and sync compete with the
/// commits' own, and at 500 ms apart the bus bench's dispatch p99 was ~3×
/// what it is at 50 ms. A failure is logged and retried at the next tick
/// (SQLite's own automatic checkpoint remains as a backstop).
async fn checkpoint_loop(store: Store, every: Option<Duration>, cancel: CancellationToken) {
    let Some(every) = every else {
        return;
    };
    loop {
        // A commit since the last checkpoint (the signal waits for whoever
        // asks) or the next one: an idle server arms no timer.
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = store.wrote() => {}
        }
        // Then let the writes of one interval gather into one checkpoint.
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = store.checkpoint().await {
            tracing::warn!(error = %format!("{e:#}"), "WAL checkpoint failed; will retry");
        }
    }
}

/// On a database other processes dispatch from too (PostgreSQL): wakes
/// the dispatcher for their deliveries ([`Store::listen`]), and every
/// `every` takes back the leases that have expired — a dead process's,
/// whose attempts are recorded abandoned and counted — so that their
/// deliveries are claimed again, here or elsewhere.
async fn shared_upkeep(store: Store, every: Duration, cancel: CancellationToken) {
    let sweep = async {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            match store.release_leases(store.now(), true).await {
                Ok(0) => {}
                Ok(released) => {
                    info!(
                        released,
                        "took back expired leases (their process stopped or stalled)"
                    );
                    let subs = store.subscriptions();
                    store.notify_committed(subs.all_workers().map(|w| w.to_string()));
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot take back expired leases; will retry");
                }
            }
        }
    };
    tokio::join!(store.listen(cancel.cancelled()), sweep);
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers").finish_non_exhaustive()
    }
}

impl Workers {
    /// Starts dispatching for `registry` with `policies`. Takes the database's
    /// dispatcher lock, and since this process is then the only dispatcher,
    /// takes back every lease a previous process left (its attempts are
    /// recorded as abandoned and keep their count).
    pub async fn start(
        store: Store,
        registry: &Registry,
        policies: &Policies,
        options: BusOptions,
    ) -> anyhow::Result<Workers> {
        let lock = store.lock_dispatcher()?;
        let mut specs = Vec::new();
        for w in registry.workers() {
            let policy = policies
                .get(&w.name)
                .with_context(|| format!("no policy resolved for worker '{}'", w.name))?
                .clone();
            specs.push((w.name.clone(), w.handler.clone(), policy));
        }
        store.set_subscriptions(registry.subscriptions());
        // The only dispatcher of its database (SQLite's lock) takes back every
        // lease; one of many (PostgreSQL) only those past their end.
        let released = store
            .release_leases(store.now(), !store.sole_dispatcher())
            .await?;
        if released > 0 {
            info!(
                released,
                "took back deliveries left in flight by a previous process"
            );
        }
        let stats = Arc::new(Stats::default());
        let kill = CancellationToken::new();
        let (tx, rx) = mpsc::channel(1024);
        let (committed, _) = tokio::sync::broadcast::channel(COMMITTED_BACKLOG);
        let (retried, _) = tokio::sync::broadcast::channel(RETRIED_BACKLOG);
        let owner: Arc<str> = Arc::from(format!("{}-{}", std::process::id(), store.ids().ulid()));
        let conns = Conns {
            read: store.reader().await?,
            writer: store.open_writer().await?,
        };
        let dispatcher = Dispatcher::new(
            store.clone(),
            conns,
            specs,
            DispatcherConfig {
                owner,
                lease_grace: options.lease_grace,
                shutdown_grace: options.shutdown_grace,
                max_batch: options.max_batch.max(1),
                poll_interval: options.poll_interval.max(Duration::from_millis(10)),
                max_cached: 262_144,
                rng: options.rng,
                kill: kill.clone(),
                retried_tx: retried.clone(),
            },
            stats.clone(),
            committed.clone(),
            rx,
        );
        let cancel = CancellationToken::new();
        let task = tokio::spawn(
            berth_core::sched::task(dispatcher.run(cancel.clone()))
                .instrument(info_span!("dispatcher")),
        );
        let checkpointer = match store.dialect() {
            berth_store::Dialect::Sqlite => tokio::spawn(
                checkpoint_loop(store.clone(), options.checkpoint_interval, cancel.clone())
                    .instrument(info_span!("checkpointer")),
            ),
            berth_store::Dialect::Postgres => tokio::spawn(
                shared_upkeep(store.clone(), options.poll_interval, cancel.clone())
                    .instrument(info_span!("upkeep")),
            ),
        };
        Ok(Workers {
            bus: Bus {
                store,
                tx: Some(tx),
                stats,
                committed,
                retried,
            },
            cancel,
            kill,
            task,
            checkpointer,
            _lock: lock,
        })
    }

    pub fn bus(&self) -> Bus {
        self.bus.clone()
    }

    /// A simulated process crash, for the simulator and crash tests: the
    /// dispatcher and every attempt stop where they are, nothing more is
    /// committed or recorded, leases stay with the dead owner until the next
    /// [`Workers::start`] takes them back. Returns once the dispatcher task
    /// is gone (an attempt still in a database call may finish that call:
    /// its transaction commits whole or not at all, as at a real crash).
    pub async fn crash(self) {
        self.kill.cancel();
        self.task.abort();
        self.checkpointer.abort();
        let _ = self.task.await;
        let _ = self.checkpointer.await;
    }

    /// Stops claiming work, lets in-flight attempts finish within the grace
    /// period, returns the rest to the queue, and commits what finished.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        let _ = self.checkpointer.await;
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("dispatcher task failed: {e}")),
        }
    }
}
