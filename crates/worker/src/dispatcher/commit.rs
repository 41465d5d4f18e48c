//! Committing a turn: the guarded writes handlers and publishers declared
//! (applied first, each owner's all or none), the settled attempts and the
//! plain writes into the script, and the script's run as one transaction.
//! The writes pass through as the store's opaque type: which rows they
//! touch is the store's business.

use std::collections::{HashMap, HashSet};

use berth_core::Timestamp;
use berth_store::Row;
use berth_store::ops::Script;
use berth_store::writes::{self, Patched, Write};

use super::settle::Settled;
use super::{Completion, Dispatcher, Finished, PublishReq, concurrent_update};

impl Dispatcher {
    /// Phase A of a turn: runs the guarded writes declared. `script` opens
    /// the transaction; on return it holds what of it has not run yet, for
    /// the rest of the turn to follow.
    /// An attempt whose guards fail becomes a retry and a publish request
    /// whose guards fail is `rejected`; an owner whose guards partly pass
    /// would leave half its writes, so the transaction is rolled back and
    /// redone without it. Returns what the patches left, for the instance
    /// cache.
    pub(super) async fn guarded_writes(
        &mut self,
        script: &mut Script,
        now: Timestamp,
        publishes: &[PublishReq],
        rejected: &mut HashSet<usize>,
    ) -> anyhow::Result<Patched> {
        // Publish requests' writes are tagged after the completions'.
        let base = self.completions.len();
        // Counted first (no row per write); exact only after a count fell
        // short, to learn which writes those were.
        let mut exact = false;
        loop {
            let guarded: Vec<(usize, &Write)> = declared(&self.completions, publishes, rejected)
                .flat_map(|(i, ws)| ws.iter().filter(|w| w.is_guarded()).map(move |w| (i, w)))
                .collect();
            if guarded.is_empty() {
                return Ok(Patched::default());
            }
            let mut needed: HashMap<usize, usize> = HashMap::new();
            for (i, _) in &guarded {
                *needed.entry(*i).or_default() += 1;
            }
            script.guarded_writes(&guarded, now, exact)?;
            let rows = match self.writer.run(std::mem::take(script)).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = self.writer.rollback().await;
                    return Err(e.context("the dispatcher's transaction failed"));
                }
            };
            let Some(passing) = writes::passed_guards(&guarded, &rows)? else {
                let _ = self.writer.rollback().await;
                script.begin();
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
                return writes::patched_rows(&rows);
            }
            let _ = self.writer.rollback().await;
            script.begin();
        }
    }

    /// Runs the turn's whole script. On failure the transaction is ended,
    /// and a repeated event id makes the next turn check ids first.
    pub(super) async fn commit(&mut self, script: Script) -> anyhow::Result<Vec<Row>> {
        match self.writer.run(script).await {
            Ok(rows) => Ok(rows),
            Err(e) => {
                // A failed statement leaves the transaction open; end it.
                let _ = self.writer.rollback().await;
                if is_duplicate_event(&e) {
                    // A publish request repeated an id already in the log:
                    // redo the turn checking ids first.
                    self.check_known = true;
                }
                Err(e.context("the dispatcher's transaction failed"))
            }
        }
    }
}

/// Appends what settling decided, in the order the schema's statements
/// expect: inbox, attempts, acknowledgements, retries, dead letters.
pub(super) fn append_settled(script: &mut Script, settled: &Settled, now: Timestamp) {
    let inbox: Vec<(&str, _)> = settled.inbox.iter().map(|(w, e)| (&**w, *e)).collect();
    script.insert_inbox(&inbox, now);
    script.insert_attempts(&settled.attempts);
    let delete: Vec<(_, &str)> = settled.delete.iter().map(|(e, w)| (*e, &**w)).collect();
    script.delete_deliveries(&delete);
    let resched: Vec<(_, &str, Timestamp)> = settled
        .reschedule
        .iter()
        .map(|r| (r.env.id, &*r.worker, r.at))
        .collect();
    script.reschedule(&resched);
    script.insert_dead_letters(&settled.dead);
}

/// The writes of this turn's successful attempts and of its publish requests
/// not rejected, each with its owner's tag: an attempt's index, or the
/// number of attempts plus a request's index.
pub(super) fn declared<'a>(
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

/// Whether `e` is SQLite refusing a second row with the same event id.
fn is_duplicate_event(e: &anyhow::Error) -> bool {
    berth_store::writer::is_unique_violation(e, "events.id")
}
