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

use anyhow::Context;
use berth_core::events::{WORKER_FAILED_VERSION, WorkerFailed};
use berth_core::{Envelope, ErrorInfo, EventId, NewEvent, SeededRng, Timestamp};
use berth_store::ops::{self, NewDeadLetter};
use berth_store::{
    AttemptRecord, Cause, Claimed, DeadReason, Lease, Outcome, Store, publish,
};
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
}

pub(crate) struct PublishReq {
    pub envs: Vec<Envelope>,
    pub reply: oneshot::Sender<anyhow::Result<HashSet<EventId>>>,
}

/// How one attempt ended, as reported by its task.
enum Finished {
    /// Succeeded without a transaction of its own: commit in the group.
    Ok(Vec<NewEvent>),
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
    pub rng: Arc<SeededRng>,
}

pub(crate) struct Dispatcher {
    store: Store,
    conn: berth_store::sqlx::SqliteConnection,
    workers: Vec<WorkerRt>,
    by_name: HashMap<Arc<str>, usize>,
    cfg: DispatcherConfig,
    stats: Arc<Stats>,
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
        conn: berth_store::sqlx::SqliteConnection,
        specs: Vec<(Arc<str>, Arc<dyn Handler>, Policy)>,
        cfg: DispatcherConfig,
        stats: Arc<Stats>,
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
            conn,
            workers,
            by_name,
            cfg,
            stats,
            publish_rx,
            done_tx,
            done_rx,
            tracker: TaskTracker::new(),
            handlers_cancel: CancellationToken::new(),
            completions: Vec::new(),
            publishes: Vec::new(),
            draining: false,
            failures: 0,
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
                let timer = self.next_timer().map(|t| {
                    tokio::time::Instant::now() + t.since(now) + Duration::from_micros(1)
                });
                tokio::select! {
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
                }
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
                    tokio::time::sleep(pause).await;
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
        let clock = self.store.clock().clone();
        let now = clock.now();
        let saved_in_flight: Vec<usize> = self.workers.iter().map(|w| w.in_flight).collect();
        let publishes = std::mem::take(&mut self.publishes);
        let result = self.build_and_commit(now, &publishes).await;
        match result {
            Ok((starts, inserted)) => {
                let completions = std::mem::take(&mut self.completions);
                self.count(&completions);
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                for p in publishes {
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
                for (w, n) in self.workers.iter_mut().zip(saved_in_flight) {
                    w.in_flight = n;
                    w.backlog = Backlog::Unknown;
                }
                for p in publishes {
                    let _ = p.reply.send(Err(anyhow::anyhow!("publish failed: {e:#}")));
                }
                Err(e)
            }
        }
    }

    fn count(&self, completions: &[Completion]) {
        for c in completions {
            let counter = match &c.finished {
                Finished::Ok(_) | Finished::Committed => &self.stats.handled,
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
    ) -> anyhow::Result<(Vec<Start>, HashSet<EventId>)> {
        use berth_store::sqlx::Connection;
        let store = self.store.clone();
        let lease = self.lease(now);
        let mut tx = self
            .conn
            .begin_with("BEGIN IMMEDIATE")
            .await
            .context("failed to begin the dispatcher's transaction")?;

        // 1. Finished attempts.
        let mut inbox: Vec<(Arc<str>, EventId)> = Vec::new();
        let mut attempts: Vec<AttemptRecord> = Vec::new();
        let mut delete: Vec<i64> = Vec::new();
        let mut resched: Vec<(i64, Timestamp)> = Vec::new();
        let mut dead: Vec<NewDeadLetter> = Vec::new();
        let mut new_envs: Vec<Envelope> = Vec::new();
        let mut dead_count = 0u64;
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
                Finished::Ok(emitted) => {
                    attempts.push(record(Outcome::Ok, None, None));
                    inbox.push((w.name.clone(), c.env.id));
                    delete.push(c.claimed.delivery_id);
                    for e in emitted {
                        new_envs.push(store.stamp(e.clone(), Cause::Event(&c.env)));
                    }
                }
                Finished::Duplicate => {
                    attempts.push(record(Outcome::Duplicate, None, None));
                    delete.push(c.claimed.delivery_id);
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
                    resched.push((c.claimed.delivery_id, now));
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
                        delete.push(c.claimed.delivery_id);
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
                        let at = now.add(delay);
                        resched.push((c.claimed.delivery_id, at));
                        w.due_no_later_than(at);
                    }
                }
            }
        }
        let inbox_rows: Vec<(&str, EventId)> = inbox.iter().map(|(w, e)| (&**w, *e)).collect();
        ops::insert_inbox(&mut tx, &inbox_rows, now).await?;
        ops::insert_attempts(&mut tx, &attempts).await?;
        ops::delete_deliveries(&mut tx, &delete).await?;
        ops::reschedule(&mut tx, &resched).await?;
        ops::insert_dead_letters(&mut tx, &dead).await?;

        // 2. Everything to publish: events emitted by finished attempts,
        // failure events, and publish requests. Idle workers get theirs
        // already claimed.
        for p in publishes {
            new_envs.extend(p.envs.iter().cloned());
        }
        let subs = store.subscriptions();
        let mut starts: Vec<Start> = Vec::new();
        let draining = self.draining;
        let by_name = &self.by_name;
        let workers = &mut self.workers;
        let published = publish(&mut tx, &subs, &new_envs, |name| {
            let i = *by_name.get(name)?;
            let w = &mut workers[i];
            if draining || w.capacity() == 0 {
                w.backlog = Backlog::Unknown;
                return None;
            }
            w.in_flight += 1;
            Some(Lease {
                until: now.add(w.policy.timeout + lease.1),
                ..lease.0.clone()
            })
        })
        .await?;
        if !published.deliveries.is_empty() {
            let by_id: HashMap<EventId, &Envelope> = new_envs.iter().map(|e| (e.id, e)).collect();
            for (delivery_id, worker, event_id, leased) in &published.deliveries {
                if !leased {
                    continue;
                }
                let (Some(&wi), Some(env)) = (self.by_name.get(worker.as_str()), by_id.get(event_id))
                else {
                    continue;
                };
                starts.push(Start {
                    worker: wi,
                    claimed: Claimed {
                        delivery_id: *delivery_id,
                        event_id: *event_id,
                        worker: self.workers[wi].name.clone(),
                        round: 0,
                        attempt: 1,
                    },
                    env: Arc::new((*env).clone()),
                    duplicate: false,
                });
            }
        }
        self.stats
            .published
            .fetch_add(published.inserted.len() as u64, Ordering::Relaxed);

        // 3. Claim due deliveries for workers with free capacity.
        if !self.draining {
            let mut claimed_all: Vec<(usize, Claimed)> = Vec::new();
            for wi in 0..self.workers.len() {
                if !self.workers[wi].wants_claim(now) {
                    continue;
                }
                let w = &self.workers[wi];
                let limit = w.capacity();
                let l = Lease {
                    until: now.add(w.policy.timeout + lease.1),
                    ..lease.0.clone()
                };
                let got = ops::claim(&mut tx, &w.name, &l, limit).await?;
                let w = &mut self.workers[wi];
                if got.len() < limit {
                    w.backlog = match ops::next_due(&mut tx, &w.name).await? {
                        None => Backlog::Empty,
                        Some(t) => Backlog::DueAt(t),
                    };
                } else {
                    w.backlog = Backlog::Unknown;
                }
                w.in_flight += got.len();
                claimed_all.extend(got.into_iter().map(|c| (wi, c)));
            }
            if !claimed_all.is_empty() {
                let ids: Vec<EventId> = claimed_all.iter().map(|(_, c)| c.event_id).collect();
                let envs: HashMap<EventId, Arc<Envelope>> = ops::load_events(&mut tx, &ids)
                    .await?
                    .into_iter()
                    .map(|e| (e.id, Arc::new(e)))
                    .collect();
                let mut per_worker: HashMap<usize, Vec<EventId>> = HashMap::new();
                for (wi, c) in &claimed_all {
                    per_worker.entry(*wi).or_default().push(c.event_id);
                }
                let mut dupes: HashSet<(usize, EventId)> = HashSet::new();
                for (wi, ids) in per_worker {
                    for id in ops::inbox_hits(&mut tx, &self.workers[wi].name, &ids).await? {
                        dupes.insert((wi, id));
                    }
                }
                for (wi, c) in claimed_all {
                    let Some(env) = envs.get(&c.event_id) else {
                        // A delivery whose event is gone cannot be handled
                        // or described; drop it loudly rather than loop.
                        error!(worker = %c.worker, event_id = %c.event_id, "delivery refers to a missing event; dropping it");
                        ops::delete_deliveries(&mut tx, &[c.delivery_id]).await?;
                        self.workers[wi].in_flight -= 1;
                        continue;
                    };
                    let duplicate = dupes.contains(&(wi, c.event_id));
                    starts.push(Start {
                        worker: wi,
                        claimed: c,
                        env: env.clone(),
                        duplicate,
                    });
                }
            }
        }
        tx.commit().await.context("failed to commit the dispatcher's transaction")?;
        if dead_count > 0 {
            self.stats
                .dead_letters
                .fetch_add(dead_count, Ordering::Relaxed);
        }
        Ok((starts, published.inserted))
    }

    /// The lease template for this turn: (lease without `until`, grace).
    fn lease(&self, now: Timestamp) -> (Lease, Duration) {
        (
            Lease {
                owner: self.cfg.owner.clone(),
                leased_at: now,
                until: now,
            },
            self.cfg.lease_grace,
        )
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
        let mut env = (*s.env).clone();
        env.attempt = s.claimed.attempt;
        let env = Arc::new(env);
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
        self.tracker.spawn(task.run().instrument(span));
    }
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
                    None => Finished::Ok(done.emitted),
                    Some(tx) => self.commit_own(tx, done.emitted, started_at, t0.elapsed()).await,
                },
            },
        };
        let duration = t0.elapsed();
        match &finished {
            Finished::Ok(_) | Finished::Committed => debug!(?duration, "handled"),
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
        started_at: Timestamp,
        duration: Duration,
    ) -> Finished {
        let result: anyhow::Result<bool> = async {
            let now = self.store.now();
            if ops::insert_inbox(tx.conn(), &[(&*self.name, self.env.id)], now).await? == 0 {
                return Ok(false);
            }
            ops::insert_attempts(
                tx.conn(),
                &[AttemptRecord {
                    event_id: self.env.id,
                    worker: self.name.to_string(),
                    round: self.claimed.round,
                    attempt: self.claimed.attempt,
                    started_at,
                    duration: Some(duration),
                    outcome: Outcome::Ok,
                    error: None,
                    next_delay: None,
                }],
            )
            .await?;
            ops::delete_deliveries(tx.conn(), &[self.claimed.delivery_id]).await?;
            let envs: Vec<Envelope> = emitted
                .into_iter()
                .map(|e| self.store.stamp(e, Cause::Event(&self.env)))
                .collect();
            tx.publish(&envs).await?;
            tx.commit().await?;
            Ok(true)
        }
        .await;
        match result {
            Ok(true) => Finished::Committed,
            Ok(false) => Finished::Duplicate,
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
