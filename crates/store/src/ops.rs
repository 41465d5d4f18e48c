//! The SQLite statements behind the store, each a bulk operation over many
//! rows passed as one JSON parameter (`json_each`). One fixed statement per
//! operation keeps sqlx's prepared-statement cache warm and turns a batch of a
//! thousand rows into one round trip to the connection's thread: this is what
//! makes group commit pay off.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use berth_core::{Envelope, ErrorInfo, EventId, FlowId, Timestamp};
use serde_json::value::RawValue;
use sqlx::{Row, SqliteConnection};

use crate::model::*;

fn parse_id<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    s.parse::<T>()
        .with_context(|| format!("corrupt {what} '{s}' in the store"))
}

fn us(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn from_us(v: i64) -> Duration {
    Duration::from_micros(u64::try_from(v).unwrap_or(0))
}

/// Appends envelopes to the event log, ignoring ids already present (the
/// dedupe), and returns the ids that were new.
pub async fn insert_events(
    conn: &mut SqliteConnection,
    envs: &[Envelope],
) -> anyhow::Result<HashSet<EventId>> {
    if envs.is_empty() {
        return Ok(HashSet::new());
    }
    let rows: Vec<_> = envs
        .iter()
        .map(|e| {
            (
                e.id,
                &e.event_type,
                e.version,
                &e.org_id,
                &e.subject,
                e.flow_id,
                e.causation_id,
                e.created_at.as_micros(),
                e.not_before.map(Timestamp::as_micros),
                e.payload.get(),
            )
        })
        .collect();
    let json = serde_json::to_string(&rows)?;
    let ids: Vec<String> = sqlx::query_scalar(
        "INSERT OR IGNORE INTO events
            (id, type, version, org_id, subject, flow_id, causation_id, created_at, not_before, payload)
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
                value->>7, value->>8, value->>9
         FROM json_each(?1)
         RETURNING id",
    )
    .bind(json)
    .fetch_all(&mut *conn)
    .await
    .context("failed to append to the event log")?;
    ids.iter().map(|s| parse_id(s, "event id")).collect()
}

/// Inserts delivery rows; returns `(delivery id, worker, event id)` for each.
pub async fn insert_deliveries(
    conn: &mut SqliteConnection,
    rows: &[NewDelivery],
) -> anyhow::Result<Vec<(i64, String, EventId)>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let json_rows: Vec<_> = rows
        .iter()
        .map(|d| {
            (
                d.event_id,
                &*d.worker,
                d.round,
                d.attempt,
                d.not_before.as_micros(),
                d.lease.as_ref().map(|l| &*l.owner),
                d.lease.as_ref().map(|l| l.leased_at.as_micros()),
                d.lease.as_ref().map(|l| l.until.as_micros()),
            )
        })
        .collect();
    let json = serde_json::to_string(&json_rows)?;
    let out = sqlx::query(
        "INSERT INTO deliveries
            (event_id, worker, round, attempt, not_before, lease_owner, leased_at, lease_until)
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, value->>7
         FROM json_each(?1)
         RETURNING id, worker, event_id",
    )
    .bind(json)
    .fetch_all(&mut *conn)
    .await
    .context("failed to insert deliveries")?;
    out.iter()
        .map(|r| {
            let id: i64 = r.try_get(0)?;
            let worker: String = r.try_get(1)?;
            let ev: String = r.try_get(2)?;
            Ok((id, worker, parse_id(&ev, "event id")?))
        })
        .collect()
}

/// Claims up to `limit` due deliveries of `worker`: counts the attempt and
/// takes a lease, in the caller's transaction.
pub async fn claim(
    conn: &mut SqliteConnection,
    worker: &Arc<str>,
    lease: &Lease,
    limit: usize,
) -> anyhow::Result<Vec<Claimed>> {
    let rows = sqlx::query(
        "UPDATE deliveries
            SET attempt = attempt + 1, lease_owner = ?1, leased_at = ?2, lease_until = ?3
          WHERE id IN (SELECT id FROM deliveries
                        WHERE worker = ?4 AND lease_owner IS NULL AND not_before <= ?2
                        ORDER BY not_before, id LIMIT ?5)
         RETURNING id, event_id, round, attempt",
    )
    .bind(&*lease.owner)
    .bind(lease.leased_at.as_micros())
    .bind(lease.until.as_micros())
    .bind(&**worker)
    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("failed to claim deliveries for worker '{worker}'"))?;
    rows.iter()
        .map(|r| {
            let ev: String = r.try_get(1)?;
            Ok(Claimed {
                delivery_id: r.try_get(0)?,
                event_id: parse_id(&ev, "event id")?,
                worker: worker.clone(),
                round: r.try_get(2)?,
                attempt: r.try_get(3)?,
            })
        })
        .collect()
}

/// The earliest `not_before` among `worker`'s unclaimed deliveries.
pub async fn next_due(
    conn: &mut SqliteConnection,
    worker: &str,
) -> anyhow::Result<Option<Timestamp>> {
    let v: Option<i64> = sqlx::query_scalar(
        "SELECT MIN(not_before) FROM deliveries WHERE worker = ?1 AND lease_owner IS NULL",
    )
    .bind(worker)
    .fetch_one(&mut *conn)
    .await
    .context("failed to read the next due delivery")?;
    Ok(v.map(Timestamp::from_micros))
}

const EVENT_COLUMNS: &str =
    "id, type, version, org_id, subject, flow_id, causation_id, created_at, not_before, payload";

fn envelope_from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Envelope> {
    let id: String = r.try_get(0)?;
    let flow: String = r.try_get(5)?;
    let cause: Option<String> = r.try_get(6)?;
    let payload: String = r.try_get(9)?;
    let id: EventId = parse_id(&id, "event id")?;
    Ok(Envelope {
        id,
        event_type: r.try_get(1)?,
        version: r.try_get(2)?,
        org_id: r.try_get(3)?,
        subject: r.try_get(4)?,
        flow_id: parse_id::<FlowId>(&flow, "flow id")?,
        causation_id: cause
            .as_deref()
            .map(|c| parse_id(c, "causation id"))
            .transpose()?,
        attempt: 0,
        created_at: Timestamp::from_micros(r.try_get(7)?),
        not_before: r.try_get::<Option<i64>, _>(8)?.map(Timestamp::from_micros),
        // The payload was valid JSON when written (it came from a RawValue),
        // but the file may have been edited; a bad one must reach the worker
        // as a malformed payload (dead-lettered with a reason), not vanish.
        payload: RawValue::from_string(payload)
            .or_else(|e| RawValue::from_string(serde_json::to_string(&format!("<unreadable: {e}>"))?))
            .with_context(|| format!("unreadable payload of event {id}"))?,
    })
}

/// Loads envelopes by id (order not preserved).
pub async fn load_events(
    conn: &mut SqliteConnection,
    ids: &[EventId],
) -> anyhow::Result<Vec<Envelope>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let json = serde_json::to_string(ids)?;
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE id IN (SELECT value FROM json_each(?1))"
    );
    let rows = sqlx::query(&sql)
        .bind(json)
        .fetch_all(&mut *conn)
        .await
        .context("failed to load events")?;
    rows.iter().map(envelope_from_row).collect()
}

/// All events of a flow, in log order.
pub async fn events_of_flow(
    conn: &mut SqliteConnection,
    flow: FlowId,
) -> anyhow::Result<Vec<Envelope>> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE flow_id = ?1 ORDER BY seq");
    let rows = sqlx::query(&sql)
        .bind(flow.to_string())
        .fetch_all(&mut *conn)
        .await
        .context("failed to load the flow's events")?;
    rows.iter().map(envelope_from_row).collect()
}

/// Which of `ids` are already in `worker`'s inbox.
pub async fn inbox_hits(
    conn: &mut SqliteConnection,
    worker: &str,
    ids: &[EventId],
) -> anyhow::Result<HashSet<EventId>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let json = serde_json::to_string(ids)?;
    let hits: Vec<String> = sqlx::query_scalar(
        "SELECT event_id FROM inbox
          WHERE worker = ?1 AND event_id IN (SELECT value FROM json_each(?2))",
    )
    .bind(worker)
    .bind(json)
    .fetch_all(&mut *conn)
    .await
    .context("failed to read the inbox")?;
    hits.iter().map(|s| parse_id(s, "event id")).collect()
}

/// Records `(worker, event id)` pairs as processed; returns how many were new.
pub async fn insert_inbox(
    conn: &mut SqliteConnection,
    rows: &[(&str, EventId)],
    at: Timestamp,
) -> anyhow::Result<u64> {
    if rows.is_empty() {
        return Ok(0);
    }
    let json = serde_json::to_string(rows)?;
    let done = sqlx::query(
        "INSERT OR IGNORE INTO inbox (worker, event_id, processed_at)
         SELECT value->>0, value->>1, ?2 FROM json_each(?1)",
    )
    .bind(json)
    .bind(at.as_micros())
    .execute(&mut *conn)
    .await
    .context("failed to write the inbox")?;
    Ok(done.rows_affected())
}

pub async fn insert_attempts(
    conn: &mut SqliteConnection,
    rows: &[AttemptRecord],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json_rows: Vec<_> = rows
        .iter()
        .map(|a| {
            (
                a.event_id,
                &a.worker,
                a.round,
                a.attempt,
                a.started_at.as_micros(),
                a.duration.map(us),
                a.outcome.as_str(),
                a.error
                    .as_ref()
                    .and_then(|e| serde_json::to_string(e).ok()),
                a.next_delay.map(us),
            )
        })
        .collect();
    let json = serde_json::to_string(&json_rows)?;
    sqlx::query(
        "INSERT INTO attempts
            (event_id, worker, round, attempt, started_at, duration_us, outcome, error, next_delay_us)
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
                value->>7, value->>8
         FROM json_each(?1)",
    )
    .bind(json)
    .execute(&mut *conn)
    .await
    .context("failed to record attempts")?;
    Ok(())
}

pub async fn delete_deliveries(conn: &mut SqliteConnection, ids: &[i64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_string(ids)?;
    sqlx::query("DELETE FROM deliveries WHERE id IN (SELECT value FROM json_each(?1))")
        .bind(json)
        .execute(&mut *conn)
        .await
        .context("failed to acknowledge deliveries")?;
    Ok(())
}

/// Releases leases and sets the next attempt's time: `(delivery id, not_before)`.
pub async fn reschedule(
    conn: &mut SqliteConnection,
    rows: &[(i64, Timestamp)],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json_rows: Vec<_> = rows.iter().map(|(id, t)| (id, t.as_micros())).collect();
    let json = serde_json::to_string(&json_rows)?;
    sqlx::query(
        "UPDATE deliveries
            SET lease_owner = NULL, leased_at = NULL, lease_until = NULL, not_before = j.value->>1
           FROM json_each(?1) AS j
          WHERE deliveries.id = j.value->>0",
    )
    .bind(json)
    .execute(&mut *conn)
    .await
    .context("failed to schedule retries")?;
    Ok(())
}

/// A dead letter to write.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub id: String,
    pub event_id: EventId,
    pub worker: String,
    pub round: u32,
    pub attempts: u32,
    pub reason: DeadReason,
    pub error: ErrorInfo,
    pub org_id: Option<String>,
    pub flow_id: FlowId,
    pub dead_at: Timestamp,
}

pub async fn insert_dead_letters(
    conn: &mut SqliteConnection,
    rows: &[NewDeadLetter],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json_rows: Vec<_> = rows
        .iter()
        .map(|d| {
            Ok((
                &d.id,
                d.event_id,
                &d.worker,
                d.round,
                d.attempts,
                d.reason.as_str(),
                serde_json::to_string(&d.error)?,
                &d.org_id,
                d.flow_id,
                d.dead_at.as_micros(),
            ))
        })
        .collect::<Result<_, serde_json::Error>>()?;
    let json = serde_json::to_string(&json_rows)?;
    sqlx::query(
        "INSERT INTO dead_letters
            (id, event_id, worker, round, attempts, reason, error, org_id, flow_id, dead_at)
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6,
                value->>7, value->>8, value->>9
         FROM json_each(?1)",
    )
    .bind(json)
    .execute(&mut *conn)
    .await
    .context("failed to write dead letters")?;
    Ok(())
}

/// Takes back leases — all of them at start-up of the only dispatcher on this
/// database, or those past `lease_until` otherwise — recording each lost
/// attempt as `abandoned`. The attempt count is kept: the attempt happened
/// (it may have had effects), so it counts toward `max_attempts`.
pub async fn release_leases(
    conn: &mut SqliteConnection,
    now: Timestamp,
    only_expired: bool,
) -> anyhow::Result<u64> {
    let filter = if only_expired {
        "lease_owner IS NOT NULL AND lease_until < ?1"
    } else {
        "lease_owner IS NOT NULL AND ?1 = ?1"
    };
    let lost = serde_json::to_string(&ErrorInfo::new(
        "attempt_abandoned",
        "the process running this attempt stopped before it finished",
    ))?;
    sqlx::query(&format!(
        "INSERT INTO attempts (event_id, worker, round, attempt, started_at, duration_us, outcome, error)
         SELECT event_id, worker, round, attempt, COALESCE(leased_at, ?1), NULL, 'abandoned', ?2
           FROM deliveries WHERE {filter}"
    ))
    .bind(now.as_micros())
    .bind(lost)
    .execute(&mut *conn)
    .await
    .context("failed to record abandoned attempts")?;
    let done = sqlx::query(&format!(
        "UPDATE deliveries SET lease_owner = NULL, leased_at = NULL, lease_until = NULL
          WHERE {filter}"
    ))
    .bind(now.as_micros())
    .execute(&mut *conn)
    .await
    .context("failed to release leases")?;
    Ok(done.rows_affected())
}

fn attempt_from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<AttemptRecord> {
    let ev: String = r.try_get(0)?;
    let outcome: String = r.try_get(6)?;
    let error: Option<String> = r.try_get(7)?;
    Ok(AttemptRecord {
        event_id: parse_id(&ev, "event id")?,
        worker: r.try_get(1)?,
        round: r.try_get(2)?,
        attempt: r.try_get(3)?,
        started_at: Timestamp::from_micros(r.try_get(4)?),
        duration: r.try_get::<Option<i64>, _>(5)?.map(from_us),
        outcome: outcome.parse()?,
        error: error
            .map(|e| serde_json::from_str(&e).context("corrupt error record in attempt history"))
            .transpose()?,
        next_delay: r.try_get::<Option<i64>, _>(8)?.map(from_us),
    })
}

const ATTEMPT_COLUMNS: &str =
    "event_id, worker, round, attempt, started_at, duration_us, outcome, error, next_delay_us";

/// Attempt history of one event, oldest first.
pub async fn attempts_of_event(
    conn: &mut SqliteConnection,
    event: EventId,
) -> anyhow::Result<Vec<AttemptRecord>> {
    let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM attempts WHERE event_id = ?1 ORDER BY id");
    let rows = sqlx::query(&sql)
        .bind(event.to_string())
        .fetch_all(&mut *conn)
        .await
        .context("failed to read attempt history")?;
    rows.iter().map(attempt_from_row).collect()
}

/// Attempt history of every event of a flow, oldest first.
pub async fn attempts_of_flow(
    conn: &mut SqliteConnection,
    flow: FlowId,
) -> anyhow::Result<Vec<AttemptRecord>> {
    let sql = format!(
        "SELECT {ATTEMPT_COLUMNS} FROM attempts
          WHERE event_id IN (SELECT id FROM events WHERE flow_id = ?1) ORDER BY id"
    );
    let rows = sqlx::query(&sql)
        .bind(flow.to_string())
        .fetch_all(&mut *conn)
        .await
        .context("failed to read the flow's attempt history")?;
    rows.iter().map(attempt_from_row).collect()
}

fn dead_letter_from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<DeadLetter> {
    let ev: String = r.try_get(1)?;
    let reason: String = r.try_get(6)?;
    let error: String = r.try_get(7)?;
    let flow: String = r.try_get(9)?;
    Ok(DeadLetter {
        id: r.try_get(0)?,
        event_id: parse_id(&ev, "event id")?,
        event_type: r.try_get(2)?,
        worker: r.try_get(3)?,
        round: r.try_get(4)?,
        attempts: r.try_get(5)?,
        reason: reason.parse()?,
        error: serde_json::from_str(&error).context("corrupt error record in dead letter")?,
        org_id: r.try_get(8)?,
        flow_id: parse_id(&flow, "flow id")?,
        dead_at: Timestamp::from_micros(r.try_get(10)?),
        redriven_at: r.try_get::<Option<i64>, _>(11)?.map(Timestamp::from_micros),
    })
}

const DEAD_COLUMNS: &str = "d.id, d.event_id, e.type, d.worker, d.round, d.attempts, d.reason, \
     d.error, d.org_id, d.flow_id, d.dead_at, d.redriven_at";

/// Dead letters, newest first; `open_only` hides re-driven ones.
pub async fn dead_letters(
    conn: &mut SqliteConnection,
    org: Option<&str>,
    open_only: bool,
    limit: u32,
) -> anyhow::Result<Vec<DeadLetter>> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM dead_letters d JOIN events e ON e.id = d.event_id
          WHERE (?1 IS NULL OR d.org_id = ?1) AND (?2 = 0 OR d.redriven_at IS NULL)
          ORDER BY d.dead_at DESC, d.id DESC LIMIT ?3"
    );
    let rows = sqlx::query(&sql)
        .bind(org)
        .bind(open_only)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await
        .context("failed to list dead letters")?;
    rows.iter().map(dead_letter_from_row).collect()
}

pub async fn dead_letter(
    conn: &mut SqliteConnection,
    id: &str,
) -> anyhow::Result<Option<DeadLetter>> {
    let sql = format!(
        "SELECT {DEAD_COLUMNS} FROM dead_letters d JOIN events e ON e.id = d.event_id WHERE d.id = ?1"
    );
    let row = sqlx::query(&sql)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .context("failed to read the dead letter")?;
    row.as_ref().map(dead_letter_from_row).transpose()
}

/// Marks a dead letter re-driven if it was not already; true if this call did.
pub async fn mark_redriven(
    conn: &mut SqliteConnection,
    id: &str,
    at: Timestamp,
) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE dead_letters SET redriven_at = ?2 WHERE id = ?1 AND redriven_at IS NULL",
    )
    .bind(id)
    .bind(at.as_micros())
    .execute(&mut *conn)
    .await
    .context("failed to mark the dead letter re-driven")?;
    Ok(done.rows_affected() == 1)
}

/// Number of deliveries waiting (unclaimed) and in flight (leased).
pub async fn queue_depth(conn: &mut SqliteConnection) -> anyhow::Result<(i64, i64)> {
    let row = sqlx::query(
        "SELECT COALESCE(SUM(lease_owner IS NULL), 0), COALESCE(SUM(lease_owner IS NOT NULL), 0)
           FROM deliveries",
    )
    .fetch_one(&mut *conn)
    .await
    .context("failed to count deliveries")?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}
