//! Shared set-up for the worker framework's tests: a real SQLite file per
//! test, policies from TOML text, and the test kit's waits (on the store's
//! commits, with real-time deadlines: safe under tokio's paused clock,
//! which would otherwise jump a tokio timeout forward while SQLite works on
//! its own thread).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_core::{Clock, EventPayload, IdGen, NewEvent, SeededRng, SystemClock};
pub use berth_store::RowRead;
pub use berth_store::ops::Arg;
use berth_store::{Cause, Store, StoreOptions};
use berth_worker::clock::TokioClock;
use berth_worker::{Bus, BusOptions, Policies, Registry, Workers, WorkersConfig};
use serde::{Deserialize, Serialize};

pub const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ping {
    pub n: u64,
}
impl EventPayload for Ping {
    const TYPE: &'static str = "test.ping";
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pong {
    pub n: u64,
}
impl EventPayload for Pong {
    const TYPE: &'static str = "test.pong";
}

pub struct TestDb {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestDb {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.db");
        TestDb { dir, path }
    }
}

/// Opens a store on `path`. With `paused`, the store runs on tokio's clock
/// and the clock is paused *after* the pool has its connection: sqlx wraps a
/// connection's opening in a timeout, and a paused clock would jump straight
/// to it while SQLite works on its own thread.
pub async fn open_store(path: &Path, paused: bool) -> Store {
    let clock: Arc<dyn Clock> = if paused {
        Arc::new(TokioClock::new())
    } else {
        Arc::new(SystemClock)
    };
    let ids = Arc::new(IdGen::new(clock.clone(), Arc::new(SeededRng::new(7))));
    let store = Store::open(path, StoreOptions::default(), clock, ids)
        .await
        .unwrap();
    if paused {
        tokio::time::pause();
    }
    store
}

pub fn policies(registry: &Registry, toml_text: &str) -> Policies {
    #[derive(Deserialize)]
    struct Root {
        #[serde(default)]
        workers: WorkersConfig,
    }
    let root: Root = toml::from_str(toml_text).unwrap();
    Policies::resolve(&root.workers, registry.names()).unwrap()
}

pub async fn start(store: &Store, registry: &Registry, toml_text: &str) -> Workers {
    start_with(store, registry, toml_text, BusOptions::default()).await
}

pub async fn start_with(
    store: &Store,
    registry: &Registry,
    toml_text: &str,
    mut options: BusOptions,
) -> Workers {
    options.rng = Arc::new(SeededRng::new(42));
    options.checkpoint_interval = None;
    Workers::start(
        store.clone(),
        registry,
        &policies(registry, toml_text),
        options,
    )
    .await
    .unwrap()
}

/// Publishes a `Ping` as the root of a new flow; returns its envelope.
pub async fn ping(bus: &Bus, n: u64) -> berth_core::Envelope {
    let flow = bus.store().ids().flow_id();
    bus.publish(
        NewEvent::of(&Ping { n })
            .unwrap()
            .org("org-a")
            .subject("inst-1"),
        Cause::Root { flow_id: flow },
    )
    .await
    .unwrap()
}

pub use berth_testkit::recv;

/// Waits until `check` holds, re-checking after each commit of `store`;
/// panics naming `what` at the deadline.
pub async fn eventually<F, Fut>(store: &Store, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    berth_testkit::wait_for(store, what, || {
        let holds = check();
        async move { holds.await.then_some(()) }
    })
    .await
}

pub async fn count(store: &Store, sql: &str) -> i64 {
    store.inspect().number(sql, []).await.unwrap()
}

pub async fn count_events(store: &Store, event_type: &str) -> i64 {
    store
        .inspect()
        .number(
            "SELECT COUNT(*) FROM events WHERE type = ?",
            [event_type.into()],
        )
        .await
        .unwrap()
}

/// Runs a statement of the test's own in a transaction of its own (a
/// redelivery, a damaged row).
pub async fn exec(store: &Store, sql: &str, args: impl IntoIterator<Item = Arg>) {
    let mut tx = store.begin().await.unwrap();
    tx.execute_for_test(sql, args).await.unwrap();
    tx.commit().await.unwrap();
}
