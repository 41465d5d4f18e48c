//! Berth's durable state on SQLite: the event log (which is also the outbox),
//! deliveries with durable attempt counts, attempt history, per-worker inboxes
//! and dead letters.
//!
//! The API is dialect-neutral (ids as text, times as microseconds, bulk writes
//! as one JSON parameter); the SQL lives in per-dialect modules so PostgreSQL
//! can sit behind the same API.

pub mod baseline;
pub mod builds;
mod cache;
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

pub use model::*;
pub use store::{Cause, Published, Redrive, Store, StoreOptions, Synchronous, Tx, publish};
pub use writer::{Row, RowRead, Writer};

/// Errors from the store. Kept as one opaque type with context: callers
/// decide retry-or-not by the operation, not by inspecting SQL errors.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;
