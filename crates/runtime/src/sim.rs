//! The simulated runtime: an in-memory [`ContainerRuntime`] with Docker's
//! semantics, per-operation latency on tokio's (pausable) clock, engine events
//! with a replayable history, container output, and test hooks (kill a
//! container, print a line, take a host down) — for large-scale tests, the
//! chaos harness and benchmarks that must not need a Docker engine.
//!
//! Each host's state sits behind its own `std::sync::Mutex`, taken only for
//! the synchronous part of an operation (never across an `.await`), so hosts
//! do not contend with each other and a benchmark measures Berth, not the
//! simulator.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use berth_core::{Clock, SeededRng, SystemClock, Timestamp};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast;

use crate::{
    BuildOutput, BuildSpec, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState,
    EngineEvent, EngineEventKind, HostId, ImageInfo, Labels, Limits, NetworkInfo, NetworkSpec,
    Resource, ResourceKind, RuntimeError,
};

/// How many engine events a live subscriber may fall behind before its stream
/// ends (it then resubscribes from its last seen time and catches up from the
/// history, as it would after a dropped Docker connection).
const EVENT_CAPACITY: usize = 1024;
/// The same for followers of a container's output.
const LOG_CAPACITY: usize = 1024;
/// Exit code of a container stopped or removed while running (SIGKILL).
const KILLED: i64 = 137;
/// Addresses per simulated network: host parts 2..=65534 of a /16 (`.0.1` is
/// the gateway). Addresses are not reused after a detach.
const LAST_HOST_PART: u32 = 0xFFFE;

/// Simulated time each kind of operation takes. Zero (the default) means no
/// sleep at all, so throughput benchmarks pay nothing for the simulator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimLatency {
    /// `ping`, `find_*` and `list_labelled`.
    pub find: Duration,
    /// `create_network` and `remove_network`.
    pub network: Duration,
    /// `connect_network` and `disconnect_network`.
    pub connect: Duration,
    /// `build_image`.
    pub image_build: Duration,
    /// `remove_image`.
    pub image_remove: Duration,
    pub container_create: Duration,
    pub container_start: Duration,
    /// `stop_container`; the requested grace period is not waited for.
    pub container_stop: Duration,
    pub container_remove: Duration,
}

impl SimLatency {
    /// The same latency for every operation.
    pub fn uniform(d: Duration) -> Self {
        SimLatency {
            find: d,
            network: d,
            connect: d,
            image_build: d,
            image_remove: d,
            container_create: d,
            container_start: d,
            container_stop: d,
            container_remove: d,
        }
    }
}

/// What a [`SimRuntime`] simulates.
#[derive(Clone)]
pub struct SimConfig {
    /// The engines that exist; any other host answers `Unavailable`.
    pub hosts: Vec<HostId>,
    pub latency: SimLatency,
    /// Seeds the generator of resource ids, so a run can be replayed.
    pub seed: u64,
    /// Stamps engine events; give it the test's clock to line events up with
    /// the rest of Berth's (possibly paused) time.
    pub clock: Arc<dyn Clock>,
}

impl SimConfig {
    /// `hosts` with no latency, seed 1 and the system clock.
    pub fn new(hosts: Vec<HostId>) -> Self {
        SimConfig {
            hosts,
            latency: SimLatency::default(),
            seed: 1,
            clock: Arc::new(SystemClock),
        }
    }

    pub fn with_latency(mut self, latency: SimLatency) -> Self {
        self.latency = latency;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// An in-memory container engine for any number of hosts. See the module
/// documentation; the semantics are the [`ContainerRuntime`] trait's, modelled
/// on Docker's where the trait is silent:
///
/// - a container inherits its image's labels (its own win on a clash), as in
///   Docker, so engine events and `list_labelled` see both;
/// - `build_image` over an existing tag replaces it; `remove_image` always
///   succeeds, even if containers were created from it (like `docker rmi -f`:
///   the containers keep running);
/// - `stop_container` on a missing container is `NotFound` (Docker's 404); on
///   a container that is not running it is `Ok`;
/// - stopping or removing a running container ends it with exit code 137;
/// - base images (see [`SimRuntime::add_base_image`]) have ids like built
///   ones and are found by name; `images` lists only built images;
/// - `find_image` matches names only, never ids (as the trait requires);
///   a container or a `FROM` may name an id;
/// - a build fails at `RUN false` or `RUN exit N` (N ≠ 0), the only
///   instructions the simulator "runs".
pub struct SimRuntime {
    hosts: HashMap<HostId, HostSlot>,
    latency: SimLatency,
    clock: Arc<dyn Clock>,
    ids: SeededRng,
    ops: AtomicU64,
}

struct HostSlot {
    /// Cleared by [`SimRuntime::set_available`]; checked before the latency
    /// (a refused connection is quick) and again under the lock.
    up: AtomicBool,
    state: Mutex<HostState>,
}

#[derive(Default)]
struct HostState {
    networks: BTreeMap<String, SimNetwork>,
    images: BTreeMap<String, ImageInfo>,
    containers: BTreeMap<String, SimContainer>,
    /// Base images by normalized name → id.
    bases: BTreeMap<String, String>,
    /// Index of the next network's /16, so addresses differ between networks.
    next_subnet: u32,
    /// Every engine event of this host, oldest first, for `events(since)`.
    history: Vec<EngineEvent>,
    /// Created on the first subscription: a broadcast channel allocates its
    /// whole buffer up front, and most hosts of a large run are never watched.
    events_tx: Option<broadcast::Sender<EngineEvent>>,
    logs_tx: Option<broadcast::Sender<LogMsg>>,
}

impl HostState {
    /// An image by exactly its name (`:latest` when none is given): built
    /// images first, then base images. Never by id, as on Docker through
    /// `find_image`.
    fn by_name(&self, reference: &str) -> Option<ImageInfo> {
        let n = crate::normal_reference(reference);
        if let Some(i) = self.images.get(&n) {
            return Some(i.clone());
        }
        self.bases.get(&n).map(|id| ImageInfo {
            id: id.clone(),
            tag: n,
            labels: Labels::new(),
        })
    }

    /// What an engine would make a container or a stage from: an id, or a name.
    fn by_id_or_name(&self, r: &str) -> Option<ImageInfo> {
        if let Some(i) = self.images.values().find(|i| i.id == r) {
            return Some(i.clone());
        }
        if let Some((name, id)) = self.bases.iter().find(|(_, id)| id.as_str() == r) {
            return Some(ImageInfo {
                id: id.clone(),
                tag: name.clone(),
                labels: Labels::new(),
            });
        }
        self.by_name(r)
    }
}

/// A stable 64-bit hash (FNV-1a) for the ids of base images.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

struct SimNetwork {
    info: NetworkInfo,
    subnet: u32,
    next_host_part: u32,
    /// Container name → its endpoint on this network.
    endpoints: BTreeMap<String, Endpoint>,
}

struct Endpoint {
    ip: String,
    alias: String,
}

struct SimContainer {
    info: ContainerInfo,
    limits: Limits,
    env: Vec<(String, String)>,
    /// Everything the container printed, oldest first.
    output: Vec<String>,
}

/// A line printed by a container, or (`line: None`) the end of its output
/// because it stopped: followers end there, as `docker logs -f` does.
#[derive(Clone)]
struct LogMsg {
    container: String,
    line: Option<String>,
}

impl SimRuntime {
    pub fn new(config: SimConfig) -> Self {
        let hosts = config
            .hosts
            .into_iter()
            .map(|h| {
                let slot = HostSlot {
                    up: AtomicBool::new(true),
                    state: Mutex::new(HostState::default()),
                };
                (h, slot)
            })
            .collect();
        SimRuntime {
            hosts,
            latency: config.latency,
            clock: config.clock,
            ids: SeededRng::new(config.seed),
            ops: AtomicU64::new(0),
        }
    }

    // ---- test hooks -------------------------------------------------------

    /// Makes `name` available as a base image on `host` (nothing is pulled by
    /// `build_image`). Unknown hosts are ignored.
    pub fn add_base_image(&self, host: &HostId, name: &str) {
        if let Some(mut h) = self.state(host) {
            let id = format!("sha256:{:064x}", fnv(name));
            h.bases.insert(crate::normal_reference(name), id);
        }
    }

    /// Takes a base image away again (to simulate a pruned engine).
    pub fn remove_base_image(&self, host: &HostId, name: &str) {
        if let Some(mut h) = self.state(host) {
            h.bases.remove(&crate::normal_reference(name));
        }
    }

    /// Ends a running container as if it had crashed: it becomes
    /// `Exited { exit_code, oom_killed: oom }`, and `Oom` (when `oom`) then
    /// `Die { exit_code }` are emitted. A container that is not running is
    /// left alone (no events); a missing one is `NotFound`.
    pub fn kill(
        &self,
        host: &HostId,
        container: &str,
        exit_code: i64,
        oom: bool,
    ) -> Result<(), RuntimeError> {
        let mut h = self.locked(host)?;
        match h.containers.get(container) {
            None => Err(RuntimeError::not_found(host, "container", container)),
            Some(c) if c.info.state != ContainerState::Running => Ok(()),
            Some(_) => {
                h.exit(self.clock.now(), host, container, exit_code, oom);
                Ok(())
            }
        }
    }

    /// Appends a line to a container's output (what `logs` returns), in any
    /// state; followers receive it at once.
    pub fn print(&self, host: &HostId, container: &str, line: &str) -> Result<(), RuntimeError> {
        let mut h = self.locked(host)?;
        let Some(c) = h.containers.get_mut(container) else {
            return Err(RuntimeError::not_found(host, "container", container));
        };
        c.output.push(line.to_owned());
        h.send_log(container, Some(line.to_owned()));
        Ok(())
    }

    /// Takes a host's engine down (every call answers `Unavailable`, live
    /// event streams end) or brings it back. State is kept across the outage.
    pub fn set_available(&self, host: &HostId, up: bool) {
        let Some(slot) = self.hosts.get(host) else {
            return;
        };
        slot.up.store(up, Ordering::SeqCst);
        if !up {
            self.drop_event_streams(host);
        }
    }

    /// Ends every live `events` stream of `host` (after what they have
    /// buffered), as a dropped engine connection does; subscribers are
    /// expected to resubscribe from their last seen time.
    pub fn drop_event_streams(&self, host: &HostId) {
        if let Some(mut h) = self.state(host) {
            h.events_tx = None;
        }
    }

    // ---- introspection, for invariant checks ------------------------------

    /// Every container on `host` (empty for an unknown host), by name.
    pub fn containers(&self, host: &HostId) -> Vec<ContainerInfo> {
        self.state(host)
            .map(|h| h.containers.values().map(|c| c.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Every network on `host`, by name.
    pub fn networks(&self, host: &HostId) -> Vec<NetworkInfo> {
        self.state(host)
            .map(|h| h.networks.values().map(|n| n.info.clone()).collect())
            .unwrap_or_default()
    }

    /// Every built image on `host` (base images excluded), by tag.
    pub fn images(&self, host: &HostId) -> Vec<ImageInfo> {
        self.state(host)
            .map(|h| h.images.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The environment a container was created with.
    pub fn env(&self, host: &HostId, container: &str) -> Option<Vec<(String, String)>> {
        self.state(host)?
            .containers
            .get(container)
            .map(|c| c.env.clone())
    }

    /// The limits a container was created with.
    pub fn limits(&self, host: &HostId, container: &str) -> Option<Limits> {
        self.state(host)?
            .containers
            .get(container)
            .map(|c| c.limits.clone())
    }

    /// What `name` resolves to from inside container `from`, as Docker's
    /// embedded DNS answers: the IP of a container attached to one of `from`'s
    /// networks under that alias (or container name). `None` means
    /// unreachable — the check for org isolation.
    pub fn resolve(&self, host: &HostId, from: &str, name: &str) -> Option<String> {
        let h = self.state(host)?;
        let c = h.containers.get(from)?;
        c.info.networks.keys().find_map(|net| {
            h.networks
                .get(net)?
                .endpoints
                .iter()
                .find_map(|(cname, e)| (e.alias == name || cname == name).then(|| e.ip.clone()))
        })
    }

    /// Every engine event emitted on `host`, oldest first.
    pub fn event_history(&self, host: &HostId) -> Vec<EngineEvent> {
        self.state(host)
            .map(|h| h.history.clone())
            .unwrap_or_default()
    }

    /// Trait operations served so far (failed ones included, `events` and
    /// `logs` subscriptions included; hooks and introspection excluded).
    pub fn op_count(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    // ---- internals --------------------------------------------------------

    /// The host's state regardless of availability (hooks and introspection
    /// see a down host's state too).
    fn state(&self, host: &HostId) -> Option<MutexGuard<'_, HostState>> {
        self.hosts.get(host).map(|s| lock(&s.state))
    }

    /// The host's state if its engine answers.
    fn locked(&self, host: &HostId) -> Result<MutexGuard<'_, HostState>, RuntimeError> {
        self.slot(host).map(|s| lock(&s.state))
    }

    fn slot(&self, host: &HostId) -> Result<&HostSlot, RuntimeError> {
        match self.hosts.get(host) {
            None => Err(RuntimeError::unavailable(host, "no such host")),
            Some(s) if !s.up.load(Ordering::SeqCst) => {
                Err(RuntimeError::unavailable(host, "engine is down"))
            }
            Some(s) => Ok(s),
        }
    }

    /// Counts the operation, waits its latency, and lends the host's state.
    /// The guard is returned after the last `.await`, and callers do not
    /// await while holding it (a `std` guard is not `Send`, so the compiler
    /// would refuse the trait's `Send` futures if they did).
    async fn enter(
        &self,
        host: &HostId,
        latency: Duration,
    ) -> Result<MutexGuard<'_, HostState>, RuntimeError> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.slot(host)?;
        if !latency.is_zero() {
            berth_core::sched::idle(tokio::time::sleep(latency)).await;
        }
        // Again: the host may have gone down during the latency.
        self.locked(host)
    }

    /// A Docker-like 64-hex-digit id from the seeded generator.
    fn new_id(&self) -> String {
        format!(
            "{:016x}{:016x}{:016x}{:016x}",
            self.ids.next_u64(),
            self.ids.next_u64(),
            self.ids.next_u64(),
            self.ids.next_u64()
        )
    }
}

impl HostState {
    fn emit(&mut self, event: EngineEvent) {
        if let Some(tx) = &self.events_tx {
            // An error only means nobody is listening right now; the history
            // below still has the event for later subscribers.
            let _ = tx.send(event.clone());
        }
        self.history.push(event);
    }

    fn send_log(&self, container: &str, line: Option<String>) {
        if let Some(tx) = self.logs_tx.as_ref().filter(|tx| tx.receiver_count() > 0) {
            let _ = tx.send(LogMsg {
                container: container.to_owned(),
                line,
            });
        }
    }

    /// A running container ends: state, events, and the end of its output for
    /// followers. The caller has checked that it exists and is running.
    fn exit(&mut self, at: Timestamp, host: &HostId, name: &str, exit_code: i64, oom: bool) {
        let Some(c) = self.containers.get_mut(name) else {
            return;
        };
        c.info.state = ContainerState::Exited {
            exit_code,
            oom_killed: oom,
        };
        let labels = c.info.labels.clone();
        let event = |kind| EngineEvent {
            at,
            host: host.clone(),
            container: name.to_owned(),
            labels: labels.clone(),
            kind,
        };
        if oom {
            self.emit(event(EngineEventKind::Oom));
        }
        self.emit(event(EngineEventKind::Die { exit_code }));
        self.send_log(name, None);
    }
}

/// Poisoning only means another thread panicked mid-operation; the maps are
/// still structurally sound, and a test harness is better served by going on
/// than by a cascade of panics.
fn lock(m: &Mutex<HostState>) -> MutexGuard<'_, HostState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Docker refuses empty names; so does the simulator, so that a permanent
/// (non-retryable) error can arise without fault injection.
fn check_name(host: &HostId, what: &str, name: &str) -> Result<(), RuntimeError> {
    if name.trim().is_empty() {
        return Err(RuntimeError::Invalid {
            host: host.clone(),
            message: format!("empty {what} name"),
        });
    }
    Ok(())
}

fn failed<T: Send + 'static>(e: RuntimeError) -> BoxStream<'static, Result<T, RuntimeError>> {
    stream::once(async move { Err(e) }).boxed()
}

#[async_trait]
impl ContainerRuntime for SimRuntime {
    async fn ping(&self, host: &HostId) -> Result<(), RuntimeError> {
        self.enter(host, self.latency.find).await.map(drop)
    }

    async fn find_network(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<NetworkInfo>, RuntimeError> {
        let h = self.enter(host, self.latency.find).await?;
        Ok(h.networks.get(name).map(|n| n.info.clone()))
    }

    async fn create_network(
        &self,
        host: &HostId,
        spec: &NetworkSpec,
    ) -> Result<NetworkInfo, RuntimeError> {
        check_name(host, "network", &spec.name)?;
        let mut h = self.enter(host, self.latency.network).await?;
        if h.networks.contains_key(&spec.name) {
            return Err(RuntimeError::conflict(host, "network", &spec.name));
        }
        let info = NetworkInfo {
            id: self.new_id(),
            name: spec.name.clone(),
            labels: spec.labels.clone(),
        };
        let subnet = h.next_subnet;
        h.next_subnet = h.next_subnet.wrapping_add(1);
        h.networks.insert(
            spec.name.clone(),
            SimNetwork {
                info: info.clone(),
                subnet,
                next_host_part: 2,
                endpoints: BTreeMap::new(),
            },
        );
        Ok(info)
    }

    async fn remove_network(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.network).await?;
        match h.networks.get(name) {
            None => Ok(()),
            // Docker: "network has active endpoints". Waiting does not
            // detach anything; the caller must.
            Some(n) if !n.endpoints.is_empty() => Err(RuntimeError::in_use(host, "network", name)),
            Some(_) => {
                h.networks.remove(name);
                Ok(())
            }
        }
    }

    async fn find_image(
        &self,
        host: &HostId,
        reference: &str,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        let h = self.enter(host, self.latency.find).await?;
        Ok(h.by_name(reference))
    }

    async fn build_image(
        &self,
        host: &HostId,
        spec: &BuildSpec,
    ) -> Result<BuildOutput, RuntimeError> {
        check_name(host, "image", &spec.tag)?;
        let dockerfile = crate::context::dockerfile_of(&spec.context)
            .map_err(|e| RuntimeError::invalid(host, e.to_string()))?;
        let bases = crate::context::base_images(&dockerfile)
            .map_err(|e| RuntimeError::invalid(host, e.to_string()))?;
        let mut h = self.enter(host, self.latency.image_build).await?;
        for base in &bases {
            if h.by_id_or_name(base).is_none() {
                return Err(RuntimeError::not_found(host, "image", base));
            }
        }
        // `RUN false` or `RUN exit N` (N ≠ 0) fails, as it would on Docker,
        // so that failed builds can be simulated.
        let steps: Vec<&str> = dockerfile
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let mut log_tail = Vec::new();
        for (i, line) in steps.iter().enumerate() {
            let step = format!("Step {}/{} : {line}", i + 1, steps.len());
            log_tail.push(step.clone());
            let run = line.strip_prefix("RUN ").map(str::trim);
            let fails = run.is_some_and(|r| {
                r == "false" || r.strip_prefix("exit ").is_some_and(|n| n.trim() != "0")
            });
            if fails {
                let message = format!(
                    "The command '/bin/sh -c {}' returned a non-zero code: 1",
                    run.unwrap_or_default()
                );
                log_tail.push(message.clone());
                return Err(RuntimeError::BuildFailed {
                    host: host.clone(),
                    step,
                    message,
                    log_tail,
                });
            }
        }
        let image = ImageInfo {
            id: format!("sha256:{}", self.new_id()),
            tag: crate::normal_reference(&spec.tag),
            labels: spec.labels.clone(),
        };
        h.images
            .insert(crate::normal_reference(&spec.tag), image.clone());
        log_tail.push(format!("Successfully built {}", image.id));
        log_tail.push(format!("Successfully tagged {}", spec.tag));
        Ok(BuildOutput { image, log_tail })
    }

    async fn remove_image(&self, host: &HostId, tag: &str) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.image_remove).await?;
        h.images.remove(&crate::normal_reference(tag));
        Ok(())
    }

    async fn find_container(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<ContainerInfo>, RuntimeError> {
        let h = self.enter(host, self.latency.find).await?;
        Ok(h.containers.get(name).map(|c| c.info.clone()))
    }

    async fn create_container(
        &self,
        host: &HostId,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, RuntimeError> {
        check_name(host, "container", &spec.name)?;
        let mut h = self.enter(host, self.latency.container_create).await?;
        if h.containers.contains_key(&spec.name) {
            return Err(RuntimeError::conflict(host, "container", &spec.name));
        }
        let Some(image) = h.by_id_or_name(&spec.image) else {
            return Err(RuntimeError::not_found(host, "image", &spec.image));
        };
        // Docker merges the image's labels under the container's own.
        let mut labels: Labels = image.labels.clone();
        labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        let info = ContainerInfo {
            id: self.new_id(),
            name: spec.name.clone(),
            image: spec.image.clone(),
            labels,
            state: ContainerState::Created,
            networks: BTreeMap::new(),
        };
        h.containers.insert(
            spec.name.clone(),
            SimContainer {
                info: info.clone(),
                limits: spec.limits.clone(),
                env: spec.env.clone(),
                output: Vec::new(),
            },
        );
        Ok(info)
    }

    async fn start_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.container_start).await?;
        let Some(c) = h.containers.get_mut(name) else {
            return Err(RuntimeError::not_found(host, "container", name));
        };
        if c.info.state == ContainerState::Running {
            return Ok(());
        }
        c.info.state = ContainerState::Running;
        let event = EngineEvent {
            at: self.clock.now(),
            host: host.clone(),
            container: name.to_owned(),
            labels: c.info.labels.clone(),
            kind: EngineEventKind::Start,
        };
        h.emit(event);
        Ok(())
    }

    async fn stop_container(
        &self,
        host: &HostId,
        name: &str,
        _grace: Duration,
    ) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.container_stop).await?;
        let Some(c) = h.containers.get(name) else {
            return Err(RuntimeError::not_found(host, "container", name));
        };
        if c.info.state == ContainerState::Running {
            h.exit(self.clock.now(), host, name, KILLED, false);
        }
        Ok(())
    }

    async fn remove_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.container_remove).await?;
        let Some(c) = h.containers.get(name) else {
            return Ok(());
        };
        if c.info.state == ContainerState::Running {
            h.exit(self.clock.now(), host, name, KILLED, false);
        }
        if let Some(c) = h.containers.remove(name) {
            for net in c.info.networks.keys() {
                if let Some(n) = h.networks.get_mut(net) {
                    n.endpoints.remove(name);
                }
            }
        }
        Ok(())
    }

    async fn connect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
        alias: &str,
    ) -> Result<String, RuntimeError> {
        let mut h = self.enter(host, self.latency.connect).await?;
        let h = &mut *h;
        let Some(n) = h.networks.get_mut(network) else {
            return Err(RuntimeError::not_found(host, "network", network));
        };
        let Some(c) = h.containers.get_mut(container) else {
            return Err(RuntimeError::not_found(host, "container", container));
        };
        if let Some(ip) = c.info.networks.get(network) {
            return Ok(ip.clone());
        }
        let part = n.next_host_part;
        if part > LAST_HOST_PART {
            return Err(RuntimeError::Invalid {
                host: host.clone(),
                message: format!("no free address on network '{network}'"),
            });
        }
        n.next_host_part += 1;
        // One /16 per network: 10.<subnet>.<part>; subnets wrap after 256
        // networks, which only makes addresses ambiguous across networks.
        let ip = format!("10.{}.{}.{}", n.subnet % 256, part >> 8, part & 0xFF);
        n.endpoints.insert(
            container.to_owned(),
            Endpoint {
                ip: ip.clone(),
                alias: alias.to_owned(),
            },
        );
        c.info.networks.insert(network.to_owned(), ip.clone());
        Ok(ip)
    }

    async fn disconnect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
    ) -> Result<(), RuntimeError> {
        let mut h = self.enter(host, self.latency.connect).await?;
        if let Some(n) = h.networks.get_mut(network) {
            n.endpoints.remove(container);
        }
        if let Some(c) = h.containers.get_mut(container) {
            c.info.networks.remove(network);
        }
        Ok(())
    }

    async fn list_labelled(&self, host: &HostId, key: &str) -> Result<Vec<Resource>, RuntimeError> {
        let h = self.enter(host, self.latency.find).await?;
        let resource = |kind, name: &str, labels: &Labels| Resource {
            kind,
            name: name.to_owned(),
            labels: labels.clone(),
            running: false,
        };
        let networks = h
            .networks
            .values()
            .filter(|n| n.info.labels.contains_key(key))
            .map(|n| resource(ResourceKind::Network, &n.info.name, &n.info.labels));
        let images = h
            .images
            .values()
            .filter(|i| i.labels.contains_key(key))
            .map(|i| resource(ResourceKind::Image, &i.tag, &i.labels));
        let containers = h
            .containers
            .values()
            .filter(|c| c.info.labels.contains_key(key))
            .map(|c| Resource {
                running: c.info.state == ContainerState::Running,
                ..resource(ResourceKind::Container, &c.info.name, &c.info.labels)
            });
        Ok(networks.chain(images).chain(containers).collect())
    }

    /// History first, then live: both are taken under the host's lock, the
    /// same lock under which events are recorded and sent, so nothing falls
    /// between them and nothing comes twice. A subscriber that falls more
    /// than [`EVENT_CAPACITY`] events behind gets an `Unavailable` item and
    /// the stream ends, like a dropped connection.
    fn events(
        &self,
        host: &HostId,
        key: &str,
        since: Option<Timestamp>,
    ) -> BoxStream<'static, Result<EngineEvent, RuntimeError>> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut h = match self.locked(host) {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        let since = since.unwrap_or(Timestamp::from_micros(i64::MIN));
        let wanted = {
            let key = key.to_owned();
            move |e: &EngineEvent| e.at >= since && e.labels.contains_key(&key)
        };
        let backlog: Vec<_> = h.history.iter().filter(|e| wanted(e)).cloned().collect();
        let rx = h
            .events_tx
            .get_or_insert_with(|| broadcast::channel(EVENT_CAPACITY).0)
            .subscribe();
        drop(h);

        let live = stream::unfold(Some(rx), {
            let host = host.clone();
            move |rx| {
                let host = host.clone();
                let wanted = wanted.clone();
                async move {
                    let mut rx = rx?;
                    loop {
                        match rx.recv().await {
                            Ok(e) if wanted(&e) => return Some((Ok(e), Some(rx))),
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Closed) => return None,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                let msg = format!("event stream fell {n} events behind");
                                return Some((Err(RuntimeError::unavailable(&host, &msg)), None));
                            }
                        }
                    }
                }
            }
        });
        stream::iter(backlog.into_iter().map(Ok))
            .chain(live)
            .boxed()
    }

    /// The last `tail` printed lines; with `follow` and a running container,
    /// then each new line until the container stops or is removed (as
    /// `docker logs -f`). Following a container that is not running ends
    /// after the existing lines. A follower more than [`LOG_CAPACITY`] lines
    /// behind gets an `Unavailable` item and the stream ends.
    fn logs(
        &self,
        host: &HostId,
        container: &str,
        tail: usize,
        follow: bool,
    ) -> BoxStream<'static, Result<String, RuntimeError>> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut h = match self.locked(host) {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        let Some(c) = h.containers.get(container) else {
            return failed(RuntimeError::not_found(host, "container", container));
        };
        let from = c.output.len().saturating_sub(tail);
        let backlog = stream::iter(c.output[from..].iter().cloned().map(Ok).collect::<Vec<_>>());
        if !follow || c.info.state != ContainerState::Running {
            return backlog.boxed();
        }
        let rx = h
            .logs_tx
            .get_or_insert_with(|| broadcast::channel(LOG_CAPACITY).0)
            .subscribe();
        drop(h);

        let live = stream::unfold(Some(rx), {
            let host = host.clone();
            let name = container.to_owned();
            move |rx| {
                let host = host.clone();
                let name = name.clone();
                async move {
                    let mut rx = rx?;
                    loop {
                        match rx.recv().await {
                            Ok(m) if m.container == name => {
                                return m.line.map(|l| (Ok(l), Some(rx)));
                            }
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Closed) => return None,
                            Err(broadcast::error::RecvError::Lagged(n)) => {
                                let msg = format!("log stream fell {n} lines behind");
                                return Some((Err(RuntimeError::unavailable(&host, &msg)), None));
                            }
                        }
                    }
                }
            }
        });
        backlog.chain(live).boxed()
    }
}
