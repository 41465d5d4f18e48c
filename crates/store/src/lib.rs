//! Berth's durable state on SQLite or PostgreSQL: the event log (which is also the outbox),
//! deliveries with durable attempt counts, attempt history, per-worker inboxes
//! and dead letters.
//!
//! The API is dialect-neutral (ids as text, times as microseconds, bulk writes
//! as one JSON parameter); the SQL lives in per-dialect modules so PostgreSQL
//! can sit behind the same API.

pub mod baseline;
pub mod builds;
mod cache;
mod conn;
mod dialect;
pub mod inspect;
pub mod instances;
mod migrate;
pub mod model;
pub mod ops;
pub mod postgres;
mod store;
pub mod tenancy;
pub mod writer;
pub mod writes;

pub use conn::Dialect;
pub use model::*;
pub use store::{Cause, Location, Published, Redrive, Store, StoreOptions, Synchronous, Tx};
pub use writer::{Row, RowRead, Writer};

/// Errors from the store. Kept as one opaque type with context: callers
/// decide retry-or-not by the operation, not by inspecting SQL errors.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// Whether `e` says the database cannot be reached right now (the pool is
/// closed or timed out, the connection broke, the server is shutting down
/// or not accepting connections), as opposed to a query it refused: the
/// API answers the first with 503 `store_unavailable`, to be retried.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let Some(err) = cause.downcast_ref::<sqlx::Error>() else {
            return false;
        };
        match err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => true,
            // PostgreSQL's connection exceptions (class 08) and its
            // shutdown and start-up refusals.
            sqlx::Error::Database(d) => d
                .code()
                .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
            _ => false,
        }
    })
}
