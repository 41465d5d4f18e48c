//! Waiting without sleeping: a state the store holds is re-checked after
//! each commit ([`berth_store::Store::commits`]), so a wait ends with the
//! commit that made it true and costs nothing in between. Deadlines are in
//! *real* time, kept by a thread: a tokio timer would be moved forward by a
//! paused clock whenever the runtime idles while SQLite works on its own
//! thread, and time out a wait that was about to succeed.

use std::future::Future;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use berth_store::Store;
use tokio::sync::oneshot;

/// How long a wait may take before the test fails; reached only on failure.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A wait that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut(pub Duration);

/// Resolves once `d` of real time has passed, whatever tokio's clock does.
/// Its thread ends as soon as the deadline is dropped, so a short wait
/// leaves no thread behind.
#[derive(Debug)]
pub struct Deadline {
    fired: oneshot::Receiver<()>,
    _cancel: std::sync::mpsc::Sender<()>,
}

impl Deadline {
    pub fn after(d: Duration) -> Deadline {
        let (fire, fired) = oneshot::channel();
        let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            // A message or a dropped sender (the waiter is done) ends the
            // thread without firing.
            if let Err(RecvTimeoutError::Timeout) = cancelled.recv_timeout(d) {
                let _ = fire.send(());
            }
        });
        Deadline {
            fired,
            _cancel: cancel,
        }
    }

    /// Resolves at the deadline.
    pub async fn passed(&mut self) {
        let _ = (&mut self.fired).await;
    }
}

/// Re-runs `check` now and after every commit of `store` until it returns
/// `Some`, within [`DEADLINE`]; panics naming `what` if it never does.
pub async fn wait_for<T, F, Fut>(store: &Store, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match wait_for_within(store, DEADLINE, check).await {
        Ok(v) => v,
        Err(TimedOut(d)) => panic!("timed out after {d:?} waiting for {what}"),
    }
}

/// [`wait_for`] with a deadline of `within`, returning [`TimedOut`] rather
/// than panicking (so the caller can say what it saw last).
pub async fn wait_for_within<T, F, Fut>(
    store: &Store,
    within: Duration,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut commits = store.commits();
    let mut deadline = Deadline::after(within);
    loop {
        // Marked seen before the check: a commit during the check makes
        // the next `changed` return at once, so none is missed.
        commits.borrow_and_update();
        if let Some(v) = check().await {
            return Ok(v);
        }
        tokio::select! {
            changed = commits.changed() => {
                // The sender lives in the store, which `store` keeps alive.
                changed.expect("the store's commit signal closed");
            }
            _ = deadline.passed() => return Err(TimedOut(within)),
        }
    }
}

/// The next message of `rx`, within [`DEADLINE`] of real time; panics
/// naming `what` if none comes or the channel closes.
pub async fn recv<T>(rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>, what: &str) -> T {
    let mut deadline = Deadline::after(DEADLINE);
    tokio::select! {
        v = rx.recv() => v.unwrap_or_else(|| panic!("channel closed while waiting for {what}")),
        _ = deadline.passed() => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}
