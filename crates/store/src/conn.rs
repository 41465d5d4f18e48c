//! A connection to whichever database the store is on. Every query goes
//! through [`crate::ops::Script::run`] on a [`Conn`], which sends it to
//! SQLite through sqlx or to PostgreSQL through [`crate::postgres`]; the
//! rest of the store never matches on the database (except where SQL must
//! differ: see [`Dialect`]).

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, Postgres, Sqlite, SqliteConnection};

/// Which SQL the database speaks, for the few statements that cannot be
/// written once (marked `SQLite only:` where they are chosen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    #[default]
    Sqlite,
    Postgres,
}

/// A borrowed connection (pooled, dedicated, or inside a transaction).
pub(crate) enum Conn<'c> {
    Sqlite(&'c mut SqliteConnection),
    Postgres(&'c mut PgConnection),
}

impl Conn<'_> {
    pub(crate) fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }
}

/// A connection taken from the store's pool, back to it when dropped.
pub(crate) enum Pooled {
    Sqlite(PoolConnection<Sqlite>),
    Postgres(PoolConnection<Postgres>),
}

impl Pooled {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Sqlite(c) => Conn::Sqlite(c),
            Pooled::Postgres(c) => Conn::Postgres(c),
        }
    }
}

/// A connection outside the pool (the dispatcher's reader).
pub(crate) enum Owned {
    Sqlite(SqliteConnection),
    Postgres(PgConnection),
}

impl Owned {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Owned::Sqlite(c) => Conn::Sqlite(c),
            Owned::Postgres(c) => Conn::Postgres(c),
        }
    }
}

/// An open write transaction; rolled back when dropped.
pub(crate) enum Transaction {
    Sqlite(sqlx::Transaction<'static, Sqlite>),
    Postgres(sqlx::Transaction<'static, Postgres>),
}

impl Transaction {
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Transaction::Sqlite(t) => Conn::Sqlite(t),
            Transaction::Postgres(t) => Conn::Postgres(t),
        }
    }

    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Transaction::Sqlite(t) => t.commit().await,
            Transaction::Postgres(t) => t.commit().await,
        }
    }
}
