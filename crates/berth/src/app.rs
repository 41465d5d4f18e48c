//! Start-up: composing the world (engine, store, workers' dependencies,
//! registry, policies) in one function, [`compose`], that the binary and
//! the tests share; starting its workers, engine-event listeners,
//! reconciler and HTTP API; and the orderly stop.

use std::sync::Arc;

use anyhow::Context;
use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_flows::Deps;
use berth_runtime::hosts::{HostProvider, LOCAL, LocalProvider, PoolProvider};
use berth_runtime::sim::{SimConfig, SimRuntime};
use berth_runtime::{ContainerRuntime, HostId, Limits};
use berth_store::{Store, StoreOptions};
use berth_worker::{Bus, BusOptions, Policies, Registry, Workers};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::{Config, ProviderKind, Role, RuntimeKind};

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
    open_store_with(config, Arc::new(SystemClock), false).await
}

/// [`open_store`] on `clock`; with `seeded_ids`, every id is drawn from
/// the seeded generator too (replayable runs: the simulator, tests).
async fn open_store_with(
    config: &Config,
    clock: Arc<dyn Clock>,
    seeded_ids: bool,
) -> anyhow::Result<(Store, Arc<SeededRng>)> {
    let rng = Arc::new(match config.bus.seed {
        Some(seed) => SeededRng::new(seed),
        None => SeededRng::from_entropy(),
    });
    // The ids the API hands out (orgs, instances, tokens, flows) take their
    // random bits from the OS, even with `bus.seed` set: a seed replays
    // retry timings, and must not make one org's ids guessable from
    // another's. Only the simulator and tests seed every id.
    let ids = Arc::new(if seeded_ids {
        IdGen::new(clock.clone(), rng.clone())
    } else {
        IdGen::with_os_entropy(clock.clone(), rng.clone())
    });
    let store = Store::open_at(
        &config.database_location(),
        StoreOptions {
            synchronous: config.store.synchronous,
            max_connections: config.store.max_connections,
            busy_timeout: config.store.busy_timeout,
            // Sound only while one process writes every instance row: with
            // `api` processes beside it, the worker side's rows would go
            // stale (see `role_lock`).
            instance_cache: config.role == Role::All,
        },
        clock,
        ids,
    )
    .await?;
    Ok((store, rng))
}

/// The runtime and host provider the configuration asks for. With Docker,
/// every engine must answer now: a start against no engine fails at once,
/// naming the endpoint. Its install id is empty: [`compose`] sets the
/// store's.
pub async fn deps(config: &Config) -> anyhow::Result<(Arc<Deps>, Option<Arc<SimRuntime>>)> {
    deps_with(config, None).await
}

/// [`deps`], on `runtime` instead of the configured engine when one is
/// given (the hosts and limits still come from the configuration).
async fn deps_with(
    config: &Config,
    runtime: Option<Arc<dyn ContainerRuntime>>,
) -> anyhow::Result<(Arc<Deps>, Option<Arc<SimRuntime>>)> {
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
    if let Some(runtime) = runtime {
        let deps = Arc::new(Deps {
            runtime,
            hosts: provider,
            limits: default_limits(config)?,
            install: String::new(),
            builds: Default::default(),
        });
        return Ok((deps, None));
    }
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
            let sim = sim_runtime(config, SimConfig::new(hosts));
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

/// The host names the configuration gives (`[hosts]`), without endpoints.
pub fn host_names(config: &Config) -> Vec<HostId> {
    match config.hosts.provider {
        ProviderKind::Local => vec![HostId::new(LOCAL)],
        ProviderKind::Pool => config
            .hosts
            .pool
            .iter()
            .map(|entry| HostId::new(entry.split_once('=').map_or(entry.as_str(), |(h, _)| h)))
            .collect(),
    }
}

/// The simulated engine as `sim` configures it, with the configured base
/// images (`runtime.sim_base_images`) on each of its hosts. Tests make
/// theirs here too (with latency, or behind the fault wrapper) and hand it
/// to [`compose`] as [`Overrides::runtime`].
pub fn sim_runtime(config: &Config, sim: SimConfig) -> Arc<SimRuntime> {
    let hosts = sim.hosts.clone();
    let sim = Arc::new(SimRuntime::new(sim));
    for h in &hosts {
        for image in &config.runtime.sim_base_images {
            sim.add_base_image(h, image);
        }
    }
    sim
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

/// What a test, a benchmark or the simulator puts in place of what the
/// configuration would make. The default replaces nothing: the binary's
/// world.
#[derive(Default)]
pub struct Overrides {
    /// The engine, instead of the one `[runtime]` names (the simulator
    /// behind the fault wrapper, or a Docker runtime already connected);
    /// hosts and limits still come from the configuration.
    pub runtime: Option<Arc<dyn ContainerRuntime>>,
    /// The store's clock (every timestamp, and so the back-off's delays),
    /// instead of the system's: a paused tokio clock, a frozen one.
    pub clock: Option<Arc<dyn Clock>>,
    /// Draw every id from `bus.seed`'s generator, as the simulator does;
    /// the binary draws the ids users see from the OS.
    pub seeded_ids: bool,
    /// The workers, instead of Berth's (the framework's tests run toy
    /// workers on the same start-up).
    pub registry: Option<Registry>,
    /// The policies, instead of those resolved from `[workers]`.
    pub policies: Option<Policies>,
    /// Leave the WAL to SQLite's automatic checkpoint: a test on tokio's
    /// paused clock must have no timer armed while SQLite works.
    pub no_checkpointer: bool,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overrides")
            .field("runtime", &self.runtime.is_some())
            .field("clock", &self.clock.is_some())
            .field("seeded_ids", &self.seeded_ids)
            .field("registry", &self.registry.is_some())
            .field("policies", &self.policies.is_some())
            .field("no_checkpointer", &self.no_checkpointer)
            .finish()
    }
}

/// Berth composed but not started: the engine, the store, what the workers
/// need, the registry and its resolved policies. [`App::build`] starts one
/// with the API; tests start its parts ([`World::start_workers`],
/// [`World::listen`], [`World::reconcile`]) as they need them.
pub struct World {
    pub config: Config,
    pub store: Store,
    /// The generator of the back-off's jitter (and, with
    /// [`Overrides::seeded_ids`], of every id).
    pub rng: Arc<SeededRng>,
    pub deps: Arc<Deps>,
    /// The simulated engine, when the configuration made it.
    pub sim: Option<Arc<SimRuntime>>,
    pub registry: Registry,
    pub policies: Policies,
    checkpoints: bool,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("store", &self.store)
            .field("workers", &self.registry.workers().len())
            .finish_non_exhaustive()
    }
}

/// Composes Berth from `config` (`source` names it in errors), replacing
/// what `overrides` gives. The one composition of the binary, the tests
/// and the benchmarks, so that what a test runs is what `berth serve` runs.
pub async fn compose(config: Config, source: &str, overrides: Overrides) -> anyhow::Result<World> {
    // The engine first: a start against no engine writes nothing. Then
    // the store, whose install id labels everything the runtime makes.
    let (deps, sim) = deps_with(&config, overrides.runtime).await?;
    let clock = overrides.clock.unwrap_or_else(|| Arc::new(SystemClock));
    let (store, rng) = open_store_with(&config, clock, overrides.seeded_ids).await?;
    let deps = Arc::new(deps.with_install(store.install_id()));
    let registry = match overrides.registry {
        Some(r) => r,
        None => registry(&config, deps.clone())?,
    };
    let policies = match overrides.policies {
        Some(p) => p,
        None => config.policies(registry.names(), source)?,
    };
    Ok(World {
        config,
        store,
        rng,
        deps,
        sim,
        registry,
        policies,
        checkpoints: !overrides.no_checkpointer,
    })
}

impl World {
    /// The dispatcher's options, from `[bus]`.
    pub fn bus_options(&self) -> BusOptions {
        let bus = &self.config.bus;
        BusOptions {
            lease_grace: bus.lease_grace,
            shutdown_grace: bus.shutdown_grace,
            max_batch: bus.max_batch,
            poll_interval: bus.poll_interval,
            checkpoint_interval: self.checkpoints.then_some(bus.checkpoint_interval),
            rng: self.rng.clone(),
        }
    }

    /// Starts dispatching the registry's workers (see [`Workers::start`]).
    pub async fn start_workers(&self) -> anyhow::Result<Workers> {
        Workers::start(
            self.store.clone(),
            &self.registry,
            &self.policies,
            self.bus_options(),
        )
        .await
        .context("failed to start the workers")
    }

    /// Spawns one engine-event listener per host, until `cancel`.
    pub fn listen(&self, bus: &Bus, cancel: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.deps
            .hosts
            .hosts()
            .into_iter()
            .map(|host| {
                tokio::spawn(berth_flows::exits::listen(
                    bus.clone(),
                    self.deps.clone(),
                    host,
                    cancel.clone(),
                ))
            })
            .collect()
    }

    /// The listeners and the reconciler where other processes may run
    /// them too (PostgreSQL): each under its lease (see [`crate::singleton`]),
    /// so that each runs in one process at a time.
    pub fn singletons(&self, bus: &Bus, cancel: &CancellationToken) -> Vec<JoinHandle<()>> {
        let owner = format!("{}-{}", std::process::id(), self.store.ids().ulid());
        let lease =
            |name: String, start: Box<dyn Fn(CancellationToken) -> JoinHandle<()> + Send>| {
                crate::singleton::spawn(
                    self.store.clone(),
                    name,
                    owner.clone(),
                    crate::singleton::TERM,
                    cancel.clone(),
                    start,
                )
            };
        let mut out: Vec<JoinHandle<()>> = self
            .deps
            .hosts
            .hosts()
            .into_iter()
            .map(|host| {
                let (bus, deps) = (bus.clone(), self.deps.clone());
                let name = format!("listener:{host}");
                lease(
                    name,
                    Box::new(move |c| {
                        tokio::spawn(berth_flows::exits::listen(
                            bus.clone(),
                            deps.clone(),
                            host.clone(),
                            c,
                        ))
                    }),
                )
            })
            .collect();
        let (bus, deps, config) = (bus.clone(), self.deps.clone(), self.reconciler_config());
        // A fresh reconciler for each term held: what an earlier holder
        // remembered (orphans first seen) is met again after its grace.
        out.push(lease(
            "reconciler".to_owned(),
            Box::new(move |c| {
                let r = berth_flows::reconciler::Reconciler::new(config.clone());
                tokio::spawn(r.run(bus.clone(), deps.clone(), c))
            }),
        ));
        out
    }

    /// The reconciler `[reconciler]` configures.
    pub fn reconciler(&self) -> berth_flows::reconciler::Reconciler {
        berth_flows::reconciler::Reconciler::new(self.reconciler_config())
    }

    fn reconciler_config(&self) -> berth_flows::reconciler::ReconcilerConfig {
        let r = &self.config.reconciler;
        berth_flows::reconciler::ReconcilerConfig {
            period: r.period,
            grace: r.grace,
            flow_deadline: r.flow_deadline,
            max_republish: r.max_republish,
            call_timeout: r.call_timeout,
        }
    }

    /// Spawns the reconciler's passes, until `cancel`.
    pub fn reconcile(&self, bus: &Bus, cancel: &CancellationToken) -> JoinHandle<()> {
        tokio::spawn(
            self.reconciler()
                .run(bus.clone(), self.deps.clone(), cancel.clone()),
        )
    }
}

/// Keeps a process of role `all` (whose instance-row cache assumes it is the
/// only writer of instance rows) and processes of role `api` (which write
/// them too) off one database: `all` holds `<database>.roles.lock`
/// exclusively, each `api` process shares it. `worker` keeps no cache and
/// takes no lock.
fn role_lock(config: &Config) -> anyhow::Result<Option<std::fs::File>> {
    // On PostgreSQL nothing needs it: the cache is off there, and any
    // number of each role share the database.
    if config.store.url.is_some() {
        return Ok(None);
    }
    let mut path = config.database_path().into_os_string();
    path.push(".roles.lock");
    let path = std::path::PathBuf::from(path);
    let open = || {
        std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("failed to open {}", path.display()))
    };
    let held = |what: &str| {
        anyhow::anyhow!(
            "{what} on {} (lock file {} is held): run the workers as `berth serve --role worker` beside `--role api` processes",
            config.database_path().display(),
            path.display()
        )
    };
    match config.role {
        Role::Worker => Ok(None),
        Role::All => {
            let file = open()?;
            match file.try_lock() {
                Ok(()) => Ok(Some(file)),
                Err(std::fs::TryLockError::WouldBlock) => {
                    Err(held("processes of role api are running"))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    Err(e).with_context(|| format!("failed to lock {}", path.display()))
                }
            }
        }
        Role::Api => {
            let file = open()?;
            match file.try_lock_shared() {
                Ok(()) => Ok(Some(file)),
                Err(std::fs::TryLockError::WouldBlock) => {
                    Err(held("a process of role all is running"))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    Err(e).with_context(|| format!("failed to lock {}", path.display()))
                }
            }
        }
    }
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
    /// Held for the process's life: see [`role_lock`].
    _role_lock: Option<std::fs::File>,
    /// `None` in a process of the `api` role.
    workers: Option<Workers>,
    bus: Bus,
    /// `None` in a process of the `worker` role.
    api: Option<berth_api::Server>,
    /// The engine-event listeners (one per host) and the reconciler.
    background: Vec<JoinHandle<()>>,
    background_cancel: CancellationToken,
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
        App::start(compose(config, source, Overrides::default()).await?).await
    }

    /// Starts what `world`'s role runs: the workers, the engine-event
    /// listeners and the reconciler (`all`, `worker`), the API (`all`,
    /// `api`).
    pub async fn start(world: World) -> anyhow::Result<App> {
        let config = &world.config;
        let role = config.role;
        let role_lock = role_lock(config)?;
        // Bound first: a taken address should stop the start before any
        // work is claimed.
        let listener = if role.serves_api() {
            Some(
                tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("cannot listen on {} (listen)", config.listen))?,
            )
        } else {
            None
        };
        let workers = if role.runs_workers() {
            Some(world.start_workers().await?)
        } else {
            None
        };
        let bus = match &workers {
            Some(w) => w.bus(),
            None => {
                // A publish fans out to the workers subscribed: this
                // process runs none, but knows them all (the same
                // registry), so each event gets its deliveries for the
                // processes that do.
                world
                    .store
                    .set_subscriptions(world.registry.subscriptions());
                Bus::without_dispatcher(world.store.clone())
            }
        };
        let store = &world.store;
        let api = async {
            let Some(listener) = listener else {
                return anyhow::Ok((None, None));
            };
            let admin =
                berth_api::admin_token(store, config.admin_token.as_ref().map(|t| t.expose()))
                    .await
                    .context("failed to set up the admin token")?;
            let server = berth_api::Server::start(
                listener,
                berth_api::ApiDeps {
                    store: store.clone(),
                    bus: bus.clone(),
                    runtime: world.deps.runtime.clone(),
                    quotas: config
                        .limits
                        .quotas()
                        .map_err(|rule| anyhow::anyhow!("{rule}"))?,
                    max_attempts: world
                        .policies
                        .iter()
                        .map(|(name, p)| (name.to_owned(), p.max_attempts))
                        .collect(),
                },
                admin.hash,
                config.api.options(),
            )
            .await
            .context("failed to start the API")?;
            anyhow::Ok((Some(server), admin.generated))
        };
        let (api, generated_admin_token) = match api.await {
            Ok(started) => started,
            Err(e) => {
                // The workers may be running: stop them before giving up.
                if let Some(workers) = workers
                    && let Err(stop) = workers.shutdown().await
                {
                    tracing::warn!(error = %format!("{stop:#}"), "stopping the workers failed");
                }
                return Err(e);
            }
        };
        // Background tasks, each owned here and stopped by `shutdown`: with
        // the workers, since they publish onto their bus.
        let background_cancel = CancellationToken::new();
        let mut background = Vec::new();
        if workers.is_some() {
            if world.store.dialect() == berth_store::Dialect::Postgres {
                background = world.singletons(&bus, &background_cancel);
            } else {
                background = world.listen(&bus, &background_cancel);
                background.push(world.reconcile(&bus, &background_cancel));
            }
        }
        info!(
            database = %config.database_location(),
            role = ?role,
            workers = if workers.is_some() { world.registry.workers().len() } else { 0 },
            listen = %api.as_ref().map(|a| a.local_addr().to_string()).unwrap_or_else(|| "-".into()),
            seed = world.rng.seed(),
            "berth started"
        );
        let World {
            config,
            store,
            deps,
            sim,
            policies,
            ..
        } = world;
        Ok(App {
            config,
            store,
            policies,
            deps,
            sim,
            generated_admin_token,
            _role_lock: role_lock,
            workers,
            bus,
            api,
            background,
            background_cancel,
        })
    }

    /// Where the API listens (the real port when `listen` asked for 0);
    /// `None` in a process of the `worker` role.
    pub fn api_addr(&self) -> Option<std::net::SocketAddr> {
        self.api.as_ref().map(|a| a.local_addr())
    }

    pub fn bus(&self) -> Bus {
        self.bus.clone()
    }

    /// Stops the API (streams close, requests in flight get the bus's
    /// shutdown grace), then the workers (finishing or returning in-flight
    /// work), and closes the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(api) = self.api {
            api.shutdown(self.config.bus.shutdown_grace).await;
        }
        // Listeners publish onto the bus: stop them before it.
        self.background_cancel.cancel();
        for task in self.background {
            let _ = task.await;
        }
        if let Some(workers) = self.workers {
            workers.shutdown().await?;
        }
        self.store.close().await;
        info!("berth stopped");
        Ok(())
    }
}
