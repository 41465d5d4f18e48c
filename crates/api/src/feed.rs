//! The end of the event log as a watch: one task per server reads the
//! newest log position and publishes it, so that every event stream and
//! every `wait` wakes when something was committed, instead of each polling
//! the database. It wakes on the bus's feed of the dispatcher's commits
//! (where nearly every event is committed), on [`Feed::kick`] after the
//! API's own commits, and, for what else commits (a handler's own
//! transaction, a CLI re-drive), on a slow poll — only while someone listens.

use std::sync::Arc;
use std::time::Duration;

use berth_core::Envelope;
use berth_store::Store;
use berth_worker::Bus;
use tokio::sync::{Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

/// How often the log's end is read while someone is listening and nothing
/// woke the feed: the latency of events committed outside the dispatcher.
pub const POLL: Duration = Duration::from_millis(250);

#[derive(Debug)]
pub struct Feed {
    tx: watch::Sender<i64>,
    subscribed: Notify,
}

impl Feed {
    pub fn new() -> Arc<Feed> {
        Arc::new(Feed {
            tx: watch::Sender::new(0),
            subscribed: Notify::new(),
        })
    }

    /// A receiver that changes whenever the log grows.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        let rx = self.tx.subscribe();
        self.subscribed.notify_one();
        rx
    }

    /// Wakes the listeners now (after a commit made by the API itself).
    pub fn kick(&self) {
        self.tx.send_modify(|_| {});
    }

    /// Runs until `cancel`.
    pub async fn run(self: Arc<Self>, store: Store, bus: Bus, cancel: CancellationToken) {
        // Held only while someone listens: a receiver nobody reads would
        // keep every committed event in the bus's buffer.
        let mut committed: Option<broadcast::Receiver<Arc<Envelope>>> = None;
        loop {
            if self.tx.receiver_count() == 0 {
                committed = None;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.subscribed.notified() => continue,
                }
            }
            let rx = committed.get_or_insert_with(|| bus.committed());
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = rx.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        // The bus is gone: the poll alone is left.
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(POLL) => {}
                        }
                    }
                    // One read covers everything committed so far.
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(POLL) => {}
            }
            match store.last_seq().await {
                Ok(seq) => {
                    self.tx.send_if_modified(|cur| {
                        let changed = *cur != seq;
                        *cur = seq;
                        changed
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the end of the event log");
                }
            }
        }
    }
}
