//! One-task-at-a-time scheduling for the deterministic simulator.
//!
//! The simulator (`berth-bench chaos`) runs the real dispatcher, handlers,
//! reconciler and engine-event listener on one thread with tokio's clock
//! paused. That alone is not deterministic: SQLite answers from threads of
//! its own, so two tasks that both wait on the database resume in whatever
//! order the answers arrive, and from there their writes, ids and engine
//! calls interleave differently on every run. Here the tasks take turns
//! instead: a task holds the *baton* while it runs and gives it up only
//! where it waits on another task or on time ([`idle`]). The baton is a fair
//! (FIFO) lock, and every wake-up that decides who queues for it next comes
//! from a task holding it or from a timer the simulator fired, so the order
//! of turns — and with it everything the run does — follows from the seed.
//!
//! Nothing happens unless the simulator [`install`]s a [`Sched`] on its
//! thread: on every other thread each function here is the future it wraps,
//! at the cost of a thread-local read.

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Mutex, OwnedMutexGuard};

/// The baton, and a count of hand-overs so the simulator can tell when
/// nothing is left to run.
#[derive(Debug, Default)]
pub struct Sched {
    baton: Arc<Mutex<()>>,
    turns: AtomicU64,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Sched>>> = const { RefCell::new(None) };
}

tokio::task_local! {
    /// The baton, while the task holds it.
    static HELD: RefCell<Option<OwnedMutexGuard<()>>>;
}

/// Makes `sched` the scheduler of tasks on this thread (the simulator's
/// current-thread runtime); `None` removes it.
pub fn install(sched: Option<Arc<Sched>>) {
    CURRENT.with(|c| *c.borrow_mut() = sched);
}

fn current() -> Option<Arc<Sched>> {
    CURRENT.with(|c| c.borrow().clone())
}

impl Sched {
    pub fn new() -> Arc<Sched> {
        Arc::new(Sched::default())
    }

    /// How many times a task has taken the baton.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::SeqCst)
    }

    async fn take(&self) -> OwnedMutexGuard<()> {
        // First let every task already woken run up to the baton. Whether
        // they have yet depends on SQLite's timing: a database answer that
        // arrives before the holder looks for it means the holder never gave
        // the executor a chance to poll them. After the yield, the queue for
        // the baton is in the order the tasks were woken, whatever the timing.
        tokio::task::yield_now().await;
        let g = self.baton.clone().lock_owned().await;
        self.turns.fetch_add(1, Ordering::SeqCst);
        g
    }

    /// Returns once no task holds the baton, none is waiting for it, and
    /// none became ready to: everything is blocked on time or on events
    /// that only the simulator can cause. Call without holding the baton
    /// (inside [`idle`]).
    pub async fn settle(&self) {
        loop {
            let before = self.turns();
            // A yield lets every task already woken run up to the baton.
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            if self.turns() == before && self.baton.try_lock().is_ok() {
                return;
            }
            // Someone is running: wait for the baton to come free (behind
            // whoever is queued) and look again.
            drop(self.baton.clone().lock_owned().await);
        }
    }
}

/// Runs a task's body holding the baton (taken first, given back when the
/// body ends or is dropped). Wrap every task the simulator must order.
pub async fn task<F: Future>(body: F) -> F::Output {
    let Some(s) = current() else {
        return body.await;
    };
    // Out of tokio's co-operative budget: a budget that runs out forces a
    // yield at a point that depends on how many of the task's awaits were
    // ready at once — on SQLite's timing — and would reorder the queue for
    // the baton. The baton already keeps any one task from hogging the rest.
    tokio::task::unconstrained(HELD.scope(RefCell::new(None), async move {
        let g = s.take().await;
        let _ = HELD.try_with(|h| *h.borrow_mut() = Some(g));
        body.await
    }))
    .await
}

/// Runs `wait` without the baton: for a wait on another task, on time, or
/// on the engine. The baton is taken back (in turn) when `wait` completes.
/// If `wait` is dropped unfinished, the task goes on without the baton until
/// it calls [`hold`].
pub async fn idle<F: Future>(wait: F) -> F::Output {
    let Some(s) = current() else {
        return wait.await;
    };
    let held = HELD.try_with(|h| h.borrow_mut().take()).ok().flatten();
    let Some(g) = held else {
        return wait.await;
    };
    drop(g);
    let out = wait.await;
    let g = s.take().await;
    let _ = HELD.try_with(|h| *h.borrow_mut() = Some(g));
    out
}

/// Takes the baton back if this task gave it up in an [`idle`] that was
/// dropped (a timeout around an engine call, a `select!`).
pub async fn hold() {
    let Some(s) = current() else {
        return;
    };
    let missing = HELD.try_with(|h| h.borrow().is_none()).unwrap_or(false);
    if missing {
        let g = s.take().await;
        let _ = HELD.try_with(|h| *h.borrow_mut() = Some(g));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn without_a_scheduler_every_wrapper_is_its_future() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let v = rt.block_on(task(async { idle(async { 41 }).await + 1 }));
        assert_eq!(v, 42);
    }

    /// Two tasks that each wait on another thread between their steps: with
    /// the baton, their steps never interleave, whatever the other thread's
    /// timing.
    #[test]
    fn tasks_holding_the_baton_do_not_interleave() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        rt.block_on(async {
            install(Some(Sched::new()));
            let mut hs = Vec::new();
            for who in ["a", "b"] {
                let log = log.clone();
                hs.push(tokio::spawn(task(async move {
                    for step in 0..3 {
                        log.lock().expect("log").push(format!("{who}{step}"));
                        // An answer from another thread, as SQLite's are.
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(1));
                            let _ = tx.send(());
                        });
                        let _ = rx.await;
                        log.lock().expect("log").push(format!("{who}{step}."));
                    }
                })));
            }
            for h in hs {
                h.await.expect("task");
            }
            install(None);
        });
        let log = log.lock().expect("log").clone();
        // Each task's steps come whole: a0 a0. a1 a1. … then b's.
        for pair in log.chunks(2) {
            assert_eq!(format!("{}.", pair[0]), pair[1], "interleaved: {log:?}");
        }
    }
}
