//! The peer the bus benchmark measures itself against in the same run: the
//! rate of single-row autocommit INSERTs on the same kind of database with
//! the store's own settings — what a bus that committed each event alone
//! could reach at best.

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::ConnectOptions;

use crate::Synchronous;

/// Single-row commits per second for about `run` on a fresh file at `path`
/// (created; the caller removes it).
pub async fn raw_commits_per_s(
    path: &Path,
    sync: Synchronous,
    run: Duration,
) -> anyhow::Result<f64> {
    let mut conn = sqlx::sqlite::SqliteConnectOptions::from_str("sqlite:")?
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .synchronous(match sync {
            Synchronous::Full => sqlx::sqlite::SqliteSynchronous::Full,
            Synchronous::Normal => sqlx::sqlite::SqliteSynchronous::Normal,
        })
        .disable_statement_logging()
        .connect()
        .await?;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .execute(&mut conn)
        .await?;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < run {
        sqlx::query("INSERT INTO t (v) VALUES ('x')")
            .execute(&mut conn)
            .await?;
        n += 1;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}
