//! A small forward-only migration runner: each migration is an embedded SQL
//! file applied once, in order, in its own transaction, recorded in
//! `schema_migrations`. (sqlx's `migrate!` would pull in its proc-macro crate
//! for what is a dozen lines here.)

use anyhow::Context;
use sqlx::{Connection, SqliteConnection};

const SQLITE: &[(i64, &str, &str)] = &[
    (
        1,
        "event_log",
        include_str!("../migrations/sqlite/0001_event_log.sql"),
    ),
    (
        2,
        "instances",
        include_str!("../migrations/sqlite/0002_instances.sql"),
    ),
    (
        3,
        "tenancy",
        include_str!("../migrations/sqlite/0003_tenancy.sql"),
    ),
    (
        4,
        "install",
        include_str!("../migrations/sqlite/0004_install.sql"),
    ),
    (
        5,
        "builds",
        include_str!("../migrations/sqlite/0005_builds.sql"),
    ),
    (
        6,
        "instances_by_org",
        include_str!("../migrations/sqlite/0006_instances_by_org.sql"),
    ),
];

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
    let newest_known = SQLITE.last().map(|m| m.0).unwrap_or(0);
    if let Some(v) = applied.iter().find(|v| **v > newest_known) {
        anyhow::bail!(
            "the database has schema version {v}, newer than this build knows ({newest_known}); \
             run a newer berth or restore a backup"
        );
    }
    for (version, name, sql) in SQLITE {
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
