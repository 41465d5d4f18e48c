//! The dispatcher's reads outside its turn's transaction, on a connection of
//! its own ([`super::Conns::read`]): all in one place, so that they can move
//! behind the store's methods together.

use std::collections::HashSet;

use berth_core::{Envelope, EventId};
use berth_store::ops;
use berth_store::sqlx::SqliteConnection;

pub(super) struct Reads {
    conn: SqliteConnection,
}

impl Reads {
    pub(super) fn new(conn: SqliteConnection) -> Self {
        Reads { conn }
    }

    /// Those of `ids` already in the event log.
    pub(super) async fn known_events(
        &mut self,
        ids: &[EventId],
    ) -> anyhow::Result<HashSet<EventId>> {
        ops::known_events(&mut self.conn, ids).await
    }

    /// The events of `ids` that are in the log.
    pub(super) async fn load_events(&mut self, ids: &[EventId]) -> anyhow::Result<Vec<Envelope>> {
        ops::load_events(&mut self.conn, ids).await
    }

    /// Those of `ids` already in `worker`'s inbox.
    pub(super) async fn inbox_hits(
        &mut self,
        worker: &str,
        ids: &[EventId],
    ) -> anyhow::Result<HashSet<EventId>> {
        ops::inbox_hits(&mut self.conn, worker, ids).await
    }
}
