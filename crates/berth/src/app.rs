//! Start-up: opening the store, resolving policies, starting the workers;
//! and the orderly stop.

use std::sync::Arc;

use anyhow::Context;
use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_flows::Deps;
use berth_runtime::hosts::{HostProvider, LOCAL, LocalProvider, PoolProvider};
use berth_runtime::sim::{SimConfig, SimRuntime};
use berth_runtime::{HostId, Limits};
use berth_store::{Store, StoreOptions};
use berth_worker::{Bus, BusOptions, Policies, Registry, Workers};
use tracing::info;

use crate::config::{Config, ProviderKind, RuntimeKind};

/// The workers Berth runs: the instance lifecycle, on `deps`.
pub fn registry(deps: Arc<Deps>) -> anyhow::Result<Registry> {
    let mut reg = Registry::new();
    berth_flows::register(&mut reg, deps)?;
    Ok(reg)
}

/// The runtime and host provider the configuration asks for.
pub fn deps(config: &Config) -> anyhow::Result<(Arc<Deps>, Option<Arc<SimRuntime>>)> {
    let (hosts, provider): (Vec<HostId>, Arc<dyn HostProvider>) = match config.hosts.provider {
        ProviderKind::Local => (vec![HostId::new(LOCAL)], Arc::new(LocalProvider)),
        ProviderKind::Pool => {
            if config.hosts.pool.is_empty() {
                anyhow::bail!("hosts.pool: provider \"pool\" needs at least one host name");
            }
            let hosts: Vec<HostId> = config.hosts.pool.iter().map(HostId::new).collect();
            (hosts.clone(), Arc::new(PoolProvider::new(hosts)))
        }
    };
    match config.runtime.kind {
        RuntimeKind::Sim => {
            let sim = Arc::new(SimRuntime::new(SimConfig::new(hosts.clone())));
            for h in &hosts {
                for image in &config.runtime.sim_base_images {
                    sim.add_base_image(h, image);
                }
            }
            let deps = Arc::new(Deps {
                runtime: sim.clone(),
                hosts: provider,
                limits: Limits::default(),
            });
            Ok((deps, Some(sim)))
        }
    }
}

/// A running Berth: the store and the workers on it.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub policies: Policies,
    pub deps: Arc<Deps>,
    /// The simulated engine, when that is the runtime (tests look inside).
    pub sim: Option<Arc<SimRuntime>>,
    workers: Workers,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// Builds the runtime and workers the configuration asks for, then
    /// [`App::start`]s them; `source` names the configuration in errors.
    pub async fn build(config: Config, source: &str) -> anyhow::Result<App> {
        let (deps, sim) = deps(&config)?;
        let registry = registry(deps.clone())?;
        let policies = config.policies(registry.names(), source)?;
        App::start(config, registry, policies, deps, sim).await
    }

    /// Opens the store under `config.data_dir` and starts `registry`'s
    /// workers with `policies`.
    pub async fn start(
        config: Config,
        registry: Registry,
        policies: Policies,
        deps: Arc<Deps>,
        sim: Option<Arc<SimRuntime>>,
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
            deps,
            sim,
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
