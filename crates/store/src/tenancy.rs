//! Tenancy and the API's read side: orgs, their tokens (stored hashed), the
//! admin token's hash, an org's slice of the event log after a cursor (the
//! event stream), and the aggregates `/metrics` reads. Callers hash tokens;
//! the store only ever sees and compares hashes.

use std::collections::HashMap;
use std::time::Duration;

use crate::conn::Conn;
use anyhow::Context;
use berth_core::{Envelope, EventId, Timestamp};
use serde::Serialize;

use crate::ops::{self, fetch};
use crate::writer::{Row, RowRead};
use crate::{Store, Tx};

/// An org (tenant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
}

/// A token of an org, without its secret (which is never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub org_id: String,
    pub created_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// An org refused because the name is in use.
#[derive(Debug, thiserror::Error)]
#[error("an org named '{0}' already exists")]
pub struct OrgNameTaken(pub String);

/// Creates an org and its first token (by hash) together, so that an org
/// never exists without a way in. Fails with [`OrgNameTaken`] on a
/// duplicate name.
pub(crate) async fn create_org(
    conn: &mut Conn<'_>,
    org: &Org,
    token_id: &str,
    token_hash: &str,
) -> anyhow::Result<()> {
    let r = fetch(
        conn,
        "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)",
        [
            org.id.as_str().into(),
            org.name.as_str().into(),
            org.created_at.into(),
        ],
    )
    .await;
    match r {
        Ok(_) => {}
        Err(e) if crate::writer::is_any_unique_violation(&e) => {
            return Err(OrgNameTaken(org.name.clone()).into());
        }
        Err(e) => return Err(e.context("failed to create the org")),
    }
    insert_token(conn, token_id, &org.id, token_hash, org.created_at).await
}

pub(crate) async fn get_org(conn: &mut Conn<'_>, id: &str) -> anyhow::Result<Option<Org>> {
    let rows = fetch(
        conn,
        "SELECT id, name, created_at FROM orgs WHERE id = ?1",
        [id.into()],
    )
    .await
    .context("failed to read the org")?;
    rows.first()
        .map(|r| {
            Ok(Org {
                id: r.text(0)?,
                name: r.text(1)?,
                created_at: Timestamp::from_micros(r.int(2)?),
            })
        })
        .transpose()
}

pub(crate) async fn insert_token(
    conn: &mut Conn<'_>,
    id: &str,
    org: &str,
    hash: &str,
    at: Timestamp,
) -> anyhow::Result<()> {
    fetch(
        conn,
        "INSERT INTO tokens (id, org_id, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
        [id.into(), org.into(), hash.into(), at.into()],
    )
    .await
    .context("failed to record the token")?;
    Ok(())
}

/// The (org id, token id) of a live token with this hash; `None` for an
/// unknown or revoked one.
pub(crate) async fn token_by_hash(
    conn: &mut Conn<'_>,
    hash: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let rows = fetch(
        conn,
        "SELECT org_id, id FROM tokens WHERE hash = ?1 AND revoked_at IS NULL",
        [hash.into()],
    )
    .await
    .context("failed to look the token up")?;
    rows.first()
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .transpose()
}

fn token_from_row(r: &Row) -> anyhow::Result<TokenInfo> {
    Ok(TokenInfo {
        id: r.text(0)?,
        org_id: r.text(1)?,
        created_at: Timestamp::from_micros(r.int(2)?),
        revoked_at: r.opt_int(3)?.map(Timestamp::from_micros),
    })
}

/// Every token of an org, oldest first, revoked ones included.
pub(crate) async fn tokens(conn: &mut Conn<'_>, org: &str) -> anyhow::Result<Vec<TokenInfo>> {
    let rows = fetch(
        conn,
        "SELECT id, org_id, created_at, revoked_at FROM tokens WHERE org_id = ?1
          ORDER BY created_at, id",
        [org.into()],
    )
    .await
    .context("failed to list tokens")?;
    rows.iter().map(token_from_row).collect()
}

/// Revokes a token of `org`. `None` if the org has no such token; the
/// token as it now is otherwise (revoking twice keeps the first time).
pub(crate) async fn revoke_token(
    conn: &mut Conn<'_>,
    org: &str,
    id: &str,
    at: Timestamp,
) -> anyhow::Result<Option<TokenInfo>> {
    fetch(
        conn,
        "UPDATE tokens SET revoked_at = ?3 WHERE id = ?1 AND org_id = ?2 AND revoked_at IS NULL",
        [id.into(), org.into(), at.into()],
    )
    .await
    .context("failed to revoke the token")?;
    let rows = fetch(
        conn,
        "SELECT id, org_id, created_at, revoked_at FROM tokens WHERE id = ?1 AND org_id = ?2",
        [id.into(), org.into()],
    )
    .await
    .context("failed to read the token")?;
    rows.first().map(token_from_row).transpose()
}

/// The stored admin token hash, if one was generated.
pub(crate) async fn admin_token_hash(conn: &mut Conn<'_>) -> anyhow::Result<Option<String>> {
    let rows = fetch(conn, "SELECT hash FROM admin_token WHERE id = 1", [])
        .await
        .context("failed to read the admin token")?;
    rows.first().map(|r| r.text(0)).transpose()
}

/// Stores a generated admin token's hash unless one is there already;
/// `true` if this call stored it (so its token is the one to print).
pub(crate) async fn init_admin_token(
    conn: &mut Conn<'_>,
    hash: &str,
    at: Timestamp,
) -> anyhow::Result<bool> {
    let done = fetch(
        conn,
        "INSERT INTO admin_token (id, hash, created_at) VALUES (1, ?1, ?2)
         ON CONFLICT DO NOTHING RETURNING 1",
        [hash.into(), at.into()],
    )
    .await
    .context("failed to store the admin token")?;
    Ok(done.len() == 1)
}

/// The position of the newest event in the log (0 when empty).
pub(crate) async fn last_seq(conn: &mut Conn<'_>) -> anyhow::Result<i64> {
    let rows = fetch(conn, "SELECT COALESCE(MAX(seq), 0) FROM events", [])
        .await
        .context("failed to read the end of the event log")?;
    rows.first().context("no row from MAX(seq)")?.int(0)
}

/// The log position of event `id` if it belongs to `org`.
pub(crate) async fn event_seq_in_org(
    conn: &mut Conn<'_>,
    org: &str,
    id: EventId,
) -> anyhow::Result<Option<i64>> {
    let rows = fetch(
        conn,
        "SELECT seq FROM events WHERE id = ?1 AND org_id = ?2",
        [id.into(), org.into()],
    )
    .await
    .context("failed to find the event")?;
    rows.first().map(|r| r.int(0)).transpose()
}

/// Up to `limit` events of `org` after log position `after`, in log order,
/// each with its position (the stream's cursor).
pub(crate) async fn org_events_after(
    conn: &mut Conn<'_>,
    org: &str,
    after: i64,
    limit: u32,
) -> anyhow::Result<Vec<(i64, Envelope)>> {
    let rows = fetch(
        conn,
        "SELECT seq, id FROM events WHERE org_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
        [org.into(), after.into(), limit.into()],
    )
    .await
    .context("failed to read the org's events")?;
    let mut order: Vec<(i64, EventId)> = Vec::with_capacity(rows.len());
    for r in &rows {
        let id = r.text(1)?;
        let id: EventId = id
            .parse()
            .with_context(|| format!("corrupt event id '{id}' in the store"))?;
        order.push((r.int(0)?, id));
    }
    let ids: Vec<EventId> = order.iter().map(|(_, id)| *id).collect();
    let mut by_id: HashMap<EventId, Envelope> = ops::load_events(conn, &ids)
        .await?
        .into_iter()
        .map(|e| (e.id, e))
        .collect();
    Ok(order
        .into_iter()
        .filter_map(|(seq, id)| by_id.remove(&id).map(|e| (seq, e)))
        .collect())
}

/// One finished attempt, as `/metrics` aggregates it.
#[derive(Debug, Clone)]
pub struct AttemptSample {
    /// Position in the attempt history (increasing in commit order: SQLite
    /// has one writer, so row ids are assigned in commit order).
    pub id: i64,
    pub worker: String,
    pub outcome: String,
    pub duration: Option<Duration>,
}

/// The newest attempt record's position (0 when none).
pub(crate) async fn last_attempt_id(conn: &mut Conn<'_>) -> anyhow::Result<i64> {
    let rows = fetch(conn, "SELECT COALESCE(MAX(id), 0) FROM attempts", [])
        .await
        .context("failed to read the attempt history")?;
    rows.first().context("no row from MAX(id)")?.int(0)
}

/// Up to `limit` attempt records after position `after`, in order.
pub(crate) async fn attempts_after(
    conn: &mut Conn<'_>,
    after: i64,
    limit: u32,
) -> anyhow::Result<Vec<AttemptSample>> {
    let rows = fetch(
        conn,
        "SELECT id, worker, outcome, duration_us FROM attempts WHERE id > ?1 ORDER BY id LIMIT ?2",
        [after.into(), limit.into()],
    )
    .await
    .context("failed to read the attempt history")?;
    rows.iter()
        .map(|r| {
            Ok(AttemptSample {
                id: r.int(0)?,
                worker: r.text(1)?,
                outcome: r.text(2)?,
                duration: r
                    .opt_int(3)?
                    .map(|us| Duration::from_micros(u64::try_from(us).unwrap_or(0))),
            })
        })
        .collect()
}

/// Open (not re-driven) dead letters per worker.
pub(crate) async fn open_dead_letters(conn: &mut Conn<'_>) -> anyhow::Result<Vec<(String, i64)>> {
    let rows = fetch(
        conn,
        "SELECT worker, COUNT(*) FROM dead_letters WHERE redriven_at IS NULL
          GROUP BY worker ORDER BY worker",
        [],
    )
    .await
    .context("failed to count dead letters")?;
    rows.iter().map(|r| Ok((r.text(0)?, r.int(1)?))).collect()
}

impl Store {
    /// The org `id`.
    pub async fn org(&self, id: &str) -> anyhow::Result<Option<Org>> {
        get_org(&mut self.read_conn().await?.conn(), id).await
    }

    /// Adds a token (by hash) to `org`.
    pub async fn insert_token(
        &self,
        id: &str,
        org: &str,
        hash: &str,
        at: Timestamp,
    ) -> anyhow::Result<()> {
        insert_token(&mut self.read_conn().await?.conn(), id, org, hash, at).await
    }

    /// The (org id, token id) a token hash belongs to, unless it is revoked.
    pub async fn token_by_hash(&self, hash: &str) -> anyhow::Result<Option<(String, String)>> {
        token_by_hash(&mut self.read_conn().await?.conn(), hash).await
    }

    /// Every token of `org`, revoked ones too, oldest first.
    pub async fn tokens(&self, org: &str) -> anyhow::Result<Vec<TokenInfo>> {
        tokens(&mut self.read_conn().await?.conn(), org).await
    }

    /// Revokes a token of `org`; `None` if `org` has no such token.
    pub async fn revoke_token(
        &self,
        org: &str,
        id: &str,
        at: Timestamp,
    ) -> anyhow::Result<Option<TokenInfo>> {
        revoke_token(&mut self.read_conn().await?.conn(), org, id, at).await
    }

    /// The stored admin token hash, if one was generated.
    pub async fn admin_token_hash(&self) -> anyhow::Result<Option<String>> {
        admin_token_hash(&mut self.read_conn().await?.conn()).await
    }

    /// Stores a generated admin token's hash unless one is there already;
    /// `true` if this call stored it.
    pub async fn init_admin_token(&self, hash: &str, at: Timestamp) -> anyhow::Result<bool> {
        init_admin_token(&mut self.read_conn().await?.conn(), hash, at).await
    }

    /// The position of the newest event in the log (0 when empty).
    pub async fn last_seq(&self) -> anyhow::Result<i64> {
        last_seq(&mut self.read_conn().await?.conn()).await
    }

    /// The log position of event `id` if it belongs to `org`.
    pub async fn event_seq_in_org(&self, org: &str, id: EventId) -> anyhow::Result<Option<i64>> {
        event_seq_in_org(&mut self.read_conn().await?.conn(), org, id).await
    }

    /// Up to `limit` events of `org` after log position `after`, in log
    /// order, each with its position.
    pub async fn org_events_after(
        &self,
        org: &str,
        after: i64,
        limit: u32,
    ) -> anyhow::Result<Vec<(i64, Envelope)>> {
        org_events_after(&mut self.read_conn().await?.conn(), org, after, limit).await
    }

    /// The newest attempt record's position (0 when none).
    pub async fn last_attempt_id(&self) -> anyhow::Result<i64> {
        last_attempt_id(&mut self.read_conn().await?.conn()).await
    }

    /// Up to `limit` attempt records after position `after`, in order.
    pub async fn attempts_after(
        &self,
        after: i64,
        limit: u32,
    ) -> anyhow::Result<Vec<AttemptSample>> {
        attempts_after(&mut self.read_conn().await?.conn(), after, limit).await
    }

    /// Open (not re-driven) dead letters per worker.
    pub async fn open_dead_letters(&self) -> anyhow::Result<Vec<(String, i64)>> {
        open_dead_letters(&mut self.read_conn().await?.conn()).await
    }
}

impl Tx {
    /// Creates an org and its first token (by hash) together; fails with
    /// [`OrgNameTaken`] on a duplicate name.
    pub async fn create_org(
        &mut self,
        org: &Org,
        token_id: &str,
        token_hash: &str,
    ) -> anyhow::Result<()> {
        create_org(&mut self.conn(), org, token_id, token_hash).await
    }
}

impl Store {
    /// Takes or renews the lease `name` for `owner` until `until`, if it is
    /// free, expired at `now`, or already `owner`'s: whether `owner` holds
    /// it now. One statement, so two processes asking at once cannot both
    /// get it (the second sees the first's row and its `until`).
    pub async fn hold_singleton(
        &self,
        name: &str,
        owner: &str,
        now: Timestamp,
        until: Timestamp,
    ) -> anyhow::Result<bool> {
        let rows = crate::ops::fetch(
            &mut self.read_conn().await?.conn(),
            "INSERT INTO singletons (name, owner, until) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until
              WHERE singletons.owner = excluded.owner OR singletons.until < ?4
             RETURNING owner",
            [name.into(), owner.into(), until.into(), now.into()],
        )
        .await
        .with_context(|| format!("failed to take the lease {name}"))?;
        Ok(!rows.is_empty())
    }

    /// Gives the lease `name` up, if `owner` holds it, so that another
    /// process takes it at once rather than when it expires.
    pub async fn release_singleton(&self, name: &str, owner: &str) -> anyhow::Result<()> {
        crate::ops::fetch(
            &mut self.read_conn().await?.conn(),
            "DELETE FROM singletons WHERE name = ? AND owner = ?",
            [name.into(), owner.into()],
        )
        .await
        .with_context(|| format!("failed to give up the lease {name}"))?;
        Ok(())
    }

    /// Who holds the lease `name`, and until when.
    pub async fn singleton_holder(
        &self,
        name: &str,
    ) -> anyhow::Result<Option<(String, Timestamp)>> {
        let rows = crate::ops::fetch(
            &mut self.read_conn().await?.conn(),
            "SELECT owner, until FROM singletons WHERE name = ?",
            [name.into()],
        )
        .await?;
        rows.first()
            .map(|r| Ok((r.text(0)?, Timestamp::from_micros(r.int(1)?))))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use berth_core::NewEvent;

    use super::*;
    use crate::{Cause, Store};

    use crate::store::tests::store;

    fn org(id: &str, s: &Store) -> Org {
        Org {
            id: id.into(),
            name: format!("{id}-name"),
            created_at: s.now(),
        }
    }

    #[tokio::test]
    async fn tokens_are_found_by_hash_until_revoked() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        create_org(&mut c, &org("a", &s), "t1", "h1").await.unwrap();
        create_org(&mut c, &org("a2", &s), "t9", "h9")
            .await
            .unwrap();
        let mut same = org("b", &s);
        same.name = "a-name".into();
        let err = create_org(&mut c, &same, "t2", "h2").await.unwrap_err();
        assert!(err.downcast_ref::<OrgNameTaken>().is_some());
        assert_eq!(
            token_by_hash(&mut c, "h1").await.unwrap(),
            Some(("a".into(), "t1".into()))
        );
        assert_eq!(token_by_hash(&mut c, "h2").await.unwrap(), None);
        assert!(
            revoke_token(&mut c, "a2", "t1", s.now())
                .await
                .unwrap()
                .is_none()
        );
        let t = revoke_token(&mut c, "a", "t1", s.now())
            .await
            .unwrap()
            .unwrap();
        assert!(t.revoked_at.is_some());
        assert_eq!(token_by_hash(&mut c, "h1").await.unwrap(), None);
        assert_eq!(tokens(&mut c, "a").await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_orgs_events_come_in_log_order_and_alone() {
        let (_d, s) = store().await;
        let mut envs = Vec::new();
        for (i, o) in ["a", "b", "a", "a"].iter().enumerate() {
            let e = NewEvent::with_type("test.thing", 1, &i).unwrap().org(*o);
            envs.push(s.stamp(
                e,
                Cause::Root {
                    flow_id: s.ids().flow_id(),
                },
            ));
        }
        s.publish(envs.clone()).await.unwrap();
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        let all = org_events_after(&mut c, "a", 0, 10).await.unwrap();
        let ids: Vec<_> = all.iter().map(|(_, e)| e.id).collect();
        assert_eq!(ids, [envs[0].id, envs[2].id, envs[3].id]);
        let after = event_seq_in_org(&mut c, "a", envs[2].id)
            .await
            .unwrap()
            .unwrap();
        let rest = org_events_after(&mut c, "a", after, 10).await.unwrap();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.id, envs[3].id);
        assert_eq!(
            event_seq_in_org(&mut c, "b", envs[2].id).await.unwrap(),
            None
        );
        assert_eq!(last_seq(&mut c).await.unwrap(), rest[0].0);
        assert_eq!(org_events_after(&mut c, "a", 0, 2).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn the_admin_token_is_stored_once() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        assert_eq!(admin_token_hash(&mut c).await.unwrap(), None);
        assert!(init_admin_token(&mut c, "x", s.now()).await.unwrap());
        assert!(!init_admin_token(&mut c, "y", s.now()).await.unwrap());
        assert_eq!(
            admin_token_hash(&mut c).await.unwrap().as_deref(),
            Some("x")
        );
    }

    /// A lease goes to one owner at a time, is renewed by its holder, and
    /// passes to another only once expired or given up.
    #[tokio::test]
    async fn a_singleton_lease_has_one_holder_until_it_expires() {
        let (_d, s) = store().await;
        let t = Timestamp::from_micros;
        assert!(
            s.hold_singleton("reconciler", "a", t(0), t(100))
                .await
                .unwrap()
        );
        assert!(
            !s.hold_singleton("reconciler", "b", t(50), t(150))
                .await
                .unwrap()
        );
        assert!(
            s.hold_singleton("reconciler", "a", t(60), t(160))
                .await
                .unwrap()
        );
        assert!(
            !s.hold_singleton("reconciler", "b", t(150), t(250))
                .await
                .unwrap()
        );
        assert_eq!(
            s.singleton_holder("reconciler").await.unwrap(),
            Some(("a".to_owned(), t(160)))
        );
        // Other names are other leases.
        assert!(
            s.hold_singleton("listener:h1", "b", t(150), t(250))
                .await
                .unwrap()
        );
        // Expired: the next asker takes it.
        assert!(
            s.hold_singleton("reconciler", "b", t(161), t(261))
                .await
                .unwrap()
        );
        assert!(
            !s.hold_singleton("reconciler", "a", t(170), t(270))
                .await
                .unwrap()
        );
        // Given up: at once, and only by its holder.
        s.release_singleton("reconciler", "a").await.unwrap();
        assert!(
            !s.hold_singleton("reconciler", "c", t(180), t(280))
                .await
                .unwrap()
        );
        s.release_singleton("reconciler", "b").await.unwrap();
        assert!(
            s.hold_singleton("reconciler", "c", t(181), t(281))
                .await
                .unwrap()
        );
    }
}
