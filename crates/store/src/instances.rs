//! Orgs, instances and host claims. Instance writes are guarded by
//! `version`: a worker reads the row, decides, and writes back only if no
//! one else wrote since — so a replayed or concurrent event changes nothing.

use std::collections::BTreeMap;

use crate::conn::Conn;
use anyhow::Context;
use berth_core::domain::{Conditions, InstanceError, InstanceName, InstanceStatus, RestartPolicy};
use berth_core::{FlowId, Timestamp};
use serde::{Deserialize, Serialize};

use crate::ops::{Arg, fetch};
use crate::writer::{Row, RowRead};
use crate::{Store, Tx};

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

/// The instance row, column by column in table order: the one description
/// that the column list, an insert's arguments, the flow's state arguments,
/// positions in SQL and decoding all come from (a column added here is
/// added everywhere, or fails to compile where a `match` must name it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Col {
    Id,
    OrgId,
    Name,
    Spec,
    Status,
    Version,
    Generation,
    Host,
    Network,
    ImageTag,
    Container,
    Ip,
    Conditions,
    Error,
    ExitCode,
    OomKilled,
    Restarts,
    FlowId,
    CreatedAt,
    UpdatedAt,
}

impl Col {
    pub(crate) const ALL: [Col; 20] = [
        Col::Id,
        Col::OrgId,
        Col::Name,
        Col::Spec,
        Col::Status,
        Col::Version,
        Col::Generation,
        Col::Host,
        Col::Network,
        Col::ImageTag,
        Col::Container,
        Col::Ip,
        Col::Conditions,
        Col::Error,
        Col::ExitCode,
        Col::OomKilled,
        Col::Restarts,
        Col::FlowId,
        Col::CreatedAt,
        Col::UpdatedAt,
    ];

    /// The columns a flow changes, from `host` to `flow_id`.
    pub(crate) const STATE: std::ops::RangeInclusive<usize> =
        Col::Host as usize..=Col::FlowId as usize;

    pub(crate) fn name(self) -> &'static str {
        match self {
            Col::Id => "id",
            Col::OrgId => "org_id",
            Col::Name => "name",
            Col::Spec => "spec",
            Col::Status => "status",
            Col::Version => "version",
            Col::Generation => "generation",
            Col::Host => "host",
            Col::Network => "network",
            Col::ImageTag => "image_tag",
            Col::Container => "container",
            Col::Ip => "ip",
            Col::Conditions => "conditions",
            Col::Error => "error",
            Col::ExitCode => "exit_code",
            Col::OomKilled => "oom_killed",
            Col::Restarts => "restarts",
            Col::FlowId => "flow_id",
            Col::CreatedAt => "created_at",
            Col::UpdatedAt => "updated_at",
        }
    }

    /// The column's place among the row's, from 0.
    pub(crate) fn at(self) -> usize {
        self as usize
    }

    /// The name SQLite gives the column in a `VALUES` list of whole rows
    /// (`column1` is the first).
    pub(crate) fn in_values(self) -> String {
        format!("column{}", self.at() + 1)
    }

    /// The column's value for `i`.
    fn arg(self, i: &Instance) -> anyhow::Result<Arg> {
        Ok(match self {
            Col::Id => Arg::from(i.id.as_str()),
            Col::OrgId => Arg::from(i.org_id.as_str()),
            Col::Name => Arg::from(i.name.as_str()),
            Col::Spec => Arg::Text(serde_json::to_string(&i.spec)?),
            Col::Status => Arg::from(i.status.as_str()),
            Col::Version => Arg::Int(i.version),
            Col::Generation => Arg::Int(i.generation),
            Col::Host => Arg::from(i.host.as_deref()),
            Col::Network => Arg::from(i.network.as_deref()),
            Col::ImageTag => Arg::from(i.image_tag.as_deref()),
            Col::Container => Arg::from(i.container.as_deref()),
            Col::Ip => Arg::from(i.ip.as_deref()),
            Col::Conditions => Arg::Text(serde_json::to_string(&i.conditions)?),
            Col::Error => Arg::from(i.error.as_ref().map(serde_json::to_string).transpose()?),
            Col::ExitCode => Arg::from(i.exit_code),
            Col::OomKilled => Arg::from(i.oom_killed),
            Col::Restarts => Arg::Int(i.restarts),
            Col::FlowId => Arg::Text(i.flow_id.to_string()),
            Col::CreatedAt => Arg::Int(i.created_at.as_micros()),
            Col::UpdatedAt => Arg::Int(i.updated_at.as_micros()),
        })
    }
}

/// Every column, in table order, comma-separated.
pub(crate) fn columns() -> &'static str {
    static COLUMNS: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| Col::ALL.map(Col::name).join(", "));
    &COLUMNS
}

fn from_row(r: &Row) -> anyhow::Result<Instance> {
    from_columns(r, 0)
}

/// The instance in [`Col`] order from column `at` of `r` on.
pub(crate) fn from_columns<R: RowRead>(r: &R, at: usize) -> anyhow::Result<Instance> {
    let col = |c: Col| at + c.at();
    let name = r.text(col(Col::Name))?;
    let spec = r.text(col(Col::Spec))?;
    let status = r.text(col(Col::Status))?;
    let conditions = r.text(col(Col::Conditions))?;
    let error = r.opt_text(col(Col::Error))?;
    let flow = r.text(col(Col::FlowId))?;
    Ok(Instance {
        id: r.text(col(Col::Id))?,
        org_id: r.text(col(Col::OrgId))?,
        name: InstanceName::parse(&name).context("corrupt instance name in the store")?,
        spec: serde_json::from_str(&spec).context("corrupt instance spec in the store")?,
        status: status
            .parse()
            .context("corrupt instance status in the store")?,
        version: r.int(col(Col::Version))?,
        generation: r.int(col(Col::Generation))?,
        host: r.opt_text(col(Col::Host))?,
        network: r.opt_text(col(Col::Network))?,
        image_tag: r.opt_text(col(Col::ImageTag))?,
        container: r.opt_text(col(Col::Container))?,
        ip: r.opt_text(col(Col::Ip))?,
        conditions: serde_json::from_str(&conditions)
            .context("corrupt instance conditions in the store")?,
        error: error
            .map(|e| serde_json::from_str(&e))
            .transpose()
            .context("corrupt instance error in the store")?,
        exit_code: r.opt_int(col(Col::ExitCode))?,
        oom_killed: r.bool(col(Col::OomKilled))?,
        restarts: r.int(col(Col::Restarts))?,
        flow_id: flow.parse().context("corrupt flow id in the store")?,
        created_at: Timestamp::from_micros(r.int(col(Col::CreatedAt))?),
        updated_at: Timestamp::from_micros(r.int(col(Col::UpdatedAt))?),
    })
}

#[cfg(test)]
pub(crate) async fn insert_org(
    conn: &mut Conn<'_>,
    id: &str,
    name: &str,
    at: Timestamp,
) -> anyhow::Result<()> {
    fetch(
        conn,
        "INSERT INTO orgs (id, name, created_at) VALUES (?1, ?2, ?3)",
        [id.into(), name.into(), at.into()],
    )
    .await
    .context("failed to create the org")?;
    Ok(())
}

/// The values of every column for `i`, in order.
pub(crate) fn insert_args(i: &Instance) -> anyhow::Result<Vec<Arg>> {
    Col::ALL.iter().map(|c| c.arg(i)).collect()
}

/// The columns the flow changes ([`Col::STATE`]), in table order.
pub(crate) fn state_args(i: &Instance) -> anyhow::Result<Vec<Arg>> {
    Col::ALL[Col::STATE].iter().map(|c| c.arg(i)).collect()
}

/// Inserts a new instance; [`NameTaken`] if its org has a live one so named.
pub(crate) async fn insert(conn: &mut Conn<'_>, i: &Instance) -> anyhow::Result<()> {
    let mut script = crate::ops::Script::for_dialect(conn.dialect());
    let marks = vec!["?"; Col::ALL.len()].join(",");
    script.push(
        &format!("INSERT INTO instances ({}) VALUES ({marks})", columns()),
        insert_args(i)?,
    );
    match script.run(conn).await {
        Ok(_) => Ok(()),
        Err(e) if crate::writer::is_any_unique_violation(&e) => {
            Err(NameTaken(i.name.to_string()).into())
        }
        Err(e) => Err(e.context("failed to insert the instance")),
    }
}

pub(crate) async fn get(conn: &mut Conn<'_>, id: &str) -> anyhow::Result<Option<Instance>> {
    let sql = format!("SELECT {} FROM instances WHERE id = ?1", columns());
    let rows = fetch(conn, &sql, [id.into()])
        .await
        .context("failed to read the instance")?;
    rows.first().map(from_row).transpose()
}

/// Every instance of an org (all of them when `org` is `None`), oldest first.
pub(crate) async fn list(conn: &mut Conn<'_>, org: Option<&str>) -> anyhow::Result<Vec<Instance>> {
    let sql = format!(
        "SELECT {} FROM instances WHERE (?1 IS NULL OR org_id = ?1) ORDER BY created_at, id",
        columns()
    );
    let rows = fetch(conn, &sql, [org.into()])
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
pub(crate) async fn list_page(
    conn: &mut Conn<'_>,
    org: &str,
    after: Option<&str>,
    filter: ListFilter<'_>,
    limit: u32,
) -> anyhow::Result<Vec<Instance>> {
    let cols = columns();
    let deleted = filter.deleted || filter.status == Some(InstanceStatus::Deleted);
    // "Backing off": a delivery of the instance's current flow that has
    // been attempted and is not running now, which is what the dispatcher
    // leaves after a failed attempt it will retry.
    let sql = format!(
        "SELECT {cols} FROM instances
          WHERE org_id = ?1 AND (?2 != 0 OR status != 'deleted')
            AND (?3 IS NULL OR (created_at, id) >
                 (SELECT created_at, id FROM instances WHERE id = ?3 AND org_id = ?1))
            AND (?5 IS NULL OR status = ?5)
            AND (?6 IS NULL OR name = ?6)
            AND (?7 = 0 OR EXISTS (
                 SELECT 1 FROM events e JOIN deliveries d ON d.event_id = e.id
                  WHERE e.flow_id = instances.flow_id
                    AND d.attempt > 0 AND d.lease_owner IS NULL))
          ORDER BY created_at, id LIMIT ?4"
    );
    let args = [
        org.into(),
        deleted.into(),
        after.into(),
        limit.into(),
        filter.status.map(InstanceStatus::as_str).into(),
        filter.name.into(),
        filter.retrying.into(),
    ];
    let rows = fetch(conn, &sql, args)
        .await
        .context("failed to list instances")?;
    if rows.is_empty()
        && let Some(cursor) = after
    {
        // An empty page: the end of the list, or a cursor naming nothing
        // (the comparison with no row matches none).
        let known = fetch(
            conn,
            "SELECT 1 FROM instances WHERE id = ?1 AND org_id = ?2",
            [cursor.into(), org.into()],
        )
        .await
        .context("failed to read the cursor's instance")?;
        if known.is_empty() {
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
pub(crate) async fn flow_progress(
    conn: &mut Conn<'_>,
    flow: FlowId,
) -> anyhow::Result<Option<FlowProgress>> {
    // Whether it is leased as 0 or 1: `IS NOT NULL` is a boolean in
    // PostgreSQL, and rows carry integers.
    let rows = fetch(
        conn,
        "SELECT d.worker, d.attempt, CASE WHEN d.lease_owner IS NOT NULL THEN 1 ELSE 0 END,
                d.not_before, d.event_id, d.round
           FROM events e JOIN deliveries d ON d.event_id = e.id
          WHERE e.flow_id = ?1
          ORDER BY e.seq DESC, d.attempt DESC LIMIT 1",
        [flow.into()],
    )
    .await
    .context("failed to read the flow's deliveries")?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let worker = row.text(0)?;
    let attempts_started = row.int(1)?;
    let event_id = row.text(4)?;
    let round = row.int(5)?;
    let errors = fetch(
        conn,
        "SELECT error FROM attempts
          WHERE event_id = ?1 AND worker = ?2 AND round = ?3 AND error IS NOT NULL
          ORDER BY id DESC LIMIT 1",
        [event_id.into(), worker.as_str().into(), Arg::Int(round)],
    )
    .await
    .context("failed to read the flow's attempts")?;
    let error = errors.first().map(|r| r.opt_text(0)).transpose()?.flatten();
    Ok(Some(FlowProgress {
        worker,
        attempts_started: u32::try_from(attempts_started).unwrap_or(0),
        running: row.bool(2)?,
        not_before: Timestamp::from_micros(row.int(3)?),
        // A record this process cannot read is shown as no error rather
        // than failing the whole read.
        last_error: error.and_then(|e| serde_json::from_str(&e).ok()),
    }))
}

/// Writes `i` back if the row still has `i.version`; bumps the version.
/// `false` means someone else changed it first: re-read and decide again.
pub(crate) async fn update(
    conn: &mut Conn<'_>,
    i: &mut Instance,
    at: Timestamp,
) -> anyhow::Result<bool> {
    // Status and generation, then the flow's state columns, from the one
    // row description.
    let state: Vec<&str> = Col::ALL[Col::STATE].iter().map(|c| c.name()).collect();
    let sets: String = state.iter().map(|c| format!(", {c} = ?")).collect();
    let mut args = vec![Arg::from(i.status.as_str()), Arg::Int(i.generation)];
    args.extend(state_args(i)?);
    args.extend([at.into(), Arg::from(i.id.as_str()), Arg::Int(i.version)]);
    let mut script = crate::ops::Script::for_dialect(conn.dialect());
    script.push(
        &format!(
            "UPDATE instances SET status = ?, version = version + 1, generation = ?{sets},
                    updated_at = ?
              WHERE id = ? AND version = ? RETURNING 1"
        ),
        args,
    );
    let rows = script
        .run(conn)
        .await
        .context("failed to update the instance")?;
    if rows.len() == 1 {
        i.version += 1;
        i.updated_at = at;
        Ok(true)
    } else {
        Ok(false)
    }
}

/// How many instances of `org` are not deleted (what its quota counts).
pub(crate) async fn live_in_org(conn: &mut Conn<'_>, org: &str) -> anyhow::Result<i64> {
    let rows = fetch(
        conn,
        "SELECT COUNT(*) FROM instances WHERE org_id = ?1 AND status != 'deleted'",
        [org.into()],
    )
    .await
    .context("failed to count the org's instances")?;
    rows.first().context("no row counting instances")?.int(0)
}

/// Live (not deleted) instances of `org` on `host`, other than `except`.
pub(crate) async fn others_on_host(
    conn: &mut Conn<'_>,
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
pub(crate) async fn deleting_on_host(
    conn: &mut Conn<'_>,
    org: &str,
    host: &str,
    except: &str,
) -> anyhow::Result<i64> {
    count_on_host(conn, "status = 'deleting'", (org, host, except)).await
}

/// Instances of an org on a host, other than one, whose status matches
/// `status` (a fixed SQL condition, never user input).
async fn count_on_host(
    conn: &mut Conn<'_>,
    status: &'static str,
    (org, host, except): (&str, &str, &str),
) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT COUNT(*) FROM instances
          WHERE org_id = ?1 AND host = ?2 AND id != ?3 AND {status}"
    );
    let rows = fetch(conn, &sql, [org.into(), host.into(), except.into()])
        .await
        .context("failed to count the org's instances on a host")?;
    rows.first().context("no row counting instances")?.int(0)
}

/// host → orgs holding it.
pub(crate) async fn claims(conn: &mut Conn<'_>) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let rows = fetch(
        conn,
        "SELECT host, org_id FROM host_claims ORDER BY host, org_id",
        [],
    )
    .await
    .context("failed to read host claims")?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        out.entry(r.text(0)?).or_default().push(r.text(1)?);
    }
    Ok(out)
}

impl Store {
    /// The instance `id`, of whichever org: callers check the org.
    pub async fn instance(&self, id: &str) -> anyhow::Result<Option<Instance>> {
        get(&mut self.read_conn().await?.conn(), id).await
    }

    /// Every instance of an org (all of them when `org` is `None`), oldest
    /// first.
    pub async fn instances(&self, org: Option<&str>) -> anyhow::Result<Vec<Instance>> {
        list(&mut self.read_conn().await?.conn(), org).await
    }

    /// A page of an org's instances; see [`ListFilter`] and
    /// [`UnknownCursor`].
    pub async fn instance_page(
        &self,
        org: &str,
        after: Option<&str>,
        filter: ListFilter<'_>,
        limit: u32,
    ) -> anyhow::Result<Vec<Instance>> {
        list_page(
            &mut self.read_conn().await?.conn(),
            org,
            after,
            filter,
            limit,
        )
        .await
    }

    /// Where `flow` is: `None` when none of its events awaits a worker.
    pub async fn flow_progress(&self, flow: FlowId) -> anyhow::Result<Option<FlowProgress>> {
        flow_progress(&mut self.read_conn().await?.conn(), flow).await
    }

    /// How many instances of `org` are not deleted (what its quota counts).
    pub async fn live_instances(&self, org: &str) -> anyhow::Result<i64> {
        live_in_org(&mut self.read_conn().await?.conn(), org).await
    }

    /// Live instances of `org` on `host`, other than `except`.
    pub async fn others_on_host(&self, org: &str, host: &str, except: &str) -> anyhow::Result<i64> {
        others_on_host(&mut self.read_conn().await?.conn(), org, host, except).await
    }

    /// Other instances of `org` on `host` being deleted.
    pub async fn deleting_on_host(
        &self,
        org: &str,
        host: &str,
        except: &str,
    ) -> anyhow::Result<i64> {
        deleting_on_host(&mut self.read_conn().await?.conn(), org, host, except).await
    }

    /// host → the orgs holding it.
    pub async fn host_claims(&self) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
        claims(&mut self.read_conn().await?.conn()).await
    }
}

impl Tx {
    /// Inserts a new instance; [`NameTaken`] if its org has a live one so
    /// named.
    pub async fn insert_instance(&mut self, i: &Instance) -> anyhow::Result<()> {
        insert(&mut self.conn(), i).await
    }

    /// The instance `id` as this transaction sees it.
    pub async fn instance(&mut self, id: &str) -> anyhow::Result<Option<Instance>> {
        get(&mut self.conn(), id).await
    }

    /// Writes `i` back if the row still has `i.version` (bumping it);
    /// `false` when someone changed it first.
    pub async fn update_instance(
        &mut self,
        i: &mut Instance,
        at: Timestamp,
    ) -> anyhow::Result<bool> {
        update(&mut self.conn(), i, at).await
    }
}
