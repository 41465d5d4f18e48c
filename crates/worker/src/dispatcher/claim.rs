//! Claiming: the claim statements a turn appends for workers with free
//! capacity, the claims read back from its result (and what they say of
//! each worker's backlog), and the envelopes of the claimed, from memory or
//! from the log.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use berth_core::{Envelope, EventId, Timestamp};
use berth_store::ops::{self, Script};
use berth_store::{Claimed, Row};
use tracing::error;

use super::{Backlog, Dispatcher, Start};

/// The claims a turn asked for: per worker, at most how many.
pub(super) struct Claims {
    limits: HashMap<Arc<str>, usize>,
}

impl Dispatcher {
    /// Appends a claim of due deliveries for each worker that wants one
    /// (none while draining), leased at `now`.
    pub(super) fn claim(&self, script: &mut Script, now: Timestamp) -> Claims {
        let mut limits: HashMap<Arc<str>, usize> = HashMap::new();
        if !self.draining {
            for w in &self.workers {
                if !w.wants_claim(now) {
                    continue;
                }
                let limit = w.capacity();
                script.claim(&w.name, &self.cfg.lease(now, w.policy.timeout), limit);
                limits.insert(w.name.clone(), limit);
            }
        }
        Claims { limits }
    }

    /// The deliveries the committed script claimed; each worker claimed
    /// from has them in flight, and its backlog is what the claim left:
    /// known only when the claim took fewer than it asked for.
    pub(super) fn claimed(&mut self, rows: &[Row], claims: Claims) -> anyhow::Result<Vec<Claimed>> {
        let claiming: HashMap<&str, Arc<str>> = claims
            .limits
            .keys()
            .map(|name| (&**name, name.clone()))
            .collect();
        let got = ops::read_claims(rows, &claiming)?;
        for (name, limit) in &claims.limits {
            let n = got.claimed.iter().filter(|c| &c.worker == name).count();
            let Some(&wi) = self.by_name.get(name) else {
                continue;
            };
            let w = &mut self.workers[wi];
            w.in_flight += n;
            w.backlog = if n < *limit {
                match got.next_due.get(&**name).copied().flatten() {
                    None => Backlog::Empty,
                    Some(t) => Backlog::DueAt(t),
                }
            } else {
                Backlog::Unknown
            };
        }
        Ok(got.claimed)
    }

    /// What to start for `claimed`: envelopes from memory when this process
    /// wrote the delivery, else from the log (with an inbox check for
    /// duplicates).
    pub(super) async fn starts(&mut self, claimed: Vec<Claimed>) -> anyhow::Result<Vec<Start>> {
        let mut starts = Vec::new();
        let mut missing: Vec<Claimed> = Vec::new();
        for c in claimed {
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
        Ok(starts)
    }

    /// Reads the envelopes of deliveries claimed without one in memory (work
    /// from before a restart, or written by another transaction), and marks
    /// those already in the worker's inbox as duplicates. The claims are
    /// committed, so a failure here is retried by the lease, not lost.
    async fn load_claimed(&mut self, claimed: Vec<Claimed>) -> anyhow::Result<Vec<Start>> {
        let ids: Vec<EventId> = claimed.iter().map(|c| c.event_id).collect();
        let envs: HashMap<EventId, Arc<Envelope>> = self
            .reads
            .events(&ids)
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
            for id in self.reads.inbox_hits(&w, &ids).await? {
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
                let mut s = self.writer.script();
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
}
