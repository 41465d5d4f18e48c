//! Start-up: opening the store, resolving policies, starting the workers;
//! and the orderly stop.

use std::sync::Arc;

use anyhow::Context;
use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_store::{Store, StoreOptions};
use berth_worker::{Bus, BusOptions, Policies, Registry, Workers};
use tracing::info;

use crate::config::Config;

/// The workers Berth runs. Empty until the instance flow registers its own;
/// the framework is complete without them.
pub fn registry() -> Registry {
    Registry::new()
}

/// A running Berth: the store and the workers on it.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub policies: Policies,
    workers: Workers,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// Opens the store under `config.data_dir` and starts `registry`'s
    /// workers with `policies`.
    pub async fn build(
        config: Config,
        registry: Registry,
        policies: Policies,
    ) -> anyhow::Result<App> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let rng = Arc::new(match config.bus.seed {
            Some(seed) => SeededRng::new(seed),
            None => SeededRng::from_entropy(),
        });
        let ids = Arc::new(IdGen::new(clock.clone(), rng.clone()));
        let path = config.database_path();
        let store = Store::open(
            &path,
            StoreOptions {
                synchronous: config.store.synchronous,
                max_connections: config.store.max_connections,
                busy_timeout: config.store.busy_timeout,
            },
            clock,
            ids,
        )
        .await?;
        let workers = Workers::start(
            store.clone(),
            &registry,
            &policies,
            BusOptions {
                lease_grace: config.bus.lease_grace,
                shutdown_grace: config.bus.shutdown_grace,
                max_batch: config.bus.max_batch,
                poll_interval: config.bus.poll_interval,
                checkpoint_interval: Some(config.bus.checkpoint_interval),
                rng: rng.clone(),
            },
        )
        .await
        .context("failed to start the workers")?;
        info!(
            database = %path.display(),
            workers = registry.workers().len(),
            seed = rng.seed(),
            "berth started"
        );
        Ok(App {
            config,
            store,
            policies,
            workers,
        })
    }

    pub fn bus(&self) -> Bus {
        self.workers.bus()
    }

    /// Stops the workers (finishing or returning in-flight work) and closes
    /// the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.workers.shutdown().await?;
        self.store.pool().close().await;
        info!("berth stopped");
        Ok(())
    }
}
