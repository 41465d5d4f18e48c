//! The store handle: opening the SQLite file (WAL, migrations), transactions
//! that publish events atomically with state, and the read side.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use berth_core::{Clock, Envelope, EventId, FlowId, IdGen, NewEvent, Timestamp};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, SqlitePool};
use tokio::sync::Notify;

use crate::conn::{Dialect, Owned, Pooled, Transaction};
use crate::instances::Instance;
use crate::model::*;
use crate::ops;
use crate::writer::RowRead;

/// The settings of every connection to the database, the pool's and the
/// dispatcher's writer's alike: one list, so that a commit on either is as
/// durable as on the other.
pub(crate) fn pragmas(options: &StoreOptions) -> [(&'static str, &'static str); 6] {
    [
        ("journal_mode", "WAL"),
        (
            "synchronous",
            match options.synchronous {
                Synchronous::Full => "FULL",
                Synchronous::Normal => "NORMAL",
            },
        ),
        ("foreign_keys", "ON"),
        ("temp_store", "memory"),
        // Checkpoints copy the WAL into the database and sync it: tens of
        // milliseconds that would land on whichever commit crosses the
        // threshold. `Store::checkpoint` runs them in the background
        // instead; this high threshold is only a backstop.
        ("wal_autocheckpoint", "16384"),
        ("cache_size", "-65536"),
    ]
}

/// SQLite's `synchronous` setting for the WAL. `full` syncs the WAL on every
/// commit (survives power loss); `normal` syncs only at checkpoints (survives
/// a process crash, may lose the last commits on power loss).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    #[default]
    Full,
    Normal,
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub synchronous: Synchronous,
    /// Connections for handler transactions and reads; the dispatcher holds
    /// two more of its own (its writer, and one for reads).
    pub max_connections: u32,
    /// How long a writer waits for SQLite's single write lock.
    pub busy_timeout: Duration,
    /// Keep the instance-row cache (see [`Store::cached_instance`]). Sound
    /// only while this process is the database's one writer of instance
    /// rows: off when other processes write them too (an API process beside
    /// a worker process).
    pub instance_cache: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Full,
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
            instance_cache: true,
        }
    }
}

/// Where the database is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file (created if missing).
    File(PathBuf),
    /// A PostgreSQL database, by its `postgres://` URL.
    Postgres(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&crate::postgres::redact(url)),
        }
    }
}

/// The pool, and how to open a connection outside it.
enum Db {
    Sqlite {
        pool: SqlitePool,
        connect: SqliteConnectOptions,
        path: PathBuf,
    },
    Postgres {
        pool: PgPool,
        connect: PgConnectOptions,
    },
}

struct Inner {
    db: Db,
    location: Location,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    ids: Arc<IdGen>,
    subscriptions: RwLock<Arc<Subscriptions>>,
    /// Signalled after any commit that added deliveries, so the dispatcher
    /// wakes on commit instead of polling; `woken` says for which workers.
    committed: Notify,
    /// Signalled by every write transaction this process commits; see
    /// [`Store::wrote`].
    wrote: Notify,
    /// How many write transactions this process has committed; see
    /// [`Store::commits`].
    commits: tokio::sync::watch::Sender<u64>,
    woken: Mutex<HashSet<String>>,
    /// One writer at a time, in arrival order. SQLite allows a single writer
    /// and makes the others wait in its busy handler, which sleeps and polls
    /// — unfair and slow with hundreds of waiters; queueing here first means
    /// SQLite never sees contention from this process.
    write_gate: Arc<tokio::sync::Mutex<()>>,
    /// Instance rows as this process's last writer left them; see
    /// [`Store::cached_instance`].
    instances: Mutex<HashMap<String, Instance>>,
    install: String,
}

/// Beyond this many cached rows the cache starts over: it only has to hold
/// the instances whose flows are in flight.
const INSTANCE_CACHE_MAX: usize = 16_384;

/// A cheap-to-clone handle on the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.inner.location)
            .finish_non_exhaustive()
    }
}

/// Where an event to publish comes from: a user action (a new flow, or one
/// given) or the handling of another event (same flow, causation set).
#[derive(Debug, Clone, Copy)]
pub enum Cause<'a> {
    Root { flow_id: FlowId },
    Event(&'a Envelope),
}

impl Store {
    /// Opens (creating if needed) the SQLite file at `path`, in WAL mode, and
    /// runs pending migrations.
    pub async fn open(
        path: &Path,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        ids: Arc<IdGen>,
    ) -> anyhow::Result<Store> {
        Store::open_at(&Location::File(path.to_owned()), options, clock, ids).await
    }

    /// Opens the database at `location` and runs pending migrations (on
    /// PostgreSQL one process at a time, under an advisory lock).
    pub async fn open_at(
        location: &Location,
        options: StoreOptions,
        clock: Arc<dyn Clock>,
        ids: Arc<IdGen>,
    ) -> anyhow::Result<Store> {
        let (db, install) = match location {
            Location::File(path) => open_sqlite(path, &options).await?,
            Location::Postgres(url) => open_postgres(url, &options).await?,
        };
        let instance_cache = options.instance_cache && matches!(db, Db::Sqlite { .. });
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                location: location.clone(),
                options: StoreOptions {
                    // Sound only with one writer of instance rows, which
                    // PostgreSQL is not there to guarantee.
                    instance_cache,
                    ..options
                },
                clock,
                ids,
                subscriptions: RwLock::new(Arc::new(Subscriptions::new())),
                committed: Notify::new(),
                wrote: Notify::new(),
                commits: tokio::sync::watch::Sender::new(0),
                woken: Mutex::new(HashSet::new()),
                write_gate: Arc::new(tokio::sync::Mutex::new(())),
                instances: Mutex::new(HashMap::new()),
                install,
            }),
        })
    }

    /// This installation's id (made with the database): the value of the
    /// `berth.install` label on everything it creates on an engine.
    pub fn install_id(&self) -> &str {
        &self.inner.install
    }

    /// Where the database is.
    pub fn location(&self) -> &Location {
        &self.inner.location
    }

    /// Which SQL the database speaks.
    pub fn dialect(&self) -> Dialect {
        match self.inner.db {
            Db::Sqlite { .. } => Dialect::Sqlite,
            Db::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// An empty script in the database's dialect.
    pub fn script(&self) -> ops::Script {
        ops::Script::for_dialect(self.dialect())
    }

    /// Whether this process's dispatcher is the database's only one, so
    /// that every lease in it is its own to take back when it starts: on
    /// SQLite, whose dispatcher lock sees to it. On PostgreSQL any number
    /// dispatch, and only expired leases are taken back.
    pub fn sole_dispatcher(&self) -> bool {
        self.dialect() == Dialect::Sqlite
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    pub fn ids(&self) -> &Arc<IdGen> {
        &self.inner.ids
    }

    /// Closes the store's connections, waiting for those in use to come
    /// back; later calls fail.
    pub async fn close(&self) {
        match &self.inner.db {
            Db::Sqlite { pool, .. } => pool.close().await,
            Db::Postgres { pool, .. } => pool.close().await,
        }
    }

    /// A connection outside the pool, for the dispatcher's reads.
    pub(crate) async fn dedicated_connection(&self) -> anyhow::Result<Owned> {
        let failed = || format!("failed to open the database {}", self.inner.location);
        Ok(match &self.inner.db {
            Db::Sqlite { connect, .. } => {
                Owned::Sqlite(connect.connect().await.with_context(failed)?)
            }
            Db::Postgres { connect, .. } => {
                Owned::Postgres(connect.connect().await.with_context(failed)?)
            }
        })
    }

    /// A connection of the dispatcher's own for its group commits: on
    /// SQLite on a thread of its own (see [`crate::writer`]).
    pub async fn open_writer(&self) -> anyhow::Result<crate::Writer> {
        match &self.inner.db {
            Db::Sqlite { path, .. } => {
                // Opening a file and setting pragmas blocks: not on the runtime.
                let (path, options) = (path.clone(), self.inner.options.clone());
                tokio::task::spawn_blocking(move || crate::Writer::open(&path, &options))
                    .await
                    .context("the task opening the database writer failed")?
            }
            Db::Postgres { connect, .. } => {
                let conn = connect.connect().await.with_context(|| {
                    format!("failed to open the database {}", self.inner.location)
                })?;
                Ok(crate::Writer::postgres(conn, connect.clone()))
            }
        }
    }

    /// Takes the exclusive dispatcher lock of this database (a lock file next
    /// to it). Only the holder may treat every lease as its own to recover.
    /// On PostgreSQL, none: any number of processes dispatch (see
    /// [`Store::sole_dispatcher`]).
    pub fn lock_dispatcher(&self) -> anyhow::Result<Option<File>> {
        let Db::Sqlite { path, .. } = &self.inner.db else {
            return Ok(None);
        };
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".dispatch.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("failed to open {}", Path::new(&lock_path).display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "another berth process is already dispatching from {} (lock file {} is held)",
                path.display(),
                Path::new(&lock_path).display()
            ),
            Err(std::fs::TryLockError::Error(e)) => Err(e)
                .with_context(|| format!("failed to lock {}", Path::new(&lock_path).display())),
        }
    }

    pub fn set_subscriptions(&self, subs: Subscriptions) {
        let mut guard = self
            .inner
            .subscriptions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(subs);
    }

    pub fn subscriptions(&self) -> Arc<Subscriptions> {
        self.inner
            .subscriptions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Wakes the dispatcher: deliveries for `workers` were committed.
    pub fn notify_committed(&self, workers: impl IntoIterator<Item = String>) {
        {
            let mut w = self.inner.woken.lock().unwrap_or_else(|p| p.into_inner());
            w.extend(workers);
        }
        self.inner.committed.notify_one();
    }

    /// The workers named by commits since the last call.
    pub fn take_woken(&self) -> HashSet<String> {
        std::mem::take(&mut *self.inner.woken.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves when a commit added deliveries since the last call.
    pub async fn committed(&self) {
        self.inner.committed.notified().await
    }

    /// Builds the envelope for a new event.
    pub fn stamp(&self, new: NewEvent, cause: Cause<'_>) -> Envelope {
        let (flow_id, causation_id, org, subject) = match cause {
            Cause::Root { flow_id } => (flow_id, None, None, None),
            Cause::Event(e) => (e.flow_id, Some(e.id), e.org_id.clone(), e.subject.clone()),
        };
        Envelope {
            id: self.inner.ids.event_id(),
            event_type: new.event_type,
            version: new.version,
            org_id: new.org_id.or(org),
            subject: new.subject.or(subject),
            flow_id,
            causation_id,
            attempt: 0,
            created_at: self.now(),
            not_before: new.not_before,
            payload: new.payload,
        }
    }

    /// Waits for this process's turn to write; hold the guard for the whole
    /// write transaction (the dispatcher does, around each group commit).
    pub async fn write_gate(&self) -> tokio::sync::OwnedMutexGuard<()> {
        // The holder may be waiting on the engine: in the simulator, let it
        // take its turn.
        berth_core::sched::idle(self.inner.write_gate.clone().lock_owned()).await
    }

    /// The instance row `id` as last written by this process, if it is
    /// known to be current: a step reads it without a query. Only writers
    /// fill the cache, holding the write gate — the dispatcher with the rows
    /// its group commit wrote (patched rows as the patches returned them),
    /// [`Tx::commit`] by emptying it — so whenever no one holds the gate it
    /// holds no row older than the database (one process writes the
    /// database; the dispatcher's lock sees to that). A reader racing a
    /// write may get the row before it, as it would from the database; its
    /// guarded write then fails and is retried.
    pub fn cached_instance(&self, id: &str) -> Option<Instance> {
        if !self.inner.options.instance_cache {
            return None;
        }
        lock(&self.inner.instances).get(id).cloned()
    }

    /// Records rows just committed, and forgets those changed in ways the
    /// caller did not compute. Call with the write gate held, before
    /// releasing it.
    pub fn cache_instances(&self, written: Vec<Instance>, changed: Vec<String>) {
        if !self.inner.options.instance_cache {
            return;
        }
        let mut cache = lock(&self.inner.instances);
        for id in changed {
            cache.remove(&id);
        }
        if cache.len() + written.len() > INSTANCE_CACHE_MAX {
            cache.clear();
        }
        for i in written {
            cache.insert(i.id.clone(), i);
        }
    }

    /// Begins a write transaction. `BEGIN IMMEDIATE` takes SQLite's write lock
    /// up front, so two writers queue on `busy_timeout` instead of failing
    /// with SQLITE_BUSY when a reader tries to upgrade.
    pub async fn begin(&self) -> anyhow::Result<Tx> {
        let gate = self.write_gate().await;
        // SQLite only: PostgreSQL begins with a plain `BEGIN` (its writers
        // lock rows, not the database).
        let tx = match &self.inner.db {
            Db::Sqlite { pool, .. } => pool
                .begin_with("BEGIN IMMEDIATE")
                .await
                .map(Transaction::Sqlite),
            Db::Postgres { pool, .. } => pool.begin().await.map(Transaction::Postgres),
        }
        .context("failed to begin a transaction")?;
        Ok(Tx {
            tx,
            store: self.clone(),
            woken: Vec::new(),
            _gate: gate,
        })
    }

    /// Copies committed WAL frames into the database file without blocking
    /// writers (a PASSIVE checkpoint), so that commits never pay for it.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        // SQLite only: PostgreSQL checkpoints on its own.
        if self.dialect() != Dialect::Sqlite {
            return Ok(());
        }
        let mut c = self.read_conn().await?;
        ops::fetch(&mut c.conn(), "PRAGMA wal_checkpoint(PASSIVE)", [])
            .await
            .context("WAL checkpoint failed")?;
        Ok(())
    }

    /// Signals a commit made outside [`Tx`] (the dispatcher's writer) to
    /// [`Store::wrote`].
    pub fn note_commit(&self) {
        self.inner.wrote.notify_one();
        self.inner.commits.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The count of write transactions this process has committed (the
    /// dispatcher's turns and every [`Tx`]), changing after each commit.
    /// Unlike [`Store::wrote`] and [`Store::committed`], which wake one
    /// waiter (the checkpointer, the dispatcher), any number may watch it:
    /// a test waits for a state by re-checking it after each commit rather
    /// than polling on a timer.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.commits.subscribe()
    }

    /// Waits for a commit by this process; one made since the last wait
    /// (nobody waiting) answers at once.
    pub async fn wrote(&self) {
        self.inner.wrote.notified().await
    }

    /// Publishes events in a transaction of their own.
    pub async fn publish(&self, envs: Vec<Envelope>) -> anyhow::Result<HashSet<EventId>> {
        let mut tx = self.begin().await?;
        let new = tx.publish(&envs).await?;
        tx.commit().await?;
        Ok(new)
    }

    pub(crate) async fn read_conn(&self) -> anyhow::Result<Pooled> {
        match &self.inner.db {
            Db::Sqlite { pool, .. } => pool.acquire().await.map(Pooled::Sqlite),
            Db::Postgres { pool, .. } => pool.acquire().await.map(Pooled::Postgres),
        }
        .context("failed to get a database connection")
    }

    pub async fn event(&self, id: EventId) -> anyhow::Result<Option<Envelope>> {
        let mut c = self.read_conn().await?;
        Ok(ops::load_events(&mut c.conn(), &[id]).await?.pop())
    }

    pub async fn events_of_flow(&self, flow: FlowId) -> anyhow::Result<Vec<Envelope>> {
        let mut c = self.read_conn().await?;
        ops::events_of_flow(&mut c.conn(), flow).await
    }

    pub async fn attempts_of_event(&self, id: EventId) -> anyhow::Result<Vec<AttemptRecord>> {
        let mut c = self.read_conn().await?;
        ops::attempts_of_event(&mut c.conn(), id).await
    }

    pub async fn attempts_of_flow(&self, flow: FlowId) -> anyhow::Result<Vec<AttemptRecord>> {
        let mut c = self.read_conn().await?;
        ops::attempts_of_flow(&mut c.conn(), flow).await
    }

    pub async fn dead_letters(
        &self,
        org: Option<&str>,
        open_only: bool,
        limit: u32,
    ) -> anyhow::Result<Vec<DeadLetter>> {
        let mut c = self.read_conn().await?;
        ops::dead_letters(&mut c.conn(), org, open_only, limit).await
    }

    pub async fn dead_letter(&self, id: &str) -> anyhow::Result<Option<DeadLetter>> {
        let mut c = self.read_conn().await?;
        ops::dead_letter(&mut c.conn(), id).await
    }

    pub async fn inbox_contains(&self, worker: &str, id: EventId) -> anyhow::Result<bool> {
        let mut c = self.read_conn().await?;
        Ok(!ops::inbox_hits(&mut c.conn(), worker, &[id])
            .await?
            .is_empty())
    }

    /// (waiting, in flight) deliveries.
    pub async fn queue_depth(&self) -> anyhow::Result<(i64, i64)> {
        let mut c = self.read_conn().await?;
        ops::queue_depth(&mut c.conn()).await
    }

    /// Re-drives a dead letter: a fresh delivery to the same worker in a new
    /// round, attempt count from zero; the history of earlier rounds stays.
    pub async fn redrive(&self, id: &str) -> anyhow::Result<Redrive> {
        let mut tx = self.begin().await?;
        let Some(dl) = ops::dead_letter(&mut tx.conn(), id).await? else {
            return Ok(Redrive::NotFound);
        };
        if !ops::mark_redriven(&mut tx.conn(), id, self.now()).await? {
            return Ok(Redrive::AlreadyRedriven(dl));
        }
        ops::insert_deliveries(
            &mut tx.conn(),
            &[NewDelivery {
                event_id: dl.event_id,
                worker: Arc::from(dl.worker.as_str()),
                round: dl.round + 1,
                attempt: 0,
                not_before: self.now(),
                lease: None,
            }],
        )
        .await?;
        tx.woken.push(dl.worker.clone());
        tx.commit().await?;
        Ok(Redrive::Redriven(dl))
    }
}

impl Store {
    /// Until `stop` resolves, wakes this process's dispatcher for the
    /// deliveries other processes commit (their `NOTIFY`, see
    /// [`ops::Script::notify_deliveries`]). When the connection is lost
    /// (notifications may have been missed meanwhile) it wakes every worker
    /// once it is back, and reconnects with back-off; the dispatcher's poll
    /// still bounds the delay of anything missed. Returns at once on
    /// SQLite, where no other process dispatches.
    pub async fn listen(&self, stop: impl std::future::Future<Output = ()>) {
        let Db::Postgres { pool, .. } = &self.inner.db else {
            return;
        };
        tokio::pin!(stop);
        let mut pause = Duration::from_millis(100);
        loop {
            let mut listener = match sqlx::postgres::PgListener::connect_with(pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "cannot listen for other processes' deliveries; retrying");
                    tokio::select! {
                        _ = &mut stop => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            if let Err(e) = listener.listen("berth_deliveries").await {
                tracing::warn!(error = %e, "cannot listen for other processes' deliveries; retrying");
                continue;
            }
            pause = Duration::from_millis(100);
            // Whatever was committed while not listening.
            self.wake_all();
            loop {
                let next = tokio::select! {
                    _ = &mut stop => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) if !n.payload().is_empty() => {
                        self.notify_committed(n.payload().split(',').map(str::to_owned));
                    }
                    Ok(Some(_)) => self.wake_all(),
                    // The connection was lost; `try_recv` reconnects on the
                    // next call, and what was sent meanwhile is lost.
                    Ok(None) => self.wake_all(),
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the connection listening for deliveries; reconnecting");
                        break;
                    }
                }
            }
        }
    }

    /// Wakes the dispatcher for every subscribed worker.
    fn wake_all(&self) {
        let subs = self.subscriptions();
        self.notify_committed(subs.all_workers().map(|w| w.to_string()));
    }
}

/// What a re-drive did.
#[derive(Debug)]
pub enum Redrive {
    Redriven(DeadLetter),
    AlreadyRedriven(DeadLetter),
    NotFound,
}

/// A write transaction. Events published through it become visible (and are
/// dispatched) only if it commits; dropping it rolls everything back.
pub struct Tx {
    tx: Transaction,
    store: Store,
    /// Workers that got deliveries in this transaction: woken on commit.
    woken: Vec<String>,
    /// This process's write turn, released when the transaction ends.
    _gate: tokio::sync::OwnedMutexGuard<()>,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl Tx {
    /// The underlying connection, for a handler's own queries.
    pub(crate) fn conn(&mut self) -> crate::conn::Conn<'_> {
        self.tx.conn()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends envelopes to the event log and fans each new one out to its
    /// subscribers; ids already in the log are ignored (dedupe).
    pub async fn publish(&mut self, envs: &[Envelope]) -> anyhow::Result<HashSet<EventId>> {
        let subs = self.store.subscriptions();
        let published = publish(&mut self.tx.conn(), &subs, envs, |_| None).await?;
        self.woken.extend(
            published
                .deliveries
                .into_iter()
                .map(|d| d.worker.to_string()),
        );
        Ok(published.inserted)
    }

    pub async fn commit(self) -> anyhow::Result<()> {
        let Tx {
            mut tx,
            store,
            woken,
            _gate,
        } = self;
        let mut notify = store.script();
        notify.notify_deliveries(woken.iter().map(String::as_str));
        if !notify.is_empty() {
            notify
                .run(&mut tx.conn())
                .await
                .context("failed to notify the other processes")?;
        }
        // Whatever the transaction wrote, the cache may now be behind it;
        // emptied before another writer can run.
        let result = tx.commit().await.context("failed to commit");
        lock(&store.inner.instances).clear();
        result?;
        store.note_commit();
        drop(_gate);
        if !woken.is_empty() {
            store.notify_committed(woken);
        }
        Ok(())
    }
}

/// What [`publish`] wrote.
#[derive(Debug, Default)]
pub struct Published {
    pub inserted: HashSet<EventId>,
    /// Every delivery created; those with a lease are born claimed.
    pub deliveries: Vec<NewDelivery>,
}

/// Appends envelopes and creates one delivery per subscribed worker for each
/// new one. `lease_for(worker)` may return a lease so the delivery is born
/// claimed (attempt 1) — the dispatcher uses this to hand fresh events to idle
/// workers without a second write.
pub(crate) async fn publish(
    conn: &mut crate::conn::Conn<'_>,
    subs: &Subscriptions,
    envs: &[Envelope],
    mut lease_for: impl FnMut(&Arc<str>) -> Option<Lease>,
) -> anyhow::Result<Published> {
    let inserted = ops::insert_events(conn, envs).await?;
    let mut rows = Vec::new();
    for e in envs.iter().filter(|e| inserted.contains(&e.id)) {
        let due = e.not_before.unwrap_or(e.created_at);
        for w in subs.workers_for(&e.event_type) {
            let lease = if e.not_before.is_none() {
                lease_for(w)
            } else {
                None
            };
            rows.push(NewDelivery {
                event_id: e.id,
                worker: w.clone(),
                round: 0,
                attempt: u32::from(lease.is_some()),
                not_before: due,
                lease,
            });
        }
    }
    ops::insert_deliveries(conn, &rows).await?;
    Ok(Published {
        inserted,
        deliveries: rows,
    })
}

/// Opens the SQLite file, migrated, and its pool; with the install id.
async fn open_sqlite(path: &Path, options: &StoreOptions) -> anyhow::Result<(Db, String)> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create data directory {}", dir.display()))?;
    }
    let mut connect = SqliteConnectOptions::from_str("sqlite:")?
        .filename(path)
        .create_if_missing(true)
        .busy_timeout(options.busy_timeout)
        // Bulk statements come in power-of-two sizes per kind: several
        // hundred distinct texts, each worth keeping prepared (preparing
        // them again every turn was half of a busy dispatcher's time).
        .statement_cache_capacity(1024)
        // sqlx logs every statement at DEBUG by default; with bulk
        // statements that drowns the delivery spans we care about.
        .disable_statement_logging();
    for (key, value) in pragmas(options) {
        connect = connect.pragma(key, value);
    }
    let mut conn = connect
        .connect()
        .await
        .with_context(|| format!("failed to open the database {}", path.display()))?;
    crate::migrate::run(&mut conn)
        .await
        .with_context(|| format!("failed to migrate the database {}", path.display()))?;
    let install = read_install(&mut crate::conn::Conn::Sqlite(&mut conn))
        .await
        .with_context(|| format!("failed to read the install id of {}", path.display()))?;
    conn.close().await.ok();
    let pool = SqlitePoolOptions::new()
        .max_connections(options.max_connections.max(1))
        .min_connections(1)
        // A local file has nothing to gain from recycling connections,
        // and the pool's reaper timers would disturb paused-clock tests.
        .idle_timeout(None)
        .max_lifetime(None)
        // A connection to a local file does not go stale; skipping the
        // ping keeps acquiring free of IO.
        .test_before_acquire(false)
        .connect_with(connect.clone())
        .await
        .with_context(|| format!("failed to open the database {}", path.display()))?;
    let db = Db::Sqlite {
        pool,
        connect,
        path: path.to_owned(),
    };
    Ok((db, install))
}

/// Connects to the PostgreSQL database at `url`, migrated, and makes its
/// pool; with the install id.
async fn open_postgres(url: &str, options: &StoreOptions) -> anyhow::Result<(Db, String)> {
    let shown = crate::postgres::redact(url);
    let connect = crate::postgres::options(url)?.statement_cache_capacity(1024);
    let mut conn = connect
        .connect()
        .await
        .with_context(|| format!("failed to connect to {shown}"))?;
    crate::migrate::run_postgres(&mut conn)
        .await
        .with_context(|| format!("failed to migrate {shown}"))?;
    let install = read_install(&mut crate::conn::Conn::Postgres(&mut conn))
        .await
        .with_context(|| format!("failed to read the install id of {shown}"))?;
    conn.close().await.ok();
    let pool = PgPoolOptions::new()
        .max_connections(options.max_connections.max(1))
        // A connection that waits longer than this for the pool tells the
        // caller the database is unavailable rather than hanging (the API
        // answers 503 `store_unavailable`).
        .acquire_timeout(options.busy_timeout)
        // Nothing is connected up front: a server that is down at this
        // moment (it answered the migration a moment ago) is met on first
        // use, with an error and a retry, not a failed start.
        .min_connections(0)
        .connect_lazy_with(connect.clone());
    Ok((Db::Postgres { pool, connect }, install))
}

async fn read_install(conn: &mut crate::conn::Conn<'_>) -> anyhow::Result<String> {
    let rows = ops::fetch(conn, "SELECT id FROM install LIMIT 1", []).await?;
    rows.first().context("no install row")?.text(0)
}

/// A mutex whose holder cannot leave it half-updated in a way that matters
/// (a cache, a set of names): a panic elsewhere does not poison it for good.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use berth_core::{Clock, IdGen, SeededRng, SystemClock};

    use super::{Store, StoreOptions};
    use crate::writer::RowRead;

    /// A store for the crate's unit tests: on a fresh file, or on a fresh
    /// PostgreSQL database under `BERTH_TEST_STORE=postgres` (the suite
    /// runs both ways).
    pub(crate) async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let at = crate::postgres::test_location(&dir.path().join("t.db"))
            .await
            .unwrap();
        (dir, open(&at).await)
    }

    /// A store on a fresh SQLite file, for tests of what only SQLite has.
    pub(crate) async fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let at = crate::Location::File(dir.path().join("t.db"));
        (dir, open(&at).await)
    }

    async fn open(at: &crate::Location) -> Store {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let ids = Arc::new(IdGen::new(clock.clone(), Arc::new(SeededRng::new(1))));
        Store::open_at(at, StoreOptions::default(), clock, ids)
            .await
            .unwrap()
    }

    /// The pool's connections and the dispatcher's writer are configured
    /// from one list: each reads back every setting the same.
    #[tokio::test]
    async fn the_pool_and_the_writer_run_with_the_same_settings() {
        let (_d, s) = sqlite_store().await;
        let w = s.open_writer().await.unwrap();
        for (key, _) in super::pragmas(&StoreOptions::default()) {
            let q = format!("PRAGMA {key}");
            let rows = s.inspect().rows(&q, []).await.unwrap();
            let row = rows.first().unwrap();
            let pool = row
                .int(0)
                .map(|n| n.to_string())
                .or_else(|_| row.text(0))
                .unwrap();
            let mut script = crate::ops::Script::new();
            script.push(&q, []);
            let rows = w.run(script).await.unwrap();
            let row = rows.first().unwrap();
            let writer = row
                .int(0)
                .map(|n| n.to_string())
                .or_else(|_| row.text(0))
                .unwrap();
            assert_eq!(pool, writer, "PRAGMA {key}");
        }
    }
}
