//! Running one attempt: a handler in a task of its own, under the policy's
//! timeout and the shutdown's cancellation, reporting how it finished; and a
//! handler that opened its own transaction committing it with its record.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use berth_core::{Envelope, ErrorInfo, NewEvent, Timestamp};
use berth_store::writes::Write;
use berth_store::{AttemptRecord, Cause, Claimed, Outcome, Store};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{Completion, Dispatcher, Finished, Start, concurrent_update};
use crate::handler::{Ctx, FailureKind, Handler};

impl Dispatcher {
    /// Starts what a turn claimed: a handler task each, or, for one already
    /// in the worker's inbox, a duplicate for the next turn to acknowledge.
    pub(super) fn spawn(&mut self, s: Start) {
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
            if !tx.inbox_hits(&self.name, &[self.env.id]).await?.is_empty() {
                return Ok(Some(Finished::Duplicate));
            }
            if !tx.apply(&writes, now).await? {
                return Ok(Some(concurrent_update()));
            }
            let mut s = tx.store().script();
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
            tx.run(s).await?;
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
