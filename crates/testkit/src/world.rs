//! Worlds for tests, composed by [`berth::compose`] as `berth serve`
//! composes its own: a [`Kit`] says what to override, a [`TestWorld`] is
//! the result, with its workers, engine-event listeners and reconciler
//! started only when the test asks (a scripted scenario runs the
//! reconciler's passes itself).

use std::sync::Arc;

use berth::Config;
use berth::app::{Overrides, World, sim_runtime};
use berth_core::domain::{InstanceName, InstanceStatus};
use berth_core::{Clock, Envelope, EventPayload, NewEvent};
use berth_flows::Deps;
use berth_runtime::faulty::FaultyRuntime;
use berth_runtime::sim::{SimConfig, SimLatency, SimRuntime};
use berth_runtime::{ContainerRuntime, HostId};
use berth_store::instances::{Instance, InstanceSpec};
use berth_store::writes::Write;
use berth_store::{Cause, Store};
use berth_worker::testing::StepOutput;
use berth_worker::{Bus, HandlerError, Registry, Workers};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::wait::{DEADLINE, wait_for, wait_for_within};

/// The engine a kit's world runs on.
enum Engine {
    /// The simulator the configuration makes, with `latency`, behind the
    /// fault wrapper (seeded; it injects nothing until told to).
    Sim {
        latency: SimLatency,
        fault_seed: u64,
    },
    /// A runtime the test made (Docker, maybe behind its own wrapper).
    Given(Arc<dyn ContainerRuntime>),
}

/// What a test world is made of, before it is composed.
pub struct Kit {
    config: String,
    engine: Engine,
    clock: Option<Arc<dyn Clock>>,
    registry: Option<Registry>,
}

impl std::fmt::Debug for Kit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kit")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Kit {
    /// A world configured by the TOML text `config` (a `berth.toml`; the
    /// data directory is the kit's), on the simulated engine behind the
    /// fault wrapper. Unless the text says otherwise the bus is seeded, and
    /// every id is drawn from that seed, so that a run replays.
    pub fn new(config: &str) -> Kit {
        Kit {
            config: config.to_owned(),
            engine: Engine::Sim {
                latency: SimLatency::default(),
                fault_seed: 7,
            },
            clock: None,
            registry: None,
        }
    }

    /// The simulated engine takes `latency` per operation.
    pub fn latency(mut self, latency: SimLatency) -> Kit {
        if let Engine::Sim { latency: l, .. } = &mut self.engine {
            *l = latency;
        }
        self
    }

    /// On `runtime` instead of the simulator (the Docker suites).
    pub fn runtime(mut self, runtime: Arc<dyn ContainerRuntime>) -> Kit {
        self.engine = Engine::Given(runtime);
        self
    }

    /// The store's clock.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Kit {
        self.clock = Some(clock);
        self
    }

    /// These workers instead of Berth's.
    pub fn registry(mut self, registry: Registry) -> Kit {
        self.registry = Some(registry);
        self
    }

    /// The configuration as [`berth::Config::load`] reads it, in `dir`.
    fn load(&self, dir: &std::path::Path) -> Config {
        let path = dir.join("berth.toml");
        std::fs::write(&path, &self.config).unwrap();
        let mut config = Config::load(Some(&path), Vec::<(String, String)>::new())
            .unwrap_or_else(|e| panic!("the test's configuration: {e}"));
        config.data_dir = dir.join("data");
        config.bus.seed.get_or_insert(3);
        config
    }

    /// Composes the world, starting nothing: [`TestWorld::start`] starts
    /// its workers; without them it is a store and a registry to try steps
    /// on ([`TestWorld::step`]).
    pub async fn compose(self) -> TestWorld {
        let dir = tempfile::tempdir().unwrap();
        let mut config = self.load(dir.path());
        on_test_store(&mut config).await;
        let (runtime, sim, faulty) = match self.engine {
            Engine::Sim {
                latency,
                fault_seed,
            } => {
                let hosts = berth::app::host_names(&config);
                let sim = sim_runtime(&config, SimConfig::new(hosts).with_latency(latency));
                let faulty = Arc::new(FaultyRuntime::new(sim.clone(), fault_seed));
                let runtime: Arc<dyn ContainerRuntime> = faulty.clone();
                (runtime, Some(sim), Some(faulty))
            }
            Engine::Given(runtime) => (runtime, None, None),
        };
        let world = berth::compose(
            config,
            "the test's configuration",
            Overrides {
                runtime: Some(runtime),
                clock: self.clock,
                seeded_ids: true,
                registry: self.registry,
                // Tests may pause tokio's clock; the checkpointer's timer
                // would then jump while SQLite works.
                no_checkpointer: true,
                ..Overrides::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("composing the test's world: {e:#}"));
        TestWorld {
            store: world.store.clone(),
            deps: world.deps.clone(),
            world,
            sim,
            faulty,
            workers: None,
            background: Vec::new(),
            cancel: CancellationToken::new(),
            _dir: dir,
        }
    }

    /// Composes the world and starts its workers.
    pub async fn start(self) -> TestWorld {
        let mut w = self.compose().await;
        w.start().await;
        w
    }
}

/// A composed world: its store, engine and registry, and the workers and
/// background tasks the test started.
pub struct TestWorld {
    pub world: World,
    pub store: Store,
    pub deps: Arc<Deps>,
    /// The simulated engine, unless the kit was given a runtime.
    pub sim: Option<Arc<SimRuntime>>,
    /// The fault wrapper around the simulated engine.
    pub faulty: Option<Arc<FaultyRuntime>>,
    workers: Option<Workers>,
    background: Vec<JoinHandle<()>>,
    cancel: CancellationToken,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestWorld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestWorld")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl TestWorld {
    /// The composed world for [`berth::App::start`] (the real server on its
    /// own port, as `berth serve` runs it), with the fault wrapper to steer
    /// its engine and the directory that must outlive the app. Only for a
    /// world whose workers this kit did not start.
    pub fn into_app_parts(self) -> (World, Option<Arc<FaultyRuntime>>, tempfile::TempDir) {
        assert!(self.workers.is_none(), "the kit's workers are running");
        (self.world, self.faulty, self._dir)
    }

    /// Starts the workers (again, after [`TestWorld::stop`]: a restart on
    /// the same database, as after a crash).
    pub async fn start(&mut self) {
        assert!(self.workers.is_none(), "the workers are already running");
        self.workers = Some(self.world.start_workers().await.unwrap());
    }

    /// The bus of the running workers.
    pub fn bus(&self) -> Bus {
        self.workers
            .as_ref()
            .expect("the workers are not running (TestWorld::start)")
            .bus()
    }

    /// The simulated engine (panics when the world runs on another).
    pub fn sim(&self) -> &Arc<SimRuntime> {
        self.sim
            .as_ref()
            .expect("this world has no simulated engine")
    }

    /// The fault wrapper (panics when the world runs on another engine).
    pub fn faulty(&self) -> &Arc<FaultyRuntime> {
        self.faulty
            .as_ref()
            .expect("this world has no fault wrapper")
    }

    /// The first host the configuration names.
    pub fn host(&self) -> HostId {
        self.deps
            .hosts
            .hosts()
            .into_iter()
            .next()
            .expect("a configured host")
    }

    /// Starts the engine-event listeners, one per host, as the app does;
    /// they stop with [`TestWorld::stop`] or when the token is cancelled.
    pub fn listen(&mut self) -> CancellationToken {
        let cancel = self.cancel.child_token();
        let tasks = self.world.listen(&self.bus(), &cancel);
        self.background.extend(tasks);
        cancel
    }

    /// Starts the reconciler's periodic passes, as the app does.
    pub fn reconcile(&mut self) -> CancellationToken {
        let cancel = self.cancel.child_token();
        let task = self.world.reconcile(&self.bus(), &cancel);
        self.background.push(task);
        cancel
    }

    /// Stops the background tasks, then the workers (what finished is
    /// committed, the rest goes back to the queue).
    pub async fn stop(&mut self) {
        self.cancel.cancel();
        for task in self.background.drain(..) {
            let _ = task.await;
        }
        self.cancel = CancellationToken::new();
        if let Some(w) = self.workers.take() {
            w.shutdown().await.unwrap();
        }
    }

    /// Waits for `check` (see [`crate::wait_for`]) on this world's store.
    pub async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_for(&self.store, what, check).await
    }

    /// Creates an instance of `spec` as a user action would (its row and
    /// `instance.requested`, in one transaction).
    pub async fn create(&self, org: &str, name: &str, spec: InstanceSpec) -> (Instance, Envelope) {
        berth_flows::create_instance(&self.store, org, InstanceName::parse(name).unwrap(), spec)
            .await
            .unwrap()
    }

    /// The instance's stored row.
    pub async fn get(&self, id: &str) -> Instance {
        self.find(id)
            .await
            .unwrap_or_else(|| panic!("no instance {id}"))
    }

    async fn find(&self, id: &str) -> Option<Instance> {
        self.store.instance(id).await.unwrap()
    }

    /// Every stored instance.
    pub async fn all(&self) -> Vec<Instance> {
        self.store.instances(None).await.unwrap()
    }

    /// Waits until the instance is as `wanted` says; a wait that ends
    /// fails naming `what` and the instance's last status and attempts.
    pub async fn until_is(
        &self,
        id: &str,
        what: &str,
        wanted: impl Fn(&Instance) -> bool,
    ) -> Instance {
        let found = wait_for_within(&self.store, DEADLINE, || async {
            self.find(id).await.filter(|i| wanted(i))
        })
        .await;
        match found {
            Ok(i) => i,
            Err(_) => {
                let i = self.get(id).await;
                let attempts = self.store.attempts_of_flow(i.flow_id).await.unwrap();
                let tried: Vec<String> = attempts
                    .iter()
                    .map(|a| format!("{} #{} {:?} {:?}", a.worker, a.attempt, a.outcome, a.error))
                    .collect();
                panic!(
                    "instance {id} ({}) stuck in {} (restarts {}, error {:?}), wanted {what}; attempts:\n{}",
                    i.name,
                    i.status,
                    i.restarts,
                    i.error,
                    tried.join("\n")
                )
            }
        }
    }

    /// Waits until the instance has `status`.
    pub async fn until(&self, id: &str, status: InstanceStatus) -> Instance {
        self.until_is(id, &format!("{status}"), |i| i.status == status)
            .await
    }

    /// Waits until the instance is running again after `n` restarts.
    pub async fn until_restarted(&self, id: &str, n: i64) -> Instance {
        self.until_is(id, &format!("running after {n} restarts"), |i| {
            i.status == InstanceStatus::Running && i.restarts == n
        })
        .await
    }

    /// Waits until the instance's status is terminal.
    pub async fn settle(&self, id: &str) -> Instance {
        self.until_is(id, "a terminal status", |i| i.status.is_terminal())
            .await
    }

    /// Waits until the bus has nothing queued or in flight.
    pub async fn quiesce(&self) {
        self.wait_for("the bus to drain", || async {
            (self.store.queue_depth().await.unwrap() == (0, 0)).then_some(())
        })
        .await
    }

    /// An envelope of `payload` about `org`'s `subject`, as the handler of
    /// `cause` would have emitted it (a root of a new flow without one).
    pub fn envelope<T: EventPayload>(
        &self,
        payload: &T,
        org: &str,
        subject: &str,
        cause: Option<&Envelope>,
    ) -> Envelope {
        let event = NewEvent::of(payload).unwrap().org(org).subject(subject);
        self.emitted(event, cause)
    }

    /// The envelope `event` gets when the handling of `cause` emits it
    /// (a root of a new flow without one): the next step's input.
    pub fn emitted(&self, event: NewEvent, cause: Option<&Envelope>) -> Envelope {
        let cause = match cause {
            Some(e) => Cause::Event(e),
            None => Cause::Root {
                flow_id: self.store.ids().flow_id(),
            },
        };
        let mut env = self.store.stamp(event, cause);
        env.attempt = 1;
        env
    }

    /// Runs worker `worker` once on `env` against this world's store and
    /// engine, outside the dispatcher: its declared writes and emitted
    /// events, applied nowhere (see [`berth_worker::testing::run_handler`]).
    pub async fn step(&self, worker: &str, env: Envelope) -> Result<StepOutput, HandlerError> {
        berth_worker::testing::run_handler(&self.world.registry, worker, &self.store, env).await
    }

    /// Applies declared `writes` as the dispatcher would, in a transaction
    /// of their own; `false` (nothing applied) when a guard fails. Lets a
    /// step test chain steps: the next one reads what the last declared.
    pub async fn apply(&self, writes: &[Write]) -> bool {
        let mut tx = self.store.begin().await.unwrap();
        let held = tx.apply(writes, self.store.now()).await.unwrap();
        if held {
            tx.commit().await.unwrap();
        }
        held
    }
}

/// Moves the world's store onto a fresh PostgreSQL database under
/// `BERTH_TEST_STORE=postgres` (the suites written for both databases run
/// once each way); else it stays on SQLite in the data dir.
pub(crate) async fn on_test_store(config: &mut Config) {
    let at = berth_store::postgres::test_location(&config.database_path())
        .await
        .unwrap_or_else(|e| panic!("the test's store: {e:#}"));
    if let berth_store::Location::Postgres(url) = at {
        config.store.url = Some(url);
    }
}
