//! Fan-out: a turn's new events (emitted, failure events, publish requests)
//! become one delivery per subscribed worker. A worker with free capacity
//! gets its delivery already claimed, so the common path costs no claim of
//! its own.

use std::collections::HashSet;
use std::sync::Arc;

use berth_core::{Envelope, EventId, Timestamp};
use berth_store::{Claimed, NewDelivery};

use super::{Backlog, Dispatcher, PublishReq, Start};

/// What fan-out decided for one turn.
pub(super) struct FanOut {
    /// Deliveries inserted claimed, to start once committed.
    pub starts: Vec<Start>,
    pub rows: Vec<NewDelivery>,
    /// Deliveries left for a later claim, with their envelopes.
    pub pending: Vec<(EventId, Arc<str>, Arc<Envelope>)>,
}

impl Dispatcher {
    /// Everything to publish, each id once: the events settling made
    /// (`settled`, fresh ids), then the publish requests not rejected (which may repeat an
    /// id already in the log: checked first when the last turn tripped over
    /// one).
    pub(super) async fn fresh_events<'a>(
        &mut self,
        settled: &'a [Envelope],
        publishes: &'a [PublishReq],
        rejected: &HashSet<usize>,
    ) -> anyhow::Result<Vec<&'a Envelope>> {
        let mut requested: Vec<&Envelope> = publishes
            .iter()
            .enumerate()
            .filter(|(i, _)| !rejected.contains(i))
            .flat_map(|(_, p)| p.envs.iter())
            .collect();
        if self.check_known && !requested.is_empty() {
            let ids: Vec<EventId> = requested.iter().map(|e| e.id).collect();
            let known = self.reads.known_events(&ids).await?;
            requested.retain(|e| !known.contains(&e.id));
        }
        let mut seen: HashSet<EventId> = HashSet::new();
        Ok(settled
            .iter()
            .chain(requested)
            .filter(|e| seen.insert(e.id))
            .collect())
    }

    /// The deliveries of `fresh`, leased at `now` where claimed at once.
    pub(super) fn fan_out(&mut self, fresh: &[&Envelope], now: Timestamp) -> FanOut {
        let subs = self.store.subscriptions();
        let mut out = FanOut {
            starts: Vec::new(),
            rows: Vec::new(),
            pending: Vec::new(),
        };
        for e in fresh {
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
                    self.cfg.lease(now, w.policy.timeout)
                });
                if claim_now {
                    out.starts.push(Start {
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
                    out.pending.push((e.id, w.name.clone(), shared.clone()));
                }
                out.rows.push(NewDelivery {
                    event_id: e.id,
                    worker: w.name.clone(),
                    round: 0,
                    attempt: u32::from(claim_now),
                    not_before: e.not_before.unwrap_or(e.created_at),
                    lease: lease_row,
                });
            }
        }
        out
    }
}
