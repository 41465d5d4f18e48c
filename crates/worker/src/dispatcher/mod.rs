//! The embedded dispatcher: one task that owns the write path of the bus.
//!
//! Each turn of its loop is one SQLite transaction (group commit) that
//! applies every finished attempt (acknowledgement, inbox, attempt history,
//! retries, dead letters, failure events), appends every event published
//! since the last turn, and claims due deliveries for workers with free
//! capacity. Fresh events for an idle worker are inserted already claimed, so
//! the common path costs no extra write. After the commit it hands the claimed
//! deliveries to handler tasks. It wakes on messages, on commits made
//! elsewhere (a handler's or the API's own transaction), and on the earliest
//! `not_before` of a delayed retry; there is no polling interval.
//!
//! A turn's parts: `commit` applies the guarded writes declared and runs
//! the script, `settle` decides what each finished attempt writes (a pure
//! function), `fanout` turns new events into deliveries, `claim` claims
//! due ones and finds their envelopes; `task` runs the attempts, and
//! `reads` holds the reads outside the transaction.

mod claim;
mod commit;
mod fanout;
mod settle;
mod task;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::{Envelope, ErrorInfo, EventId, NewEvent, SeededRng, Timestamp};
use berth_store::writes::Write;
use berth_store::{Cause, Claimed, Lease, Outcome, Store};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::handler::{FailureKind, Handler};
use crate::policy::Policy;

/// Counters of what the dispatcher did since start, for metrics and benches.
#[derive(Debug, Default)]
pub struct Stats {
    pub handled: AtomicU64,
    pub duplicates: AtomicU64,
    pub retries: AtomicU64,
    pub timeouts: AtomicU64,
    pub dead_letters: AtomicU64,
    pub published: AtomicU64,
    pub commits: AtomicU64,
    pub in_flight: AtomicU64,
    /// Time spent in group-commit turns, and in their final COMMIT alone.
    pub turn_micros: AtomicU64,
    pub commit_micros: AtomicU64,
}

pub(crate) struct PublishReq {
    pub envs: Vec<Envelope>,
    /// Writes to commit with the events; if a guard fails, neither happens
    /// and the publisher gets [`crate::Rejected`].
    pub writes: Vec<Write>,
    pub reply: oneshot::Sender<anyhow::Result<HashSet<EventId>>>,
}

/// How one attempt ended, as reported by its task.
enum Finished {
    /// Succeeded without a transaction of its own: commit in the group, with
    /// the writes it declared.
    Ok {
        emitted: Vec<NewEvent>,
        writes: Vec<Write>,
    },
    /// Succeeded and committed in the handler's own transaction.
    Committed,
    /// Already processed (in the inbox): acknowledge, do not run.
    Duplicate,
    Failed {
        outcome: Outcome,
        kind: FailureKind,
        error: ErrorInfo,
    },
    /// Cancelled by shutdown: hand back without waiting.
    Abandoned,
}

pub(crate) struct Completion {
    worker: usize,
    claimed: Claimed,
    env: Arc<Envelope>,
    started_at: Timestamp,
    duration: Duration,
    finished: Finished,
}

/// Whether a worker may have due, unclaimed deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backlog {
    /// Maybe: ask the database.
    Unknown,
    /// None at all.
    Empty,
    /// None before this time.
    DueAt(Timestamp),
}

struct WorkerRt {
    name: Arc<str>,
    handler: Arc<dyn Handler>,
    policy: Policy,
    in_flight: usize,
    backlog: Backlog,
}

impl WorkerRt {
    fn capacity(&self) -> usize {
        (self.policy.concurrency as usize).saturating_sub(self.in_flight)
    }

    fn wants_claim(&self, now: Timestamp) -> bool {
        self.capacity() > 0
            && match self.backlog {
                Backlog::Unknown => true,
                Backlog::Empty => false,
                Backlog::DueAt(t) => t <= now,
            }
    }

    fn due_no_later_than(&mut self, t: Timestamp) {
        self.backlog = match self.backlog {
            Backlog::Unknown => Backlog::Unknown,
            Backlog::Empty => Backlog::DueAt(t),
            Backlog::DueAt(old) => Backlog::DueAt(old.min(t)),
        };
    }
}

pub(crate) struct DispatcherConfig {
    pub owner: Arc<str>,
    pub lease_grace: Duration,
    pub shutdown_grace: Duration,
    pub max_batch: usize,
    pub poll_interval: Duration,
    pub max_cached: usize,
    pub rng: Arc<SeededRng>,
    /// Cancelled for a simulated crash: every attempt stops where it is,
    /// unrecorded, as if the process had died.
    pub kill: CancellationToken,
    /// Each failed attempt that will be retried, once its turn committed,
    /// for in-process listeners (the API's event stream).
    pub retried_tx: tokio::sync::broadcast::Sender<Arc<crate::Retried>>,
}

impl DispatcherConfig {
    /// A lease taken at `now` for an attempt of `timeout`. It outlives the
    /// attempt by the grace, so only a dead process lets a delivery be
    /// handed out again.
    fn lease(&self, now: Timestamp, timeout: Duration) -> Lease {
        Lease {
            owner: self.owner.clone(),
            leased_at: now,
            // Saturating: a configured timeout may be as long as `Duration::MAX`.
            until: now.plus(timeout.saturating_add(self.lease_grace)),
        }
    }
}

pub(crate) struct Dispatcher {
    store: Store,
    /// For reads outside the turn's transaction.
    reads: berth_store::ops::Reader,
    /// The turn's transaction: whole scripts on a thread of their own.
    writer: berth_store::Writer,
    workers: Vec<WorkerRt>,
    by_name: HashMap<Arc<str>, usize>,
    cfg: DispatcherConfig,
    stats: Arc<Stats>,
    /// Every event once its turn committed, for in-process listeners.
    committed_tx: tokio::sync::broadcast::Sender<Arc<Envelope>>,
    publish_rx: mpsc::Receiver<PublishReq>,
    done_tx: mpsc::UnboundedSender<Completion>,
    done_rx: mpsc::UnboundedReceiver<Completion>,
    tracker: TaskTracker,
    /// Cancels running handlers when the shutdown grace period ends.
    handlers_cancel: CancellationToken,
    completions: Vec<Completion>,
    publishes: Vec<PublishReq>,
    draining: bool,
    /// Consecutive failed turns, for the back-off between them.
    failures: u32,
    /// Check publish requests against the log before inserting (set after a
    /// turn failed on a repeated id; cleared by the next success).
    check_known: bool,
    /// Envelopes of deliveries this process wrote and has not yet claimed,
    /// by (event, worker): claiming them needs no read of the log.
    pending_envs: HashMap<(EventId, Arc<str>), Arc<Envelope>>,
    /// The time of the last turn: each turn's is later, whatever the clock
    /// does, so that times written at commit follow commit order.
    last_turn: Timestamp,
}

/// Failed turns in a row after which finished attempts are retried on their
/// own (see `Dispatcher::suspect_completions`).
const SUSPECT_AFTER: u32 = 3;

/// The dispatcher's own connections to the database.
pub(crate) struct Conns {
    /// For reads outside the turn's transaction.
    pub read: berth_store::ops::Reader,
    /// For the turns' transactions.
    pub writer: berth_store::Writer,
}

/// What one turn decided to start once its transaction commits.
struct Start {
    worker: usize,
    claimed: Claimed,
    env: Arc<Envelope>,
    /// Already in the worker's inbox: acknowledge without running.
    duplicate: bool,
}

/// What a committed turn leaves to do.
struct Turned {
    /// The attempts to start.
    starts: Vec<Start>,
    /// The published ids that were new.
    inserted: HashSet<EventId>,
    /// The publish requests refused by a guard, by index.
    rejected: HashSet<usize>,
}

/// Settling stamps and names what it creates with the store's ids.
impl settle::Ids for Store {
    fn caused_by(&self, new: NewEvent, cause: &Envelope) -> Envelope {
        self.stamp(new, Cause::Event(cause))
    }

    fn dead_letter_id(&self) -> String {
        self.ids().ulid().to_string()
    }
}

impl Dispatcher {
    pub(crate) fn new(
        store: Store,
        conns: Conns,
        specs: Vec<(Arc<str>, Arc<dyn Handler>, Policy)>,
        cfg: DispatcherConfig,
        stats: Arc<Stats>,
        committed_tx: tokio::sync::broadcast::Sender<Arc<Envelope>>,
        publish_rx: mpsc::Receiver<PublishReq>,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let workers: Vec<WorkerRt> = specs
            .into_iter()
            .map(|(name, handler, policy)| WorkerRt {
                name,
                handler,
                policy,
                in_flight: 0,
                backlog: Backlog::Unknown,
            })
            .collect();
        let by_name = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.clone(), i))
            .collect();
        Dispatcher {
            store,
            reads: conns.read,
            writer: conns.writer,
            workers,
            by_name,
            cfg,
            stats,
            committed_tx,
            publish_rx,
            done_tx,
            done_rx,
            tracker: TaskTracker::new(),
            handlers_cancel: CancellationToken::new(),
            completions: Vec::new(),
            publishes: Vec::new(),
            draining: false,
            failures: 0,
            check_known: false,
            pending_envs: HashMap::new(),
            last_turn: Timestamp::default(),
        }
    }

    fn in_flight(&self) -> usize {
        self.workers.iter().map(|w| w.in_flight).sum()
    }

    fn has_work(&self, now: Timestamp) -> bool {
        !self.completions.is_empty()
            || !self.publishes.is_empty()
            || (!self.draining && self.workers.iter().any(|w| w.wants_claim(now)))
    }

    /// The earliest time a worker with free capacity has work due.
    fn next_timer(&self) -> Option<Timestamp> {
        if self.draining {
            return None;
        }
        self.workers
            .iter()
            .filter(|w| w.capacity() > 0)
            .filter_map(|w| match w.backlog {
                Backlog::DueAt(t) => Some(t),
                _ => None,
            })
            .min()
    }

    fn accept(&mut self, c: Completion) {
        if let Some(w) = self.workers.get_mut(c.worker) {
            w.in_flight = w.in_flight.saturating_sub(1);
        }
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.completions.push(c);
    }

    fn take_woken(&mut self) {
        for name in self.store.take_woken() {
            if let Some(&i) = self.by_name.get(name.as_str()) {
                self.workers[i].backlog = Backlog::Unknown;
            }
        }
    }

    pub(crate) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let clock = self.store.clock().clone();
        let mut grace_deadline: Option<tokio::time::Instant> = None;
        loop {
            let now = clock.now();
            if !self.has_work(now) {
                if self.draining && self.in_flight() == 0 {
                    break;
                }
                let timer = self
                    .next_timer()
                    .map(|t| tokio::time::Instant::now() + t.since(now) + Duration::from_micros(1));
                // The simulator's other tasks take their turns while this
                // one waits (a no-op outside the simulator).
                berth_core::sched::idle(async { tokio::select! {
                    biased;
                    _ = cancel.cancelled(), if !self.draining => {
                        info!(in_flight = self.in_flight(), "bus shutting down: finishing in-flight work");
                        self.draining = true;
                        self.publish_rx.close();
                        grace_deadline = Some(tokio::time::Instant::now() + self.cfg.shutdown_grace);
                    }
                    _ = sleep_until_opt(grace_deadline), if grace_deadline.is_some() && !self.handlers_cancel.is_cancelled() => {
                        warn!(in_flight = self.in_flight(), "shutdown grace period over: returning unfinished work");
                        self.handlers_cancel.cancel();
                    }
                    Some(c) = self.done_rx.recv() => self.accept(c),
                    Some(p) = self.publish_rx.recv() => self.publishes.push(p),
                    _ = self.store.committed() => self.take_woken(),
                    _ = sleep_until_opt(timer), if timer.is_some() => {}
                    // Commits by another process (a CLI re-drive) send no
                    // wake-up; this slow safety net finds them. In-process
                    // commits never wait for it.
                    _ = tokio::time::sleep(self.cfg.poll_interval), if !self.draining => {
                        for w in &mut self.workers {
                            w.backlog = Backlog::Unknown;
                        }
                    }
                }})
                .await;
            }
            // Gather everything already waiting into this turn's batch.
            while self.completions.len() < self.cfg.max_batch {
                match self.done_rx.try_recv() {
                    Ok(c) => self.accept(c),
                    Err(_) => break,
                }
            }
            let mut queued: usize = self.publishes.iter().map(|p| p.envs.len()).sum();
            while queued < self.cfg.max_batch {
                match self.publish_rx.try_recv() {
                    Ok(p) => {
                        queued += p.envs.len();
                        self.publishes.push(p);
                    }
                    Err(_) => break,
                }
            }
            self.take_woken();
            if !self.has_work(clock.now()) {
                continue;
            }
            match self.turn().await {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    self.failures += 1;
                    let pause = Duration::from_millis(50)
                        .saturating_mul(1 << self.failures.min(6))
                        .min(Duration::from_secs(5));
                    error!(error = %format!("{e:#}"), failures = self.failures, retry_in = ?pause, "dispatcher turn failed; retrying");
                    if self.failures >= SUSPECT_AFTER {
                        self.suspect_completions(&e);
                    }
                    berth_core::sched::idle(tokio::time::sleep(pause)).await;
                }
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
        info!("bus stopped");
        Ok(())
    }

    /// One group commit. On error nothing is committed: completions stay
    /// buffered for the next turn, publishers get the error.
    async fn turn(&mut self) -> anyhow::Result<()> {
        // Declared writes may record this time, and what reads them may
        // order commits by it (the store's `writes` says which do): each
        // turn's is strictly later than the last.
        let now = self
            .store
            .now()
            .max(self.last_turn.plus(Duration::from_micros(1)));
        self.last_turn = now;
        let saved_in_flight: Vec<usize> = self.workers.iter().map(|w| w.in_flight).collect();
        let publishes = std::mem::take(&mut self.publishes);
        let checked_before = self.check_known;
        let t0 = std::time::Instant::now();
        let result = self.build_and_commit(now, &publishes).await;
        self.stats
            .turn_micros
            .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
        match result {
            Ok(Turned {
                starts,
                inserted,
                rejected,
            }) => {
                let completions = std::mem::take(&mut self.completions);
                self.count(&completions);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                for (i, p) in publishes.into_iter().enumerate() {
                    if rejected.contains(&i) {
                        let _ = p.reply.send(Err(anyhow::Error::new(crate::Rejected)));
                        continue;
                    }
                    let mine = p
                        .envs
                        .iter()
                        .map(|e| e.id)
                        .filter(|id| inserted.contains(id))
                        .collect();
                    let _ = p.reply.send(Ok(mine));
                }
                for s in starts {
                    self.spawn(s);
                }
                Ok(())
            }
            Err(e) => {
                // A step that failed between statements (a corrupt row, a
                // failed read) may have left the transaction open: end it,
                // or every later turn's BEGIN would fail too. Nothing if
                // none is open.
                if let Err(r) = self.writer.rollback().await {
                    warn!(error = %format!("{r:#}"), "could not roll back a failed turn");
                }
                for (w, n) in self.workers.iter_mut().zip(saved_in_flight) {
                    w.in_flight = n;
                    w.backlog = Backlog::Unknown;
                }
                if self.check_known && !checked_before {
                    // A publish repeated a known id: not a failure of the
                    // bus. Redo the turn at once, checking ids first.
                    debug!("a published id is already in the log; redoing the turn with a check");
                    self.publishes = publishes;
                    return Ok(());
                }
                for p in publishes {
                    let _ = p.reply.send(Err(anyhow::anyhow!("publish failed: {e:#}")));
                }
                Err(e)
            }
        }
    }

    /// After [`SUSPECT_AFTER`] failed turns in a row, the cause may be what
    /// a finished attempt declared (a write the database refuses every
    /// time): kept in every turn, it would stop the whole bus. Each such
    /// attempt becomes a retryable failure instead, so the next turn
    /// commits without its writes and each is retried on its own — an
    /// innocent one succeeds (handlers are idempotent), the culprit fails
    /// until its policy dead-letters it with the database's error.
    fn suspect_completions(&mut self, e: &anyhow::Error) {
        let mut suspects = 0;
        for c in &mut self.completions {
            if matches!(c.finished, Finished::Ok { .. }) {
                c.finished = Finished::Failed {
                    outcome: Outcome::Retry,
                    kind: FailureKind::Retryable,
                    error: ErrorInfo {
                        code: "commit_failed".into(),
                        message: format!(
                            "the group commit holding this attempt's writes failed {} times",
                            self.failures
                        ),
                        chain: e.chain().map(|c| c.to_string()).collect(),
                    },
                };
                suspects += 1;
            }
        }
        if suspects > 0 {
            warn!(
                suspects,
                "retrying the finished attempts of the failing turns on their own"
            );
        }
    }

    fn count(&self, completions: &[Completion]) {
        for c in completions {
            let counter = match &c.finished {
                Finished::Ok { .. } | Finished::Committed => &self.stats.handled,
                Finished::Duplicate => &self.stats.duplicates,
                Finished::Failed {
                    outcome: Outcome::Timeout,
                    ..
                } => &self.stats.timeouts,
                Finished::Failed { .. } | Finished::Abandoned => &self.stats.retries,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One turn's transaction, its parts in order: the guarded writes
    /// declared, settling the finished attempts, fan-out of the new events,
    /// claims; then, once committed, what it tells and what it starts.
    async fn build_and_commit(
        &mut self,
        now: Timestamp,
        publishes: &[PublishReq],
    ) -> anyhow::Result<Turned> {
        // One writer at a time in this process, for the whole turn.
        let gate = self.store.write_gate().await;
        let mut script = self.writer.script();
        script.begin();
        let mut rejected: HashSet<usize> = HashSet::new();
        let patched = self
            .guarded_writes(&mut script, now, publishes, &mut rejected)
            .await?;

        // Decided before settling, as listeners subscribed then are told.
        let tell_retries = self.cfg.retried_tx.receiver_count() > 0;
        let settled = {
            let workers: Vec<settle::Worker<'_>> = self
                .workers
                .iter()
                .map(|w| settle::Worker {
                    name: &w.name,
                    policy: &w.policy,
                })
                .collect();
            settle::settle(&self.completions, &workers, now, &self.cfg.rng, &self.store)?
        };
        for (wi, due) in &settled.backlog {
            let w = &mut self.workers[*wi];
            match due {
                settle::Due::Unknown => w.backlog = Backlog::Unknown,
                settle::Due::By(t) => w.due_no_later_than(*t),
            }
        }
        commit::append_settled(&mut script, &settled, now);
        let plain: Vec<&Write> = commit::declared(&self.completions, publishes, &rejected)
            .flat_map(|(_, ws)| ws.iter().filter(|w| !w.is_guarded()))
            .collect();
        script.plain_writes(&plain, now);

        let fresh = self
            .fresh_events(&settled.new_envs, publishes, &rejected)
            .await?;
        script.insert_events(&fresh);
        let fan = self.fan_out(&fresh, now);
        script.insert_deliveries(&fan.rows);
        let claims = self.claim(&mut script, now);
        // Deliveries due that this process has no room for yet: another
        // process may take them (on PostgreSQL; nothing on SQLite).
        script.notify_deliveries(
            fan.pending
                .iter()
                .map(|(_, w, _)| &**w)
                .chain(settled.reschedule.iter().map(|r| &*r.worker)),
        );
        script.push("COMMIT", []);

        let c0 = std::time::Instant::now();
        let rows = self.commit(script).await?;
        // Before the write gate is released: see `Store::cached_instance`.
        let applied =
            commit::declared(&self.completions, publishes, &rejected).flat_map(|(_, ws)| ws);
        self.store.cache_committed(now, applied, patched);
        self.store.note_commit();
        if self.committed_tx.receiver_count() > 0 {
            for e in &fresh {
                // No receiver, or one that lags (it is told so), is fine.
                let _ = self.committed_tx.send(Arc::new((*e).clone()));
            }
        }
        // Told only once durable, like the events above.
        if tell_retries {
            for r in settled.retried {
                let _ = self.cfg.retried_tx.send(Arc::new(r));
            }
        }
        drop(gate);
        self.stats
            .commit_micros
            .fetch_add(c0.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.check_known = false;
        let inserted: HashSet<EventId> = fresh.iter().map(|e| e.id).collect();

        let claimed = self.claimed(&rows, claims)?;
        let unclaimed = settled
            .reschedule
            .into_iter()
            .map(|r| (r.env.id, r.worker, r.env))
            .chain(fan.pending);
        for (id, w, env) in unclaimed {
            if self.pending_envs.len() < self.cfg.max_cached {
                self.pending_envs.insert((id, w), env);
            }
        }
        let mut starts = fan.starts;
        starts.extend(self.starts(claimed).await?);
        let dead = settled.dead.len() as u64;
        if dead > 0 {
            self.stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
        }
        Ok(Turned {
            starts,
            inserted,
            rejected,
        })
    }
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// A step whose guarded write lost to a concurrent change: retried at once
/// (losing an optimistic race is not a fault to back off from — the two
/// deliveries of a flow's join can meet it), so that its next attempt
/// re-reads the record.
fn concurrent_update() -> Finished {
    Finished::Failed {
        outcome: Outcome::Retry,
        kind: FailureKind::RetryAfter(Duration::ZERO),
        error: ErrorInfo::new(
            "concurrent_update",
            "the record changed while the step ran; retrying with a fresh read",
        ),
    }
}
