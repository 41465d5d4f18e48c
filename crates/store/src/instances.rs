//! Orgs, instances and host claims. Instance writes are guarded by
//! `version`: a worker reads the row, decides, and writes back only if no
//! one else wrote since — so a replayed or concurrent event changes nothing.

use std::collections::BTreeMap;

use anyhow::Context;
use berth_core::domain::{Conditions, InstanceError, InstanceName, InstanceStatus, RestartPolicy};
use berth_core::{FlowId, Timestamp};
use serde::{Deserialize, Serialize};
use sqlx::{Row, SqliteConnection};

use crate::writer::RowRead;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The base image by reference (`name[:tag]`, `name@sha256:…`); empty
    /// when the instance is made from a build context instead.
    #[serde(default)]
    pub image: String,
    /// The org's uploaded build context the image is built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRef>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default)]
    pub restart: RestartPolicy,
    /// The container's resource limits, resolved from the request and the
    /// configured defaults when the instance was created (a later change
    /// of defaults changes no existing instance). Rows from before limits
    /// existed have none and get the runtime's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceLimits>,
}

/// A build context named by an instance: its id and digest (the digest
/// names the shared image, so the reconciler needs no lookup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRef {
    pub id: String,
    pub digest: String,
}

/// Memory (bytes), CPU (billionths of a CPU) and process limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids: i64,
}

impl ResourceLimits {
    /// What a container gets when nothing says otherwise (`[limits]`'s
    /// defaults): 512MiB, one CPU, 512 processes.
    pub const DEFAULT: ResourceLimits = ResourceLimits {
        memory_bytes: 512 << 20,
        nano_cpus: 1_000_000_000,
        pids: 512,
    };
}

/// An instance row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub org_id: String,
    pub name: InstanceName,
    pub spec: InstanceSpec,
    pub status: InstanceStatus,
    pub version: i64,
    pub generation: i64,
    pub host: Option<String>,
    pub network: Option<String>,
    pub image_tag: Option<String>,
    pub container: Option<String>,
    pub ip: Option<String>,
    pub conditions: Conditions,
    pub error: Option<InstanceError>,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub restarts: i64,
    pub flow_id: FlowId,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// An insert refused because the org already has a live instance of that name.
#[derive(Debug, thiserror::Error)]
#[error("an instance named '{0}' already exists in this org")]
pub struct NameTaken(pub String);

pub(crate) const COLUMNS: &str = "id, org_id, name, spec, status, version, generation, host, network, \
     image_tag, container, ip, conditions, error, exit_code, oom_killed, restarts, flow_id, \
     created_at, updated_at";

fn from_row(r: &sqlx::sqlite::SqliteRow) -> anyhow::Result<Instance> {
    from_columns(r, 0)
}

/// The instance in [`COLUMNS`] order from column `at` of `r` on.
pub(crate) fn from_columns<R: RowRead>(r: &R, at: usize) -> anyhow::Result<Instance> {
    let name = r.text(at + 2)?;
    let spec = r.text(at + 3)?;
    let status = r.text(at + 4)?;
    let conditions = r.text(at + 12)?;
    let error = r.opt_text(at + 13)?;
    let flow = r.text(at + 17)?;
    Ok(Instance {
        id: r.text(at)?,
        org_id: r.text(at + 1)?,
        name: InstanceName::parse(&name).context("corrupt instance name in the store")?,
        spec: serde_json::from_str(&spec).context("corrupt instance spec in the store")?,
        status: status
            .parse()
            .context("corrupt instance status in the store")?,
        version: r.int(at + 5)?,
        generation: r.int(at + 6)?,
        host: r.opt_text(at + 7)?,
        network: r.opt_text(at + 8)?,
        image_tag: r.opt_text(at + 9)?,
        container: r.opt_text(at + 10)?,
        ip: r.opt_text(at + 11)?,
        conditions: serde_json::from_str(&conditions)
            .context("corrupt instance conditions in the store")?,
        error: error
            .map(|e| serde_json::from_str(&e))
            .transpose()
            .context("corrupt instance error in the store")?,
        exit_code: r.opt_int(at + 14)?,
        oom_killed: r.int(at + 15)? != 0,
        restarts: r.int(at + 16)?,
        flow_id: flow.parse().context("corrupt flow id in the store")?,
        created_at: Timestamp::from_micros(r.int(at + 18)?),
        updated_at: Timestamp::from_micros(r.int(at + 19)?),
    })
}

pub async fn insert_org(
    conn: &mut SqliteConnection,
    id: &str,
    name: &str,
    at: Timestamp,
) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)")
        .bind(id)
        .bind(name)
        .bind(at.as_micros())
        .execute(&mut *conn)
        .await
        .context("failed to create the org")?;
    Ok(())
}

/// The values of [`COLUMNS`] for `i`, in order.
pub(crate) fn insert_args(i: &Instance) -> anyhow::Result<Vec<crate::ops::Arg>> {
    use crate::ops::Arg;
    Ok([
        Arg::from(i.id.as_str()),
        Arg::from(i.org_id.as_str()),
        Arg::from(i.name.as_str()),
        Arg::Text(serde_json::to_string(&i.spec)?),
        Arg::from(i.status.as_str()),
        Arg::Int(i.version),
        Arg::Int(i.generation),
    ]
    .into_iter()
    .chain(state_args(i)?)
    .chain([
        Arg::Int(i.created_at.as_micros()),
        Arg::Int(i.updated_at.as_micros()),
    ])
    .collect())
}

/// The columns the flow changes, from `host` to `flow_id`, in table order.
pub(crate) fn state_args(i: &Instance) -> anyhow::Result<[crate::ops::Arg; 11]> {
    use crate::ops::Arg;
    Ok([
        Arg::from(i.host.as_deref()),
        Arg::from(i.network.as_deref()),
        Arg::from(i.image_tag.as_deref()),
        Arg::from(i.container.as_deref()),
        Arg::from(i.ip.as_deref()),
        Arg::Text(serde_json::to_string(&i.conditions)?),
        Arg::from(i.error.as_ref().map(serde_json::to_string).transpose()?),
        Arg::from(i.exit_code),
        Arg::Int(i64::from(i.oom_killed)),
        Arg::Int(i.restarts),
        Arg::Text(i.flow_id.to_string()),
    ])
}

/// Inserts a new instance; [`NameTaken`] if its org has a live one so named.
pub async fn insert(conn: &mut SqliteConnection, i: &Instance) -> anyhow::Result<()> {
    let mut script = crate::ops::Script::new();
    script.push(
        &format!(
            "INSERT INTO instances ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        ),
        insert_args(i)?,
    );
    match script.run(conn).await {
        Ok(_) => Ok(()),
        Err(e)
            if e.as_database_error()
                .is_some_and(|d| d.is_unique_violation()) =>
        {
            Err(NameTaken(i.name.to_string()).into())
        }
        Err(e) => Err(anyhow::Error::new(e).context("failed to insert the instance")),
    }
}

pub async fn get(conn: &mut SqliteConnection, id: &str) -> anyhow::Result<Option<Instance>> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM instances WHERE id = ?1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await
        .context("failed to read the instance")?;
    row.as_ref().map(from_row).transpose()
}

/// Every instance of an org (all of them when `org` is `None`), oldest first.
pub async fn list(conn: &mut SqliteConnection, org: Option<&str>) -> anyhow::Result<Vec<Instance>> {
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM instances WHERE (?1 IS NULL OR org_id = ?1) ORDER BY created_at, id"
    ))
    .bind(org)
    .fetch_all(&mut *conn)
    .await
    .context("failed to list instances")?;
    rows.iter().map(from_row).collect()
}

/// A page cursor that names no instance of the org.
#[derive(Debug, thiserror::Error)]
#[error("the cursor names no instance of this org")]
pub struct UnknownCursor;

/// What a page of the list is narrowed to.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListFilter<'a> {
    /// Include deleted instances (a `status` of `deleted` includes them too).
    pub deleted: bool,
    /// Only instances in this status.
    pub status: Option<InstanceStatus>,
    /// Only instances whose current step is backing off before a retry.
    pub retrying: bool,
    /// Only instances with this name.
    pub name: Option<&'a str>,
}

/// At most `limit` of an org's instances, oldest first (by creation time,
/// then id: a stable order), after the instance `after` if given, as
/// narrowed by `filter`. The cursor is looked up within the org alone,
/// so another org's id is [`UnknownCursor`] exactly like one that does not
/// exist.
pub async fn list_page(
    conn: &mut SqliteConnection,
    org: &str,
    after: Option<&str>,
    filter: ListFilter<'_>,
    limit: u32,
) -> anyhow::Result<Vec<Instance>> {
    let deleted = filter.deleted || filter.status == Some(InstanceStatus::Deleted);
    // "Backing off": a delivery of the instance's current flow that has
    // been attempted and is not running now, which is what the dispatcher
    // leaves after a failed attempt it will retry.
    let rows = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM instances
          WHERE org_id = ?1 AND (?2 OR status != 'deleted')
            AND (?3 IS NULL OR (created_at, id) >
                 (SELECT created_at, id FROM instances WHERE id = ?3 AND org_id = ?1))
            AND (?5 IS NULL OR status = ?5)
            AND (?6 IS NULL OR name = ?6)
            AND (NOT ?7 OR EXISTS (
                 SELECT 1 FROM events e JOIN deliveries d ON d.event_id = e.id
                  WHERE e.flow_id = instances.flow_id
                    AND d.attempt > 0 AND d.lease_owner IS NULL))
          ORDER BY created_at, id LIMIT ?4"
    ))
    .bind(org)
    .bind(deleted)
    .bind(after)
    .bind(limit)
    .bind(filter.status.map(InstanceStatus::as_str))
    .bind(filter.name)
    .bind(filter.retrying)
    .fetch_all(&mut *conn)
    .await
    .context("failed to list instances")?;
    if rows.is_empty()
        && let Some(cursor) = after
    {
        // An empty page: the end of the list, or a cursor naming nothing
        // (the comparison with no row matches none).
        let known: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM instances WHERE id = ?1 AND org_id = ?2")
                .bind(cursor)
                .bind(org)
                .fetch_optional(&mut *conn)
                .await
                .context("failed to read the cursor's instance")?;
        if known.is_none() {
            return Err(UnknownCursor.into());
        }
    }
    rows.iter().map(from_row).collect()
}

/// Where a flow in progress is: its newest pending delivery.
#[derive(Debug, Clone)]
pub struct FlowProgress {
    /// The worker (step) the delivery is for, e.g. `network.attach`.
    pub worker: String,
    /// Attempts started in this round (0: not yet started).
    pub attempts_started: u32,
    /// An attempt is running now (the delivery is leased).
    pub running: bool,
    /// When the delivery is due (the next attempt, while backing off).
    pub not_before: Timestamp,
    /// The error of the latest failed attempt of this round, if any.
    pub last_error: Option<berth_core::ErrorInfo>,
}

/// The progress of `flow`: `None` when none of its events awaits a worker.
pub async fn flow_progress(
    conn: &mut SqliteConnection,
    flow: FlowId,
) -> anyhow::Result<Option<FlowProgress>> {
    let row = sqlx::query(
        "SELECT d.worker, d.attempt, d.lease_owner IS NOT NULL, d.not_before, d.event_id, d.round
           FROM events e JOIN deliveries d ON d.event_id = e.id
          WHERE e.flow_id = ?1
          ORDER BY e.seq DESC, d.attempt DESC LIMIT 1",
    )
    .bind(flow.to_string())
    .fetch_optional(&mut *conn)
    .await
    .context("failed to read the flow's deliveries")?;
    let Some(row) = row else {
        return Ok(None);
    };
    let worker: String = row.try_get(0)?;
    let attempts_started: i64 = row.try_get(1)?;
    let event_id: String = row.try_get(4)?;
    let round: i64 = row.try_get(5)?;
    let error: Option<String> = sqlx::query_scalar(
        "SELECT error FROM attempts
          WHERE event_id = ?1 AND worker = ?2 AND round = ?3 AND error IS NOT NULL
          ORDER BY id DESC LIMIT 1",
    )
    .bind(&event_id)
    .bind(&worker)
    .bind(round)
    .fetch_optional(&mut *conn)
    .await
    .context("failed to read the flow's attempts")?;
    Ok(Some(FlowProgress {
        worker,
        attempts_started: u32::try_from(attempts_started).unwrap_or(0),
        running: row.try_get(2)?,
        not_before: Timestamp::from_micros(row.try_get(3)?),
        // A record this process cannot read is shown as no error rather
        // than failing the whole read.
        last_error: error.and_then(|e| serde_json::from_str(&e).ok()),
    }))
}

/// Writes `i` back if the row still has `i.version`; bumps the version.
/// `false` means someone else changed it first: re-read and decide again.
pub async fn update(
    conn: &mut SqliteConnection,
    i: &mut Instance,
    at: Timestamp,
) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE instances SET status = ?3, version = version + 1, generation = ?4, host = ?5,
                network = ?6, image_tag = ?7, container = ?8, ip = ?9, conditions = ?10,
                error = ?11, exit_code = ?12, oom_killed = ?13, restarts = ?14, flow_id = ?15,
                updated_at = ?16
          WHERE id = ?1 AND version = ?2",
    )
    .bind(&i.id)
    .bind(i.version)
    .bind(i.status.as_str())
    .bind(i.generation)
    .bind(&i.host)
    .bind(&i.network)
    .bind(&i.image_tag)
    .bind(&i.container)
    .bind(&i.ip)
    .bind(serde_json::to_string(&i.conditions)?)
    .bind(i.error.as_ref().map(serde_json::to_string).transpose()?)
    .bind(i.exit_code)
    .bind(i.oom_killed)
    .bind(i.restarts)
    .bind(i.flow_id.to_string())
    .bind(at.as_micros())
    .execute(&mut *conn)
    .await
    .context("failed to update the instance")?;
    if done.rows_affected() == 1 {
        i.version += 1;
        i.updated_at = at;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// Live (not deleted) instances of `org` on `host`, other than `except`.
/// How many instances of `org` are not deleted (what its quota counts).
pub async fn live_in_org(conn: &mut SqliteConnection, org: &str) -> anyhow::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM instances WHERE org_id = ?1 AND status != 'deleted'")
        .bind(org)
        .fetch_one(&mut *conn)
        .await
        .context("failed to count the org's instances")
}

pub async fn others_on_host(
    conn: &mut SqliteConnection,
    org: &str,
    host: &str,
    except: &str,
) -> anyhow::Result<i64> {
    count_on_host(
        conn,
        "status NOT IN ('deleted', 'failed', 'deleting')",
        (org, host, except),
    )
    .await
}

/// How many other instances of `org` on `host` are being deleted.
pub async fn deleting_on_host(
    conn: &mut SqliteConnection,
    org: &str,
    host: &str,
    except: &str,
) -> anyhow::Result<i64> {
    count_on_host(conn, "status = 'deleting'", (org, host, except)).await
}

/// Instances of an org on a host, other than one, whose status matches
/// `status` (a fixed SQL condition, never user input).
async fn count_on_host(
    conn: &mut SqliteConnection,
    status: &'static str,
    (org, host, except): (&str, &str, &str),
) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT COUNT(*) FROM instances
          WHERE org_id = ?1 AND host = ?2 AND id != ?3 AND {status}"
    );
    let n: i64 = sqlx::query_scalar(&sql)
        .bind(org)
        .bind(host)
        .bind(except)
        .fetch_one(&mut *conn)
        .await
        .context("failed to count the org's instances on a host")?;
    Ok(n)
}

/// host → orgs holding it.
pub async fn claims(conn: &mut SqliteConnection) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let rows = sqlx::query("SELECT host, org_id FROM host_claims ORDER BY host, org_id")
        .fetch_all(&mut *conn)
        .await
        .context("failed to read host claims")?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        out.entry(r.try_get(0)?).or_default().push(r.try_get(1)?);
    }
    Ok(out)
}

pub async fn claim_host(
    conn: &mut SqliteConnection,
    host: &str,
    org: &str,
    at: Timestamp,
) -> anyhow::Result<()> {
    sqlx::query("INSERT OR IGNORE INTO host_claims (host, org_id, claimed_at) VALUES (?1, ?2, ?3)")
        .bind(host)
        .bind(org)
        .bind(at.as_micros())
        .execute(&mut *conn)
        .await
        .context("failed to claim the host")?;
    Ok(())
}

pub async fn release_host(
    conn: &mut SqliteConnection,
    host: &str,
    org: &str,
) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM host_claims WHERE host = ?1 AND org_id = ?2")
        .bind(host)
        .bind(org)
        .execute(&mut *conn)
        .await
        .context("failed to release the host")?;
    Ok(())
}
