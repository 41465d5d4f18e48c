//! Read-only looks into the store's tables for tests and audits (the
//! simulator's checks, a crash test counting what is left): SQL in the
//! store's own dialect, rows as owned values. The control plane never uses
//! this; it goes through the typed methods of [`Store`] and [`Tx`].

use anyhow::Context;

use crate::ops::Arg;
use crate::writer::{Row, RowRead};
use crate::{Store, Tx};

/// See the module's documentation; from [`Store::inspect`].
#[derive(Debug, Clone, Copy)]
pub struct Inspect<'a>(&'a Store);

impl Store {
    /// Queries for tests and audits.
    pub fn inspect(&self) -> Inspect<'_> {
        Inspect(self)
    }
}

impl Inspect<'_> {
    /// Every row `sql` returns.
    pub async fn rows(
        &self,
        sql: &str,
        args: impl IntoIterator<Item = Arg>,
    ) -> anyhow::Result<Vec<Row>> {
        let mut script = self.0.script();
        script.push(sql, args);
        let mut conn = self.0.read_conn().await?;
        script
            .run(&mut conn.conn())
            .await
            .with_context(|| format!("inspection query failed: {sql}"))
    }

    /// The integer in the first column of the first row (a count, a sum).
    pub async fn number(
        &self,
        sql: &str,
        args: impl IntoIterator<Item = Arg>,
    ) -> anyhow::Result<i64> {
        let rows = self.rows(sql, args).await?;
        rows.first()
            .with_context(|| format!("no row from {sql}"))?
            .int(0)
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> anyhow::Result<i64> {
        self.number(&format!("SELECT COUNT(*) FROM {table}"), [])
            .await
    }
}

impl Tx {
    /// Runs one statement of a test's own making in this transaction (a
    /// test replaying deliveries as a redelivering bus would).
    pub async fn execute_for_test(
        &mut self,
        sql: &str,
        args: impl IntoIterator<Item = Arg>,
    ) -> anyhow::Result<()> {
        let mut script = self.store().script();
        script.push(sql, args);
        self.run(script).await
    }
}
