//! The dispatcher's writer: one connection of its own, running a whole
//! [`Script`] per call. On PostgreSQL it is a plain connection; on SQLite it
//! lives on a thread of its own, for the reason below.
//!
//! Through sqlx every statement of a script is a round trip between the
//! caller's task and sqlx's connection thread (a channel send and a wake-up
//! each way). A busy group commit is a few dozen statements, and on a small
//! machine those hand-offs, not SQLite, were most of the turn: the thread
//! was idle about two thirds of it. Here the caller hands the thread the
//! whole script and gets back every row it produced: one hand-off per call,
//! with each statement prepared once and kept (rusqlite's statement cache).
//!
//! The connection is opened on the same file with the same settings as the
//! pool's and links the same SQLite library, so SQLite's own locking keeps
//! it and the pool's connections consistent; the store's write gate still
//! orders writers inside the process.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use anyhow::Context;
use rusqlite::types::{ToSqlOutput, Value, ValueRef};

use crate::ops::{Arg, Script};
use crate::store::StoreOptions;

type Job = Box<dyn FnOnce(&mut rusqlite::Connection) + Send>;

/// The dispatcher's connection (see the module's documentation).
pub struct Writer {
    inner: Inner,
}

enum Inner {
    Sqlite(SqliteWriter),
    Postgres(Box<PgWriter>),
}

/// A PostgreSQL connection, opened again after it is lost (the server
/// restarted): the dispatcher retries its turn with back-off, and the
/// retry finds a fresh connection here.
pub(crate) struct PgWriter {
    connect: sqlx::postgres::PgConnectOptions,
    conn: tokio::sync::Mutex<Option<sqlx::PgConnection>>,
}

impl PgWriter {
    async fn run(&self, script: Script) -> anyhow::Result<Vec<Row>> {
        use sqlx::ConnectOptions;
        let mut guard = self.conn.lock().await;
        let conn = match &mut *guard {
            Some(c) => c,
            slot => slot.insert(
                self.connect
                    .connect()
                    .await
                    .context("failed to connect to the database again")?,
            ),
        };
        let result = crate::postgres::run_script(conn, script).await;
        if let Err(e) = &result
            && crate::is_unavailable(e)
        {
            // Broken for good: the next call connects anew.
            *guard = None;
        }
        result
    }
}

/// A SQLite connection on its own thread. Dropping it lets the thread
/// finish the job in hand, then joins it.
pub(crate) struct SqliteWriter {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

/// Statements kept prepared: bulk statements come in a power-of-two size per
/// kind, a few hundred texts in all.
const STATEMENT_CACHE: usize = 1024;

impl Writer {
    /// Opens the SQLite connection on a new thread; returns once it is open
    /// (or failed to).
    pub(crate) fn open(path: &Path, options: &StoreOptions) -> anyhow::Result<Writer> {
        Ok(Writer {
            inner: Inner::Sqlite(SqliteWriter::open(path, options)?),
        })
    }

    /// The writer on a PostgreSQL connection, which it opens again from
    /// `connect` when it is lost.
    pub(crate) fn postgres(
        conn: sqlx::PgConnection,
        connect: sqlx::postgres::PgConnectOptions,
    ) -> Writer {
        Writer {
            inner: Inner::Postgres(Box::new(PgWriter {
                connect,
                conn: tokio::sync::Mutex::new(Some(conn)),
            })),
        }
    }

    /// An empty script in this writer's dialect.
    pub fn script(&self) -> Script {
        Script::for_dialect(match self.inner {
            Inner::Sqlite(_) => crate::Dialect::Sqlite,
            Inner::Postgres(_) => crate::Dialect::Postgres,
        })
    }

    /// Runs every statement of `script`; returns the rows any of them
    /// produced.
    pub async fn run(&self, script: Script) -> anyhow::Result<Vec<Row>> {
        match &self.inner {
            Inner::Sqlite(w) => Ok(w.call(move |c| script.run_on(c)).await??),
            Inner::Postgres(w) => w.run(script).await,
        }
    }

    /// Ends a transaction a failed script left open; does nothing if none
    /// is.
    pub async fn rollback(&self) -> anyhow::Result<()> {
        match &self.inner {
            Inner::Sqlite(w) => {
                w.call(|c| {
                    if c.is_autocommit() {
                        Ok(())
                    } else {
                        c.execute_batch("ROLLBACK")
                    }
                })
                .await??;
            }
            Inner::Postgres(w) => {
                // Outside a transaction PostgreSQL only warns.
                let mut s = Script::for_dialect(crate::Dialect::Postgres);
                s.push("ROLLBACK", []);
                w.run(s).await?;
            }
        }
        Ok(())
    }

    /// The SQLite thread, for the unit tests.
    #[cfg(test)]
    pub(crate) fn sqlite(&self) -> &SqliteWriter {
        match &self.inner {
            Inner::Sqlite(w) => w,
            Inner::Postgres(_) => panic!("not a SQLite writer"),
        }
    }
}

impl SqliteWriter {
    fn open(path: &Path, options: &StoreOptions) -> anyhow::Result<SqliteWriter> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel::<anyhow::Result<()>>(1);
        let path = path.to_owned();
        let options = options.clone();
        let thread = std::thread::Builder::new()
            .name("berth-sqlite-writer".into())
            .spawn(move || {
                let mut conn = match connect(&path, &options) {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        c
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                // Ends when every sender is gone.
                for job in rx {
                    job(&mut conn);
                }
            })
            .context("failed to start the database writer thread")?;
        let opened = ready_rx
            .recv()
            .context("the database writer thread stopped while opening")?;
        let writer = SqliteWriter {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        opened.map(|()| writer)
    }

    /// Runs `f` on the writer's thread.
    pub(crate) async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // A panic stays on this job: the caller sees the thread's reply
            // dropped, and the thread goes on to the next job.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)));
            if let Ok(out) = out {
                let _ = tx.send(out);
            }
        });
        self.jobs
            .as_ref()
            .context("the database writer is closed")?
            .send(job)
            .map_err(|_| anyhow::anyhow!("the database writer thread has stopped"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("a database writer job panicked"))
    }
}

impl Drop for SqliteWriter {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `e` is, anywhere in its chain, the database refusing a second
/// row with the same `column` (`table.column`), from any connection.
/// SQLite names the column in its message; PostgreSQL names the table and
/// the constraint (`events_pkey`, `orgs_name_key`).
pub fn is_unique_violation(e: &anyhow::Error, column: &str) -> bool {
    let (table, col) = column.split_once('.').unwrap_or(("", column));
    e.chain().any(|cause| {
        if let Some(rusqlite::Error::SqliteFailure(f, Some(msg))) =
            cause.downcast_ref::<rusqlite::Error>()
        {
            return f.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains(column);
        }
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|s| s.as_database_error())
            .is_some_and(|d| {
                d.is_unique_violation()
                    && (d.message().contains(column)
                        || (d.table() == Some(table)
                            && d.constraint().is_some_and(|c| {
                                c == format!("{table}_{col}_key")
                                    || (c == format!("{table}_pkey") && col == "id")
                            })))
            })
    })
}

/// Whether `e` is, anywhere in its chain, the pool's connection refusing
/// a row that breaks any unique index or key. sqlx's test is the
/// database's own error code, so it holds for PostgreSQL as for SQLite.
pub(crate) fn is_any_unique_violation(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .and_then(|s| s.as_database_error())
            .is_some_and(|d| d.is_unique_violation())
    })
}

fn connect(path: &Path, options: &StoreOptions) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| format!("failed to open the database {}", path.display()))?;
    conn.busy_timeout(options.busy_timeout)?;
    // The pool's settings, so that a commit here is as durable as one there.
    let batch: String = crate::store::pragmas(options)
        .iter()
        .map(|(k, v)| format!("PRAGMA {k} = {v};\n"))
        .collect();
    conn.execute_batch(&batch)
        .with_context(|| format!("failed to configure the database {}", path.display()))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// One row a script returned, its values owned.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    pub(crate) fn new(values: Vec<Value>) -> Row {
        Row(values)
    }

    fn value(&self, i: usize) -> anyhow::Result<&Value> {
        self.0
            .get(i)
            .with_context(|| format!("a result row has no column {i}"))
    }
}

/// An sqlx row as owned values, by each value's own type (SQLite's typing
/// is per value, not per column): what [`Script::run`] returns, so that rows
/// from either connection are one type, read one way.
pub(crate) fn owned(r: &sqlx::sqlite::SqliteRow) -> Result<Row, sqlx::Error> {
    use sqlx::{Row as _, TypeInfo as _, ValueRef as _};
    let mut values = Vec::with_capacity(r.len());
    for i in 0..r.len() {
        let raw = r.try_get_raw(i)?;
        let v = if raw.is_null() {
            Value::Null
        } else {
            match raw.type_info().name() {
                "INTEGER" => Value::Integer(r.try_get(i)?),
                "REAL" => Value::Real(r.try_get(i)?),
                "BLOB" => Value::Blob(r.try_get(i)?),
                _ => Value::Text(r.try_get(i)?),
            }
        };
        values.push(v);
    }
    Ok(Row(values))
}

/// Reading the columns of a script's result rows. Booleans are integers
/// (0 or 1) in SQL the store shares with PostgreSQL, which has no implicit
/// conversion between the two: [`RowRead::bool`] reads one.
pub trait RowRead {
    fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>>;
    fn text(&self, i: usize) -> anyhow::Result<String> {
        self.opt_text(i)?
            .with_context(|| format!("column {i} of a result row is NULL"))
    }
    fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>>;
    fn int(&self, i: usize) -> anyhow::Result<i64> {
        self.opt_int(i)?
            .with_context(|| format!("column {i} of a result row is NULL"))
    }
    fn bool(&self, i: usize) -> anyhow::Result<bool> {
        Ok(self.int(i)? != 0)
    }
    fn opt_blob(&self, i: usize) -> anyhow::Result<Option<Vec<u8>>>;
    fn blob(&self, i: usize) -> anyhow::Result<Vec<u8>> {
        self.opt_blob(i)?
            .with_context(|| format!("column {i} of a result row is NULL"))
    }
}

impl RowRead for Row {
    fn opt_text(&self, i: usize) -> anyhow::Result<Option<String>> {
        match self.value(i)? {
            Value::Text(s) => Ok(Some(s.clone())),
            Value::Null => Ok(None),
            v => anyhow::bail!(
                "column {i} of a result row is {:?}, not text",
                v.data_type()
            ),
        }
    }
    fn opt_int(&self, i: usize) -> anyhow::Result<Option<i64>> {
        match self.value(i)? {
            Value::Integer(n) => Ok(Some(*n)),
            Value::Null => Ok(None),
            v => anyhow::bail!(
                "column {i} of a result row is {:?}, not an integer",
                v.data_type()
            ),
        }
    }
    fn opt_blob(&self, i: usize) -> anyhow::Result<Option<Vec<u8>>> {
        match self.value(i)? {
            Value::Blob(b) => Ok(Some(b.clone())),
            Value::Null => Ok(None),
            v => anyhow::bail!(
                "column {i} of a result row is {:?}, not a blob",
                v.data_type()
            ),
        }
    }
}

impl rusqlite::ToSql for Arg {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Arg::Text(s) => ValueRef::Text(s.as_bytes()),
            Arg::Int(n) => ValueRef::Integer(*n),
            Arg::Blob(b) => ValueRef::Blob(b),
            Arg::Null | Arg::NullText | Arg::NullInt | Arg::NullBlob => ValueRef::Null,
        }))
    }
}

impl Script {
    /// Runs every statement on `conn`, in order; returns every row.
    pub(crate) fn run_on(self, conn: &rusqlite::Connection) -> rusqlite::Result<Vec<Row>> {
        let mut rows = Vec::new();
        let (stmts, args) = self.into_parts();
        let mut args = args.iter();
        for (sql, n) in &stmts {
            let mut st = conn.prepare_cached(sql)?;
            for (i, a) in args.by_ref().take(*n).enumerate() {
                st.raw_bind_parameter(i + 1, a)?;
            }
            let cols = st.column_count();
            let mut out = st.raw_query();
            while let Some(r) = out.next()? {
                rows.push(Row((0..cols)
                    .map(|i| r.get(i))
                    .collect::<rusqlite::Result<_>>()?));
            }
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use berth_core::Timestamp;

    use super::*;
    // The thread and its rusqlite connection are SQLite's alone.
    use crate::store::tests::sqlite_store as store;

    fn org_insert(id: &str) -> Script {
        let mut s = Script::new();
        s.push(
            "INSERT INTO orgs (id, name, created_at) VALUES (?, ?, ?)",
            [
                Arg::from(id),
                Arg::from(format!("{id}-name")),
                Arg::from(Timestamp::from_micros(1)),
            ],
        );
        s
    }

    #[tokio::test]
    async fn a_script_commits_as_one_transaction_the_pool_then_sees() {
        let (_d, store) = store().await;
        let writer = store.open_writer().await.unwrap();
        let mut script = Script::new();
        script.push("BEGIN IMMEDIATE", []);
        for (stmts, args) in [org_insert("a"), org_insert("b")].map(Script::into_parts) {
            for (sql, _) in stmts {
                script.push(&sql, args.clone());
            }
        }
        script.push("SELECT 'count', count(*) FROM orgs", []);
        script.push("COMMIT", []);
        let rows = writer.run(script).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].text(0).unwrap(), "count");
        assert_eq!(rows[0].int(1).unwrap(), 2);

        let seen = store.inspect().count("orgs").await.unwrap();
        assert_eq!(seen, 2, "another connection sees the commit");
    }

    #[tokio::test]
    async fn a_failed_statement_is_reported_and_rolled_back_and_the_writer_goes_on() {
        let (_d, store) = store().await;
        let writer = store.open_writer().await.unwrap();
        let mut script = Script::new();
        script.push("BEGIN IMMEDIATE", []);
        let (stmts, args) = org_insert("a").into_parts();
        // The second insert of the same org breaks its unique name.
        for _ in 0..2 {
            script.push(&stmts[0].0, args.clone());
        }
        let err = writer.run(script).await.unwrap_err();
        assert!(is_unique_violation(&err, "orgs.name"), "{err:#}");
        assert!(!is_unique_violation(&err, "events.id"), "{err:#}");
        writer.rollback().await.unwrap();
        // Rolling back with nothing open is fine too.
        writer.rollback().await.unwrap();

        let rows = writer
            .run({
                let mut s = Script::new();
                s.push("SELECT count(*) FROM orgs", []);
                s
            })
            .await
            .unwrap();
        assert_eq!(rows[0].int(0).unwrap(), 0, "the first insert was undone");
        writer.run(org_insert("b")).await.unwrap();
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let (_d, store) = store().await;
        let writer = store.open_writer().await.unwrap();
        let err = writer
            .sqlite()
            .call(|_| -> () { panic!("boom") })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err:#}");
        let n = writer
            .sqlite()
            .call(|c| c.query_row("SELECT 41 + 1", [], |r| r.get::<_, i64>(0)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, 42);
    }

    #[tokio::test]
    async fn reading_a_column_of_the_wrong_kind_says_which() {
        let row = Row(vec![
            Value::Integer(1),
            Value::Null,
            Value::Text("x".into()),
        ]);
        assert_eq!(row.int(0).unwrap(), 1);
        assert_eq!(row.opt_int(1).unwrap(), None);
        assert!(row.int(1).unwrap_err().to_string().contains("column 1"));
        assert!(row.text(0).unwrap_err().to_string().contains("not text"));
        assert!(
            row.int(2)
                .unwrap_err()
                .to_string()
                .contains("not an integer")
        );
        assert!(row.text(3).unwrap_err().to_string().contains("no column 3"));
        let row = Row(vec![
            Value::Blob(vec![1, 2]),
            Value::Integer(0),
            Value::Null,
        ]);
        assert_eq!(row.blob(0).unwrap(), [1, 2]);
        assert!(!row.bool(1).unwrap());
        assert_eq!(row.opt_blob(2).unwrap(), None);
        assert!(row.blob(1).unwrap_err().to_string().contains("not a blob"));
    }
}
