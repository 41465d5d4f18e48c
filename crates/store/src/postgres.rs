//! PostgreSQL, the store's second database (see ARCHITECTURE.md): running
//! the store's shared scripts on it, connecting with its migrations
//! applied, a fresh database for a test or a benchmark run, and the raw
//! single-row commit rate the bus benchmark compares itself with.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};

/// Whether `url` names a PostgreSQL database (`postgres://` or
/// `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

pub(crate) fn options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .with_context(|| format!("'{}' is not a PostgreSQL URL", redact(url)))?
        .disable_statement_logging())
}

/// Whether `url` parses as a PostgreSQL connection URL; the error says
/// why not (without the password).
pub fn check_url(url: &str) -> anyhow::Result<()> {
    options(url).map(drop)
}

/// Applies the pending migrations to the database at `url` (one process
/// at a time: see `migrate::run_postgres`).
pub async fn migrate(url: &str) -> anyhow::Result<()> {
    let mut conn = PgConnection::connect_with(&options(url)?)
        .await
        .with_context(|| format!("failed to connect to {}", redact(url)))?;
    let result = crate::migrate::run_postgres(&mut conn)
        .await
        .with_context(|| format!("failed to migrate {}", redact(url)));
    conn.close().await.ok();
    result
}

/// Creates an empty database on the server of `server_url` (whose own
/// database is only used to connect) and returns its URL: a fresh database
/// per test or benchmark run.
pub async fn fresh_database(server_url: &str) -> anyhow::Result<String> {
    let mut conn = PgConnection::connect_with(&options(server_url)?)
        .await
        .with_context(|| format!("failed to connect to {}", redact(server_url)))?;
    let name = format!("berth_{:016x}", rand_u64());
    // A name of hex digits made here: nothing to quote.
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("failed to create the database {name}"))?;
    conn.close().await.ok();
    Ok(with_database(server_url, &name))
}

/// Drops a database [`fresh_database`] made; the server's other databases
/// are not touched.
pub async fn drop_database(server_url: &str, url: &str) -> anyhow::Result<()> {
    let name = options(url)?
        .get_database()
        .map(str::to_owned)
        .context("the URL names no database")?;
    anyhow::ensure!(
        name.starts_with("berth_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "not a database made by fresh_database: {name}"
    );
    let mut conn = PgConnection::connect_with(&options(server_url)?).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .with_context(|| format!("failed to drop the database {name}"))?;
    conn.close().await.ok();
    Ok(())
}

/// `url` with its database (the path) replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // The path starts at the first '/' after the scheme's "//".
    let after_scheme = base.find("//").map(|i| i + 2).unwrap_or(0);
    let root = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{name}?{q}"),
        None => format!("{root}/{name}"),
    }
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    let Some(at) = url.find('@') else {
        return url.to_owned();
    };
    let start = url.find("//").map(|i| i + 2).unwrap_or(0);
    match url[start..at].find(':') {
        Some(colon) => format!("{}:***{}", &url[..start + colon], &url[at..]),
        None => url.to_owned(),
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // The standard library's random keys: distinct per call and process,
    // which is all a scratch database's name needs.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Single-row autocommit INSERTs per second for about `run` on a scratch
/// table of the database at `url` (dropped after): the peer of
/// [`crate::baseline::raw_commits_per_s`] on PostgreSQL.
pub async fn raw_commits_per_s(url: &str, run: Duration) -> anyhow::Result<f64> {
    let mut conn = PgConnection::connect_with(&options(url)?).await?;
    let table = format!("raw_commits_{:016x}", rand_u64());
    sqlx::query(&format!(
        "CREATE TABLE {table} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v TEXT NOT NULL)"
    ))
    .execute(&mut conn)
    .await?;
    let insert = format!("INSERT INTO {table} (v) VALUES ('x')");
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < run {
        sqlx::query(&insert).execute(&mut conn).await?;
        n += 1;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64().max(1e-9);
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut conn)
        .await?;
    conn.close().await.ok();
    Ok(rate)
}

/// The variable naming the PostgreSQL server the test suites make their
/// databases on (`scripts/test` starts one and sets it).
pub const TEST_SERVER_VAR: &str = "BERTH_TEST_POSTGRES_URL";

/// The variable that moves the suites written for both databases onto
/// PostgreSQL: `BERTH_TEST_STORE=postgres` (`scripts/test` runs them once
/// each way).
pub const TEST_STORE_VAR: &str = "BERTH_TEST_STORE";

/// The test suites' PostgreSQL server, if there is one. Under `CI=true`
/// there must be: an error, never a silent skip.
pub fn test_server() -> anyhow::Result<Option<String>> {
    match std::env::var(TEST_SERVER_VAR) {
        Ok(url) if !url.is_empty() => Ok(Some(url)),
        _ if std::env::var("CI").as_deref() == Ok("true") => Err(anyhow::anyhow!(
            "{TEST_SERVER_VAR} is not set: under CI=true the PostgreSQL suites must run"
        )),
        _ => Ok(None),
    }
}

/// Where a test's store goes: a fresh PostgreSQL database under
/// `BERTH_TEST_STORE=postgres`, else the SQLite file `file`.
pub async fn test_location(file: &std::path::Path) -> anyhow::Result<crate::Location> {
    match std::env::var(TEST_STORE_VAR).as_deref() {
        Ok("postgres") => {
            let server = test_server()?.with_context(|| {
                format!("{TEST_STORE_VAR}=postgres needs {TEST_SERVER_VAR}, the server to use")
            })?;
            Ok(crate::Location::Postgres(fresh_database(&server).await?))
        }
        Ok("") | Ok("sqlite") | Err(_) => Ok(crate::Location::File(file.to_owned())),
        Ok(other) => anyhow::bail!("{TEST_STORE_VAR}={other}: expected sqlite or postgres"),
    }
}

/// Runs every statement of `script` on `conn`, in order, with its
/// parameters renumbered for PostgreSQL; returns every row, owned and read
/// like SQLite's (integers of any width as integers, booleans as 0 or 1).
pub(crate) async fn run_script(
    conn: &mut PgConnection,
    script: crate::ops::Script,
) -> anyhow::Result<Vec<crate::Row>> {
    use crate::ops::Arg;
    let (stmts, args) = script.into_parts();
    let mut args = args.into_iter();
    let mut rows = Vec::new();
    for (sql, n) in &stmts {
        let sql = crate::dialect::to_postgres(sql);
        let mut q = sqlx::query(&sql);
        for a in args.by_ref().take(*n) {
            q = match a {
                Arg::Text(t) => q.bind(t),
                Arg::Int(i) => q.bind(i),
                Arg::Blob(b) => q.bind(b),
                Arg::Null => q.bind(Untyped),
                Arg::NullText => q.bind(None::<String>),
                Arg::NullInt => q.bind(None::<i64>),
                Arg::NullBlob => q.bind(None::<Vec<u8>>),
            };
        }
        for r in q.fetch_all(&mut *conn).await? {
            // A function called for its effect (a lock, a notification)
            // returns `void`: no row to the caller, as the statement would
            // be on SQLite.
            if is_void(&r) {
                continue;
            }
            rows.push(owned(&r)?);
        }
    }
    Ok(rows)
}

/// A NULL parameter of no declared type: the server infers it from where
/// it stands, as it does for SQLite's untyped NULL.
struct Untyped;

impl sqlx::Type<sqlx::Postgres> for Untyped {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        // Oid 0: "unspecified" in the protocol's Parse message.
        sqlx::postgres::PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for Untyped {
    fn encode_by_ref(
        &self,
        _buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

/// Whether the row is one `void` value.
fn is_void(r: &sqlx::postgres::PgRow) -> bool {
    use sqlx::{Column, Row, TypeInfo};
    matches!(r.columns(), [c] if c.type_info().name() == "VOID")
}

/// A PostgreSQL row as the owned values a SQLite row gives.
fn owned(r: &sqlx::postgres::PgRow) -> anyhow::Result<crate::Row> {
    use rusqlite::types::Value;
    use sqlx::{Column, Row, TypeInfo, ValueRef};
    let mut values = Vec::with_capacity(r.len());
    for (i, col) in r.columns().iter().enumerate() {
        if r.try_get_raw(i)?.is_null() {
            values.push(Value::Null);
            continue;
        }
        values.push(match col.type_info().name() {
            "INT8" => Value::Integer(r.try_get::<i64, _>(i)?),
            "INT4" => Value::Integer(i64::from(r.try_get::<i32, _>(i)?)),
            "INT2" => Value::Integer(i64::from(r.try_get::<i16, _>(i)?)),
            "BOOL" => Value::Integer(i64::from(r.try_get::<bool, _>(i)?)),
            "FLOAT4" | "FLOAT8" => Value::Real(r.try_get::<f64, _>(i)?),
            "BYTEA" => Value::Blob(r.try_get::<Vec<u8>, _>(i)?),
            "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" | "UNKNOWN" => {
                Value::Text(r.try_get::<String, _>(i)?)
            }
            other => anyhow::bail!(
                "column {} of a result row has PostgreSQL type {other}, which the store does not read",
                col.name()
            ),
        });
    }
    Ok(crate::Row::new(values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_database_keeps_the_server_and_the_parameters() {
        assert_eq!(
            with_database(
                "postgres://u:p@127.0.0.1:5432/postgres?sslmode=disable",
                "berth_1"
            ),
            "postgres://u:p@127.0.0.1:5432/berth_1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://127.0.0.1:5432", "berth_1"),
            "postgres://127.0.0.1:5432/berth_1"
        );
    }

    #[test]
    fn messages_never_show_the_password() {
        assert_eq!(
            redact("postgres://berth:hunter2@db:5432/b"),
            "postgres://berth:***@db:5432/b"
        );
        assert_eq!(redact("postgres://db/b"), "postgres://db/b");
        assert!(is_postgres_url("postgresql://db/b") && !is_postgres_url("/var/lib/berth.db"));
    }

    /// The server the PostgreSQL tests make databases on, if there is one
    /// (a failure under `CI=true` when there is none).
    fn server() -> Option<String> {
        let server = test_server().unwrap();
        if server.is_none() {
            eprintln!("skipped: {TEST_SERVER_VAR} is not set");
        }
        server
    }

    /// The store's own statement builders run on PostgreSQL as written for
    /// SQLite: events with and without their optional columns, deliveries,
    /// a claim with its `RETURNING` rows and the due row after it.
    #[tokio::test]
    async fn a_script_runs_on_postgres_and_reads_back_as_on_sqlite() {
        use std::sync::Arc;

        use berth_core::{Clock, Envelope, IdGen, SeededRng, SystemClock, Timestamp};

        use crate::ops::{Arg, Script};
        use crate::{Lease, NewDelivery, RowRead};

        let Some(server) = server() else { return };
        let url = fresh_database(&server).await.unwrap();
        migrate(&url).await.unwrap();
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let ids = IdGen::new(clock, Arc::new(SeededRng::new(7)));
        let at = Timestamp::from_micros(1_000_000);
        let env = |org: Option<&str>, not_before: Option<Timestamp>| Envelope {
            id: ids.event_id(),
            event_type: "test.ping".into(),
            version: 1,
            org_id: org.map(str::to_owned),
            subject: None,
            flow_id: ids.flow_id(),
            causation_id: None,
            attempt: 0,
            created_at: at,
            not_before,
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        };
        let (a, b) = (
            env(Some("o1"), None),
            env(None, Some(at.plus(Duration::from_secs(5)))),
        );
        let mut s = Script::new();
        s.insert_events(&[&a, &b]);
        s.insert_deliveries(&[a.id, b.id].map(|id| NewDelivery {
            event_id: id,
            worker: Arc::from("w"),
            round: 0,
            attempt: 0,
            not_before: if id == a.id {
                at
            } else {
                at.plus(Duration::from_secs(5))
            },
            lease: None,
        }));
        s.claim(
            "w",
            &Lease {
                owner: Arc::from("p1"),
                leased_at: at,
                until: at.plus(Duration::from_secs(30)),
            },
            10,
        );
        let rows = run_script(&mut conn, s).await.unwrap();
        // The claim took the due delivery only, and the due row names the
        // other one's time.
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert_eq!(rows[0].text(0).unwrap(), "claim");
        assert_eq!(rows[0].text(2).unwrap(), a.id.to_string());
        assert_eq!(rows[0].int(4).unwrap(), 1, "attempt 1");
        assert_eq!(rows[1].text(0).unwrap(), "due");
        assert_eq!(
            rows[1].opt_int(2).unwrap(),
            Some(at.as_micros() + 5_000_000)
        );
        let mut s = Script::new();
        s.push(
            "SELECT org_id, not_before, not_before IS NULL, COUNT(*) OVER () FROM events
              WHERE id = ? OR id = ? ORDER BY id",
            [Arg::from(a.id), Arg::from(b.id)],
        );
        let rows = run_script(&mut conn, s).await.unwrap();
        assert_eq!(rows[0].opt_text(0).unwrap().as_deref(), Some("o1"));
        assert_eq!(rows[0].opt_int(1).unwrap(), None);
        assert_eq!(rows[0].int(2).unwrap(), 1, "a boolean reads as 1");
        assert_eq!(rows[1].opt_text(0).unwrap(), None);
        assert_eq!(rows[1].int(2).unwrap(), 0);
        assert_eq!(rows[1].int(3).unwrap(), 2);
        conn.close().await.unwrap();
        drop_database(&server, &url).await.unwrap();
    }
}
