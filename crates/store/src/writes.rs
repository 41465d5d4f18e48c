//! Writes a handler declares instead of executing: applied by the
//! dispatcher inside its group commit, so that a step's record costs a share
//! of one commit rather than a commit of its own. Guarded writes carry their
//! condition (an instance's version, a host nobody else holds); a handler's
//! writes apply all together or, if any guard fails, not at all — and the
//! attempt is retried, re-reading what changed.

use crate::instances::Instance;
use crate::ops::{Arg, Script};

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
    /// Insert a new instance if its org has no live instance of that name.
    InsertInstance(Box<Instance>),
}

impl Write {
    /// Whether the write has a condition that may fail.
    pub fn is_guarded(&self) -> bool {
        matches!(
            self,
            Write::Instance(_)
                | Write::InsertInstance(_)
                | Write::ClaimHost {
                    exclusive: true,
                    ..
                }
        )
    }
}

const INSTANCE_SET: &str = "status = v.column3, version = v.column2 + 1, generation = v.column4, \
     host = v.column5, network = v.column6, image_tag = v.column7, container = v.column8, \
     ip = v.column9, conditions = v.column10, error = v.column11, exit_code = v.column12, \
     oom_killed = v.column13, restarts = v.column14, flow_id = v.column15, updated_at = v.column16";

impl Script {
    /// Appends guarded writes; each that passes returns a row, which
    /// [`passed_guards`] maps back to the `usize` tag (the owner) it was
    /// given with.
    pub fn guarded_writes(
        &mut self,
        writes: &[(usize, &Write)],
        at: berth_core::Timestamp,
    ) -> anyhow::Result<()> {
        for (tag, w) in writes {
            let tag = Arg::Int(i64::try_from(*tag).unwrap_or(i64::MAX));
            match w {
                Write::Instance(i) => {
                    // RETURNING may not name the FROM table, so the row
                    // says which instance and version passed; see
                    // `passed_guards` for mapping it back to the write.
                    self.push(
                        &format!(
                            "UPDATE instances SET {INSTANCE_SET}
                               FROM (VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)) AS v
                              WHERE instances.id = v.column1 AND instances.version = v.column2
                             RETURNING 'guard_instance', instances.id, instances.version"
                        ),
                        [
                            Arg::from(i.id.as_str()),
                            Arg::Int(i.version),
                            Arg::from(i.status.as_str()),
                            Arg::Int(i.generation),
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
                            Arg::from(at),
                        ],
                    );
                }
                Write::InsertInstance(i) => {
                    self.push(
                        &format!(
                            "INSERT INTO instances ({cols})
                             SELECT ?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?
                              WHERE NOT EXISTS (SELECT 1 FROM instances
                                    WHERE org_id = ? AND name = ? AND status != 'deleted')
                             RETURNING 'guard_insert', id, 0",
                            cols = crate::instances::COLUMNS
                        ),
                        crate::instances::insert_args(i)?
                            .into_iter()
                            .chain([Arg::from(i.org_id.as_str()), Arg::from(i.name.as_str())]),
                    );
                }
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
                    self.push(
                        "INSERT OR IGNORE INTO host_claims (host, org_id, claimed_at)
                         SELECT ?, ?, ? WHERE NOT EXISTS
                            (SELECT 1 FROM host_claims WHERE host = ? AND org_id != ?)",
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

    /// Appends writes that have no condition.
    pub fn plain_writes(&mut self, writes: &[&Write], at: berth_core::Timestamp) {
        for w in writes {
            match w {
                Write::ClaimHost {
                    host,
                    org,
                    exclusive: false,
                } => self.push(
                    "INSERT OR IGNORE INTO host_claims (host, org_id, claimed_at) VALUES (?, ?, ?)",
                    [host.as_str().into(), org.as_str().into(), at.into()],
                ),
                Write::ReleaseHost { host, org } => self.push(
                    "DELETE FROM host_claims WHERE host = ? AND org_id = ?",
                    [host.as_str().into(), org.as_str().into()],
                ),
                _ => {}
            }
        }
    }
}

/// Applies `writes` in the caller's transaction (a handler that also opened
/// one); `false` if a guard failed — the caller must then roll back.
pub async fn apply(
    conn: &mut sqlx::SqliteConnection,
    writes: &[Write],
    at: berth_core::Timestamp,
) -> anyhow::Result<bool> {
    let guarded: Vec<(usize, &Write)> = writes
        .iter()
        .filter(|w| w.is_guarded())
        .map(|w| (0, w))
        .collect();
    let plain: Vec<&Write> = writes.iter().filter(|w| !w.is_guarded()).collect();
    let mut s = Script::new();
    s.guarded_writes(&guarded, at)?;
    s.plain_writes(&plain, at);
    let rows = s.run(conn).await?;
    Ok(passed_guards(&guarded, &rows)?.len() == guarded.len())
}

/// For guarded writes appended in order by [`Script::guarded_writes`], the
/// tags (owners) of those that passed, one entry per passed write.
pub fn passed_guards(
    writes: &[(usize, &Write)],
    rows: &[sqlx::sqlite::SqliteRow],
) -> anyhow::Result<Vec<usize>> {
    use sqlx::Row;
    let mut matched = vec![false; writes.len()];
    let mut out = Vec::new();
    for r in rows {
        let kind: String = r.try_get(0)?;
        match kind.as_str() {
            "guard_instance" => {
                let id: String = r.try_get(1)?;
                let version: i64 = r.try_get(2)?;
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
            "guard_insert" => {
                let id: String = r.try_get(1)?;
                if let Some(k) = writes.iter().enumerate().position(|(k, (_, w))| {
                    !matched[k] && matches!(w, Write::InsertInstance(i) if i.id == id)
                }) {
                    matched[k] = true;
                    out.push(writes[k].0);
                }
            }
            "guard_claim" => {
                let tag: i64 = r.try_get(1)?;
                out.push(usize::try_from(tag)?);
            }
            _ => {}
        }
    }
    Ok(out)
}
