//! Build contexts an org uploaded: stored whole, content-addressed within
//! the org (one row per org and digest), read back by the image step.

use crate::conn::Conn;
use anyhow::Context;
use berth_core::Timestamp;

use crate::ops::{Arg, fetch};
use crate::writer::{Row, RowRead};
use crate::{Store, Tx};

/// A stored build context, without its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    pub id: String,
    pub org_id: String,
    /// `sha256:<hex>` of the archive.
    pub digest: String,
    pub size: i64,
    /// The images its Dockerfile's stages start from.
    pub bases: Vec<String>,
    pub created_at: Timestamp,
}

/// What [`insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    New(Build),
    /// The org had uploaded these bytes before: that build.
    Existing(Build),
    /// The org has `max` builds already.
    Quota {
        max: i64,
    },
}

/// A row of [`COLUMNS`], in that order.
fn from_row(r: &Row) -> anyhow::Result<Build> {
    let bases = r.text(4)?;
    Ok(Build {
        id: r.text(0)?,
        org_id: r.text(1)?,
        digest: r.text(2)?,
        size: r.int(3)?,
        bases: serde_json::from_str(&bases).context("corrupt build bases in the store")?,
        created_at: Timestamp::from_micros(r.int(5)?),
    })
}

const COLUMNS: &str = "id, org_id, digest, size, bases, created_at";

/// The org's build with these bytes, stored now if it is new and the org
/// has fewer than `max` builds. Run it in a transaction (the count and the
/// insert must see the same table).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn insert(
    conn: &mut Conn<'_>,
    id: &str,
    org: &str,
    digest: &str,
    bases: &[String],
    context: &[u8],
    max: i64,
    at: Timestamp,
) -> anyhow::Result<Inserted> {
    if let Some(b) = by_digest(conn, org, digest).await? {
        return Ok(Inserted::Existing(b));
    }
    let count = fetch(
        conn,
        "SELECT COUNT(*) FROM builds WHERE org_id = ?1",
        [org.into()],
    )
    .await
    .context("failed to count the org's builds")?
    .first()
    .context("no row counting builds")?
    .int(0)?;
    if count >= max {
        return Ok(Inserted::Quota { max });
    }
    let size = i64::try_from(context.len()).unwrap_or(i64::MAX);
    fetch(
        conn,
        "INSERT INTO builds (id, org_id, digest, size, bases, context, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        [
            id.into(),
            org.into(),
            digest.into(),
            Arg::Int(size),
            serde_json::to_string(bases)?.into(),
            context.into(),
            at.into(),
        ],
    )
    .await
    .context("failed to store the build context")?;
    Ok(Inserted::New(Build {
        id: id.to_owned(),
        org_id: org.to_owned(),
        digest: digest.to_owned(),
        size,
        bases: bases.to_vec(),
        created_at: at,
    }))
}

async fn by_digest(conn: &mut Conn<'_>, org: &str, digest: &str) -> anyhow::Result<Option<Build>> {
    let sql = format!("SELECT {COLUMNS} FROM builds WHERE org_id = ?1 AND digest = ?2");
    let rows = fetch(conn, &sql, [org.into(), digest.into()])
        .await
        .context("failed to read a build")?;
    rows.first().map(from_row).transpose()
}

/// The org's build `id`; `None` for another org's, exactly like a missing one.
pub(crate) async fn get(conn: &mut Conn<'_>, org: &str, id: &str) -> anyhow::Result<Option<Build>> {
    let sql = format!("SELECT {COLUMNS} FROM builds WHERE id = ?1 AND org_id = ?2");
    let rows = fetch(conn, &sql, [id.into(), org.into()])
        .await
        .context("failed to read a build")?;
    rows.first().map(from_row).transpose()
}

/// The archive of the org's build `id`.
pub(crate) async fn context(
    conn: &mut Conn<'_>,
    org: &str,
    id: &str,
) -> anyhow::Result<Option<Vec<u8>>> {
    let rows = fetch(
        conn,
        "SELECT context FROM builds WHERE id = ?1 AND org_id = ?2",
        [id.into(), org.into()],
    )
    .await
    .context("failed to read a build context")?;
    rows.first().map(|r| r.blob(0)).transpose()
}

/// The org's builds, newest first.
pub(crate) async fn list(conn: &mut Conn<'_>, org: &str) -> anyhow::Result<Vec<Build>> {
    let sql =
        format!("SELECT {COLUMNS} FROM builds WHERE org_id = ?1 ORDER BY created_at DESC, id DESC");
    let rows = fetch(conn, &sql, [org.into()])
        .await
        .context("failed to list builds")?;
    rows.iter().map(from_row).collect()
}

/// A build context to store; see [`Tx::insert_build`].
#[derive(Debug, Clone, Copy)]
pub struct NewBuild<'a> {
    pub id: &'a str,
    pub org: &'a str,
    /// `sha256:<hex>` of `context`.
    pub digest: &'a str,
    pub bases: &'a [String],
    pub context: &'a [u8],
    /// The most builds the org may hold.
    pub max: i64,
    pub at: Timestamp,
}

impl Tx {
    /// The org's build with these bytes, stored now if it is new and the
    /// org holds fewer than `max` builds (the count and the insert see the
    /// same table: this transaction's).
    pub async fn insert_build(&mut self, b: NewBuild<'_>) -> anyhow::Result<Inserted> {
        insert(
            &mut self.conn(),
            b.id,
            b.org,
            b.digest,
            b.bases,
            b.context,
            b.max,
            b.at,
        )
        .await
    }
}

impl Store {
    /// The build `id` of `org` (another org's is `None`).
    pub async fn build(&self, org: &str, id: &str) -> anyhow::Result<Option<Build>> {
        get(&mut self.read_conn().await?.conn(), org, id).await
    }

    /// The archive of the build `id` of `org`.
    pub async fn build_context(&self, org: &str, id: &str) -> anyhow::Result<Option<Vec<u8>>> {
        context(&mut self.read_conn().await?.conn(), org, id).await
    }

    /// Every build of `org`, newest first.
    pub async fn builds(&self, org: &str) -> anyhow::Result<Vec<Build>> {
        list(&mut self.read_conn().await?.conn(), org).await
    }
}
