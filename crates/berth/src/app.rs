//! Start-up: opening the store, resolving policies, starting the workers and
//! the HTTP API; and the orderly stop.

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

/// The workers Berth runs: the instance lifecycle on `deps`, and one
/// notifier per configured webhook.
pub fn registry(config: &Config, deps: Arc<Deps>) -> anyhow::Result<Registry> {
    let mut reg = Registry::new();
    berth_flows::register(&mut reg, deps)?;
    for w in &config.webhooks {
        berth_flows::notify::register(
            &mut reg,
            berth_flows::notify::Webhook {
                name: w.name.clone(),
                url: w.url.clone(),
                secret: w.secret.clone(),
                timeout: std::time::Duration::from_secs(10),
            },
        )
        .with_context(|| format!("webhooks: cannot register '{}'", w.name))?;
    }
    Ok(reg)
}

/// Opens (creating and migrating if needed) the database under
/// `config.data_dir`; returns it with the random source its ids use.
pub async fn open_store(config: &Config) -> anyhow::Result<(Store, Arc<SeededRng>)> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let rng = Arc::new(match config.bus.seed {
        Some(seed) => SeededRng::new(seed),
        None => SeededRng::from_entropy(),
    });
    // The ids the API hands out (orgs, instances, tokens, flows) take their
    // random bits from the OS, even with `bus.seed` set: a seed replays
    // retry timings, and must not make one org's ids guessable from
    // another's. Only the simulator seeds every id.
    let ids = Arc::new(IdGen::with_os_entropy(clock.clone(), rng.clone()));
    let store = Store::open(
        &config.database_path(),
        StoreOptions {
            synchronous: config.store.synchronous,
            max_connections: config.store.max_connections,
            busy_timeout: config.store.busy_timeout,
        },
        clock,
        ids,
    )
    .await?;
    Ok((store, rng))
}

/// The runtime and host provider the configuration asks for. With Docker,
/// every engine must answer now: a start against no engine fails at once,
/// naming the endpoint. Its install id is empty: [`App::build`] sets the
/// store's.
pub async fn deps(config: &Config) -> anyhow::Result<(Arc<Deps>, Option<Arc<SimRuntime>>)> {
    // Host names, and for Docker their endpoints.
    let named: Vec<(HostId, Option<String>)> = match config.hosts.provider {
        ProviderKind::Local => vec![(HostId::new(LOCAL), config.runtime.docker_host.clone())],
        ProviderKind::Pool => {
            if config.hosts.pool.is_empty() {
                anyhow::bail!("hosts.pool: provider \"pool\" needs at least one host");
            }
            config
                .hosts
                .pool
                .iter()
                .map(|entry| match entry.split_once('=') {
                    Some((name, endpoint)) => (HostId::new(name), Some(endpoint.to_owned())),
                    None => (HostId::new(entry.as_str()), None),
                })
                .collect()
        }
    };
    let hosts: Vec<HostId> = named.iter().map(|(h, _)| h.clone()).collect();
    let provider: Arc<dyn HostProvider> = match config.hosts.provider {
        ProviderKind::Local => Arc::new(LocalProvider),
        ProviderKind::Pool => Arc::new(PoolProvider::new(hosts.clone())),
    };
    match config.runtime.kind {
        RuntimeKind::Docker => {
            let mut endpoints = Vec::new();
            for (host, endpoint) in named {
                let endpoint = match (endpoint, config.hosts.provider) {
                    (Some(e), _) => e,
                    (None, ProviderKind::Local) => berth_docker::local_endpoint(),
                    (None, ProviderKind::Pool) => anyhow::bail!(
                        "hosts.pool: with the docker runtime each host needs an endpoint, as \"{host}=tcp://…\""
                    ),
                };
                endpoints.push((host, endpoint));
            }
            let docker = berth_docker::DockerRuntime::connect(endpoints)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let deps = Arc::new(Deps {
                runtime: Arc::new(docker),
                hosts: provider,
                limits: default_limits(config)?,
                install: String::new(),
                builds: Default::default(),
            });
            Ok((deps, None))
        }
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
                limits: default_limits(config)?,
                install: String::new(),
                builds: Default::default(),
            });
            Ok((deps, Some(sim)))
        }
    }
}

/// The configured default limits, for instances recorded without their own.
fn default_limits(config: &Config) -> anyhow::Result<Limits> {
    let q = config
        .limits
        .quotas()
        .map_err(|rule| anyhow::anyhow!("{rule}"))?;
    Ok(Limits {
        memory_bytes: Some(q.default.memory_bytes),
        nano_cpus: Some(q.default.nano_cpus),
        pids: Some(q.default.pids),
    })
}

/// A running Berth: the store, the workers on it, and the HTTP API.
pub struct App {
    pub config: Config,
    pub store: Store,
    pub policies: Policies,
    pub deps: Arc<Deps>,
    /// The simulated engine, when that is the runtime (tests look inside).
    pub sim: Option<Arc<SimRuntime>>,
    /// The admin token when it was generated by this start (none was
    /// configured or stored): to be shown once, then only its hash remains.
    pub generated_admin_token: Option<String>,
    workers: Workers,
    api: berth_api::Server,
    /// The engine-event listeners (one per host) and the reconciler.
    background: Vec<tokio::task::JoinHandle<()>>,
    background_cancel: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl App {
    /// Builds the runtime and workers the configuration asks for, then
    /// starts them and the API; `source` names the configuration in errors.
    pub async fn build(config: Config, source: &str) -> anyhow::Result<App> {
        // The engine first: a start against no engine writes nothing. Then
        // the store, whose install id labels everything the runtime makes.
        let (deps, sim) = deps(&config).await?;
        let (store, rng) = open_store(&config).await?;
        let deps = Arc::new(deps.with_install(store.install_id()));
        let registry = registry(&config, deps.clone())?;
        let policies = config.policies(registry.names(), source)?;
        App::start(config, store, rng, registry, policies, deps, sim).await
    }

    /// Starts `registry`'s workers on `store` with `policies`, and the API.
    async fn start(
        config: Config,
        store: Store,
        rng: Arc<SeededRng>,
        registry: Registry,
        policies: Policies,
        deps: Arc<Deps>,
        sim: Option<Arc<SimRuntime>>,
    ) -> anyhow::Result<App> {
        // Bound first: a taken address should stop the start before any
        // work is claimed.
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {} (listen)", config.listen))?;
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
        let api = async {
            let admin =
                berth_api::admin_token(&store, config.admin_token.as_ref().map(|t| t.expose()))
                    .await
                    .context("failed to set up the admin token")?;
            let server = berth_api::Server::start(
                listener,
                berth_api::ApiDeps {
                    store: store.clone(),
                    bus: workers.bus(),
                    runtime: deps.runtime.clone(),
                    quotas: config
                        .limits
                        .quotas()
                        .map_err(|rule| anyhow::anyhow!("{rule}"))?,
                },
                admin.hash,
                config.api.options(),
            )
            .await
            .context("failed to start the API")?;
            anyhow::Ok((server, admin.generated))
        };
        let (api, generated_admin_token) = match api.await {
            Ok(started) => started,
            Err(e) => {
                // The workers are running: stop them before giving up.
                if let Err(stop) = workers.shutdown().await {
                    tracing::warn!(error = %format!("{stop:#}"), "stopping the workers failed");
                }
                return Err(e);
            }
        };
        // Background tasks, each owned here and stopped by `shutdown`.
        let background_cancel = tokio_util::sync::CancellationToken::new();
        let mut background = Vec::new();
        for host in deps.hosts.hosts() {
            background.push(tokio::spawn(berth_flows::exits::listen(
                workers.bus(),
                deps.clone(),
                host,
                background_cancel.clone(),
            )));
        }
        let r = &config.reconciler;
        background.push(tokio::spawn(
            berth_flows::reconciler::Reconciler::new(berth_flows::reconciler::ReconcilerConfig {
                period: r.period,
                grace: r.grace,
                flow_deadline: r.flow_deadline,
                max_republish: r.max_republish,
            })
            .run(workers.bus(), deps.clone(), background_cancel.clone()),
        ));
        info!(
            database = %config.database_path().display(),
            workers = registry.workers().len(),
            listen = %api.local_addr(),
            seed = rng.seed(),
            "berth started"
        );
        Ok(App {
            config,
            store,
            policies,
            deps,
            sim,
            generated_admin_token,
            workers,
            api,
            background,
            background_cancel,
        })
    }

    /// Where the API listens (the real port when `listen` asked for 0).
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.api.local_addr()
    }

    pub fn bus(&self) -> Bus {
        self.workers.bus()
    }

    /// Stops the API (streams close, requests in flight get the bus's
    /// shutdown grace), then the workers (finishing or returning in-flight
    /// work), and closes the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.api.shutdown(self.config.bus.shutdown_grace).await;
        // Listeners publish onto the bus: stop them before it.
        self.background_cancel.cancel();
        for task in self.background {
            let _ = task.await;
        }
        self.workers.shutdown().await?;
        self.store.pool().close().await;
        info!("berth stopped");
        Ok(())
    }
}
