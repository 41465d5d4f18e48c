//! The PostgreSQL migrations make the schema the SQLite ones make: the same
//! tables, columns (in order, with corresponding types and nullability)
//! and indexes, so that one set of queries serves both. Against the real
//! server `scripts/test` starts (`BERTH_TEST_POSTGRES_URL`); without one the
//! test is skipped, except under `CI=true`, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_store::{RowRead, Store, StoreOptions};
use sqlx::{Connection, PgConnection};

/// The server to make databases on, if there is one.
fn server() -> Option<String> {
    match std::env::var("BERTH_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "BERTH_TEST_POSTGRES_URL is not set: under CI=true the PostgreSQL suites must run"
            );
            eprintln!("skipped: BERTH_TEST_POSTGRES_URL is not set");
            None
        }
    }
}

/// (table, column, type, not null) in table then column order.
type Columns = Vec<(String, String, String, bool)>;

async fn sqlite_schema() -> (Columns, BTreeSet<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ids = Arc::new(IdGen::new(clock.clone(), Arc::new(SeededRng::new(1))));
    let store = Store::open(
        &dir.path().join("t.db"),
        StoreOptions::default(),
        clock,
        ids,
    )
    .await
    .unwrap();
    let rows = store
        .inspect()
        .rows(
            "SELECT m.name, p.name, p.type, p.\"notnull\", p.pk
               FROM sqlite_master m JOIN pragma_table_info(m.name) p
              WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'
              ORDER BY m.name, p.cid",
            [],
        )
        .await
        .unwrap();
    let columns = rows
        .iter()
        .map(|r| {
            let ty = match r.text(2).unwrap().as_str() {
                "INTEGER" => "bigint",
                "TEXT" => "text",
                "BLOB" => "bytea",
                other => panic!("a SQLite type this test does not map: {other}"),
            };
            // A primary key column is never NULL on PostgreSQL; SQLite's
            // table_info says so only when it is declared.
            let not_null = r.int(3).unwrap() != 0 || r.int(4).unwrap() != 0;
            (
                r.text(0).unwrap(),
                r.text(1).unwrap(),
                ty.to_owned(),
                not_null,
            )
        })
        .collect();
    let indexes = store
        .inspect()
        .rows(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL",
            [],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.text(0).unwrap())
        .collect();
    store.close().await;
    (columns, indexes, dir)
}

async fn postgres_schema(url: &str) -> (Columns, BTreeSet<String>) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let columns: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text, is_nullable::text
           FROM information_schema.columns WHERE table_schema = 'public'
          ORDER BY table_name, ordinal_position",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'public'
            AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    (
        columns
            .into_iter()
            .map(|(t, c, ty, nullable)| (t, c, ty, nullable == "NO"))
            .collect(),
        indexes.into_iter().collect(),
    )
}

#[tokio::test]
async fn the_postgres_migrations_make_the_sqlite_schema() {
    let Some(server) = server() else { return };
    let url = berth_store::postgres::fresh_database(&server)
        .await
        .unwrap();
    berth_store::postgres::migrate(&url).await.unwrap();
    // A second start finds every migration applied and changes nothing.
    berth_store::postgres::migrate(&url).await.unwrap();
    let (pg_columns, pg_indexes) = postgres_schema(&url).await;
    let (sqlite_columns, sqlite_indexes, _dir) = sqlite_schema().await;
    berth_store::postgres::drop_database(&server, &url)
        .await
        .unwrap();
    assert!(pg_columns.len() > 60, "{pg_columns:?}");
    let only_pg: Vec<_> = pg_columns
        .iter()
        .filter(|c| !sqlite_columns.contains(c))
        .collect();
    let only_sqlite: Vec<_> = sqlite_columns
        .iter()
        .filter(|c| !pg_columns.contains(c))
        .collect();
    assert!(
        only_pg.is_empty() && only_sqlite.is_empty(),
        "columns differ: PostgreSQL has {only_pg:?}, SQLite has {only_sqlite:?}"
    );
    assert_eq!(
        pg_columns, sqlite_columns,
        "the same columns, in another order"
    );
    assert_eq!(pg_indexes, sqlite_indexes);
}

#[tokio::test]
async fn processes_starting_together_migrate_once() {
    let Some(server) = server() else { return };
    let url = berth_store::postgres::fresh_database(&server)
        .await
        .unwrap();
    // Four processes' worth of starts at once: the advisory lock lets one
    // apply each migration; the others wait, then find it applied.
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { berth_store::postgres::migrate(&url).await })
        })
        .collect();
    for s in starts {
        s.await.unwrap().unwrap();
    }
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY 1")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let installs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM install")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    berth_store::postgres::drop_database(&server, &url)
        .await
        .unwrap();
    assert_eq!(versions, (1..=7).collect::<Vec<i64>>());
    assert_eq!(installs, 1, "one install id, made once");
}
