//! The worker framework against a real SQLite file: retries and back-off,
//! timeouts, dead letters and failure events, duplicates, crash recovery,
//! atomicity of a handler's writes and emissions, malformed payloads,
//! re-drive, graceful shutdown and fan-out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_core::events::WorkerFailed;
use berth_core::{EventPayload, NewEvent, Timestamp};
use berth_store::{Outcome, Redrive};
use berth_worker::{BusOptions, Ctx, HandlerResult, Registry, fatal, retryable};
use common::*;
use tokio::sync::mpsc;

/// A handler that reports each call's attempt number on a channel.
fn reporting(
    tx: mpsc::UnboundedSender<u32>,
    result: impl Fn(&Ctx) -> Option<berth_worker::HandlerError> + Send + Sync + 'static,
) -> impl Fn(Ctx) -> std::pin::Pin<Box<dyn std::future::Future<Output = HandlerResult> + Send>>
+ Send
+ Sync
+ 'static {
    let result = Arc::new(result);
    move |ctx: Ctx| {
        let tx = tx.clone();
        let result = result.clone();
        Box::pin(async move {
            let _ = tx.send(ctx.attempt());
            match result(&ctx) {
                Some(e) => Err(e),
                None => Ok(ctx.done()),
            }
        })
    }
}

/// A worker on `<worker>.failed` that forwards each failure event.
fn failure_watcher(
    reg: &mut Registry,
    worker: &str,
) -> mpsc::UnboundedReceiver<(berth_core::Envelope, WorkerFailed)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let failed = format!("{worker}.failed");
    let name = format!("watch.{worker}");
    reg.register(&name, &[failed.as_str()], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let p: WorkerFailed = ctx.envelope().payload_as()?;
            let _ = tx.send(((*ctx.envelope()).clone(), p));
            Ok(ctx.done())
        }
    })
    .unwrap();
    rx
}

#[tokio::test]
async fn backoff_delays_follow_the_policy_within_jitter_bounds() {
    let db = TestDb::new();
    let store = open_store(&db.path, true).await;
    let clock = store.clock().clone();
    let starts: Arc<Mutex<Vec<Timestamp>>> = Arc::default();
    let mut reg = Registry::new();
    let s = starts.clone();
    reg.register("flaky", &["test.ping"], move |ctx: Ctx| {
        s.lock().unwrap().push(clock.now());
        async move {
            drop(ctx);
            Err(retryable(anyhow::anyhow!("still down")))
        }
    })
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "flaky");
    let workers = start(
        &store,
        &reg,
        r#"
        [workers.flaky]
        max_attempts = 6
        timeout = "5s"
        backoff = { initial = "100ms", multiplier = 2.0, max = "1s", jitter = "equal" }
        "#,
    )
    .await;
    let env = ping(&workers.bus(), 1).await;
    recv(&mut failures, "the failure event").await;
    workers.shutdown().await.unwrap();
    // Back to real time for reading: the pool's timeouts are tokio timers.
    tokio::time::resume();

    let history = store.attempts_of_event(env.id).await.unwrap();
    let flaky: Vec<_> = history.iter().filter(|a| a.worker == "flaky").collect();
    assert_eq!(flaky.len(), 6, "{flaky:#?}");
    let backoff = berth_worker::Backoff {
        initial: Duration::from_millis(100),
        multiplier: 2.0,
        max: Duration::from_secs(1),
        jitter: berth_worker::Jitter::Equal,
    };
    let starts = starts.lock().unwrap().clone();
    for (k, a) in flaky.iter().enumerate() {
        assert_eq!(a.attempt, k as u32 + 1);
        assert_eq!(a.outcome, Outcome::Retry);
        if k == 5 {
            assert_eq!(a.next_delay, None, "no delay after the last attempt");
            continue;
        }
        let chosen = a.next_delay.expect("a delay after a retryable failure");
        let n = k as u32 + 1;
        assert!(
            chosen >= backoff.floor(n) && chosen <= backoff.ceiling(n),
            "attempt {n}: delay {chosen:?} outside [{:?}, {:?}]",
            backoff.floor(n),
            backoff.ceiling(n)
        );
        let gap = starts[k + 1].since(starts[k]);
        assert!(
            gap >= chosen && gap <= chosen + Duration::from_millis(20),
            "attempt {n}: waited {gap:?}, policy chose {chosen:?}"
        );
    }
    // The ceilings double from 100ms and cap at 1s: 100, 200, 400, 800, 1000.
    assert_eq!(backoff.ceiling(5), Duration::from_secs(1));
}

#[tokio::test]
async fn max_attempts_is_honoured_and_on_exhausted_is_emitted_once() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut reg = Registry::new();
    let c = calls.clone();
    reg.register("flaky", &["test.ping"], move |ctx: Ctx| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            drop(ctx);
            Err(retryable(anyhow::anyhow!("engine unreachable")))
        }
    })
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "flaky");
    let workers = start(
        &store,
        &reg,
        r#"
        [workers.flaky]
        max_attempts = 3
        backoff = { initial = "1ms", max = "2ms" }
        "#,
    )
    .await;
    let env = ping(&workers.bus(), 1).await;
    let (failure_env, failure) = recv(&mut failures, "the failure event").await;
    // Stop cleanly so nothing still in flight could add to the counts.
    workers.shutdown().await.unwrap();

    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(failure.worker, "flaky");
    assert_eq!(failure.event_id, env.id);
    assert_eq!(failure.attempts, 3);
    assert_eq!(failure.reason, "exhausted");
    assert!(failure.error.message.contains("engine unreachable"));
    assert_eq!(failure_env.event_type, "flaky.failed");
    assert_eq!(failure_env.flow_id, env.flow_id, "same flow");
    assert_eq!(
        failure_env.causation_id,
        Some(env.id),
        "caused by the event"
    );
    assert_eq!(failure_env.org_id.as_deref(), Some("org-a"));
    assert_eq!(count_events(&store, "flaky.failed").await, 1);
    assert!(
        failures.try_recv().is_err(),
        "the failure event is handled once"
    );

    let dead = store.dead_letters(None, true, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].reason, berth_store::DeadReason::Exhausted);
    let history: Vec<_> = store
        .attempts_of_event(env.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.worker == "flaky")
        .collect();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a.outcome == Outcome::Retry));
    assert_eq!(count(&store, "SELECT COUNT(*) FROM deliveries").await, 0);
}

#[tokio::test]
async fn a_timeout_counts_as_a_retryable_failure() {
    let db = TestDb::new();
    let store = open_store(&db.path, true).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("slow", &["test.ping"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            if ctx.attempt() == 1 {
                // Hangs: only the policy's timeout can end this attempt.
                std::future::pending::<()>().await;
            }
            let _ = tx.send(ctx.attempt());
            Ok(ctx.done())
        }
    })
    .unwrap();
    let workers = start(
        &store,
        &reg,
        r#"
        [workers.slow]
        timeout = "2s"
        backoff = { initial = "100ms", jitter = "none" }
        "#,
    )
    .await;
    let env = ping(&workers.bus(), 1).await;
    assert_eq!(recv(&mut rx, "the second attempt").await, 2);
    workers.shutdown().await.unwrap();
    tokio::time::resume();

    let history = store.attempts_of_event(env.id).await.unwrap();
    assert_eq!(history.len(), 2, "{history:#?}");
    assert_eq!(history[0].outcome, Outcome::Timeout);
    assert_eq!(history[0].error.as_ref().unwrap().code, "timeout");
    assert!(history[0].duration.unwrap() >= Duration::from_secs(2));
    assert_eq!(history[0].next_delay, Some(Duration::from_millis(100)));
    assert_eq!(history[1].outcome, Outcome::Ok);
    assert!(store.dead_letters(None, true, 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn fatal_and_panic_go_straight_to_dead_letters() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register(
        "doomed",
        &["test.ping"],
        reporting(tx.clone(), |_| {
            Some(fatal(anyhow::anyhow!("base image 'foo' not found")).with_code("image_not_found"))
        }),
    )
    .unwrap();
    reg.register("crashy", &["test.ping"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.attempt());
            if ctx.attempt() > 0 {
                panic!("bug in handler");
            }
            Ok(ctx.done())
        }
    })
    .unwrap();
    let mut doomed_failures = failure_watcher(&mut reg, "doomed");
    let mut crashy_failures = failure_watcher(&mut reg, "crashy");
    let workers = start(&store, &reg, "[workers.default]\nmax_attempts = 5\n").await;
    let env = ping(&workers.bus(), 1).await;
    let (_, d) = recv(&mut doomed_failures, "doomed's failure event").await;
    let (_, c) = recv(&mut crashy_failures, "crashy's failure event").await;
    workers.shutdown().await.unwrap();

    assert_eq!((d.reason.as_str(), d.attempts), ("fatal", 1));
    assert_eq!(d.error.code, "image_not_found");
    assert_eq!((c.reason.as_str(), c.attempts), ("panic", 1));
    assert!(
        c.error.message.contains("bug in handler"),
        "{}",
        c.error.message
    );
    let mut calls = Vec::new();
    while let Ok(a) = rx.try_recv() {
        calls.push(a);
    }
    assert_eq!(calls, vec![1, 1], "one attempt each, no retry");
    let dead = store.dead_letters(None, true, 10).await.unwrap();
    let mut reasons: Vec<_> = dead.iter().map(|d| (d.worker.clone(), d.reason)).collect();
    reasons.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        reasons,
        vec![
            ("crashy".to_owned(), berth_store::DeadReason::Panic),
            ("doomed".to_owned(), berth_store::DeadReason::Fatal)
        ]
    );
    assert!(dead.iter().all(|d| d.event_id == env.id));
}

#[tokio::test]
async fn a_duplicate_delivery_of_a_processed_event_changes_nothing() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut reg = Registry::new();
    let c = calls.clone();
    reg.register("echo", &["test.ping"], move |mut ctx: Ctx| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let n = ctx.payload::<Ping>()?.n;
            ctx.emit_payload(&Pong { n })?;
            Ok(ctx.done())
        }
    })
    .unwrap();
    let workers = start(&store, &reg, "").await;
    let bus = workers.bus();
    let env = ping(&bus, 7).await;
    eventually(&store, "the pong", || async {
        count_events(&store, Pong::TYPE).await == 1
    })
    .await;

    // The same envelope published again: the log already has its id.
    let again = bus.publish_all(vec![env.clone()]).await.unwrap();
    assert!(again.is_empty(), "a known id is not new");

    // A redelivery, as a bus relay might make one: a fresh delivery row for
    // an event the worker has already processed.
    exec(
        &store,
        "INSERT INTO deliveries (event_id, worker, round, attempt, not_before) VALUES (?, 'echo', 0, 0, 0)",
        [env.id.into()],
    )
    .await;
    store.notify_committed(["echo".to_owned()]);
    eventually(&store, "the duplicate to be acknowledged", || async {
        count(&store, "SELECT COUNT(*) FROM deliveries").await == 0
    })
    .await;
    workers.shutdown().await.unwrap();

    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
    assert_eq!(
        count_events(&store, Pong::TYPE).await,
        1,
        "nothing emitted twice"
    );
    assert_eq!(count_events(&store, Ping::TYPE).await, 1);
    let outcomes: Vec<Outcome> = store
        .attempts_of_event(env.id)
        .await
        .unwrap()
        .iter()
        .map(|a| a.outcome)
        .collect();
    assert_eq!(outcomes, vec![Outcome::Ok, Outcome::Duplicate]);
    assert!(store.inbox_contains("echo", env.id).await.unwrap());
}

#[test]
fn a_process_stopped_mid_handler_redelivers_with_its_attempt_count() {
    let db = TestDb::new();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();

    let first = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (event_id, workers) = first.block_on(async {
        let store = open_store(&db.path, false).await;
        let mut reg = Registry::new();
        reg.register("stuck", &["test.ping"], move |ctx: Ctx| {
            let started_tx = started_tx.clone();
            async move {
                let _ = started_tx.send(ctx.attempt());
                std::future::pending::<()>().await;
                Ok(ctx.done())
            }
        })
        .unwrap();
        let workers = start(&store, &reg, "").await;
        let env = ping(&workers.bus(), 1).await;
        assert_eq!(recv(&mut started_rx, "the first attempt").await, 1);
        (env.id, workers)
    });
    // The crash: the runtime goes away with the handler mid-attempt and no
    // shutdown; then the process's last handle (and its lock) goes too.
    drop(first);
    drop(workers);

    let second = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    second.block_on(async {
        let store = open_store(&db.path, false).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut reg = Registry::new();
        reg.register("stuck", &["test.ping"], reporting(tx, |_| None))
            .unwrap();
        let workers = start(&store, &reg, "").await;
        assert_eq!(
            recv(&mut rx, "the redelivery").await,
            2,
            "the interrupted attempt still counts"
        );
        workers.shutdown().await.unwrap();
        let history = store.attempts_of_event(event_id).await.unwrap();
        let summary: Vec<(u32, Outcome, bool)> = history
            .iter()
            .map(|a| (a.attempt, a.outcome, a.duration.is_some()))
            .collect();
        assert_eq!(
            summary,
            vec![(1, Outcome::Abandoned, false), (2, Outcome::Ok, true)]
        );
    });
}

#[tokio::test]
async fn a_handler_that_emits_and_then_fails_leaves_nothing_visible() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    exec(&store, "CREATE TABLE notes (body TEXT NOT NULL)", []).await;
    let mut reg = Registry::new();
    // Writes in its transaction and emits, then fails.
    reg.register("tx.writer", &["test.ping"], |mut ctx: Ctx| async move {
        let tx = ctx.tx().await?;
        tx.execute_for_test("INSERT INTO notes (body) VALUES ('half-done')", [])
            .await?;
        ctx.emit_payload(&Pong { n: 1 })?;
        Err(fatal(anyhow::anyhow!("failed after writing")))
    })
    .unwrap();
    // Emits without a transaction, then fails.
    reg.register("group.emitter", &["test.ping"], |mut ctx: Ctx| async move {
        ctx.emit_payload(&Pong { n: 2 })?;
        Err(fatal(anyhow::anyhow!("failed after emitting")))
    })
    .unwrap();
    // The control: the same writes, succeeding, do become visible.
    reg.register("tx.ok", &["test.ping"], |mut ctx: Ctx| async move {
        let tx = ctx.tx().await?;
        tx.execute_for_test("INSERT INTO notes (body) VALUES ('done')", [])
            .await?;
        ctx.emit(NewEvent::with_type("test.noted", 1, &serde_json::json!({})).unwrap());
        Ok(ctx.done())
    })
    .unwrap();
    let workers = start(&store, &reg, "").await;
    ping(&workers.bus(), 1).await;
    eventually(
        &store,
        "both failures dead-lettered and the control done",
        || async {
            count(&store, "SELECT COUNT(*) FROM dead_letters").await == 2
                && count_events(&store, "test.noted").await == 1
        },
    )
    .await;
    workers.shutdown().await.unwrap();
    assert_eq!(
        count_events(&store, Pong::TYPE).await,
        0,
        "no emitted event leaked"
    );
    let notes: Vec<String> = store
        .inspect()
        .rows("SELECT body FROM notes", [])
        .await
        .unwrap()
        .iter()
        .map(|r| r.text(0).unwrap())
        .collect();
    assert_eq!(
        notes,
        vec!["done".to_owned()],
        "only the successful write stays"
    );
}

#[tokio::test]
async fn writes_and_emitted_events_commit_together_and_carry_the_flow() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("first", &["test.ping"], |mut ctx: Ctx| async move {
        let n = ctx.payload::<Ping>()?.n;
        let tx = ctx.tx().await?;
        tx.execute_for_test("CREATE TABLE IF NOT EXISTS seen (n INTEGER)", [])
            .await?;
        tx.execute_for_test("INSERT INTO seen (n) VALUES (?)", [Arg::Int(n as i64)])
            .await?;
        ctx.emit_payload(&Pong { n: n + 1 })?;
        Ok(ctx.done())
    })
    .unwrap();
    reg.register("second", &["test.pong"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((*ctx.envelope()).clone());
            Ok(ctx.done())
        }
    })
    .unwrap();
    let workers = start(&store, &reg, "").await;
    let root = ping(&workers.bus(), 41).await;
    let pong = recv(&mut rx, "the pong").await;
    workers.shutdown().await.unwrap();
    assert_eq!(pong.payload::<Pong>().unwrap(), Pong { n: 42 });
    assert_eq!(pong.flow_id, root.flow_id);
    assert_eq!(pong.causation_id, Some(root.id));
    assert_eq!(pong.org_id.as_deref(), Some("org-a"), "org inherited");
    assert_eq!(pong.subject.as_deref(), Some("inst-1"), "subject inherited");
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM seen WHERE n = 41").await,
        1
    );
    let flow = store.events_of_flow(root.flow_id).await.unwrap();
    assert_eq!(
        flow.iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        vec!["test.ping", "test.pong"]
    );
}

#[tokio::test]
async fn a_malformed_payload_is_dead_lettered_with_a_readable_reason() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let calls = Arc::new(AtomicU32::new(0));
    let mut reg = Registry::new();
    let c = calls.clone();
    reg.register("reader", &["test.ping"], move |ctx: Ctx| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            let _p: Ping = ctx.payload()?;
            Ok(ctx.done())
        }
    })
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "reader");
    let workers = start(&store, &reg, "").await;
    let bus = workers.bus();
    // Valid JSON of the wrong shape.
    let flow = store.ids().flow_id();
    let wrong = bus
        .publish(
            NewEvent::with_type("test.ping", 1, &serde_json::json!({"m": "x"})).unwrap(),
            berth_store::Cause::Root { flow_id: flow },
        )
        .await
        .unwrap();
    let (_, f) = recv(&mut failures, "the first failure").await;
    assert_eq!(f.event_id, wrong.id);
    assert_eq!(f.reason, "malformed");
    assert_eq!(f.attempts, 1);
    assert!(
        f.error.message.contains("missing field `n`"),
        "{}",
        f.error.message
    );
    assert!(f.error.message.contains("test.ping"), "{}", f.error.message);

    // Not JSON at all, as a damaged file or a foreign producer might leave it.
    let bad_id = store.ids().event_id();
    exec(
        &store,
        "INSERT INTO events (id, type, version, flow_id, created_at, payload) VALUES (?, 'test.ping', 1, ?, 0, '{not json')",
        [bad_id.into(), flow.into()],
    )
    .await;
    exec(
        &store,
        "INSERT INTO deliveries (event_id, worker, round, attempt, not_before) VALUES (?, 'reader', 0, 0, 0)",
        [bad_id.into()],
    )
    .await;
    store.notify_committed(["reader".to_owned()]);
    let (_, f) = recv(&mut failures, "the second failure").await;
    workers.shutdown().await.unwrap();
    assert_eq!(f.event_id, bad_id);
    assert_eq!(f.reason, "malformed");
    assert!(
        f.error.message.contains("unreadable"),
        "{}",
        f.error.message
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "never retried");
    let dead = store.dead_letters(None, true, 10).await.unwrap();
    assert_eq!(dead.len(), 2, "neither was dropped");
}

#[tokio::test]
async fn a_redriven_dead_letter_starts_a_new_round_and_keeps_history() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    let b = broken.clone();
    reg.register(
        "fixable",
        &["test.ping"],
        reporting(tx, move |_| {
            b.load(Ordering::SeqCst)
                .then(|| retryable(anyhow::anyhow!("not yet")))
        }),
    )
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "fixable");
    let workers = start(
        &store,
        &reg,
        "[workers.fixable]\nmax_attempts = 2\nbackoff = { initial = \"1ms\", max = \"1ms\" }\n",
    )
    .await;
    let bus = workers.bus();
    let env = ping(&bus, 1).await;
    recv(&mut failures, "the failure").await;
    let dead = store.dead_letters(None, true, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    broken.store(false, Ordering::SeqCst);
    assert_eq!(recv(&mut rx, "attempt 1").await, 1);
    assert_eq!(recv(&mut rx, "attempt 2").await, 2);

    let Redrive::Redriven(_) = bus.redrive(&dead[0].id).await.unwrap() else {
        panic!("expected a re-drive");
    };
    assert_eq!(
        recv(&mut rx, "the re-driven attempt").await,
        1,
        "count reset"
    );
    eventually(&store, "the re-driven delivery to finish", || async {
        count(&store, "SELECT COUNT(*) FROM deliveries").await == 0
    })
    .await;
    assert!(matches!(
        bus.redrive(&dead[0].id).await.unwrap(),
        Redrive::AlreadyRedriven(_)
    ));
    assert!(matches!(
        bus.redrive("nope").await.unwrap(),
        Redrive::NotFound
    ));
    workers.shutdown().await.unwrap();

    let history: Vec<(u32, u32, Outcome)> = store
        .attempts_of_event(env.id)
        .await
        .unwrap()
        .iter()
        .filter(|a| a.worker == "fixable")
        .map(|a| (a.round, a.attempt, a.outcome))
        .collect();
    assert_eq!(
        history,
        vec![
            (0, 1, Outcome::Retry),
            (0, 2, Outcome::Retry),
            (1, 1, Outcome::Ok)
        ]
    );
    assert!(store.dead_letters(None, true, 10).await.unwrap().is_empty());
    assert_eq!(store.dead_letters(None, false, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn shutdown_finishes_in_flight_work_within_the_grace_period() {
    let db = TestDb::new();
    let store = open_store(&db.path, true).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("patient", &["test.ping"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.attempt());
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(ctx.done())
        }
    })
    .unwrap();
    let options = BusOptions {
        shutdown_grace: Duration::from_secs(10),
        ..BusOptions::default()
    };
    let workers = start_with(&store, &reg, "", options).await;
    let env = ping(&workers.bus(), 1).await;
    recv(&mut rx, "the attempt to start").await;
    workers.shutdown().await.unwrap();
    tokio::time::resume();
    let history = store.attempts_of_event(env.id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome, Outcome::Ok, "finished, not cut off");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM deliveries").await, 0);
}

#[tokio::test]
async fn shutdown_returns_work_that_outlives_the_grace_period() {
    let db = TestDb::new();
    let store = open_store(&db.path, true).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("stubborn", &["test.ping"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.attempt());
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(ctx.done())
        }
    })
    .unwrap();
    let options = BusOptions {
        shutdown_grace: Duration::from_secs(1),
        ..BusOptions::default()
    };
    let workers = start_with(
        &store,
        &reg,
        "[workers.stubborn]\ntimeout = \"2h\"\n",
        options,
    )
    .await;
    let env = ping(&workers.bus(), 1).await;
    recv(&mut rx, "the attempt to start").await;
    workers.shutdown().await.unwrap();
    tokio::time::resume();

    let history = store.attempts_of_event(env.id).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].outcome, Outcome::Abandoned);
    let (waiting, in_flight) = store.queue_depth().await.unwrap();
    assert_eq!(
        (waiting, in_flight),
        (1, 0),
        "returned to the queue, lease released"
    );
    let attempt: i64 = count(&store, "SELECT attempt FROM deliveries").await;
    assert_eq!(attempt, 1, "the attempt count is kept");
}

#[tokio::test]
async fn each_subscriber_gets_its_own_delivery_and_fails_alone() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let (ok_tx, mut ok_rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("healthy", &["test.ping"], reporting(ok_tx, |_| None))
        .unwrap();
    let (bad_tx, _bad_rx) = mpsc::unbounded_channel();
    reg.register(
        "broken",
        &["test.ping"],
        reporting(bad_tx, |_| {
            Some(retryable(anyhow::anyhow!("provider down")))
        }),
    )
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "broken");
    let workers = start(
        &store,
        &reg,
        "[workers.broken]\nmax_attempts = 4\nbackoff = { initial = \"1ms\", max = \"3ms\" }\n",
    )
    .await;
    let bus = workers.bus();
    for n in 0..10 {
        ping(&bus, n).await;
    }
    for _ in 0..10 {
        assert_eq!(recv(&mut ok_rx, "a healthy delivery").await, 1, "first try");
    }
    for _ in 0..10 {
        recv(&mut failures, "a broken delivery's failure").await;
    }
    workers.shutdown().await.unwrap();
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM inbox WHERE worker = 'healthy'"
        )
        .await,
        10
    );
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM dead_letters WHERE worker = 'broken'"
        )
        .await,
        10
    );
}

#[tokio::test]
async fn a_second_dispatcher_on_the_same_database_is_refused() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let reg = Registry::new();
    let workers = start(&store, &reg, "").await;
    let policies = common::policies(&reg, "");
    let err = berth_worker::Workers::start(store.clone(), &reg, &policies, BusOptions::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already dispatching"), "{err}");
    workers.shutdown().await.unwrap();
}

#[tokio::test]
async fn committed_events_reach_in_process_listeners_after_their_commit() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let mut reg = Registry::new();
    reg.register("echo", &["test.ping"], |mut ctx: Ctx| async move {
        let n = ctx.payload::<Ping>()?.n;
        ctx.emit_payload(&Pong { n })?;
        Ok(ctx.done())
    })
    .unwrap();
    let workers = start(&store, &reg, "").await;
    let mut committed = workers.bus().committed();
    let root = ping(&workers.bus(), 7).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let env = tokio::time::timeout_at(deadline, committed.recv())
            .await
            .expect("committed events within the deadline")
            .unwrap();
        // Told only once durable: the event is in the log already.
        let flow = store.events_of_flow(env.flow_id).await.unwrap();
        assert!(
            flow.iter().any(|e| e.id == env.id),
            "{} not in the log",
            env.id
        );
        seen.push((env.event_type.clone(), env.flow_id));
    }
    assert_eq!(
        seen,
        vec![
            ("test.ping".to_owned(), root.flow_id),
            ("test.pong".to_owned(), root.flow_id)
        ]
    );
    workers.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_attempt_whose_writes_the_database_always_refuses_does_not_stop_the_bus() {
    use berth_store::writes::Write;
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    // A table that refuses every row: the claim below fails in SQL, every
    // time, and so would every group commit holding it.
    exec(
        &store,
        "CREATE TRIGGER refuse_claims BEFORE INSERT ON host_claims
         BEGIN SELECT RAISE(ABORT, 'claims refused by the test'); END",
        [],
    )
    .await;
    let mut reg = Registry::new();
    reg.register("poison", &["test.ping"], |mut ctx: Ctx| async move {
        ctx.write(Write::ClaimHost {
            host: "h".into(),
            org: "o".into(),
            exclusive: true,
        });
        Ok(ctx.done())
    })
    .unwrap();
    let (tx, mut healthy) = mpsc::unbounded_channel();
    reg.register("healthy", &["test.pong"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.payload::<Pong>()?.n);
            Ok(ctx.done())
        }
    })
    .unwrap();
    let mut failures = failure_watcher(&mut reg, "poison");
    let workers = start(
        &store,
        &reg,
        "[workers.poison]\nmax_attempts = 2\nbackoff = { initial = \"1ms\", max = \"1ms\" }\n",
    )
    .await;
    let bus = workers.bus();
    let poison = ping(&bus, 1).await;
    // Other work goes on: a publish refused while a turn fails is retried,
    // as any publisher would.
    let flow = store.ids().flow_id();
    eventually(&store, "a publish to go through", || {
        let bus = bus.clone();
        async move {
            bus.publish(
                NewEvent::of(&Pong { n: 7 }).unwrap(),
                berth_store::Cause::Root { flow_id: flow },
            )
            .await
            .is_ok()
        }
    })
    .await;
    assert_eq!(recv(&mut healthy, "the healthy worker's event").await, 7);
    // The culprit fails on its own, with the database's reason.
    let (_, f) = recv(&mut failures, "the poison's dead letter").await;
    assert_eq!(f.event_id, poison.id);
    assert_eq!(f.reason, "exhausted");
    assert_eq!(f.attempts, 2);
    assert_eq!(f.error.code, "commit_failed");
    assert!(
        f.error.chain.iter().any(|c| c.contains("claims refused")),
        "{:?}",
        f.error.chain
    );
    workers.shutdown().await.unwrap();
}

/// Follows from what the `config` fuzz target found (the policies'
/// overflow): `timeout = "18446744073709551615s"` loads, and the lease of
/// the first delivery, the timeout plus the grace, panicked the dispatcher.
#[tokio::test]
async fn fuzz_the_longest_configured_timeout_leases_without_overflowing() {
    let db = TestDb::new();
    let store = open_store(&db.path, false).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reg = Registry::new();
    reg.register("w", &["test.ping"], move |ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.payload::<Ping>()?.n);
            Ok(ctx.done())
        }
    })
    .unwrap();
    let workers = start(
        &store,
        &reg,
        "[workers.w]\ntimeout = \"18446744073709551615s\"\n",
    )
    .await;
    ping(&workers.bus(), 7).await;
    assert_eq!(recv(&mut rx, "the delivery").await, 7);
    workers.shutdown().await.unwrap();
}
