//! The SQLite statements behind the store. Writes are built into a
//! [`Script`]: many statements and their bound parameters run together, so
//! that a whole group commit (acknowledgements, history, retries, new
//! events, deliveries, claims, COMMIT) is one hand-off to SQLite's thread
//! instead of a dozen. The dispatcher runs its scripts on its own
//! [`crate::Writer`] (one call per script, each statement kept prepared);
//! handlers' and the API's transactions run theirs through sqlx. Bulk
//! statements are multi-row over bound parameters, cut into chunks of fixed
//! sizes (256, then powers of two) so a handful of statement shapes cover
//! every batch size.
//!
//! Through sqlx, a small script is sent as one query string: this relies on
//! sqlx-sqlite running every statement of it and numbering anonymous `?`
//! parameters across them (sqlx 0.8); revisit on an upgrade. Numbered
//! parameters (`?1`) must not be used inside a script.
//!
//! Every query of the store goes through [`Script`] (one statement alone:
//! [`fetch`]) and comes back as owned [`Row`]s read with [`RowRead`], so a
//! runner for another database can return the same rows to the same
//! decoding. The SQL keeps to what SQLite and PostgreSQL both accept: within
//! one statement either only anonymous `?` or only numbered `?N`
//! parameters (for `$N` in PostgreSQL), booleans bound and returned as
//! integers 0/1 and compared explicitly, `ON CONFLICT DO NOTHING` rather
//! than `INSERT OR IGNORE`, `RETURNING` rather than a count of changed
//! rows. What cannot be common is marked `SQLite only:`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_core::{Envelope, ErrorInfo, EventId, FlowId, Timestamp};
use serde_json::value::RawValue;
use sqlx::SqliteConnection;

use crate::conn::{Conn, Dialect};

use crate::model::*;
use crate::writer::{Row, RowRead, owned};

const CHUNK: usize = 256;

/// The advisory lock of appends to the event log on PostgreSQL (see
/// [`Script::insert_events`]); the migrations' is another.
const EVENT_LOG_LOCK: i64 = 0x6265_7274_685f_6c67; // "berth_lg"

/// Splits `n` rows into chunk lengths: 256s, then descending powers of two.
pub(crate) fn chunk_lens(mut n: usize) -> Vec<usize> {
    let mut out = Vec::new();
    while n >= CHUNK {
        out.push(CHUNK);
        n -= CHUNK;
    }
    let mut size = CHUNK / 2;
    while n > 0 {
        if n >= size {
            out.push(size);
            n -= size;
        }
        size /= 2;
    }
    out
}

/// `(?,?,?),(?,?,?)` for `rows` rows of `cols` columns.
fn tuples(rows: usize, cols: usize) -> String {
    let one = format!("({})", vec!["?"; cols].join(","));
    vec![one; rows].join(",")
}

/// A bound value. NULLs carry the type of the value they stand for:
/// PostgreSQL types every parameter, and an untyped NULL in a `VALUES`
/// list would be taken for text (SQLite, typed per value, ignores it).
#[derive(Debug, Clone)]
pub enum Arg {
    Text(String),
    Int(i64),
    Blob(Vec<u8>),
    /// A NULL of no declared type: the database infers it from where it
    /// stands.
    Null,
    NullText,
    NullInt,
    NullBlob,
}

/// The NULL of a type's values (see [`Arg`]).
pub trait SqlType {
    const NULL: Arg;
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(s.to_owned())
    }
}
impl SqlType for &str {
    const NULL: Arg = Arg::NullText;
}
impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(s)
    }
}
impl SqlType for String {
    const NULL: Arg = Arg::NullText;
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl SqlType for i64 {
    const NULL: Arg = Arg::NullInt;
}
impl From<bool> for Arg {
    /// As 0 or 1: compare it explicitly (`? != 0`), PostgreSQL has no
    /// implicit conversion from integers to booleans.
    fn from(v: bool) -> Self {
        Arg::Int(i64::from(v))
    }
}
impl SqlType for bool {
    const NULL: Arg = Arg::NullInt;
}
impl From<&[u8]> for Arg {
    fn from(v: &[u8]) -> Self {
        Arg::Blob(v.to_vec())
    }
}
impl SqlType for &[u8] {
    const NULL: Arg = Arg::NullBlob;
}
impl From<u32> for Arg {
    fn from(v: u32) -> Self {
        Arg::Int(i64::from(v))
    }
}
impl SqlType for u32 {
    const NULL: Arg = Arg::NullInt;
}
impl<T: Into<Arg> + SqlType> From<Option<T>> for Arg {
    fn from(v: Option<T>) -> Self {
        v.map_or(T::NULL, Into::into)
    }
}
impl SqlType for EventId {
    const NULL: Arg = Arg::NullText;
}
impl SqlType for FlowId {
    const NULL: Arg = Arg::NullText;
}
impl SqlType for Timestamp {
    const NULL: Arg = Arg::NullInt;
}
impl From<EventId> for Arg {
    fn from(v: EventId) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<FlowId> for Arg {
    fn from(v: FlowId) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<Timestamp> for Arg {
    fn from(v: Timestamp) -> Self {
        Arg::Int(v.as_micros())
    }
}

/// Statements and their arguments. On a [`crate::Writer`] a script is one
/// call, each statement prepared once and kept. Through sqlx, a small script
/// runs as one command (one round trip); a large one statement by
/// statement, each a cached prepared statement. A script's text changes
/// with the shape of its batch, so as one command it is prepared anew each
/// time: worth it only while small (with the threshold at 2000 arguments,
/// re-preparing was half of a busy dispatcher's time in the flows
/// benchmark).
#[derive(Debug, Default)]
pub struct Script {
    /// Each statement with the number of arguments it takes.
    stmts: Vec<(String, usize)>,
    args: Vec<Arg>,
    /// Whose SQL the builders write where the two databases differ.
    dialect: Dialect,
}

/// At most this many arguments in all to send a script as one command.
const ONE_COMMAND_ARGS: usize = 200;

impl Script {
    /// A script in SQLite's dialect; see [`Script::for_dialect`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A script whose builders write `dialect`'s SQL where the databases
    /// differ ([`crate::Store::script`], [`crate::Writer::script`]).
    pub fn for_dialect(dialect: Dialect) -> Self {
        Script {
            dialect,
            ..Self::default()
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Begins a write transaction. SQLite only: `BEGIN IMMEDIATE` takes
    /// SQLite's write lock up front (see [`crate::Store::begin`]);
    /// PostgreSQL's writers lock rows, so a plain `BEGIN`.
    pub fn begin(&mut self) {
        match self.dialect {
            Dialect::Sqlite => self.push("BEGIN IMMEDIATE", []),
            Dialect::Postgres => self.push("BEGIN", []),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.stmts.is_empty()
    }

    /// Each statement with how many arguments it takes, and every argument
    /// in order.
    pub(crate) fn into_parts(self) -> (Vec<(String, usize)>, Vec<Arg>) {
        (self.stmts, self.args)
    }

    /// Appends one statement (without its `;`) and its arguments in order.
    pub fn push(&mut self, sql: &str, args: impl IntoIterator<Item = Arg>) {
        let before = self.args.len();
        self.args.extend(args);
        self.stmts.push((sql.to_owned(), self.args.len() - before));
    }

    /// Appends `make_sql(tuples)` once per chunk of `rows`, with `lead`
    /// arguments before each chunk's rows.
    pub(crate) fn push_rows<T>(
        &mut self,
        rows: &[T],
        cols: usize,
        lead: &[Arg],
        make_sql: impl Fn(&str) -> String,
        mut row_args: impl FnMut(&T, &mut Vec<Arg>),
    ) {
        let mut start = 0;
        for len in chunk_lens(rows.len()) {
            let before = self.args.len();
            self.args.extend(lead.iter().cloned());
            for row in &rows[start..start + len] {
                row_args(row, &mut self.args);
            }
            self.stmts
                .push((make_sql(&tuples(len, cols)), self.args.len() - before));
            start += len;
        }
    }

    /// Runs every statement; returns the rows any of them produced, owned.
    /// A failed statement's error is sqlx's, in the chain (see
    /// [`crate::writer::is_any_unique_violation`]).
    pub(crate) async fn run(self, conn: &mut Conn<'_>) -> anyhow::Result<Vec<Row>> {
        match conn {
            Conn::Sqlite(c) => Ok(self.run_sqlx(c).await?),
            Conn::Postgres(c) => crate::postgres::run_script(c, self).await,
        }
    }

    async fn run_sqlx(self, conn: &mut SqliteConnection) -> Result<Vec<Row>, sqlx::Error> {
        if self.stmts.is_empty() {
            return Ok(Vec::new());
        }
        if self.stmts.len() == 1 || self.args.len() <= ONE_COMMAND_ARGS {
            let one;
            let sql = if let [(s, _)] = self.stmts.as_slice() {
                s.as_str()
            } else {
                one = self
                    .stmts
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(";\n");
                one.as_str()
            };
            let rows = bind_all(sqlx::query(sql), self.args)
                .fetch_all(&mut *conn)
                .await?;
            return rows.iter().map(owned).collect();
        }
        let mut rows = Vec::new();
        let mut args = self.args.into_iter();
        for (sql, n) in &self.stmts {
            let q = bind_all(sqlx::query(sql), args.by_ref().take(*n));
            for r in q.fetch_all(&mut *conn).await? {
                rows.push(owned(&r)?);
            }
        }
        Ok(rows)
    }

    pub fn insert_events(&mut self, envs: &[&Envelope]) {
        if envs.is_empty() {
            return;
        }
        if self.dialect == Dialect::Postgres {
            // Readers of the log follow `seq` (an org's event stream resumes
            // after the last one it sent), so `seq` must grow in commit
            // order. A sequence alone does not: a transaction may take 10,
            // another 11 and commit first, and a reader who saw 11 would
            // never see 10. Transactions that append to the log take this
            // lock, held to their commit, one at a time. (SQLite's one
            // writer gives that order by itself.)
            // (A `void` result reads as no row: see `postgres::run_script`.)
            self.push(
                "SELECT pg_advisory_xact_lock(?)",
                [Arg::Int(EVENT_LOG_LOCK)],
            );
        }
        self.push_rows(
            envs,
            10,
            &[],
            |t| {
                format!(
                    "INSERT INTO events
                        (id, type, version, org_id, subject, flow_id, causation_id, created_at, not_before, payload)
                     VALUES {t}"
                )
            },
            |e, a| {
                a.extend([
                    e.id.into(),
                    e.event_type.as_str().into(),
                    e.version.into(),
                    e.org_id.as_deref().into(),
                    e.subject.as_deref().into(),
                    e.flow_id.into(),
                    e.causation_id.into(),
                    e.created_at.into(),
                    e.not_before.into(),
                    e.payload.get().into(),
                ])
            },
        );
    }

    pub fn insert_deliveries(&mut self, rows: &[NewDelivery]) {
        self.push_rows(
            rows,
            8,
            &[],
            |t| {
                format!(
                    "INSERT INTO deliveries
                        (event_id, worker, round, attempt, not_before, lease_owner, leased_at, lease_until)
                     VALUES {t}"
                )
            },
            |d, a| {
                a.extend([
                    d.event_id.into(),
                    (&*d.worker).into(),
                    d.round.into(),
                    d.attempt.into(),
                    d.not_before.into(),
                    d.lease.as_ref().map(|l| &*l.owner).into(),
                    d.lease.as_ref().map(|l| l.leased_at).into(),
                    d.lease.as_ref().map(|l| l.until).into(),
                ])
            },
        );
    }

    /// Tells the other processes on the database, once this transaction
    /// commits, that `workers` have deliveries they may claim (PostgreSQL's
    /// `NOTIFY`; see [`crate::Store::listen`]). SQLite only: a no-op there,
    /// where one process dispatches and wakes itself.
    pub fn notify_deliveries<'w>(&mut self, workers: impl IntoIterator<Item = &'w str>) {
        if self.dialect != Dialect::Postgres {
            return;
        }
        let mut names: Vec<&str> = workers.into_iter().collect();
        if names.is_empty() {
            return;
        }
        names.sort_unstable();
        names.dedup();
        // A payload is at most 8000 bytes; past that, an empty one wakes
        // every worker.
        let mut payload = names.join(",");
        if payload.len() > 7000 {
            payload.clear();
        }
        self.push(
            "SELECT pg_notify('berth_deliveries', ?)",
            [Arg::Text(payload)],
        );
    }

    /// Claims up to `limit` due deliveries of `worker` (rows tagged `claim`),
    /// then reports the earliest unclaimed one left (a row tagged `due`).
    pub fn claim(&mut self, worker: &str, lease: &Lease, limit: usize) {
        // SQLite only: its one writer claims alone. On PostgreSQL several
        // dispatchers claim at once; each skips the rows another is
        // claiming rather than waiting for them or taking them twice.
        let skip_locked = match self.dialect {
            Dialect::Sqlite => "",
            Dialect::Postgres => "FOR UPDATE SKIP LOCKED",
        };
        self.push(
            &format!(
                "UPDATE deliveries
                SET attempt = attempt + 1, lease_owner = ?, leased_at = ?, lease_until = ?
              WHERE worker = ? AND event_id IN (
                    SELECT event_id FROM deliveries
                     WHERE worker = ? AND lease_owner IS NULL AND not_before <= ?
                     ORDER BY not_before LIMIT ? {skip_locked})
             RETURNING 'claim', worker, event_id, round, attempt"
            ),
            [
                (&*lease.owner).into(),
                lease.leased_at.into(),
                lease.until.into(),
                worker.into(),
                worker.into(),
                lease.leased_at.into(),
                Arg::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        );
        self.push(
            "SELECT 'due', ?, MIN(not_before), 0, 0 FROM deliveries
              WHERE worker = ? AND lease_owner IS NULL",
            [worker.into(), worker.into()],
        );
    }

    pub fn insert_inbox(&mut self, rows: &[(&str, EventId)], at: Timestamp) {
        self.push_rows(
            rows,
            3,
            &[],
            |t| {
                format!(
                    "INSERT INTO inbox (worker, event_id, processed_at) VALUES {t}
                     ON CONFLICT DO NOTHING"
                )
            },
            |(w, e), a| a.extend([(*w).into(), (*e).into(), at.into()]),
        );
    }

    pub fn insert_attempts(&mut self, rows: &[AttemptRecord]) {
        self.push_rows(
            rows,
            9,
            &[],
            |t| {
                format!(
                    "INSERT INTO attempts
                        (event_id, worker, round, attempt, started_at, duration_us, outcome, error, next_delay_us)
                     VALUES {t}"
                )
            },
            |r, a| {
                a.extend([
                    r.event_id.into(),
                    r.worker.as_str().into(),
                    r.round.into(),
                    r.attempt.into(),
                    r.started_at.into(),
                    r.duration.map(us).into(),
                    r.outcome.as_str().into(),
                    r.error
                        .as_ref()
                        .and_then(|e| serde_json::to_string(e).ok())
                        .into(),
                    r.next_delay.map(us).into(),
                ])
            },
        );
    }

    /// Removes deliveries `(event id, worker)`. One statement set per worker:
    /// `worker = ? AND event_id IN (…)` searches the primary key, where a
    /// row-value `(event_id, worker) IN (…)` would scan the table.
    pub fn delete_deliveries(&mut self, keys: &[(EventId, &str)]) {
        // One statement for all workers (not one per worker: each statement
        // is a round trip to SQLite's thread); the row-value IN over a
        // subquery is what lets SQLite seek the primary key.
        self.push_rows(
            keys,
            2,
            &[],
            |t| {
                format!(
                    "DELETE FROM deliveries WHERE (event_id, worker) IN
                        (SELECT column1, column2 FROM (VALUES {t}) AS v)"
                )
            },
            |(e, w), a| {
                a.push((*e).into());
                a.push((*w).into());
            },
        );
    }

    /// Releases leases and sets the next attempt's time.
    pub fn reschedule(&mut self, rows: &[(EventId, &str, Timestamp)]) {
        self.push_rows(
            rows,
            3,
            &[],
            |t| {
                format!(
                    "UPDATE deliveries
                        SET lease_owner = NULL, leased_at = NULL, lease_until = NULL,
                            not_before = v.column3
                       FROM (VALUES {t}) AS v
                      WHERE deliveries.event_id = v.column1 AND deliveries.worker = v.column2"
                )
            },
            |(e, w, t), a| a.extend([(*e).into(), (*w).into(), (*t).into()]),
        );
    }

    pub fn insert_dead_letters(&mut self, rows: &[NewDeadLetter]) {
        self.push_rows(
            rows,
            10,
            &[],
            |t| {
                format!(
                    "INSERT INTO dead_letters
                        (id, event_id, worker, round, attempts, reason, error, org_id, flow_id, dead_at)
                     VALUES {t}"
                )
            },
            |d, a| {
                a.extend([
                    d.id.as_str().into(),
                    d.event_id.into(),
                    d.worker.as_str().into(),
                    d.round.into(),
                    d.attempts.into(),
                    d.reason.as_str().into(),
                    serde_json::to_string(&d.error)
                        .unwrap_or_else(|_| "{}".to_owned())
                        .into(),
                    d.org_id.as_deref().into(),
                    d.flow_id.into(),
                    d.dead_at.into(),
                ])
            },
        );
    }
}

/// Runs one statement (numbered parameters allowed: it is alone); its
/// rows, owned.
pub(crate) async fn fetch(
    conn: &mut Conn<'_>,
    sql: &str,
    args: impl IntoIterator<Item = Arg>,
) -> anyhow::Result<Vec<Row>> {
    let mut s = Script::for_dialect(conn.dialect());
    s.push(sql, args);
    s.run(conn).await
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    args: impl IntoIterator<Item = Arg>,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    for a in args {
        q = match a {
            Arg::Text(s) => q.bind(s),
            Arg::Int(v) => q.bind(v),
            Arg::Blob(b) => q.bind(b),
            Arg::Null | Arg::NullText | Arg::NullInt | Arg::NullBlob => q.bind(None::<i64>),
        };
    }
    q
}

/// What the `claim` statements of a script returned.
#[derive(Debug, Default)]
pub struct ClaimResult {
    pub claimed: Vec<Claimed>,
    /// Per worker claimed from: the earliest unclaimed delivery left.
    pub next_due: HashMap<String, Option<Timestamp>>,
}

/// Reads `claim` and `due` rows out of a script's result.
pub fn read_claims<R: crate::RowRead>(
    rows: &[R],
    workers: &HashMap<&str, Arc<str>>,
) -> anyhow::Result<ClaimResult> {
    let mut out = ClaimResult::default();
    for r in rows {
        let tag = r.text(0)?;
        let worker = r.text(1)?;
        match tag.as_str() {
            "claim" => {
                let ev = r.text(2)?;
                let Some(name) = workers.get(worker.as_str()) else {
                    continue;
                };
                out.claimed.push(Claimed {
                    event_id: parse_id(&ev, "event id")?,
                    worker: name.clone(),
                    round: u32::try_from(r.int(3)?)?,
                    attempt: u32::try_from(r.int(4)?)?,
                });
            }
            "due" => {
                let t = r.opt_int(2)?;
                out.next_due.insert(worker, t.map(Timestamp::from_micros));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse::<T>()
        .with_context(|| format!("corrupt {what} '{s}' in the store"))
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_us(v: i64) -> Duration {
    Duration::from_micros(u64::try_from(v).unwrap_or(0))
}

/// Which of `ids` the event log already has.
pub(crate) async fn known_events(
    conn: &mut Conn<'_>,
    ids: &[EventId],
) -> anyhow::Result<HashSet<EventId>> {
    let mut s = Script::for_dialect(conn.dialect());
    s.push_rows(
        ids,
        1,
        &[],
        |t| format!("SELECT id FROM events WHERE id IN (VALUES {t})"),
        |e, a| a.push((*e).into()),
    );
    let rows = s.run(conn).await.context("failed to check the event log")?;
    rows.iter()
        .map(|r| parse_id::<EventId>(&r.text(0)?, "event id"))
        .collect()
}

/// Appends envelopes to the event log, skipping ids already present (the
/// dedupe, also within `envs`), and returns the ids that were new.
pub(crate) async fn insert_events(
    conn: &mut Conn<'_>,
    envs: &[Envelope],
) -> anyhow::Result<HashSet<EventId>> {
    if envs.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<EventId> = envs.iter().map(|e| e.id).collect();
    let known = known_events(conn, &ids).await?;
    let mut seen = HashSet::new();
    let fresh: Vec<&Envelope> = envs
        .iter()
        .filter(|e| !known.contains(&e.id) && seen.insert(e.id))
        .collect();
    let mut s = Script::for_dialect(conn.dialect());
    s.insert_events(&fresh);
    s.run(conn)
        .await
        .context("failed to append to the event log")?;
    Ok(seen)
}

/// Inserts delivery rows.
pub(crate) async fn insert_deliveries(
    conn: &mut Conn<'_>,
    rows: &[NewDelivery],
) -> anyhow::Result<()> {
    let mut s = Script::for_dialect(conn.dialect());
    s.insert_deliveries(rows);
    s.run(conn).await.context("failed to insert deliveries")?;
    Ok(())
}

const EVENT_COLUMNS: &str =
    "id, type, version, org_id, subject, flow_id, causation_id, created_at, not_before, payload";

fn envelope_from_row(r: &Row) -> anyhow::Result<Envelope> {
    let id = r.text(0)?;
    let flow = r.text(5)?;
    let cause = r.opt_text(6)?;
    let payload = r.text(9)?;
    let id: EventId = parse_id(&id, "event id")?;
    Ok(Envelope {
        id,
        event_type: r.text(1)?,
        version: u32::try_from(r.int(2)?).context("corrupt event version in the store")?,
        org_id: r.opt_text(3)?,
        subject: r.opt_text(4)?,
        flow_id: parse_id::<FlowId>(&flow, "flow id")?,
        causation_id: cause
            .as_deref()
            .map(|c| parse_id(c, "causation id"))
            .transpose()?,
        attempt: 0,
        created_at: Timestamp::from_micros(r.int(7)?),
        not_before: r.opt_int(8)?.map(Timestamp::from_micros),
        // The payload was valid JSON when written (it came from a RawValue),
        // but the file may have been edited; a bad one must reach the worker
        // as a malformed payload (dead-lettered with a reason), not vanish.
        payload: RawValue::from_string(payload)
            .or_else(|e| {
                RawValue::from_string(serde_json::to_string(&format!("<unreadable: {e}>"))?)
            })
            .with_context(|| format!("unreadable payload of event {id}"))?,
    })
}

/// All events of a flow, in log order.
pub(crate) async fn events_of_flow(
    conn: &mut Conn<'_>,
    flow: FlowId,
) -> anyhow::Result<Vec<Envelope>> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE flow_id = ?1 ORDER BY seq");
    let rows = fetch(conn, &sql, [flow.into()])
        .await
        .context("failed to load the flow's events")?;
    rows.iter().map(envelope_from_row).collect()
}

/// Which of `ids` are already in `worker`'s inbox.
pub(crate) async fn inbox_hits(
    conn: &mut Conn<'_>,
    worker: &str,
    ids: &[EventId],
) -> anyhow::Result<HashSet<EventId>> {
    // `worker = ? AND event_id IN (…)` lets SQLite search the primary key;
    // a row-value `(event_id, worker) IN (…)` would scan the whole inbox.
    let mut s = Script::for_dialect(conn.dialect());
    s.push_rows(
        ids,
        1,
        &[worker.into()],
        |t| format!("SELECT event_id FROM inbox WHERE worker = ? AND event_id IN (VALUES {t})"),
        |e, a| a.push((*e).into()),
    );
    let rows = s.run(conn).await.context("failed to read the inbox")?;
    rows.iter()
        .map(|r| parse_id::<EventId>(&r.text(0)?, "event id"))
        .collect()
}

/// Loads envelopes by id (order not preserved).
pub(crate) async fn load_events(
    conn: &mut Conn<'_>,
    ids: &[EventId],
) -> anyhow::Result<Vec<Envelope>> {
    let mut s = Script::for_dialect(conn.dialect());
    s.push_rows(
        ids,
        1,
        &[],
        |t| format!("SELECT {EVENT_COLUMNS} FROM events WHERE id IN (VALUES {t})"),
        |e, a| a.push((*e).into()),
    );
    let rows = s.run(conn).await.context("failed to load events")?;
    rows.iter().map(envelope_from_row).collect()
}

/// A dead letter to write.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub id: String,
    pub event_id: EventId,
    pub worker: String,
    pub round: u32,
    pub attempts: u32,
    pub reason: DeadReason,
    pub error: ErrorInfo,
    pub org_id: Option<String>,
    pub flow_id: FlowId,
    pub dead_at: Timestamp,
}

/// Takes back leases — all of them at start-up of the only dispatcher on this
/// database, or those past `lease_until` otherwise — recording each lost
/// attempt as `abandoned`. The attempt count is kept: the attempt happened
/// (it may have had effects), so it counts toward `max_attempts`.
pub(crate) async fn release_leases(
    conn: &mut Conn<'_>,
    now: Timestamp,
    only_expired: bool,
) -> anyhow::Result<u64> {
    let filter = if only_expired {
        "lease_owner IS NOT NULL AND lease_until < ?1"
    } else {
        "lease_owner IS NOT NULL"
    };
    // The update takes `now` only when its filter names it.
    let filter_args = || {
        if only_expired {
            vec![Arg::from(now)]
        } else {
            Vec::new()
        }
    };
    let lost = serde_json::to_string(&ErrorInfo::new(
        "attempt_abandoned",
        "the process running this attempt stopped before it finished",
    ))?;
    if conn.dialect() == Dialect::Postgres {
        // Several processes may sweep at once: each lease is released by
        // one statement that records what it released, so a row taken by
        // one sweep (the other waits on its lock, then finds it free) is
        // recorded abandoned once. SQLite's one writer needs no such care,
        // and has no data-modifying CTEs.
        let done = fetch(
            conn,
            &format!(
                "WITH released AS (
                    UPDATE deliveries SET lease_owner = NULL, leased_at = NULL, lease_until = NULL
                     WHERE {filter}
                 RETURNING event_id, worker, round, attempt, leased_at)
                 INSERT INTO attempts (event_id, worker, round, attempt, started_at, duration_us, outcome, error)
                 SELECT event_id, worker, round, attempt, COALESCE(leased_at, ?1), NULL, 'abandoned', ?2
                   FROM released
                 RETURNING 1"
            ),
            [now.into(), lost.into()],
        )
        .await
        .context("failed to release leases")?;
        return Ok(u64::try_from(done.len()).unwrap_or(u64::MAX));
    }
    fetch(
        conn,
        &format!(
            "INSERT INTO attempts (event_id, worker, round, attempt, started_at, duration_us, outcome, error)
             SELECT event_id, worker, round, attempt, COALESCE(leased_at, ?1), NULL, 'abandoned', ?2
               FROM deliveries WHERE {filter}"
        ),
        [now.into(), lost.into()],
    )
    .await
    .context("failed to record abandoned attempts")?;
    let done = fetch(
        conn,
        &format!(
            "UPDATE deliveries SET lease_owner = NULL, leased_at = NULL, lease_until = NULL
              WHERE {filter} RETURNING 1"
        ),
        filter_args(),
    )
    .await
    .context("failed to release leases")?;
    Ok(u64::try_from(done.len()).unwrap_or(u64::MAX))
}

fn attempt_from_row(r: &Row) -> anyhow::Result<AttemptRecord> {
    let ev = r.text(0)?;
    let outcome = r.text(6)?;
    let error = r.opt_text(7)?;
    Ok(AttemptRecord {
        event_id: parse_id(&ev, "event id")?,
        worker: r.text(1)?,
        round: u32::try_from(r.int(2)?).context("corrupt round in attempt history")?,
        attempt: u32::try_from(r.int(3)?).context("corrupt attempt in attempt history")?,
        started_at: Timestamp::from_micros(r.int(4)?),
        duration: r.opt_int(5)?.map(from_us),
        outcome: outcome.parse()?,
        error: error
            .map(|e| serde_json::from_str(&e).context("corrupt error record in attempt history"))
            .transpose()?,
        next_delay: r.opt_int(8)?.map(from_us),
    })
}

const ATTEMPT_COLUMNS: &str =
    "event_id, worker, round, attempt, started_at, duration_us, outcome, error, next_delay_us";

/// Attempt history of one event, oldest first.
pub(crate) async fn attempts_of_event(
    conn: &mut Conn<'_>,
    event: EventId,
) -> anyhow::Result<Vec<AttemptRecord>> {
    let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE event_id = ?1 ORDER BY id");
    let rows = fetch(conn, &sql, [event.into()])
        .await
        .context("failed to read attempt history")?;
    rows.iter().map(attempt_from_row).collect()
}

/// Attempt history of every event of a flow, oldest first.
pub(crate) async fn attempts_of_flow(
    conn: &mut Conn<'_>,
    flow: FlowId,
) -> anyhow::Result<Vec<AttemptRecord>> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts
          WHERE event_id IN (SELECT id FROM events WHERE flow_id = ?1) ORDER BY id"
    );
    let rows = fetch(conn, &sql, [flow.into()])
        .await
        .context("failed to read the flow's attempt history")?;
    rows.iter().map(attempt_from_row).collect()
}

fn dead_letter_from_row(r: &Row) -> anyhow::Result<DeadLetter> {
    let ev = r.text(1)?;
    let reason = r.text(6)?;
    let error = r.text(7)?;
    let flow = r.text(9)?;
    Ok(DeadLetter {
        id: r.text(0)?,
        event_id: parse_id(&ev, "event id")?,
        event_type: r.text(2)?,
        worker: r.text(3)?,
        round: u32::try_from(r.int(4)?).context("corrupt round in dead letter")?,
        attempts: u32::try_from(r.int(5)?).context("corrupt attempt count in dead letter")?,
        reason: reason.parse()?,
        error: serde_json::from_str(&error).context("corrupt error record in dead letter")?,
        org_id: r.opt_text(8)?,
        flow_id: parse_id(&flow, "flow id")?,
        dead_at: Timestamp::from_micros(r.int(10)?),
        redriven_at: r.opt_int(11)?.map(Timestamp::from_micros),
    })
}

const DEAD_COLUMNS: &str = "d.id, d.event_id, e.type, d.worker, d.round, d.attempts, d.reason, \
     d.error, d.org_id, d.flow_id, d.dead_at, d.redriven_at";

/// Dead letters, newest first; `open_only` hides re-driven ones.
pub(crate) async fn dead_letters(
    conn: &mut Conn<'_>,
    org: Option<&str>,
    open_only: bool,
    limit: u32,
) -> anyhow::Result<Vec<DeadLetter>> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM dead_letters d JOIN events e ON e.id = d.event_id
          WHERE (?1 IS NULL OR d.org_id = ?1) AND (?2 = 0 OR d.redriven_at IS NULL)
          ORDER BY d.dead_at DESC, d.id DESC LIMIT ?3"
    );
    let rows = fetch(conn, &sql, [org.into(), open_only.into(), limit.into()])
        .await
        .context("failed to list dead letters")?;
    rows.iter().map(dead_letter_from_row).collect()
}

pub(crate) async fn dead_letter(
    conn: &mut Conn<'_>,
    id: &str,
) -> anyhow::Result<Option<DeadLetter>> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM dead_letters d JOIN events e ON e.id = d.event_id WHERE d.id = ?1"
    );
    let rows = fetch(conn, &sql, [id.into()])
        .await
        .context("failed to read the dead letter")?;
    rows.first().map(dead_letter_from_row).transpose()
}

/// Marks a dead letter re-driven if it was not already; true if this call did.
pub(crate) async fn mark_redriven(
    conn: &mut Conn<'_>,
    id: &str,
    at: Timestamp,
) -> anyhow::Result<bool> {
    let done = fetch(
        conn,
        "UPDATE dead_letters SET redriven_at = ?2 WHERE id = ?1 AND redriven_at IS NULL
         RETURNING 1",
        [id.into(), at.into()],
    )
    .await
    .context("failed to mark the dead letter re-driven")?;
    Ok(done.len() == 1)
}

/// Number of deliveries waiting (unclaimed) and in flight (leased).
pub(crate) async fn queue_depth(conn: &mut Conn<'_>) -> anyhow::Result<(i64, i64)> {
    // Counting the leased rather than summing a boolean, which PostgreSQL
    // does not add up.
    let rows = fetch(
        conn,
        "SELECT COUNT(*) - COUNT(lease_owner), COUNT(lease_owner) FROM deliveries",
        [],
    )
    .await
    .context("failed to count deliveries")?;
    let row = rows.first().context("no row counting deliveries")?;
    Ok((row.int(0)?, row.int(1)?))
}

/// A connection of its own for a reader that must not queue behind the
/// pool (the dispatcher's reads outside its turn's transaction); from
/// [`crate::Store::reader`].
pub struct Reader {
    store: crate::Store,
    /// Opened again on the next call after it is lost (PostgreSQL
    /// restarted).
    conn: Option<crate::conn::Owned>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    async fn conn(&mut self) -> anyhow::Result<&mut crate::conn::Owned> {
        let conn = match &mut self.conn {
            Some(c) => c,
            slot => slot.insert(self.store.dedicated_connection().await?),
        };
        Ok(conn)
    }

    /// Forgets the connection if `result` says it is broken.
    fn keep<T>(&mut self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if let Err(e) = &result
            && crate::is_unavailable(e)
        {
            self.conn = None;
        }
        result
    }

    /// Those of `ids` already in the event log.
    pub async fn known_events(&mut self, ids: &[EventId]) -> anyhow::Result<HashSet<EventId>> {
        let r = known_events(&mut self.conn().await?.conn(), ids).await;
        self.keep(r)
    }

    /// The envelopes of `ids` that are in the log (order not kept).
    pub async fn events(&mut self, ids: &[EventId]) -> anyhow::Result<Vec<Envelope>> {
        let r = load_events(&mut self.conn().await?.conn(), ids).await;
        self.keep(r)
    }

    /// Those of `ids` already in `worker`'s inbox.
    pub async fn inbox_hits(
        &mut self,
        worker: &str,
        ids: &[EventId],
    ) -> anyhow::Result<HashSet<EventId>> {
        let r = inbox_hits(&mut self.conn().await?.conn(), worker, ids).await;
        self.keep(r)
    }
}

impl crate::Store {
    /// A [`Reader`] on a connection outside the pool.
    pub async fn reader(&self) -> anyhow::Result<Reader> {
        Ok(Reader {
            store: self.clone(),
            conn: Some(self.dedicated_connection().await?),
        })
    }

    /// Which of `ids` the event log already has.
    pub async fn known_events(&self, ids: &[EventId]) -> anyhow::Result<HashSet<EventId>> {
        known_events(&mut self.read_conn().await?.conn(), ids).await
    }

    /// The envelopes of `ids` that are in the log (order not kept).
    pub async fn events(&self, ids: &[EventId]) -> anyhow::Result<Vec<Envelope>> {
        load_events(&mut self.read_conn().await?.conn(), ids).await
    }

    /// Which of `ids` are in `worker`'s inbox (handled already).
    pub async fn inbox_hits(
        &self,
        worker: &str,
        ids: &[EventId],
    ) -> anyhow::Result<HashSet<EventId>> {
        inbox_hits(&mut self.read_conn().await?.conn(), worker, ids).await
    }

    /// Takes back leases — every one when `only_expired` is false (at the
    /// start of the only dispatcher of the database), else those past
    /// their end — recording each lost attempt as `abandoned`; how many.
    pub async fn release_leases(&self, now: Timestamp, only_expired: bool) -> anyhow::Result<u64> {
        let mut tx = self.begin().await?;
        let n = release_leases(&mut tx.conn(), now, only_expired).await?;
        tx.commit().await?;
        Ok(n)
    }
}

impl crate::Tx {
    /// Which of `ids` are in `worker`'s inbox, as this transaction sees it.
    pub async fn inbox_hits(
        &mut self,
        worker: &str,
        ids: &[EventId],
    ) -> anyhow::Result<HashSet<EventId>> {
        inbox_hits(&mut self.conn(), worker, ids).await
    }

    /// Runs a script's statements in this transaction.
    pub async fn run(&mut self, script: Script) -> anyhow::Result<()> {
        script
            .run(&mut self.conn())
            .await
            .context("a statement of the transaction failed")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_cover_every_row_with_few_distinct_sizes() {
        for n in 0..2000 {
            let lens = super::chunk_lens(n);
            assert_eq!(lens.iter().sum::<usize>(), n);
            assert!(
                lens.iter()
                    .all(|l| l.is_power_of_two() && *l <= super::CHUNK)
            );
            assert!(lens.len() <= n / super::CHUNK + 8);
        }
    }
}
