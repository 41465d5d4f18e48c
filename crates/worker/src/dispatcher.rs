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

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use berth_core::events::{WORKER_FAILED_VERSION, WorkerFailed};
use berth_core::{Envelope, ErrorInfo, EventId, NewEvent, SeededRng, Timestamp};
use berth_store::ops::{self, NewDeadLetter, Script};
use berth_store::writes::Write;
use berth_store::{AttemptRecord, Cause, Claimed, DeadReason, Lease, NewDelivery, Outcome, Store};
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::handler::{Ctx, FailureKind, Handler};
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

pub(crate) struct Dispatcher {
    store: Store,
    /// For reads outside the turn's transaction.
    conn: berth_store::sqlx::SqliteConnection,
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
    pub read: berth_store::sqlx::SqliteConnection,
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
            conn: conns.read,
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
        // A patch records its condition at this time, and the join orders
        // its two branches by those times (see `Write::Patch`).
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
            Ok((starts, inserted, rejected)) => {
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

    async fn build_and_commit(
        &mut self,
        now: Timestamp,
        publishes: &[PublishReq],
    ) -> anyhow::Result<(Vec<Start>, HashSet<EventId>, HashSet<usize>)> {
        let store = self.store.clone();
        // A lease outlives its attempt by the grace, so only a dead process
        // lets a delivery be handed out again.
        let (owner, grace) = (self.cfg.owner.clone(), self.cfg.lease_grace);
        let lease = |timeout: Duration| Lease {
            owner: owner.clone(),
            leased_at: now,
            // Saturating: a configured timeout may be as long as `Duration::MAX`.
            until: now.plus(timeout.saturating_add(grace)),
        };
        // One writer at a time in this process, for the whole turn.
        let gate = self.store.write_gate().await;
        let mut script = Script::new();
        script.push("BEGIN IMMEDIATE", []);
        // Phase A: the guarded writes handlers declared. A handler whose
        // guards all fail becomes a retry; one whose guards partly pass would
        // leave half its writes, so the transaction is rolled back and redone
        // without it.
        // Publish requests' writes are tagged after the completions'.
        let base = self.completions.len();
        let mut rejected: HashSet<usize> = HashSet::new();
        // Counted first (no row per write); exact only after a count fell
        // short, to learn which writes those were.
        let mut exact = false;
        // The rows the patches left, for the instance cache.
        let mut patched = berth_store::writes::Patched::default();
        loop {
            let guarded: Vec<(usize, &Write)> = declared(&self.completions, publishes, &rejected)
                .flat_map(|(i, ws)| ws.iter().filter(|w| w.is_guarded()).map(move |w| (i, w)))
                .collect();
            if guarded.is_empty() {
                break;
            }
            let mut needed: HashMap<usize, usize> = HashMap::new();
            for (i, _) in &guarded {
                *needed.entry(*i).or_default() += 1;
            }
            script.guarded_writes(&guarded, now, exact)?;
            let rows = match self.writer.run(std::mem::take(&mut script)).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.writer.rollback().await;
                    return Err(e.context("the dispatcher's transaction failed"));
                }
            };
            let Some(passing) = berth_store::writes::passed_guards(&guarded, &rows)? else {
                let _ = self.writer.rollback().await;
                script.push("BEGIN IMMEDIATE", []);
                exact = true;
                continue;
            };
            let mut passed: HashMap<usize, usize> = HashMap::new();
            for i in passing {
                *passed.entry(i).or_default() += 1;
            }
            let mut partial = false;
            for (i, n) in &needed {
                let got = passed.get(i).copied().unwrap_or(0);
                if got < *n {
                    partial |= got > 0;
                    if *i < base {
                        self.completions[*i].finished = concurrent_update();
                    } else {
                        rejected.insert(*i - base);
                    }
                }
            }
            if !partial {
                patched = berth_store::writes::patched_rows(&rows)?;
                break;
            }
            let _ = self.writer.rollback().await;
            script.push("BEGIN IMMEDIATE", []);
        }

        // 1. Finished attempts.
        let mut inbox: Vec<(Arc<str>, EventId)> = Vec::new();
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        let mut delete: Vec<(EventId, Arc<str>)> = Vec::new();
        let mut resched: Vec<(EventId, Arc<str>, Timestamp)> = Vec::new();
        let mut dead: Vec<NewDeadLetter> = Vec::new();
        let mut new_envs: Vec<Envelope> = Vec::new();
        let mut dead_count = 0u64;
        let mut recache: Vec<(EventId, Arc<str>, Arc<Envelope>)> = Vec::new();
        let mut retried: Vec<crate::Retried> = Vec::new();
        let tell_retries = self.cfg.retried_tx.receiver_count() > 0;
        for c in &self.completions {
            let w = &mut self.workers[c.worker];
            let record = |outcome: Outcome, error: Option<ErrorInfo>, next: Option<Duration>| {
                AttemptRecord {
                    event_id: c.env.id,
                    worker: w.name.to_string(),
                    round: c.claimed.round,
                    attempt: c.claimed.attempt,
                    started_at: c.started_at,
                    duration: Some(c.duration),
                    outcome,
                    error,
                    next_delay: next,
                }
            };
            match &c.finished {
                Finished::Committed => {}
                Finished::Ok { emitted, .. } => {
                    attempts.push(record(Outcome::Ok, None, None));
                    inbox.push((w.name.clone(), c.env.id));
                    delete.push((c.env.id, w.name.clone()));
                    for e in emitted {
                        new_envs.push(store.stamp(e.clone(), Cause::Event(&c.env)));
                    }
                }
                Finished::Duplicate => {
                    attempts.push(record(Outcome::Duplicate, None, None));
                    delete.push((c.env.id, w.name.clone()));
                }
                Finished::Abandoned => {
                    attempts.push(record(
                        Outcome::Abandoned,
                        Some(ErrorInfo::new(
                            "attempt_abandoned",
                            "berth shut down before the attempt finished; it will be retried",
                        )),
                        Some(Duration::ZERO),
                    ));
                    resched.push((c.env.id, w.name.clone(), now));
                    recache.push((c.env.id, w.name.clone(), c.env.clone()));
                    w.backlog = Backlog::Unknown;
                }
                Finished::Failed {
                    outcome,
                    kind,
                    error,
                } => {
                    let reason = match kind {
                        FailureKind::Fatal if *outcome == Outcome::Panic => Some(DeadReason::Panic),
                        FailureKind::Fatal => Some(DeadReason::Fatal),
                        FailureKind::Malformed => Some(DeadReason::Malformed),
                        FailureKind::Retryable | FailureKind::RetryAfter(_)
                            if c.claimed.attempt >= w.policy.max_attempts =>
                        {
                            Some(DeadReason::Exhausted)
                        }
                        _ => None,
                    };
                    if let Some(reason) = reason {
                        attempts.push(record(*outcome, Some(error.clone()), None));
                        delete.push((c.env.id, w.name.clone()));
                        dead.push(NewDeadLetter {
                            id: store.ids().ulid().to_string(),
                            event_id: c.env.id,
                            worker: w.name.to_string(),
                            round: c.claimed.round,
                            attempts: c.claimed.attempt,
                            reason,
                            error: error.clone(),
                            org_id: c.env.org_id.clone(),
                            flow_id: c.env.flow_id,
                            dead_at: now,
                        });
                        dead_count += 1;
                        if let Some(failure_type) = &w.policy.on_exhausted {
                            let payload = WorkerFailed {
                                worker: w.name.to_string(),
                                event_id: c.env.id,
                                event_type: c.env.event_type.clone(),
                                attempts: c.claimed.attempt,
                                reason: reason.as_str().to_owned(),
                                error: error.clone(),
                            };
                            let ev = NewEvent::with_type(
                                failure_type.clone(),
                                WORKER_FAILED_VERSION,
                                &payload,
                            )?;
                            new_envs.push(store.stamp(ev, Cause::Event(&c.env)));
                        }
                    } else {
                        let delay = match kind {
                            FailureKind::RetryAfter(d) => w.policy.clamp_retry_after(*d),
                            _ => w.policy.backoff.delay(c.claimed.attempt, &self.cfg.rng),
                        };
                        attempts.push(record(*outcome, Some(error.clone()), Some(delay)));
                        let at = now.plus(delay);
                        if tell_retries {
                            retried.push(crate::Retried {
                                event_id: c.env.id,
                                org_id: c.env.org_id.clone(),
                                flow_id: c.env.flow_id,
                                subject: c.env.subject.clone(),
                                worker: w.name.to_string(),
                                attempt: c.claimed.attempt,
                                max_attempts: w.policy.max_attempts,
                                error: error.clone(),
                                next_attempt_at: at,
                            });
                        }
                        resched.push((c.env.id, w.name.clone(), at));
                        recache.push((c.env.id, w.name.clone(), c.env.clone()));
                        w.due_no_later_than(at);
                    }
                }
            }
        }
        let inbox_rows: Vec<(&str, EventId)> = inbox.iter().map(|(w, e)| (&**w, *e)).collect();
        script.insert_inbox(&inbox_rows, now);
        script.insert_attempts(&attempts);
        let delete: Vec<(EventId, &str)> = delete.iter().map(|(e, w)| (*e, &**w)).collect();
        script.delete_deliveries(&delete);
        let resched_rows: Vec<(EventId, &str, Timestamp)> =
            resched.iter().map(|(e, w, t)| (*e, &**w, *t)).collect();
        script.reschedule(&resched_rows);
        script.insert_dead_letters(&dead);
        let plain: Vec<&Write> = declared(&self.completions, publishes, &rejected)
            .flat_map(|(_, ws)| ws.iter().filter(|w| !w.is_guarded()))
            .collect();
        script.plain_writes(&plain, now);

        // 2. Everything to publish: events emitted by finished attempts and
        // failure events (fresh ids), and publish requests (which may repeat
        // an id already in the log: checked first when the last turn tripped
        // over one).
        let mut requested: Vec<&Envelope> = publishes
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected.contains(i))
            .flat_map(|(_, p)| p.envs.iter())
            .collect();
        if self.check_known && !requested.is_empty() {
            let ids: Vec<EventId> = requested.iter().map(|e| e.id).collect();
            let known = ops::known_events(&mut self.conn, &ids).await?;
            requested.retain(|e| !known.contains(&e.id));
        }
        let mut seen: HashSet<EventId> = HashSet::new();
        let fresh: Vec<&Envelope> = new_envs
            .iter()
            .chain(requested)
            .filter(|e| seen.insert(e.id))
            .collect();
        script.insert_events(&fresh);
        let subs = store.subscriptions();
        let mut starts: Vec<Start> = Vec::new();
        let mut rows: Vec<NewDelivery> = Vec::new();
        let mut cache_add: Vec<(EventId, Arc<str>, Arc<Envelope>)> = Vec::new();
        for e in &fresh {
            let targets = subs.workers_for(&e.event_type);
            if targets.is_empty() {
                continue;
            }
            let shared = Arc::new(Envelope {
                attempt: 1,
                ..(*e).clone()
            });
            for name in targets {
                let Some(&wi) = self.by_name.get(name) else {
                    continue;
                };
                let w = &mut self.workers[wi];
                let claim_now = e.not_before.is_none() && !self.draining && w.capacity() > 0;
                let lease_row = claim_now.then(|| {
                    w.in_flight += 1;
                    lease(w.policy.timeout)
                });
                if claim_now {
                    starts.push(Start {
                        worker: wi,
                        claimed: Claimed {
                            event_id: e.id,
                            worker: w.name.clone(),
                            round: 0,
                            attempt: 1,
                        },
                        env: shared.clone(),
                        duplicate: false,
                    });
                } else {
                    match e.not_before {
                        Some(t) => w.due_no_later_than(t),
                        None => w.backlog = Backlog::Unknown,
                    }
                    cache_add.push((e.id, w.name.clone(), shared.clone()));
                }
                rows.push(NewDelivery {
                    event_id: e.id,
                    worker: w.name.clone(),
                    round: 0,
                    attempt: u32::from(claim_now),
                    not_before: e.not_before.unwrap_or(e.created_at),
                    lease: lease_row,
                });
            }
        }
        script.insert_deliveries(&rows);

        // 3. Claim due deliveries for workers with free capacity.
        let mut claiming: HashMap<&str, Arc<str>> = HashMap::new();
        let mut limits: HashMap<Arc<str>, usize> = HashMap::new();
        if !self.draining {
            for w in self.workers.iter_mut() {
                if !w.wants_claim(now) {
                    continue;
                }
                let limit = w.capacity();
                script.claim(&w.name, &lease(w.policy.timeout), limit);
                limits.insert(w.name.clone(), limit);
            }
            for name in limits.keys() {
                claiming.insert(name, name.clone());
            }
        }
        script.push("COMMIT", []);

        let c0 = std::time::Instant::now();
        let result = self.writer.run(script).await;
        let rows_back = match result {
            Ok(r) => r,
            Err(e) => {
                // A failed statement leaves the transaction open; end it.
                let _ = self.writer.rollback().await;
                if is_duplicate_event(&e) {
                    // A publish request repeated an id already in the log:
                    // redo the turn checking ids first.
                    self.check_known = true;
                }
                return Err(e.context("the dispatcher's transaction failed"));
            }
        };
        // Before the write gate is released: see `Store::cached_instance`.
        let applied = declared(&self.completions, publishes, &rejected).flat_map(|(_, ws)| ws);
        self.store.cache_committed(now, applied, patched);
        self.store.note_commit();
        if self.committed_tx.receiver_count() > 0 {
            for e in &fresh {
                // No receiver, or one that lags (it is told so), is fine.
                let _ = self.committed_tx.send(Arc::new((*e).clone()));
            }
        }
        // Told only once durable, like the events above.
        for r in retried {
            let _ = self.cfg.retried_tx.send(Arc::new(r));
        }
        drop(gate);
        self.stats
            .commit_micros
            .fetch_add(c0.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.check_known = false;
        let claims = ops::read_claims(&rows_back, &claiming)?;
        for (name, limit) in &limits {
            let got = claims.claimed.iter().filter(|c| &c.worker == name).count();
            let Some(&wi) = self.by_name.get(name) else {
                continue;
            };
            let w = &mut self.workers[wi];
            w.in_flight += got;
            w.backlog = if got < *limit {
                match claims.next_due.get(&**name).copied().flatten() {
                    None => Backlog::Empty,
                    Some(t) => Backlog::DueAt(t),
                }
            } else {
                Backlog::Unknown
            };
        }
        for (id, w, env) in recache.into_iter().chain(cache_add) {
            if self.pending_envs.len() < self.cfg.max_cached {
                self.pending_envs.insert((id, w), env);
            }
        }

        // Envelopes for the claimed: from memory when this process wrote the
        // delivery, else from the log (with an inbox check for duplicates).
        let mut missing: Vec<Claimed> = Vec::new();
        for c in claims.claimed {
            let Some(&wi) = self.by_name.get(&c.worker) else {
                continue;
            };
            match self.pending_envs.remove(&(c.event_id, c.worker.clone())) {
                Some(env) => {
                    let env = Arc::new(Envelope {
                        attempt: c.attempt,
                        ..(*env).clone()
                    });
                    starts.push(Start {
                        worker: wi,
                        claimed: c,
                        env,
                        duplicate: false,
                    });
                }
                None => missing.push(c),
            }
        }
        if !missing.is_empty() {
            starts.extend(self.load_claimed(missing).await?);
        }
        if dead_count > 0 {
            self.stats
                .dead_letters
                .fetch_add(dead_count, Ordering::Relaxed);
        }
        Ok((starts, seen, rejected))
    }

    /// Reads the envelopes of deliveries claimed without one in memory (work
    /// from before a restart, or written by another transaction), and marks
    /// those already in the worker's inbox as duplicates. The claims are
    /// committed, so a failure here is retried by the lease, not lost.
    async fn load_claimed(&mut self, claimed: Vec<Claimed>) -> anyhow::Result<Vec<Start>> {
        let ids: Vec<EventId> = claimed.iter().map(|c| c.event_id).collect();
        let envs: HashMap<EventId, Arc<Envelope>> = ops::load_events(&mut self.conn, &ids)
            .await?
            .into_iter()
            .map(|e| (e.id, Arc::new(e)))
            .collect();
        let mut per_worker: HashMap<Arc<str>, Vec<EventId>> = HashMap::new();
        for c in &claimed {
            per_worker
                .entry(c.worker.clone())
                .or_default()
                .push(c.event_id);
        }
        let mut dupes: HashSet<(Arc<str>, EventId)> = HashSet::new();
        for (w, ids) in per_worker {
            for id in ops::inbox_hits(&mut self.conn, &w, &ids).await? {
                dupes.insert((w.clone(), id));
            }
        }
        let mut starts = Vec::new();
        for c in claimed {
            let Some(&wi) = self.by_name.get(&c.worker) else {
                continue;
            };
            let Some(env) = envs.get(&c.event_id) else {
                // A delivery whose event is gone cannot be handled or
                // described; drop it loudly rather than loop on it.
                error!(worker = %c.worker, event_id = %c.event_id, "delivery refers to a missing event; dropping it");
                let mut s = Script::new();
                s.delete_deliveries(&[(c.event_id, &*c.worker)]);
                self.writer.run(s).await?;
                self.workers[wi].in_flight = self.workers[wi].in_flight.saturating_sub(1);
                continue;
            };
            let duplicate = dupes.contains(&(c.worker.clone(), c.event_id));
            let env = Arc::new(Envelope {
                attempt: c.attempt,
                ..(**env).clone()
            });
            starts.push(Start {
                worker: wi,
                claimed: c,
                env,
                duplicate,
            });
        }
        Ok(starts)
    }

    fn spawn(&mut self, s: Start) {
        if s.duplicate {
            // Acknowledged in the next turn without running the handler.
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            self.accept(Completion {
                worker: s.worker,
                claimed: s.claimed,
                env: s.env,
                started_at: self.store.now(),
                duration: Duration::ZERO,
                finished: Finished::Duplicate,
            });
            return;
        }
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        let w = &self.workers[s.worker];
        let env = s.env;
        let span = info_span!(
            "delivery",
            worker = %w.name,
            event_type = %env.event_type,
            event_id = %env.id,
            flow_id = %env.flow_id,
            org = env.org_id.as_deref().unwrap_or("-"),
            attempt = s.claimed.attempt,
        );
        let task = HandlerTask {
            worker: s.worker,
            name: w.name.clone(),
            handler: w.handler.clone(),
            timeout: w.policy.timeout,
            store: self.store.clone(),
            claimed: s.claimed,
            env,
            done: self.done_tx.clone(),
            cancel: self.handlers_cancel.clone(),
        };
        let kill = self.cfg.kill.clone();
        self.tracker.spawn(
            berth_core::sched::task(async move {
                tokio::select! {
                    biased;
                    // A simulated crash: the attempt ends unrecorded, its
                    // lease left for the next process to take back.
                    _ = kill.cancelled() => {}
                    _ = task.run() => {}
                }
            })
            .instrument(span),
        );
    }
}

/// The writes of this turn's successful attempts and of its publish requests
/// not rejected, each with its owner's tag: an attempt's index, or the
/// number of attempts plus a request's index.
fn declared<'a>(
    completions: &'a [Completion],
    publishes: &'a [PublishReq],
    rejected: &'a HashSet<usize>,
) -> impl Iterator<Item = (usize, &'a [Write])> {
    let base = completions.len();
    completions
        .iter()
        .enumerate()
        .filter_map(|(i, c)| match &c.finished {
            Finished::Ok { writes, .. } => Some((i, writes.as_slice())),
            _ => None,
        })
        .chain(
            publishes
                .iter()
                .enumerate()
                .filter(|(i, _)| !rejected.contains(i))
                .map(move |(i, p)| (base + i, p.writes.as_slice())),
        )
}

async fn sleep_until_opt(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One attempt, run in its own task so a slow or panicking handler touches
/// nothing else.
struct HandlerTask {
    worker: usize,
    name: Arc<str>,
    handler: Arc<dyn Handler>,
    timeout: Duration,
    store: Store,
    claimed: Claimed,
    env: Arc<Envelope>,
    done: mpsc::UnboundedSender<Completion>,
    cancel: CancellationToken,
}

impl HandlerTask {
    async fn run(self) {
        let started_at = self.store.now();
        let t0 = tokio::time::Instant::now();
        let ctx = Ctx {
            writes: Vec::new(),
            env: self.env.clone(),
            worker: self.name.clone(),
            store: self.store.clone(),
            tx: None,
            emitted: Vec::new(),
        };
        let call = AssertUnwindSafe(self.handler.call(ctx)).catch_unwind();
        let finished = tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Finished::Abandoned,
            r = tokio::time::timeout(self.timeout, call) => match r {
                Err(_) => Finished::Failed {
                    outcome: Outcome::Timeout,
                    kind: FailureKind::Retryable,
                    error: ErrorInfo::new(
                        "timeout",
                        format!("attempt timed out after {}", humantime::format_duration(self.timeout)),
                    ),
                },
                Ok(Err(panic)) => Finished::Failed {
                    outcome: Outcome::Panic,
                    kind: FailureKind::Fatal,
                    error: ErrorInfo::new("handler_panic", format!("handler panicked: {}", panic_message(&*panic))),
                },
                Ok(Ok(Err(e))) => Finished::Failed {
                    outcome: match e.kind {
                        FailureKind::Fatal => Outcome::Fatal,
                        FailureKind::Malformed => Outcome::Malformed,
                        _ => Outcome::Retry,
                    },
                    kind: e.kind,
                    error: e.info(),
                },
                Ok(Ok(Ok(done))) => match done.tx {
                    None => Finished::Ok {
                        emitted: done.emitted,
                        writes: done.writes,
                    },
                    Some(tx) => {
                        self.commit_own(tx, done.emitted, done.writes, started_at, t0.elapsed())
                            .await
                    }
                },
            },
        };
        // A timeout may have dropped the handler in an engine call, where
        // it had given up the simulator's baton.
        berth_core::sched::hold().await;
        let duration = t0.elapsed();
        match &finished {
            Finished::Ok { .. } | Finished::Committed => debug!(?duration, "handled"),
            Finished::Duplicate => debug!("already processed; skipped"),
            Finished::Abandoned => warn!("attempt abandoned by shutdown"),
            Finished::Failed { outcome, error, .. } => {
                warn!(%outcome, code = %error.code, error = %error.one_line(), "attempt failed")
            }
        }
        let _ = self.done.send(Completion {
            worker: self.worker,
            claimed: self.claimed,
            env: self.env,
            started_at,
            duration,
            finished,
        });
    }

    /// Commits the handler's own transaction together with the inbox entry,
    /// the attempt record, the acknowledgement and the emitted events.
    async fn commit_own(
        &self,
        mut tx: berth_store::Tx,
        emitted: Vec<NewEvent>,
        writes: Vec<Write>,
        started_at: Timestamp,
        duration: Duration,
    ) -> Finished {
        let result: anyhow::Result<Option<Finished>> = async {
            let now = self.store.now();
            if !ops::inbox_hits(tx.conn(), &self.name, &[self.env.id])
                .await?
                .is_empty()
            {
                return Ok(Some(Finished::Duplicate));
            }
            if !berth_store::writes::apply(tx.conn(), &writes, now).await? {
                return Ok(Some(concurrent_update()));
            }
            let mut s = Script::new();
            s.insert_inbox(&[(&*self.name, self.env.id)], now);
            s.insert_attempts(&[AttemptRecord {
                event_id: self.env.id,
                worker: self.name.to_string(),
                round: self.claimed.round,
                attempt: self.claimed.attempt,
                started_at,
                duration: Some(duration),
                outcome: Outcome::Ok,
                error: None,
                next_delay: None,
            }]);
            s.delete_deliveries(&[(self.env.id, &*self.name)]);
            s.run(tx.conn()).await?;
            let envs: Vec<Envelope> = emitted
                .into_iter()
                .map(|e| self.store.stamp(e, Cause::Event(&self.env)))
                .collect();
            tx.publish(&envs).await?;
            tx.commit().await?;
            Ok(None)
        }
        .await;
        match result {
            Ok(None) => Finished::Committed,
            Ok(Some(f)) => f,
            Err(e) => Finished::Failed {
                outcome: Outcome::Retry,
                kind: FailureKind::Retryable,
                error: ErrorInfo {
                    code: "commit_failed".into(),
                    message: "failed to commit the handler's transaction".into(),
                    chain: e.chain().map(|c| c.to_string()).collect(),
                },
            },
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// Whether `e` is SQLite refusing a second row with the same event id.
fn is_duplicate_event(e: &anyhow::Error) -> bool {
    berth_store::writer::is_unique_violation(e, "events.id")
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
