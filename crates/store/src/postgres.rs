//! PostgreSQL, the store's second database (in progress; see
//! ARCHITECTURE.md): connecting with its migrations applied, a fresh
//! database for a test or a benchmark run, and the raw single-row commit
//! rate the bus benchmark compares itself with. The queries themselves
//! are to be shared with SQLite through `ops::Script`.

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

fn options(url: &str) -> anyhow::Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .with_context(|| format!("'{}' is not a PostgreSQL URL", redact(url)))?
        .disable_statement_logging())
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
}
