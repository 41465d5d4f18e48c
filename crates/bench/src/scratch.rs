//! Where a benchmark's database lives (`--store`): a SQLite file in a
//! scratch directory, or a fresh database on a PostgreSQL server, made for
//! the run and dropped after it, so that runs never see each other's rows.

use std::path::Path;

use berth_store::Location;
use berth_store::postgres::{drop_database, fresh_database, is_postgres_url, redact};

/// The parsed `--store`: `sqlite`, or a PostgreSQL server's URL.
#[derive(Clone)]
pub enum StoreArg {
    Sqlite,
    /// The server's URL; its own database is only used to connect, to make
    /// and drop the run's.
    Postgres(String),
}

impl StoreArg {
    pub fn parse(arg: &str) -> anyhow::Result<StoreArg> {
        if arg == "sqlite" {
            Ok(StoreArg::Sqlite)
        } else if is_postgres_url(arg) {
            berth_store::postgres::check_url(arg).map_err(|e| anyhow::anyhow!("--store: {e:#}"))?;
            Ok(StoreArg::Postgres(arg.to_owned()))
        } else {
            // Redacted: a mistyped scheme may still carry a password.
            anyhow::bail!(
                "--store must be sqlite or a postgres:// server URL, got '{}'",
                redact(arg)
            )
        }
    }

    /// The JSON's `store` field.
    pub fn name(&self) -> &'static str {
        match self {
            StoreArg::Sqlite => "sqlite",
            StoreArg::Postgres(_) => "postgres",
        }
    }
}

/// The run's database; [`Scratch::remove`] drops it if it was made on a
/// server (a SQLite file goes with its temporary directory).
pub struct Scratch {
    server: Option<String>,
    location: Location,
}

impl Scratch {
    /// A fresh database for `arg`: on SQLite the file `file` (in the
    /// caller's scratch directory), on PostgreSQL a new database on the
    /// server.
    pub async fn make(arg: &StoreArg, file: &Path) -> anyhow::Result<Scratch> {
        Ok(match arg {
            StoreArg::Sqlite => Scratch {
                server: None,
                location: Location::File(file.to_owned()),
            },
            StoreArg::Postgres(server) => Scratch {
                location: Location::Postgres(fresh_database(server).await?),
                server: Some(server.clone()),
            },
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// The database's URL on PostgreSQL (for the raw commit rate).
    pub fn postgres_url(&self) -> Option<&str> {
        match &self.location {
            Location::Postgres(url) => Some(url),
            Location::File(_) => None,
        }
    }

    /// Drops the run's PostgreSQL database. A failure is only a warning:
    /// the numbers are still good, and the message names what was left.
    pub async fn remove(self) {
        if let (Some(server), Location::Postgres(url)) = (&self.server, &self.location)
            && let Err(e) = drop_database(server, url).await
        {
            eprintln!(
                "warning: could not drop the benchmark's database {}: {e:#}",
                redact(url)
            );
        }
    }

    /// Runs `body` on this database and drops it after, whether `body`
    /// succeeded, failed or was interrupted by Ctrl-C (dropping the future
    /// leaves its spawned tasks running, but the drop forces their
    /// connections closed).
    pub async fn run<F>(self, body: F) -> anyhow::Result<String>
    where
        F: std::future::Future<Output = anyhow::Result<String>>,
    {
        let result = tokio::select! {
            r = body => r,
            // A failure to listen for Ctrl-C disables the branch, no more.
            Ok(()) = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        };
        self.remove().await;
        result
    }
}
