//! Writes a handler declares instead of executing: applied by the
//! dispatcher inside its group commit, so that a step's record costs a share
//! of one commit rather than a commit of its own. Guarded writes carry their
//! condition (an instance's version, a host nobody else holds); a handler's
//! writes apply all together or, if any guard fails, not at all — and the
//! attempt is retried, re-reading what changed.

use berth_core::domain::{Condition, InstanceStatus};

use crate::conn::{Conn, Dialect};
use crate::instances::{Col, Instance};
use crate::ops::{Arg, Script};
use crate::writer::RowRead;

/// One declared write.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Write the row back if it still has the version it was read with.
    Instance(Box<Instance>),
    /// Record that `org` holds `host`; with `exclusive`, only if no other org
    /// holds it.
    ClaimHost {
        host: String,
        org: String,
        exclusive: bool,
    },
    /// Drop `org`'s claim on `host`.
    ReleaseHost { host: String, org: String },
    /// Insert a new instance if its org has no live instance of that name
    /// and, with a quota, fewer live instances than it.
    InsertInstance(Box<Instance>, Option<u32>),
    /// Merge one step's result into an instance that is still being created
    /// in that generation, whatever its version.
    Patch(Box<InstancePatch>),
}

/// What one step of a creation adds to its instance: a field, a condition,
/// maybe a status. Unlike [`Write::Instance`] it is not guarded by version
/// but by generation and status, like a Kubernetes status patch: steps that
/// run in parallel (network and image both follow `host.ready`) each set
/// their own field and condition and never undo each other, so neither has
/// to be retried because the other wrote first.
#[derive(Debug, Clone, PartialEq)]
pub struct InstancePatch {
    pub id: String,
    pub generation: i64,
    pub network: Option<String>,
    pub image_tag: Option<String>,
    /// Set to hold (status true), from the time of the commit that writes
    /// it (whatever time it carries here); its transition time is kept if
    /// it already held. Commit times follow commit order (the dispatcher's
    /// turns are strictly later one after another), which the join relies
    /// on to let exactly one of its two deliveries act.
    pub condition: Condition,
    /// The status to move to, applied only from the statuses that may
    /// become it (the state machine's rule).
    pub status: Option<InstanceStatus>,
}

impl Write {
    /// Whether the write has a condition that may fail.
    pub fn is_guarded(&self) -> bool {
        matches!(
            self,
            Write::Instance(_)
                | Write::InsertInstance(..)
                | Write::Patch(_)
                | Write::ClaimHost {
                    exclusive: true,
                    ..
                }
        )
    }
}

/// The SET of the whole-row update, over [`instance_row`]'s values: id,
/// version, status, generation, the state columns, the time.
fn instance_set() -> &'static str {
    static SET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let state = Col::ALL[Col::STATE]
            .iter()
            .enumerate()
            .map(|(n, c)| format!("{} = v.column{}", c.name(), n + 5));
        [
            "status = v.column3".to_owned(),
            "version = v.column2 + 1".to_owned(),
            "generation = v.column4".to_owned(),
        ]
        .into_iter()
        .chain(state)
        .chain([format!("updated_at = v.column{INSTANCE_ROW}")])
        .collect::<Vec<_>>()
        .join(", ")
    });
    &SET
}

impl Script {
    /// Appends guarded writes, for [`passed_guards`] to say which passed,
    /// by the `usize` tag (the owner) each was given with.
    ///
    /// With `exact`, each write that passes returns a row. Without, the
    /// multi-row instance writes, patches and inserts only report how many
    /// rows they changed: when all of them pass, as they nearly always do, that is
    /// enough, and hundreds of rows need not cross from SQLite's thread one
    /// by one (most of a busy turn's time). When a count falls short,
    /// [`passed_guards`] says so and the caller rolls back and redoes the
    /// writes with `exact`.
    pub fn guarded_writes(
        &mut self,
        writes: &[(usize, &Write)],
        at: berth_core::Timestamp,
        exact: bool,
    ) -> anyhow::Result<()> {
        // SQLite only: the counted form reads `changes()`, which PostgreSQL
        // lacks (it would take each statement in a CTE); there every guarded
        // write returns its row.
        let exact = exact || self.dialect() == Dialect::Postgres;
        let returning = |r: &str| {
            if exact {
                format!("RETURNING {r}")
            } else {
                String::new()
            }
        };
        // Row-at-a-time statements were most of a busy turn; instance writes
        // and patches go as multi-row statements instead, each holding an
        // instance at most once (a second write of the same row goes in a
        // later statement, so their order holds).
        let whole: Vec<&Instance> = writes
            .iter()
            .filter_map(|(_, w)| match w {
                Write::Instance(i) => Some(&**i),
                _ => None,
            })
            .collect();
        for layer in layers(&whole, |i| i.id.as_str()) {
            let rows = layer
                .iter()
                .map(|i| instance_row(i, at))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // RETURNING may not name the FROM table, so the row says which
            // instance and version passed; see `passed_guards` for mapping
            // it back to the write.
            let ret = returning("'guard_instance', instances.id, instances.version");
            self.push_rows_counted(
                &rows,
                INSTANCE_ROW,
                |t| {
                    let set = instance_set();
                    format!(
                        "UPDATE instances SET {set}
                           FROM (VALUES {t}) AS v
                          WHERE instances.id = v.column1 AND instances.version = v.column2
                         {ret}"
                    )
                },
                !exact,
            );
        }
        let patches: Vec<&InstancePatch> = writes
            .iter()
            .filter_map(|(_, w)| match w {
                Write::Patch(p) => Some(&**p),
                _ => None,
            })
            .collect();
        for layer in layers(&patches, |p| p.id.as_str()) {
            let rows = layer
                .iter()
                .map(|p| patch_row(p, at))
                .collect::<anyhow::Result<Vec<_>>>()?;
            // Always the whole row, counted or not: a patch is merged in SQL,
            // and this is how the caller learns the result (the dispatcher
            // keeps it in the instance cache instead of reading it again).
            let ret = format!(
                "RETURNING 'guard_patch', instances.id, instances.version, {}",
                Col::ALL
                    .iter()
                    .map(|c| format!("instances.{}", c.name()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let dialect = self.dialect();
            self.push_rows_counted(&rows, PATCH_ROW, |t| patch_sql(dialect, t, &ret), !exact);
        }
        // New instances, each only if its org has no live one of its name.
        // Two of one name in one statement would both pass that check (the
        // statement reads the table before it inserts) and fail the unique
        // index, so a name goes at most once per statement.
        let inserts: Vec<(&Instance, Option<u32>)> = writes
            .iter()
            .filter_map(|(_, w)| match w {
                Write::InsertInstance(i, quota) => Some((&**i, *quota)),
                _ => None,
            })
            .collect();
        let refs: Vec<&(&Instance, Option<u32>)> = inserts.iter().collect();
        // The quota: the statement does not see its own rows either, so
        // each row counts the org's rows before it in the statement (among
        // those whose name is free) on top of the org's stored ones, which
        // are counted once per org and statement. Rows without a quota skip
        // the count.
        for with_quota in [false, true] {
            let these: Vec<&(&Instance, Option<u32>)> = refs
                .iter()
                .copied()
                .filter(|(_, q)| q.is_some() == with_quota)
                .collect();
            for layer in layers(&these, |(i, _)| (i.org_id.as_str(), i.name.as_str())) {
                let rows = layer
                    .iter()
                    .map(|(i, quota)| {
                        let mut args = crate::instances::insert_args(i)?;
                        if let Some(q) = quota {
                            args.push(Arg::Int(i64::from(*q)));
                        }
                        Ok(args)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let ret = returning("'guard_insert', id, 0");
                let cols = crate::instances::columns();
                let (org, name) = (Col::OrgId.in_values(), Col::Name.in_values());
                let free = format!(
                    "NOT EXISTS (SELECT 1 FROM instances
                        WHERE org_id = v.{org} AND name = v.{name}
                          AND status != 'deleted')"
                );
                if with_quota {
                    let vals = Col::ALL.map(|c| format!("v.{}", c.in_values())).join(", ");
                    // The quota rides after the row's columns.
                    let quota = format!("column{}", INSERT_ROW + 1);
                    self.push_rows_counted(
                        &rows,
                        INSERT_ROW + 1,
                        |t| {
                            format!(
                                "WITH v AS (SELECT * FROM (VALUES {t}) AS t),
                                      fresh AS (SELECT v.*, ROW_NUMBER() OVER (PARTITION BY v.{org}) AS rn
                                                  FROM v WHERE {free}),
                                      live AS (SELECT org_id, COUNT(*) AS n FROM instances
                                                WHERE status != 'deleted'
                                                  AND org_id IN (SELECT {org} FROM v)
                                                GROUP BY org_id)
                                 INSERT INTO instances ({cols})
                                 SELECT {vals} FROM fresh AS v LEFT JOIN live ON live.org_id = v.{org}
                                  WHERE COALESCE(live.n, 0) + v.rn <= v.{quota}
                                 {ret}"
                            )
                        },
                        !exact,
                    );
                } else {
                    self.push_rows_counted(
                        &rows,
                        INSERT_ROW,
                        |t| {
                            format!(
                                "INSERT INTO instances ({cols})
                                 SELECT * FROM (VALUES {t}) AS v WHERE {free}
                                 {ret}"
                            )
                        },
                        !exact,
                    );
                }
            }
        }
        for (tag, w) in writes {
            let tag = Arg::Int(i64::try_from(*tag).unwrap_or(i64::MAX));
            match w {
                Write::InsertInstance(..) => {} // above, all together
                Write::ClaimHost {
                    host,
                    org,
                    exclusive: true,
                } => {
                    self.push(
                        "SELECT 'guard_claim', ?, 0 WHERE NOT EXISTS
                            (SELECT 1 FROM host_claims WHERE host = ? AND org_id != ?)",
                        [tag, host.as_str().into(), org.as_str().into()],
                    );
                    // The WHERE also keeps SQLite from reading ON CONFLICT
                    // as a join's ON.
                    self.push(
                        "INSERT INTO host_claims (host, org_id, claimed_at)
                         SELECT ?, ?, ? WHERE NOT EXISTS
                            (SELECT 1 FROM host_claims WHERE host = ? AND org_id != ?)
                         ON CONFLICT DO NOTHING",
                        [
                            host.as_str().into(),
                            org.as_str().into(),
                            at.into(),
                            host.as_str().into(),
                            org.as_str().into(),
                        ],
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Multi-row statements of `rows`, each followed, if `counted`, by a
    /// row saying how many rows it changed and how many it should have.
    fn push_rows_counted(
        &mut self,
        rows: &[Vec<Arg>],
        cols: usize,
        make_sql: impl Fn(&str) -> String,
        counted: bool,
    ) {
        let mut start = 0;
        for len in crate::ops::chunk_lens(rows.len()) {
            self.push_rows(&rows[start..start + len], cols, &[], &make_sql, |r, a| {
                a.extend(r.iter().cloned())
            });
            if counted {
                // SQLite only: `changes()` counts the previous statement's
                // rows; PostgreSQL will need the statement in a CTE,
                // `WITH w AS (… RETURNING 1) SELECT 'guard_count', COUNT(*), ? FROM w`.
                self.push(
                    "SELECT 'guard_count', changes(), ?",
                    [Arg::Int(i64::try_from(len).unwrap_or(i64::MAX))],
                );
            }
            start += len;
        }
    }

    /// Appends writes that have no condition.
    pub fn plain_writes(&mut self, writes: &[&Write], at: berth_core::Timestamp) {
        // Releases first: a claim and a release of the same org and host in
        // one turn (its last instance deleted as a new one starts) must
        // leave the claim, or another org could take a host this org uses.
        for w in writes {
            if let Write::ReleaseHost { host, org } = w {
                self.push(
                    "DELETE FROM host_claims WHERE host = ? AND org_id = ?",
                    [host.as_str().into(), org.as_str().into()],
                );
            }
        }
        // Shared claims repeat (every creation on a shared host claims it
        // again): once each, in one statement.
        let mut shared: Vec<(&str, &str)> = writes
            .iter()
            .filter_map(|w| match w {
                Write::ClaimHost {
                    host,
                    org,
                    exclusive: false,
                } => Some((host.as_str(), org.as_str())),
                _ => None,
            })
            .collect();
        shared.sort_unstable();
        shared.dedup();
        self.push_rows(
            &shared,
            3,
            &[],
            |t| {
                format!(
                    "INSERT INTO host_claims (host, org_id, claimed_at) VALUES {t}
                     ON CONFLICT DO NOTHING"
                )
            },
            |(h, o), a| a.extend([Arg::from(*h), Arg::from(*o), Arg::from(at)]),
        );
    }
}

/// Arguments per row of an instance insert: every column (and, for a row
/// with a quota, one more).
const INSERT_ROW: usize = Col::ALL.len();

/// Arguments per row of the instance update: id, version, status and
/// generation, the state columns, the time.
const INSTANCE_ROW: usize = 4 + (Col::FlowId as usize - Col::Host as usize + 1) + 1;

fn instance_row(i: &Instance, at: berth_core::Timestamp) -> anyhow::Result<Vec<Arg>> {
    Ok([
        Arg::from(i.id.as_str()),
        Arg::Int(i.version),
        Arg::from(i.status.as_str()),
        Arg::Int(i.generation),
    ]
    .into_iter()
    .chain(crate::instances::state_args(i)?)
    .chain([Arg::from(at)])
    .collect())
}

/// Arguments per row of the patch.
const PATCH_ROW: usize = 9;

/// A patch sets its field if given; replaces its condition unless it already
/// holds (keeping the time it began to); moves the status if the row is in
/// one that may become it; all only while the row is being created in the
/// patch's generation.
///
/// SQLite only: the merge of conditions and the statuses list are in each
/// database's JSON functions (SQLite's `json_each`, `json_extract`,
/// `json_group_array`; PostgreSQL's `jsonb_array_elements`, `->>`,
/// `jsonb_agg` over the text columns cast to `jsonb`).
fn patch_sql(dialect: Dialect, tuples: &str, returning: &str) -> String {
    let creating = InstanceStatus::ALL
        .iter()
        .filter(|s| s.is_creating())
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",");
    let merge = match dialect {
        Dialect::Sqlite => {
            "conditions = CASE
              WHEN EXISTS (SELECT 1 FROM json_each(instances.conditions)
                           WHERE json_extract(value, '$.type') = v.column5
                             AND json_extract(value, '$.status') = 1)
              THEN instances.conditions
              ELSE (SELECT json_group_array(json(c)) FROM (
                      SELECT value AS c FROM json_each(instances.conditions)
                       WHERE json_extract(value, '$.type') != v.column5
                      UNION ALL SELECT v.column6))
            END,
            status = CASE WHEN instances.status IN (SELECT value FROM json_each(v.column7))
                          THEN v.column8 ELSE instances.status END,"
        }
        Dialect::Postgres => {
            "conditions = CASE
              WHEN EXISTS (SELECT 1 FROM jsonb_array_elements(instances.conditions::jsonb) AS e(value)
                           WHERE value->>'type' = v.column5
                             AND value->'status' = 'true'::jsonb)
              THEN instances.conditions
              ELSE (SELECT jsonb_agg(c)::text FROM (
                      SELECT value AS c FROM jsonb_array_elements(instances.conditions::jsonb) AS e(value)
                       WHERE value->>'type' != v.column5
                      UNION ALL SELECT v.column6::jsonb) AS cs)
            END,
            status = CASE WHEN instances.status IN (SELECT jsonb_array_elements_text(v.column7::jsonb))
                          THEN v.column8 ELSE instances.status END,"
        }
    };
    format!(
        "UPDATE instances SET
            network = COALESCE(v.column3, instances.network),
            image_tag = COALESCE(v.column4, instances.image_tag),
{merge}
            version = instances.version + 1,
            updated_at = v.column9
           FROM (VALUES {tuples}) AS v
          WHERE instances.id = v.column1 AND instances.generation = v.column2
            AND instances.status IN ({creating})
         {returning}"
    )
}

fn patch_row(p: &InstancePatch, at: berth_core::Timestamp) -> anyhow::Result<Vec<Arg>> {
    // The statuses the patch may move the instance from (none: the CASE
    // keeps the status).
    let from: Vec<&str> = match p.status {
        Some(to) => InstanceStatus::ALL
            .iter()
            .filter(|s| s.is_creating() && **s != to && s.can_become(to))
            .map(|s| s.as_str())
            .collect(),
        None => Vec::new(),
    };
    let kind = serde_json::to_value(p.condition.kind)?;
    // The condition holds from the commit that wrote it, not from when its
    // handler read the clock: the join orders the two branches by these
    // times, and a branch that read the clock first may commit last.
    let condition = Condition {
        last_transition: at,
        ..p.condition.clone()
    };
    Ok(vec![
        Arg::from(p.id.as_str()),
        Arg::Int(p.generation),
        Arg::from(p.network.as_deref()),
        Arg::from(p.image_tag.as_deref()),
        Arg::Text(kind.as_str().unwrap_or_default().to_owned()),
        Arg::Text(serde_json::to_string(&condition)?),
        Arg::Text(serde_json::to_string(&from)?),
        Arg::from(p.status.map(|s| s.as_str()).unwrap_or_default()),
        Arg::from(at),
    ])
}

/// `items` split so that no part holds two with the same key, each item in
/// the part after the last one holding its key: parts applied in order keep
/// the order of each key's items.
fn layers<'a, T: ?Sized, K: std::hash::Hash + Eq>(
    items: &[&'a T],
    key: impl Fn(&'a T) -> K,
) -> Vec<Vec<&'a T>> {
    let mut seen: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    let mut out: Vec<Vec<&'a T>> = Vec::new();
    for item in items {
        let n = seen.entry(key(item)).or_default();
        if out.len() <= *n {
            out.push(Vec::new());
        }
        out[*n].push(item);
        *n += 1;
    }
    out
}

impl crate::Tx {
    /// Applies `writes` in this transaction (a handler that also opened
    /// one); `false` if a guard failed — then drop the transaction, which
    /// rolls back.
    pub async fn apply(
        &mut self,
        writes: &[Write],
        at: berth_core::Timestamp,
    ) -> anyhow::Result<bool> {
        apply(&mut self.conn(), writes, at).await
    }
}

/// Applies `writes` on `conn`; `false` if a guard failed.
pub(crate) async fn apply(
    conn: &mut Conn<'_>,
    writes: &[Write],
    at: berth_core::Timestamp,
) -> anyhow::Result<bool> {
    let guarded: Vec<(usize, &Write)> = writes
        .iter()
        .filter(|w| w.is_guarded())
        .map(|w| (0, w))
        .collect();
    let plain: Vec<&Write> = writes.iter().filter(|w| !w.is_guarded()).collect();
    let mut s = Script::for_dialect(conn.dialect());
    s.guarded_writes(&guarded, at, true)?;
    s.plain_writes(&plain, at);
    let rows = s.run(conn).await?;
    Ok(passed_guards(&guarded, &rows)?.is_some_and(|p| p.len() == guarded.len()))
}

/// The rows a turn's patches left, for [`crate::Store::cache_committed`]:
/// what the caller passes on without looking inside.
#[derive(Debug, Default)]
pub struct Patched(pub(crate) Vec<Instance>);

/// The rows patches left, as the patches' own result rows carry them, in the
/// order they were applied (a row patched twice appears twice, the later
/// last).
pub fn patched_rows<R: RowRead>(rows: &[R]) -> anyhow::Result<Patched> {
    rows.iter()
        .filter(|r| r.text(0).is_ok_and(|k| k == "guard_patch"))
        .map(|r| crate::instances::from_columns(r, 3))
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Patched)
}

/// For guarded writes appended in order by [`Script::guarded_writes`], the
/// tags (owners) of those that passed, one entry per passed write; `None`
/// when a counted statement fell short, so that which writes passed is not
/// known: redo them exactly.
pub fn passed_guards<R: RowRead>(
    writes: &[(usize, &Write)],
    rows: &[R],
) -> anyhow::Result<Option<Vec<usize>>> {
    let mut matched = vec![false; writes.len()];
    let mut out = Vec::new();
    let mut counted = false;
    for r in rows {
        let kind = r.text(0)?;
        match kind.as_str() {
            "guard_count" => {
                let (changed, expected) = (r.int(1)?, r.int(2)?);
                if changed != expected {
                    return Ok(None);
                }
                counted = true;
            }
            "guard_instance" => {
                let id = r.text(1)?;
                let version = r.int(2)?;
                // Statements ran in order, so the first unmatched write of
                // this instance at the version before is the one that passed.
                if let Some(k) = writes.iter().enumerate().position(|(k, (_, w))| {
                    !matched[k]
                        && matches!(w, Write::Instance(i) if i.id == id && i.version + 1 == version)
                }) {
                    matched[k] = true;
                    out.push(writes[k].0);
                }
            }
            "guard_patch" => {
                let id = r.text(1)?;
                if let Some(k) = writes.iter().enumerate().position(|(k, (_, w))| {
                    !matched[k] && matches!(w, Write::Patch(p) if p.id == id)
                }) {
                    matched[k] = true;
                    out.push(writes[k].0);
                }
            }
            "guard_insert" => {
                let id = r.text(1)?;
                if let Some(k) = writes.iter().enumerate().position(|(k, (_, w))| {
                    !matched[k] && matches!(w, Write::InsertInstance(i, _) if i.id == id)
                }) {
                    matched[k] = true;
                    out.push(writes[k].0);
                }
            }
            "guard_claim" => {
                let tag = r.int(1)?;
                out.push(usize::try_from(tag)?);
            }
            _ => {}
        }
    }
    if counted {
        // Every counted statement changed all its rows: every instance
        // write, patch and insert passed.
        for (k, (tag, w)) in writes.iter().enumerate() {
            if !matched[k]
                && matches!(
                    w,
                    Write::Instance(_) | Write::Patch(_) | Write::InsertInstance(..)
                )
            {
                out.push(*tag);
            }
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use berth_core::Timestamp;
    use berth_core::domain::{ConditionKind, Conditions, InstanceName};

    use super::*;
    use crate::Store;
    use crate::instances::{self, InstanceSpec};

    use crate::store::tests::store;

    /// The SQL made from the one description of the row is the SQL the
    /// schema expects: the table's columns in its order, and the update's
    /// SET over `instance_row`'s values.
    #[test]
    fn the_row_description_makes_the_tables_columns_and_the_update() {
        assert_eq!(
            instances::columns(),
            "id, org_id, name, spec, status, version, generation, host, network, \
             image_tag, container, ip, conditions, error, exit_code, oom_killed, restarts, \
             flow_id, created_at, updated_at"
        );
        assert_eq!(
            instance_set(),
            "status = v.column3, version = v.column2 + 1, generation = v.column4, \
             host = v.column5, network = v.column6, image_tag = v.column7, container = v.column8, \
             ip = v.column9, conditions = v.column10, error = v.column11, exit_code = v.column12, \
             oom_killed = v.column13, restarts = v.column14, flow_id = v.column15, updated_at = v.column16"
        );
        assert_eq!(INSERT_ROW, 20);
        assert_eq!(INSTANCE_ROW, 16);
        assert_eq!(Col::OrgId.in_values(), "column2");
    }

    fn instance(s: &Store) -> Instance {
        Instance {
            id: "i1".into(),
            org_id: "o".into(),
            name: InstanceName::parse("web").unwrap(),
            spec: InstanceSpec {
                image: "busybox".into(),
                env: Default::default(),
                cmd: None,
                ports: vec![],
                restart: Default::default(),
                build: None,
                limits: None,
            },
            status: InstanceStatus::Provisioning,
            version: 1,
            generation: 1,
            host: Some("local".into()),
            network: None,
            image_tag: None,
            container: None,
            ip: None,
            conditions: Conditions::default(),
            error: None,
            exit_code: None,
            oom_killed: false,
            restarts: 0,
            flow_id: s.ids().flow_id(),
            created_at: s.now(),
            updated_at: s.now(),
        }
    }

    fn patch(kind: ConditionKind, at: i64, field: (&str, &str)) -> Write {
        let (network, image_tag) = match field.0 {
            "network" => (Some(field.1.to_owned()), None),
            _ => (None, Some(field.1.to_owned())),
        };
        Write::Patch(Box::new(InstancePatch {
            id: "i1".into(),
            generation: 1,
            network,
            image_tag,
            condition: Condition {
                kind,
                status: true,
                reason: "Done".into(),
                message: field.1.into(),
                last_transition: Timestamp::from_micros(at),
            },
            status: (kind == ConditionKind::ImageBuilt).then_some(InstanceStatus::Building),
        }))
    }

    #[tokio::test]
    async fn parallel_patches_both_land_and_a_stale_one_does_not() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        instances::insert_org(&mut c, "o", "o-name", s.now())
            .await
            .unwrap();
        let i = instance(&s);
        instances::insert(&mut c, &i).await.unwrap();

        // Both branches patch the row they read at version 1: both apply.
        // The network's handler read the clock first but commits last.
        let t = Timestamp::from_micros;
        let net = patch(ConditionKind::NetworkReady, 10, ("network", "berth-o"));
        let img = patch(ConditionKind::ImageBuilt, 20, ("image", "berth/o/web:g1"));
        assert!(apply(&mut c, &[img], t(1000)).await.unwrap());
        assert!(apply(&mut c, &[net], t(2000)).await.unwrap());
        let got = instances::get(&mut c, "i1").await.unwrap().unwrap();
        // The conditions carry their commits' times: the network is last.
        let time = |k| got.conditions.get(k).unwrap().last_transition;
        assert_eq!(time(ConditionKind::ImageBuilt), t(1000));
        assert_eq!(time(ConditionKind::NetworkReady), t(2000));
        assert_eq!(got.network.as_deref(), Some("berth-o"));
        assert_eq!(got.image_tag.as_deref(), Some("berth/o/web:g1"));
        assert!(got.conditions.holds(ConditionKind::NetworkReady));
        assert!(got.conditions.holds(ConditionKind::ImageBuilt));
        assert_eq!(got.status, InstanceStatus::Building);
        assert_eq!(got.version, 3);

        // A repeated patch keeps the time the condition first held.
        let again = patch(ConditionKind::ImageBuilt, 99, ("image", "berth/o/web:g1"));
        assert!(apply(&mut c, &[again], t(3000)).await.unwrap());
        let got = instances::get(&mut c, "i1").await.unwrap().unwrap();
        let cond = got.conditions.get(ConditionKind::ImageBuilt).unwrap();
        assert_eq!(cond.last_transition, t(1000));
        assert_eq!(got.conditions.0.len(), 2);

        // Once the instance failed, or in another generation, nothing lands.
        let mut failed = got.clone();
        failed.status = InstanceStatus::Failed;
        assert!(
            apply(&mut c, &[Write::Instance(Box::new(failed))], s.now())
                .await
                .unwrap()
        );
        let late = patch(ConditionKind::NetworkReady, 30, ("network", "other"));
        assert!(!apply(&mut c, &[late], s.now()).await.unwrap());
        let got = instances::get(&mut c, "i1").await.unwrap().unwrap();
        assert_eq!(got.status, InstanceStatus::Failed);
        assert_eq!(got.network.as_deref(), Some("berth-o"));
    }

    #[tokio::test]
    async fn the_instance_cache_never_outlives_another_writer() {
        // The cache is SQLite's alone: off where other processes write.
        let (_d, s) = crate::store::tests::sqlite_store().await;
        let i = instance(&s);
        s.cache_instances(vec![i.clone()], vec![]);
        assert_eq!(s.cached_instance("i1"), Some(i.clone()));
        s.cache_instances(vec![], vec!["i1".into()]);
        assert_eq!(s.cached_instance("i1"), None);

        // Any transaction may have written the row: its commit forgets all.
        s.cache_instances(vec![i.clone()], vec![]);
        let tx = s.begin().await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(s.cached_instance("i1"), None);
        // The checkpointer, waiting for a commit, learns of one made before
        // it waited.
        tokio::time::timeout(std::time::Duration::from_secs(5), s.wrote())
            .await
            .expect("the commit was signalled");
    }

    #[tokio::test]
    async fn counted_guards_pass_all_or_ask_for_an_exact_redo() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        instances::insert_org(&mut c, "o", "o-name", s.now())
            .await
            .unwrap();
        let a = instance(&s);
        let mut b = instance(&s);
        b.id = "i2".into();
        b.name = InstanceName::parse("db").unwrap();
        instances::insert(&mut c, &a).await.unwrap();
        instances::insert(&mut c, &b).await.unwrap();
        let run = |writes: Vec<Write>, exact: bool| {
            let s = s.clone();
            async move {
                let tagged: Vec<(usize, &Write)> = writes.iter().enumerate().collect();
                let mut script = s.script();
                script.guarded_writes(&tagged, s.now(), exact).unwrap();
                // On the dispatcher's writer, as in a group commit.
                let rows = s.open_writer().await.unwrap().run(script).await.unwrap();
                passed_guards(&tagged, &rows).unwrap()
            }
        };
        // Both rows at the version they were read with: both pass, known
        // from the counts alone.
        let w = vec![
            Write::Instance(Box::new(a.clone())),
            Write::Instance(Box::new(b.clone())),
        ];
        assert_eq!(run(w, false).await, Some(vec![0, 1]));
        // Now both are at version 2: a write of `a` at version 1 falls
        // short, so the counted run cannot say which passed...
        let mut b2 = b.clone();
        b2.version = 2;
        let w = vec![
            Write::Instance(Box::new(a.clone())),
            Write::Instance(Box::new(b2.clone())),
        ];
        // (On PostgreSQL there is no counted form: every guarded write
        // returns its row, and the answer is the exact one.)
        let counted = s.dialect() == Dialect::Sqlite;
        let short = if counted { None } else { Some(vec![1]) };
        assert_eq!(run(w.clone(), false).await, short);
        // ...and the exact one can (the counted run changed `b` already, so
        // this one is at version 3).
        let mut b3 = b2.clone();
        b3.version = 3;
        let w = vec![
            Write::Instance(Box::new(a.clone())),
            Write::Instance(Box::new(b3)),
        ];
        assert_eq!(run(w, true).await, Some(vec![1]));
    }

    #[tokio::test]
    async fn of_two_new_instances_of_one_name_only_the_first_goes_in() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        instances::insert_org(&mut c, "o", "o-name", s.now())
            .await
            .unwrap();
        let first = instance(&s);
        let mut second = instance(&s);
        second.id = "i2".into();
        let mut other = instance(&s);
        other.id = "i3".into();
        other.name = InstanceName::parse("db").unwrap();
        let writes: Vec<Write> = [&first, &second, &other]
            .into_iter()
            .map(|i| Write::InsertInstance(Box::new(i.clone()), None))
            .collect();
        let tagged: Vec<(usize, &Write)> = writes.iter().enumerate().collect();
        let writer = s.open_writer().await.unwrap();
        for exact in [false, true] {
            let mut script = s.script();
            script.begin();
            script.guarded_writes(&tagged, s.now(), exact).unwrap();
            let rows = writer.run(script).await.unwrap();
            let passed = passed_guards(&tagged, &rows).unwrap();
            writer.rollback().await.unwrap();
            // PostgreSQL has no counted form (see `guarded_writes`).
            if exact || s.dialect() == Dialect::Postgres {
                let mut passed = passed.unwrap();
                passed.sort_unstable();
                assert_eq!(passed, vec![0, 2], "the second of the name is refused");
            } else {
                assert_eq!(passed, None, "a count fell short: redo exactly");
            }
        }
    }

    #[tokio::test]
    async fn new_instances_past_their_orgs_quota_are_refused_in_one_statement() {
        let (_d, s) = store().await;
        let mut pooled = s.read_conn().await.unwrap();
        let mut c = pooled.conn();
        instances::insert_org(&mut c, "o", "o-name", s.now())
            .await
            .unwrap();
        // One already stored; quota 3: two more of o may go in, of five.
        let mut stored = instance(&s);
        stored.id = "i0".into();
        stored.name = InstanceName::parse("n0").unwrap();
        instances::insert(&mut c, &stored).await.unwrap();
        let mut all = Vec::new();
        for n in 1..=5 {
            let mut i = instance(&s);
            i.id = format!("i{n}");
            i.name = InstanceName::parse(&format!("n{n}")).unwrap();
            all.push(i);
        }
        // A taken name does not use up the quota of the rows after it.
        let mut dup = instance(&s);
        dup.id = "idup".into();
        dup.name = InstanceName::parse("n0").unwrap();
        all.insert(0, dup);
        let writes: Vec<Write> = all
            .iter()
            .map(|i| Write::InsertInstance(Box::new(i.clone()), Some(3)))
            .collect();
        let tagged: Vec<(usize, &Write)> = writes.iter().enumerate().collect();
        let writer = s.open_writer().await.unwrap();
        let mut script = s.script();
        script.begin();
        script.guarded_writes(&tagged, s.now(), true).unwrap();
        let rows = writer.run(script).await.unwrap();
        let passed = passed_guards(&tagged, &rows).unwrap().unwrap();
        writer.rollback().await.unwrap();
        assert_eq!(passed.len(), 2, "{passed:?}");
        assert!(!passed.contains(&0), "the taken name is refused");
    }
}
