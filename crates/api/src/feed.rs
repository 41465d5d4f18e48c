//! The end of the event log as a watch: one task per server reads the
//! newest log position and publishes it, so that every event stream and
//! every `wait` wakes when something was committed, instead of each polling
//! the database. Events are committed by API requests, handlers' own
//! transactions and the dispatcher's group commits alike; the store has no
//! broadcast of commits (its notification wakes the dispatcher only), so the
//! task polls — a read of the largest rowid, only while someone listens.

use std::sync::Arc;
use std::time::Duration;

use berth_store::Store;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// How often the log's end is read while someone is listening: the latency
/// of the event stream and of `wait`.
pub const POLL: Duration = Duration::from_millis(20);

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
    pub async fn run(self: Arc<Self>, store: Store, cancel: CancellationToken) {
        loop {
            if self.tx.receiver_count() == 0 {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = self.subscribed.notified() => continue,
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
            let end = async {
                let mut conn = store.pool().acquire().await?;
                berth_store::tenancy::last_seq(&mut conn).await
            };
            match end.await {
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
