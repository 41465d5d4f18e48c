//! A small forward-only migration runner: each migration is an embedded SQL
//! file applied once, in order, in its own transaction, recorded in
//! `schema_migrations`. (sqlx's `migrate!` would pull in its proc-macro crate
//! for what is a dozen lines here.)

use anyhow::Context;
use sqlx::{Connection, PgConnection, SqliteConnection};

/// Every migration, in order: its version, its name, and its text for each
/// database. One list, so that a migration cannot be added to one database
/// and forgotten for the other (a test compares the schemas they make).
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event_log",
        sqlite: include_str!("../migrations/sqlite/0001_event_log.sql"),
        postgres: include_str!("../migrations/postgres/0001_event_log.sql"),
    },
    Migration {
        version: 2,
        name: "instances",
        sqlite: include_str!("../migrations/sqlite/0002_instances.sql"),
        postgres: include_str!("../migrations/postgres/0002_instances.sql"),
    },
    Migration {
        version: 3,
        name: "tenancy",
        sqlite: include_str!("../migrations/sqlite/0003_tenancy.sql"),
        postgres: include_str!("../migrations/postgres/0003_tenancy.sql"),
    },
    Migration {
        version: 4,
        name: "install",
        sqlite: include_str!("../migrations/sqlite/0004_install.sql"),
        postgres: include_str!("../migrations/postgres/0004_install.sql"),
    },
    Migration {
        version: 5,
        name: "builds",
        sqlite: include_str!("../migrations/sqlite/0005_builds.sql"),
        postgres: include_str!("../migrations/postgres/0005_builds.sql"),
    },
    Migration {
        version: 6,
        name: "instances_by_org",
        sqlite: include_str!("../migrations/sqlite/0006_instances_by_org.sql"),
        postgres: include_str!("../migrations/postgres/0006_instances_by_org.sql"),
    },
    Migration {
        version: 7,
        name: "singletons",
        sqlite: include_str!("../migrations/sqlite/0007_singletons.sql"),
        postgres: include_str!("../migrations/postgres/0007_singletons.sql"),
    },
];

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

/// The newest version this build knows.
fn newest_known() -> i64 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}

fn refuse_newer(applied: &[i64]) -> anyhow::Result<()> {
    let newest = newest_known();
    if let Some(v) = applied.iter().find(|v| **v > newest) {
        anyhow::bail!(
            "the database has schema version {v}, newer than this build knows ({newest}); \
             run a newer berth or restore a backup"
        );
    }
    Ok(())
}

/// Applies the pending migrations to a SQLite database.
pub(crate) async fn run(conn: &mut SqliteConnection) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .context("failed to create schema_migrations")?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await
        .context("failed to read schema_migrations")?;
    refuse_newer(&applied)?;
    for Migration {
        version,
        name,
        sqlite: sql,
        ..
    } in MIGRATIONS
    {
        if applied.contains(version) {
            continue;
        }
        let mut tx = conn.begin().await?;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("migration {version} ({name}) failed"))?;
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, datetime('now'))",
        )
        .bind(version)
        .bind(name)
        .execute(&mut *tx)
        .await?;
        tx.commit()
            .await
            .with_context(|| format!("migration {version} ({name}) failed to commit"))?;
        tracing::info!(version, name, "applied migration");
    }
    Ok(())
}

/// A key for PostgreSQL's advisory lock that serialises migrations: any
/// number of processes may start on one database at once, and exactly one
/// applies each migration while the others wait, then see it applied.
const MIGRATION_LOCK: i64 = 0x6265_7274_685f_6d67; // "berth_mg"

/// Applies the pending migrations to a PostgreSQL database.
pub(crate) async fn run_postgres(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .context("failed to take the migration lock")?;
    let result = apply_postgres(conn).await;
    let unlocked = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .context("failed to release the migration lock");
    result.and(unlocked.map(|_| ()))
}

async fn apply_postgres(conn: &mut PgConnection) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .context("failed to create schema_migrations")?;
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations")
        .fetch_all(&mut *conn)
        .await
        .context("failed to read schema_migrations")?;
    refuse_newer(&applied)?;
    for m in MIGRATIONS {
        if applied.contains(&m.version) {
            continue;
        }
        let mut tx = conn.begin().await?;
        // Statement by statement: `raw_sql`'s future is not `Send` (sqlx
        // 0.8), and a process may migrate from a spawned task. The files
        // end each statement with `;` at the end of a line and have none
        // inside a string.
        for stmt in m.postgres.split(";\n").filter(|s| has_sql(s)) {
            sqlx::query(stmt)
                .execute(&mut *tx)
                .await
                .with_context(|| format!("migration {} ({}) failed", m.version, m.name))?;
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, now()::text)",
        )
        .bind(m.version)
        .bind(m.name)
        .execute(&mut *tx)
        .await?;
        tx.commit()
            .await
            .with_context(|| format!("migration {} ({}) failed to commit", m.version, m.name))?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(())
}

/// Whether a piece of a migration file holds a statement, not only
/// comments and blank lines.
fn has_sql(piece: &str) -> bool {
    piece
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with("--"))
}
