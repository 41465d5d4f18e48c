//! One-task-at-a-time scheduling for the deterministic simulator.
//!
//! The simulator (`berth-bench chaos`) runs the real dispatcher, handlers,
//! reconciler and engine-event listener on one thread with tokio's clock
//! paused. That alone is not deterministic: SQLite answers from threads of
//! its own, so the executor polls the tasks a database answer has not held
//! up in an order that depends on when the answer came, and from there their
//! writes, ids and engine calls interleave differently on every run.
//!
//! Here the tasks take turns instead. A task holds the *baton* while it runs
//! and gives it up only where it waits on another task or on time
//! ([`idle`]). Who gets the baton next is not left to the executor:
//!
//! - every wake-up of a task that gave up the baton is seen (its waker is
//!   wrapped) and numbered when it happens. Wake-ups come only from the task
//!   holding the baton or from timers the simulator fired while no one held
//!   it, so their numbers follow from the seed, whatever SQLite's timing;
//! - the baton is handed over only once every woken task has been polled
//!   and has either asked for it again or gone back to waiting, so the
//!   queue is complete when the choice is made;
//! - the next holder is the queued task with the earliest wake-up: first
//!   come, first served, in an order that does not depend on the executor;
//! - a woken task does not even look at what it waits on while another
//!   holds the baton (its poll is put off until the holder gives it up):
//!   which of its waits is ready, which branch of a `select!` wins, would
//!   otherwise depend on how far the holder had got when the executor
//!   polled it — on SQLite's timing again.
//!
//! Nothing happens unless the simulator [`install`]s a [`Sched`] on its
//! thread: on every other thread each function here is the future it wraps,
//! at the cost of a thread-local read.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};

/// The baton and the queue for it.
#[derive(Debug, Default)]
pub struct Sched {
    state: Mutex<State>,
    turns: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    holder: Option<u64>,
    /// Tasks woken (or spawned) and not yet polled since: until it is 0 the
    /// queue may still be missing someone, and the baton is not handed on.
    pending: usize,
    /// The number the next wake-up gets.
    seq: u64,
    next_id: u64,
    /// The tasks waiting for the baton, by the number of the wake-up that
    /// made them ask.
    queue: BTreeMap<u64, u64>,
    tasks: HashMap<u64, Slot>,
    /// [`Sched::settle`]s waiting for nothing to be left to run.
    settlers: Vec<Waker>,
    /// Tasks woken while someone held the baton, to be polled once no one
    /// does.
    deferred: Vec<Waker>,
}

#[derive(Debug)]
struct Slot {
    mode: Mode,
    /// A wake-up that found the task without the baton and that no poll
    /// has answered yet.
    woken: Option<u64>,
    /// The wake-up the poll under way answers: the task's place in the
    /// queue if it asks for the baton in this poll.
    answering: Option<u64>,
    /// Whether the poll under way answers a wake-up (it is counted in
    /// `pending` until the poll ends).
    consumed: bool,
    /// Where to tell a queued task that the baton is its.
    waker: Option<Waker>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Waiting on something else, or running without the baton between a
    /// dropped [`idle`] and its [`hold`].
    Idle,
    Queued,
    Holder,
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Sched>>> = const { RefCell::new(None) };
    /// The id of the task being polled on this thread.
    static POLLING: Cell<Option<u64>> = const { Cell::new(None) };
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held left nothing half-done that a
        // later reader could trip on: every change is a few assignments.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the baton to the first in the queue if no one holds it and no
    /// woken task is still to be heard from; if no one is queued either,
    /// wakes the settlers. Returns whom to wake, to be woken unlocked.
    fn hand_on(&self, st: &mut State) -> Vec<Waker> {
        if st.holder.is_some() {
            return Vec::new();
        }
        if st.pending > 0 {
            // The woken tasks that were kept waiting for the holder to be
            // done may now look at what they wait on.
            return std::mem::take(&mut st.deferred);
        }
        let Some((_, id)) = st.queue.pop_first() else {
            return std::mem::take(&mut st.settlers);
        };
        st.holder = Some(id);
        self.turns.fetch_add(1, Ordering::SeqCst);
        let slot = st.tasks.get_mut(&id);
        match slot {
            Some(slot) => {
                slot.mode = Mode::Holder;
                slot.waker.take().into_iter().collect()
            }
            None => Vec::new(),
        }
    }

    /// Returns once no task holds the baton, none is waiting for it, and
    /// none was woken: everything is blocked on time or on events that only
    /// the simulator can cause. Call without holding the baton (inside
    /// [`idle`]).
    pub async fn settle(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.lock();
            // The caller's own wake-up, which this very poll answers, is
            // not someone still to run.
            let own = POLLING
                .get()
                .and_then(|id| st.tasks.get(&id))
                .is_some_and(|s| s.consumed) as usize;
            if st.holder.is_none() && st.queue.is_empty() && st.pending <= own {
                Poll::Ready(())
            } else {
                st.settlers.push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn register(self: &Arc<Self>) -> u64 {
        let mut st = self.lock();
        let id = st.next_id;
        st.next_id += 1;
        // Being spawned counts as a wake-up: numbered here, in the
        // spawner's turn.
        let seq = st.seq;
        st.seq += 1;
        st.pending += 1;
        st.tasks.insert(
            id,
            Slot {
                mode: Mode::Idle,
                woken: Some(seq),
                answering: None,
                consumed: false,
                waker: None,
            },
        );
        id
    }

    /// Forgets a task that ended or was dropped, giving up what it held.
    fn forget(&self, id: u64) {
        let wake = {
            let mut st = self.lock();
            if st
                .tasks
                .remove(&id)
                .is_some_and(|slot| slot.woken.is_some())
            {
                st.pending -= 1;
            }
            st.queue.retain(|_, t| *t != id);
            if st.holder == Some(id) {
                st.holder = None;
            }
            self.hand_on(&mut st)
        };
        wake.into_iter().for_each(Waker::wake);
    }

    fn release(&self, id: u64) {
        let wake = {
            let mut st = self.lock();
            if st.holder != Some(id) {
                return;
            }
            st.holder = None;
            if let Some(slot) = st.tasks.get_mut(&id) {
                slot.mode = Mode::Idle;
            }
            self.hand_on(&mut st)
        };
        wake.into_iter().for_each(Waker::wake);
    }

    fn holds(&self, id: u64) -> bool {
        self.lock().holder == Some(id)
    }

    /// Waits for the baton, in the place of the wake-up that brought the
    /// task here (or, if none did, of now).
    async fn take(&self, id: u64) {
        let mut queued = false;
        std::future::poll_fn(|cx| {
            let mut st = self.lock();
            let Some(slot) = st.tasks.get_mut(&id) else {
                return Poll::Ready(());
            };
            if slot.mode == Mode::Holder {
                return Poll::Ready(());
            }
            slot.waker = Some(cx.waker().clone());
            if queued {
                return Poll::Pending;
            }
            queued = true;
            slot.mode = Mode::Queued;
            let key = match slot.answering.take() {
                Some(k) => k,
                None => {
                    let k = st.seq;
                    st.seq += 1;
                    k
                }
            };
            st.queue.insert(key, id);
            let wake = self.hand_on(&mut st);
            let mine = st.holder == Some(id);
            drop(st);
            wake.into_iter().for_each(Waker::wake);
            if mine { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }
}

/// A task's waker, wrapped so that the scheduler sees the wake-up.
struct Track {
    sched: Arc<Sched>,
    id: u64,
    inner: Waker,
}

impl Wake for Track {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        {
            let mut st = self.sched.lock();
            let seq = st.seq;
            if let Some(slot) = st.tasks.get_mut(&self.id) {
                // A holder is woken by SQLite's threads at any time, and a
                // queued task only by the hand-over: neither is counted.
                if slot.mode == Mode::Idle && slot.woken.is_none() {
                    slot.woken = Some(seq);
                    st.seq += 1;
                    st.pending += 1;
                }
            }
        }
        self.inner.wake_by_ref();
    }
}

/// A future run as a task of the scheduler.
struct Task<F> {
    body: Pin<Box<F>>,
    /// The scheduler and the task's id; `None` outside the simulator, or
    /// for a task awaited inside another one (it is part of that one).
    reg: Option<(Arc<Sched>, u64)>,
    started: bool,
    /// The last waker made, and the one it wraps, to reuse while the
    /// executor's waker stays the same.
    waker: Option<(Waker, Waker)>,
}

impl<F: Future> Future for Task<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.started {
            this.started = true;
            if let Some((s, id)) = this.reg.take_if(|_| POLLING.get().is_some()) {
                s.forget(id);
            }
        }
        let Some((sched, id)) = this.reg.clone() else {
            return this.body.as_mut().poll(cx);
        };
        let consumed = {
            let mut st = sched.lock();
            // A task without the baton does not look at what it waits on
            // while another holds it: which of its waits is ready (which
            // branch of a `select!` wins) would depend on how far the
            // holder got, which depends on SQLite's timing. It looks once
            // the holder gives the baton up; its wake-up keeps its number.
            let holder = st.holder;
            if holder.is_some_and(|h| h != id)
                && st.tasks.get(&id).is_some_and(|s| s.mode == Mode::Idle)
            {
                st.deferred.push(cx.waker().clone());
                return Poll::Pending;
            }
            let answered = st.tasks.get_mut(&id).and_then(|slot| {
                let w = slot.woken.take();
                slot.answering = w;
                slot.consumed = w.is_some();
                w
            });
            answered.is_some()
        };
        let waker = match &this.waker {
            Some((inner, tracked)) if inner.will_wake(cx.waker()) => tracked.clone(),
            _ => {
                let tracked = Waker::from(Arc::new(Track {
                    sched: sched.clone(),
                    id,
                    inner: cx.waker().clone(),
                }));
                this.waker = Some((cx.waker().clone(), tracked.clone()));
                tracked
            }
        };
        let outer = POLLING.replace(Some(id));
        let out = this.body.as_mut().poll(&mut Context::from_waker(&waker));
        POLLING.set(outer);
        if out.is_ready() {
            this.reg = None;
            if consumed {
                sched.lock().pending -= 1;
            }
            // Gives the baton up and answers any wake-up since.
            sched.forget(id);
            return out;
        }
        let wake = {
            let mut st = sched.lock();
            if let Some(slot) = st.tasks.get_mut(&id) {
                slot.answering = None;
                slot.consumed = false;
            }
            if consumed {
                st.pending -= 1;
                sched.hand_on(&mut st)
            } else {
                Vec::new()
            }
        };
        wake.into_iter().for_each(Waker::wake);
        out
    }
}

impl<F> Drop for Task<F> {
    fn drop(&mut self) {
        if let Some((s, id)) = self.reg.take() {
            s.forget(id);
        }
    }
}

/// Runs a task's body holding the baton (taken first, given back when the
/// body ends or is dropped). Wrap every task the simulator must order; the
/// task is queued from the moment this is called, so call it where the task
/// is spawned.
pub fn task<F: Future>(body: F) -> impl Future<Output = F::Output> {
    let reg = current().map(|s| {
        let id = s.register();
        (s, id)
    });
    let inner = reg.clone();
    // Out of tokio's co-operative budget: a budget that runs out forces a
    // yield at a point that depends on how many of the task's awaits were
    // ready at once — on SQLite's timing. The baton already keeps any one
    // task from hogging the rest.
    let body = tokio::task::unconstrained(async move {
        if let Some((s, id)) = inner {
            s.take(id).await;
        }
        body.await
    });
    Task {
        body: Box::pin(body),
        reg,
        started: false,
        waker: None,
    }
}

/// The scheduler and the id of the task being polled, if it is one of the
/// simulator's.
fn me() -> Option<(Arc<Sched>, u64)> {
    let s = current()?;
    let id = POLLING.get()?;
    let known = s.lock().tasks.contains_key(&id);
    known.then_some((s, id))
}

/// Runs `wait` without the baton: for a wait on another task, on time, or
/// on the engine. The baton is taken back (in turn) when `wait` completes.
/// If `wait` is dropped unfinished, the task goes on without the baton until
/// it calls [`hold`].
pub async fn idle<F: Future>(wait: F) -> F::Output {
    let Some((s, id)) = me() else {
        return wait.await;
    };
    if !s.holds(id) {
        return wait.await;
    }
    s.release(id);
    let out = wait.await;
    s.take(id).await;
    out
}

/// Takes the baton back if this task gave it up in an [`idle`] that was
/// dropped (a timeout around an engine call, a `select!`).
pub async fn hold() {
    let Some((s, id)) = me() else {
        return;
    };
    if !s.holds(id) {
        s.take(id).await;
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
        install(Some(Sched::new()));
        rt.block_on(async {
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
        });
        install(None);
        let log = log.lock().expect("log").clone();
        // Each task's steps come whole: a0 a0. a1 a1. … then b's.
        for pair in log.chunks(2) {
            assert_eq!(format!("{}.", pair[0]), pair[1], "interleaved: {log:?}");
        }
    }

    /// Tasks woken in one turn run in the order they were woken, though
    /// the executor polls them in an order a thread's timing decides.
    #[test]
    fn woken_tasks_take_turns_in_the_order_they_were_woken() {
        let run = |jitter: [u64; 4]| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            let log = Arc::new(std::sync::Mutex::new(Vec::new()));
            install(Some(Sched::new()));
            rt.block_on(task(async {
                let mut gates: Vec<Option<tokio::sync::oneshot::Sender<()>>> = Vec::new();
                let mut hs = Vec::new();
                for (i, j) in jitter.into_iter().enumerate() {
                    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                    gates.push(Some(tx));
                    let log = log.clone();
                    hs.push(tokio::spawn(task(async move {
                        let _ = idle(rx).await;
                        // Held up by another thread for a while that
                        // differs from run to run: the next in line must
                        // wait for it all the same.
                        let (tx, done) = tokio::sync::oneshot::channel();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(j));
                            let _ = tx.send(());
                        });
                        let _ = done.await;
                        log.lock().expect("log").push(i);
                    })));
                }
                // Let every task reach its gate, then open the gates in an
                // order of our choosing, all in this one turn.
                idle(tokio::task::yield_now()).await;
                for i in [2, 0, 3, 1] {
                    if let Some(g) = gates[i].take() {
                        let _ = g.send(());
                    }
                }
                drop(gates);
                for h in hs {
                    let _ = idle(h).await;
                }
            }));
            install(None);
            log.lock().expect("log").clone()
        };
        assert_eq!(run([3, 0, 2, 1]), vec![2, 0, 3, 1]);
        assert_eq!(run([0, 3, 1, 2]), vec![2, 0, 3, 1]);
    }

    /// A task woken in the middle of another's turn sees the whole turn:
    /// the holder wakes it, waits on another thread, then sends more; the
    /// woken task's `select!` must always see both messages, however long
    /// the other thread takes.
    #[test]
    fn a_woken_task_looks_at_its_waits_only_after_the_holders_turn() {
        for pause in [0, 1, 3] {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime");
            install(Some(Sched::new()));
            let seen = rt.block_on(task(async move {
                let (first_tx, mut first) = tokio::sync::mpsc::unbounded_channel::<()>();
                let (second_tx, mut second) = tokio::sync::mpsc::unbounded_channel::<()>();
                let waiter = tokio::spawn(task(async move {
                    idle(async {
                        tokio::select! {
                            biased;
                            _ = second.recv() => "second",
                            _ = first.recv() => "first",
                        }
                    })
                    .await
                }));
                // Let the waiter reach its select.
                idle(tokio::task::yield_now()).await;
                let _ = first_tx.send(());
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(pause));
                    let _ = tx.send(());
                });
                let _ = rx.await;
                let _ = second_tx.send(());
                idle(waiter).await.expect("waiter")
            }));
            install(None);
            assert_eq!(seen, "second", "pause {pause} ms");
        }
    }
}
