//! Settling a turn's finished attempts: what each one's end writes
//! (acknowledgement, inbox entry, attempt record, retry, dead letter,
//! emitted and failure events). A pure function of the completions, the
//! workers' policies, the time and the seeded generator, so that every retry
//! and dead-letter decision is tested without a database.

use std::sync::Arc;
use std::time::Duration;

use berth_core::events::{WORKER_FAILED_VERSION, WorkerFailed};
use berth_core::{Envelope, ErrorInfo, EventId, NewEvent, SeededRng, Timestamp};
use berth_store::ops::NewDeadLetter;
use berth_store::{AttemptRecord, DeadReason, Outcome};

use super::{Completion, Finished};
use crate::handler::FailureKind;
use crate::policy::Policy;

/// What settling needs of one worker, at the index its completions carry.
pub(super) struct Worker<'a> {
    pub name: &'a Arc<str>,
    pub policy: &'a Policy,
}

/// Where the ids of what settling creates come from. The store in the
/// dispatcher: its id generator draws from the seeded generator, so the
/// order of these calls is part of a simulated run's replay.
pub(super) trait Ids {
    /// The envelope of `new`, emitted while handling `cause`.
    fn caused_by(&self, new: NewEvent, cause: &Envelope) -> Envelope;
    /// A fresh dead letter's id.
    fn dead_letter_id(&self) -> String;
}

/// A delivery to be attempted again.
#[derive(Debug)]
pub(super) struct Reschedule {
    pub worker: Arc<str>,
    /// Kept in memory, so that claiming it again needs no read of the log.
    pub env: Arc<Envelope>,
    pub at: Timestamp,
}

/// How a worker's backlog changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Due {
    /// It may hold anything: ask the database.
    Unknown,
    /// It holds a delivery due at this time.
    By(Timestamp),
}

/// What a turn's finished attempts write, for the turn to put in its
/// script, and what it tells once they are committed.
#[derive(Debug, Default)]
pub(super) struct Settled {
    pub inbox: Vec<(Arc<str>, EventId)>,
    pub attempts: Vec<AttemptRecord>,
    /// Deliveries done with: acknowledged or dead.
    pub delete: Vec<(EventId, Arc<str>)>,
    pub reschedule: Vec<Reschedule>,
    pub dead: Vec<NewDeadLetter>,
    /// Events emitted by successful attempts and failure events of dead
    /// ones, stamped.
    pub new_envs: Vec<Envelope>,
    /// Failed attempts that will be retried, to tell listeners.
    pub retried: Vec<crate::Retried>,
    /// Per worker (by index), in order.
    pub backlog: Vec<(usize, Due)>,
}

/// Settles `completions` at `now`. Ids are drawn from `ids` and back-off
/// jitter from `rng`, one completion after another in order.
pub(super) fn settle(
    completions: &[Completion],
    workers: &[Worker<'_>],
    now: Timestamp,
    rng: &SeededRng,
    ids: &impl Ids,
) -> anyhow::Result<Settled> {
    let mut out = Settled::default();
    for c in completions {
        let w = &workers[c.worker];
        let record =
            |outcome: Outcome, error: Option<ErrorInfo>, next: Option<Duration>| AttemptRecord {
                event_id: c.env.id,
                worker: w.name.to_string(),
                round: c.claimed.round,
                attempt: c.claimed.attempt,
                started_at: c.started_at,
                duration: Some(c.duration),
                outcome,
                error,
                next_delay: next,
            };
        match &c.finished {
            // Recorded by its own transaction.
            Finished::Committed => {}
            Finished::Ok { emitted, .. } => {
                out.attempts.push(record(Outcome::Ok, None, None));
                out.inbox.push((w.name.clone(), c.env.id));
                out.delete.push((c.env.id, w.name.clone()));
                for e in emitted {
                    out.new_envs.push(ids.caused_by(e.clone(), &c.env));
                }
            }
            Finished::Duplicate => {
                out.attempts.push(record(Outcome::Duplicate, None, None));
                out.delete.push((c.env.id, w.name.clone()));
            }
            Finished::Abandoned => {
                out.attempts.push(record(
                    Outcome::Abandoned,
                    Some(ErrorInfo::new(
                        "attempt_abandoned",
                        "berth shut down before the attempt finished; it will be retried",
                    )),
                    Some(Duration::ZERO),
                ));
                out.reschedule.push(Reschedule {
                    worker: w.name.clone(),
                    env: c.env.clone(),
                    at: now,
                });
                out.backlog.push((c.worker, Due::Unknown));
            }
            Finished::Failed {
                outcome,
                kind,
                error,
            } => match dead_reason(*outcome, *kind, c.claimed.attempt, w.policy) {
                Some(reason) => {
                    out.attempts
                        .push(record(*outcome, Some(error.clone()), None));
                    out.delete.push((c.env.id, w.name.clone()));
                    out.dead.push(NewDeadLetter {
                        id: ids.dead_letter_id(),
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
                        out.new_envs.push(ids.caused_by(ev, &c.env));
                    }
                }
                None => {
                    let delay = match kind {
                        FailureKind::RetryAfter(d) => w.policy.clamp_retry_after(*d),
                        _ => w.policy.backoff.delay(c.claimed.attempt, rng),
                    };
                    out.attempts
                        .push(record(*outcome, Some(error.clone()), Some(delay)));
                    let at = now.plus(delay);
                    out.retried.push(crate::Retried {
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
                    out.reschedule.push(Reschedule {
                        worker: w.name.clone(),
                        env: c.env.clone(),
                        at,
                    });
                    out.backlog.push((c.worker, Due::By(at)));
                }
            },
        }
    }
    Ok(out)
}

/// Why a failed attempt is the delivery's last, if it is: fatal kinds at
/// once, retryable ones when the policy's attempts are used up.
fn dead_reason(
    outcome: Outcome,
    kind: FailureKind,
    attempt: u32,
    policy: &Policy,
) -> Option<DeadReason> {
    match kind {
        FailureKind::Fatal if outcome == Outcome::Panic => Some(DeadReason::Panic),
        FailureKind::Fatal => Some(DeadReason::Fatal),
        FailureKind::Malformed => Some(DeadReason::Malformed),
        FailureKind::Retryable | FailureKind::RetryAfter(_) if attempt >= policy.max_attempts => {
            Some(DeadReason::Exhausted)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use berth_core::{Clock, FlowId, IdGen};
    use berth_store::Claimed;

    use super::*;

    const T0: i64 = 1_700_000_000_000_000;

    fn at(us: i64) -> Timestamp {
        Timestamp::from_micros(T0 + us)
    }

    struct Fixed;
    impl Clock for Fixed {
        fn now(&self) -> Timestamp {
            at(0)
        }
    }

    /// Ids as the store makes them (event ids from a seeded generator, the
    /// envelope inheriting its cause's flow, org and subject); dead letters
    /// numbered.
    struct TestIds {
        ids: IdGen,
        dead: Cell<u32>,
    }

    impl TestIds {
        fn new() -> Self {
            TestIds {
                ids: IdGen::new(Arc::new(Fixed), Arc::new(SeededRng::new(1))),
                dead: Cell::new(0),
            }
        }
    }

    impl Ids for TestIds {
        fn caused_by(&self, new: NewEvent, cause: &Envelope) -> Envelope {
            Envelope {
                id: self.ids.event_id(),
                event_type: new.event_type,
                version: new.version,
                org_id: new.org_id.or(cause.org_id.clone()),
                subject: new.subject.or(cause.subject.clone()),
                flow_id: cause.flow_id,
                causation_id: Some(cause.id),
                attempt: 0,
                created_at: at(0),
                not_before: new.not_before,
                payload: new.payload,
            }
        }

        fn dead_letter_id(&self) -> String {
            self.dead.set(self.dead.get() + 1);
            format!("dl-{}", self.dead.get())
        }
    }

    /// Five attempts, back-off 100ms doubling up to 30s, without jitter.
    fn policy() -> Policy {
        let mut p = Policy::builtin("w");
        p.backoff.jitter = crate::policy::Jitter::None;
        p
    }

    struct World {
        ids: TestIds,
        name: Arc<str>,
        policy: Policy,
        env: Arc<Envelope>,
        flow: FlowId,
    }

    impl World {
        fn new() -> Self {
            let ids = TestIds::new();
            let flow = ids.ids.flow_id();
            let env = Envelope {
                id: ids.ids.event_id(),
                event_type: "test.ping".into(),
                version: 1,
                org_id: Some("o".into()),
                subject: Some("i1".into()),
                flow_id: flow,
                causation_id: None,
                attempt: 0,
                created_at: at(0),
                not_before: None,
                payload: serde_json::value::to_raw_value(&serde_json::json!({"n": 1})).unwrap(),
            };
            World {
                ids,
                name: "w".into(),
                policy: policy(),
                env: Arc::new(env),
                flow,
            }
        }

        fn completion(&self, attempt: u32, finished: Finished) -> Completion {
            Completion {
                worker: 0,
                claimed: Claimed {
                    event_id: self.env.id,
                    worker: self.name.clone(),
                    round: 2,
                    attempt,
                },
                env: self.env.clone(),
                started_at: at(10),
                duration: Duration::from_millis(7),
                finished,
            }
        }

        fn settle_with(&self, completions: &[Completion], rng: &SeededRng) -> Settled {
            let workers = [Worker {
                name: &self.name,
                policy: &self.policy,
            }];
            settle(completions, &workers, at(1_000), rng, &self.ids).unwrap()
        }

        fn settle(&self, completions: &[Completion]) -> Settled {
            self.settle_with(completions, &SeededRng::new(5))
        }
    }

    fn failed(outcome: Outcome, kind: FailureKind) -> Finished {
        Finished::Failed {
            outcome,
            kind,
            error: ErrorInfo::new("boom", "it broke"),
        }
    }

    #[test]
    fn an_ok_attempt_is_acknowledged_recorded_and_its_events_are_caused_by_it() {
        let w = World::new();
        let pong = NewEvent::with_type("test.pong", 1, &serde_json::json!({"n": 2})).unwrap();
        let c = w.completion(
            1,
            Finished::Ok {
                emitted: vec![pong],
                writes: vec![],
            },
        );
        let s = w.settle(&[c]);
        assert_eq!(s.inbox, vec![(w.name.clone(), w.env.id)]);
        assert_eq!(s.delete, vec![(w.env.id, w.name.clone())]);
        assert_eq!(s.attempts.len(), 1);
        let a = &s.attempts[0];
        assert_eq!(
            (a.event_id, a.worker.as_str(), a.round, a.attempt),
            (w.env.id, "w", 2, 1)
        );
        assert_eq!(a.outcome, Outcome::Ok);
        assert_eq!(a.started_at, at(10));
        assert_eq!(a.duration, Some(Duration::from_millis(7)));
        assert_eq!((a.error.clone(), a.next_delay), (None, None));
        assert_eq!(s.new_envs.len(), 1);
        let e = &s.new_envs[0];
        assert_eq!(e.event_type, "test.pong");
        assert_eq!(e.causation_id, Some(w.env.id));
        assert_eq!(e.flow_id, w.flow);
        assert_eq!(e.org_id.as_deref(), Some("o"));
        assert_eq!(e.subject.as_deref(), Some("i1"));
        assert!(e.id > w.env.id, "a fresh id from the generator");
        assert!(s.reschedule.is_empty() && s.dead.is_empty() && s.retried.is_empty());
        assert!(s.backlog.is_empty());
    }

    #[test]
    fn a_retryable_failure_under_max_attempts_is_rescheduled_after_its_backoff() {
        let w = World::new();
        let s = w.settle(&[w.completion(2, failed(Outcome::Retry, FailureKind::Retryable))]);
        // The second attempt's delay: 100ms × 2.
        let delay = Duration::from_millis(200);
        let due = at(1_000).plus(delay);
        assert_eq!(s.attempts.len(), 1);
        assert_eq!(s.attempts[0].outcome, Outcome::Retry);
        assert_eq!(s.attempts[0].next_delay, Some(delay));
        assert_eq!(
            s.attempts[0].error.as_ref().map(|e| e.code.as_str()),
            Some("boom")
        );
        assert_eq!(s.reschedule.len(), 1);
        let r = &s.reschedule[0];
        assert_eq!((&*r.worker, r.env.id, r.at), ("w", w.env.id, due));
        assert_eq!(s.backlog, vec![(0, Due::By(due))]);
        assert_eq!(s.retried.len(), 1);
        let n = &s.retried[0];
        assert_eq!((n.event_id, n.flow_id), (w.env.id, w.flow));
        assert_eq!(n.org_id.as_deref(), Some("o"));
        assert_eq!(n.subject.as_deref(), Some("i1"));
        assert_eq!((n.worker.as_str(), n.attempt, n.max_attempts), ("w", 2, 5));
        assert_eq!(n.error.code, "boom");
        assert_eq!(n.next_attempt_at, due);
        assert!(s.delete.is_empty() && s.inbox.is_empty() && s.dead.is_empty());
        assert!(s.new_envs.is_empty());
    }

    #[test]
    fn jitter_is_drawn_from_the_seeded_generator_one_retry_after_another() {
        let mut w = World::new();
        w.policy.backoff.jitter = crate::policy::Jitter::Full;
        let cs = [
            w.completion(1, failed(Outcome::Retry, FailureKind::Retryable)),
            w.completion(3, failed(Outcome::Timeout, FailureKind::Retryable)),
        ];
        let s = w.settle_with(&cs, &SeededRng::new(42));
        let rng = SeededRng::new(42);
        let first = w.policy.backoff.delay(1, &rng);
        let second = w.policy.backoff.delay(3, &rng);
        let delays: Vec<_> = s.attempts.iter().map(|a| a.next_delay).collect();
        assert_eq!(delays, vec![Some(first), Some(second)]);
        assert_eq!(s.reschedule[1].at, at(1_000).plus(second));
        assert_eq!(s.attempts[1].outcome, Outcome::Timeout);
        // The same seed settles the same way.
        let again = w.settle_with(&cs, &SeededRng::new(42));
        let delays_again: Vec<_> = again.attempts.iter().map(|a| a.next_delay).collect();
        assert_eq!(delays_again, delays);
    }

    #[test]
    fn at_max_attempts_a_failure_is_dead_lettered_and_announced() {
        let w = World::new();
        let s = w.settle(&[w.completion(5, failed(Outcome::Retry, FailureKind::Retryable))]);
        assert_eq!(s.dead.len(), 1);
        let d = &s.dead[0];
        assert_eq!(d.id, "dl-1");
        assert_eq!((d.event_id, d.worker.as_str()), (w.env.id, "w"));
        assert_eq!((d.round, d.attempts), (2, 5));
        assert_eq!(d.reason, DeadReason::Exhausted);
        assert_eq!(d.error.code, "boom");
        assert_eq!((d.org_id.as_deref(), d.flow_id), (Some("o"), w.flow));
        assert_eq!(d.dead_at, at(1_000));
        assert_eq!(s.delete, vec![(w.env.id, w.name.clone())]);
        assert_eq!(s.attempts[0].next_delay, None);
        assert_eq!(s.attempts[0].outcome, Outcome::Retry);
        assert!(s.reschedule.is_empty() && s.retried.is_empty() && s.backlog.is_empty());
        // The policy's `on_exhausted` event, caused by the delivery's.
        assert_eq!(s.new_envs.len(), 1);
        let e = &s.new_envs[0];
        assert_eq!(
            (e.event_type.as_str(), e.version),
            ("w.failed", WORKER_FAILED_VERSION)
        );
        assert_eq!(e.causation_id, Some(w.env.id));
        let payload: WorkerFailed = e.payload_as().unwrap();
        assert_eq!(
            payload,
            WorkerFailed {
                worker: "w".into(),
                event_id: w.env.id,
                event_type: "test.ping".into(),
                attempts: 5,
                reason: "exhausted".into(),
                error: ErrorInfo::new("boom", "it broke"),
            }
        );
    }

    #[test]
    fn without_on_exhausted_a_dead_letter_announces_nothing() {
        let mut w = World::new();
        w.policy.on_exhausted = None;
        let s = w.settle(&[w.completion(5, failed(Outcome::Retry, FailureKind::Retryable))]);
        assert_eq!(s.dead.len(), 1);
        assert!(s.new_envs.is_empty());
    }

    #[test]
    fn fatal_malformed_and_panic_are_dead_at_the_first_attempt() {
        let w = World::new();
        let cs = [
            w.completion(1, failed(Outcome::Fatal, FailureKind::Fatal)),
            w.completion(1, failed(Outcome::Malformed, FailureKind::Malformed)),
            w.completion(1, failed(Outcome::Panic, FailureKind::Fatal)),
        ];
        let s = w.settle(&cs);
        let reasons: Vec<(String, DeadReason)> =
            s.dead.iter().map(|d| (d.id.clone(), d.reason)).collect();
        assert_eq!(
            reasons,
            vec![
                ("dl-1".into(), DeadReason::Fatal),
                ("dl-2".into(), DeadReason::Malformed),
                ("dl-3".into(), DeadReason::Panic),
            ]
        );
        let outcomes: Vec<Outcome> = s.attempts.iter().map(|a| a.outcome).collect();
        assert_eq!(
            outcomes,
            vec![Outcome::Fatal, Outcome::Malformed, Outcome::Panic]
        );
        let announced: Vec<String> = s
            .new_envs
            .iter()
            .map(|e| e.payload_as::<WorkerFailed>().unwrap().reason)
            .collect();
        assert_eq!(announced, vec!["fatal", "malformed", "panic"]);
        assert_eq!(s.delete.len(), 3);
        assert!(s.reschedule.is_empty() && s.retried.is_empty());
    }

    #[test]
    fn retry_after_is_kept_within_the_policys_backoff_max() {
        let w = World::new();
        let cs = [
            w.completion(
                1,
                failed(
                    Outcome::Retry,
                    FailureKind::RetryAfter(Duration::from_secs(3600)),
                ),
            ),
            w.completion(
                1,
                failed(
                    Outcome::Retry,
                    FailureKind::RetryAfter(Duration::from_secs(2)),
                ),
            ),
        ];
        let s = w.settle(&cs);
        let delays: Vec<_> = s.attempts.iter().map(|a| a.next_delay).collect();
        assert_eq!(
            delays,
            vec![Some(Duration::from_secs(30)), Some(Duration::from_secs(2))]
        );
        assert_eq!(s.reschedule[0].at, at(1_000).plus(Duration::from_secs(30)));
        // Asked-for delays are retries too: at max attempts, dead.
        let s = w.settle(&[w.completion(
            5,
            failed(Outcome::Retry, FailureKind::RetryAfter(Duration::ZERO)),
        )]);
        assert_eq!(s.dead[0].reason, DeadReason::Exhausted);
    }

    #[test]
    fn a_duplicate_is_acknowledged_without_an_inbox_entry() {
        let w = World::new();
        let s = w.settle(&[w.completion(1, Finished::Duplicate)]);
        assert_eq!(s.attempts.len(), 1);
        assert_eq!(s.attempts[0].outcome, Outcome::Duplicate);
        assert_eq!(s.attempts[0].error, None);
        assert_eq!(s.delete, vec![(w.env.id, w.name.clone())]);
        assert!(s.inbox.is_empty() && s.new_envs.is_empty() && s.dead.is_empty());
    }

    #[test]
    fn an_abandoned_attempt_is_rescheduled_now() {
        let w = World::new();
        let s = w.settle(&[w.completion(3, Finished::Abandoned)]);
        assert_eq!(s.attempts.len(), 1);
        let a = &s.attempts[0];
        assert_eq!(a.outcome, Outcome::Abandoned);
        assert_eq!(
            a.error.as_ref().map(|e| e.code.as_str()),
            Some("attempt_abandoned")
        );
        assert_eq!(a.next_delay, Some(Duration::ZERO));
        assert_eq!(s.reschedule.len(), 1);
        assert_eq!(
            (s.reschedule[0].env.id, s.reschedule[0].at),
            (w.env.id, at(1_000))
        );
        assert_eq!(s.backlog, vec![(0, Due::Unknown)]);
        assert!(s.retried.is_empty() && s.delete.is_empty() && s.dead.is_empty());
    }

    #[test]
    fn an_attempt_committed_on_its_own_records_nothing() {
        let w = World::new();
        let s = w.settle(&[w.completion(1, Finished::Committed)]);
        assert!(s.attempts.is_empty() && s.inbox.is_empty() && s.delete.is_empty());
        assert!(s.reschedule.is_empty() && s.dead.is_empty() && s.new_envs.is_empty());
        assert!(s.retried.is_empty() && s.backlog.is_empty());
        assert_eq!(w.ids.dead.get(), 0);
    }
}
