//! Work that must run in exactly one process at a time among those sharing
//! a PostgreSQL database — the reconciler, each host's engine-event
//! listener — held through a lease in the database (`singletons`): the
//! holder renews it every third of its term and stops the work if it cannot
//! before the term ends; another process takes it once it has ended, or at
//! once when the holder gives it up on a clean stop. On SQLite one process
//! runs them all (its dispatcher lock sees to it) and this is not used.

use std::time::Duration;

use berth_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a lease lasts without renewal: the longest a dead holder's
/// work waits for another process to take it up.
pub const TERM: Duration = Duration::from_secs(10);

/// Runs `start`'s task while this process holds the lease `name` as
/// `owner`, until `cancel`; the task is given a token that is cancelled
/// when the lease is lost or the process stops.
pub fn spawn(
    store: Store,
    name: String,
    owner: String,
    term: Duration,
    cancel: CancellationToken,
    start: impl Fn(CancellationToken) -> JoinHandle<()> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let every = term / 3;
        loop {
            let now = store.now();
            match store
                .hold_singleton(&name, &owner, now, now.plus(term))
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(every) => continue,
                    }
                }
                Err(e) => {
                    warn!(lease = %name, error = %format!("{e:#}"), "cannot ask for the lease; will retry");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(every) => continue,
                    }
                }
            }
            info!(lease = %name, "took the lease: running here");
            let mut held_until = now.plus(term);
            let child = cancel.child_token();
            let mut task = start(child.clone());
            // (stopping the process, the task already ended)
            let (stopping, ended) = loop {
                tokio::select! {
                    _ = cancel.cancelled() => break (true, false),
                    _ = &mut task => {
                        warn!(lease = %name, "the task ended by itself; giving the lease up");
                        break (false, true);
                    }
                    _ = tokio::time::sleep(every) => {
                        let now = store.now();
                        match store.hold_singleton(&name, &owner, now, now.plus(term)).await {
                            Ok(true) => held_until = now.plus(term),
                            Ok(false) => {
                                warn!(lease = %name, "lost the lease to another process; stopping here");
                                break (false, false);
                            }
                            // Past the next renewal the term may have run
                            // out, and another process may take it: stop
                            // before then.
                            Err(e) if store.now().plus(every) >= held_until => {
                                warn!(lease = %name, error = %format!("{e:#}"), "cannot renew the lease before it ends; stopping here");
                                break (false, false);
                            }
                            Err(e) => {
                                warn!(lease = %name, error = %format!("{e:#}"), "cannot renew the lease; will retry");
                            }
                        }
                    }
                }
            };
            child.cancel();
            if !ended {
                let _ = task.await;
            }
            if let Err(e) = store.release_singleton(&name, &owner).await {
                warn!(lease = %name, error = %format!("{e:#}"), "cannot give the lease up; it will expire");
            }
            if stopping {
                return;
            }
        }
    })
}
