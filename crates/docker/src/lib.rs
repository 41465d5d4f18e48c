//! The Docker runtime: [`ContainerRuntime`] on the Docker Engine API through
//! bollard, fronting one engine per [`HostId`].
//!
//! - **Images** are found by name only: inspecting an image also matches
//!   ids and id prefixes, so a reference counts only if the image's
//!   `RepoTags` (or `RepoDigests`, for `name@digest`) hold it. Builds take
//!   the caller's tar context (its `FROM`s already pinned to ids), run with
//!   the classic builder, no network and nothing pulled; a failing
//!   instruction is `BuildFailed` with its step and the output's tail.
//!   Labels go on as build options, never into the Dockerfile.
//! - **Networks** are user-defined bridges. Engines before API 1.44 accept a
//!   second network with a taken name, so creation is serialized per runtime
//!   and engine, and a duplicate the engine warns about (made by another
//!   process) is removed again and reported as `Conflict`. Names resolve to
//!   the lowest id of any duplicates left, so all callers agree.
//! - **Containers** are created never privileged, with `no-new-privileges`,
//!   a reduced capability set ([`DROPPED_CAPS`]), a capped log
//!   ([`LOG_MAX_SIZE`] × [`LOG_MAX_FILES`]), no swap beyond the memory
//!   limit, without host mounts or published ports, with the spec's limits,
//!   env and command, and on the `none` network: a
//!   container has no network at all until `connect_network` moves it onto
//!   its org's bridge, so it is never reachable on Docker's default bridge.
//! - **Events** are the engine's event stream filtered by label, from a
//!   `since` time (Docker replays its last 256 events from there), mapped to
//!   start/die/oom. **Logs** follow `docker logs` (`--tail`, `--follow`).
//!
//! Semantics the trait leaves open follow the simulated runtime
//! (`berth_runtime::sim`): `stop_container` on a missing container is
//! `NotFound`, `remove_image` removes a tag even if a container uses it,
//! removal of something already gone is `Ok`.

mod build;
mod error;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use berth_core::Timestamp;
use berth_runtime::hosts::LOCAL;
use berth_runtime::{
    BuildOutput, BuildSpec, ContainerInfo, ContainerRuntime, ContainerSpec, ContainerState,
    EngineEvent, EngineEventKind, HostId, ImageInfo, Labels, NetworkInfo, NetworkSpec, Resource,
    ResourceKind, RuntimeError,
};
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerSummaryStateEnum, EndpointSettings, EventMessage, HostConfig, HostConfigLogConfig,
    NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, EventsOptions, InspectContainerOptions,
    ListContainersOptions, ListImagesOptions, ListNetworksOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
};
use bollard::{ClientVersion, Docker};
use futures::stream::{self, BoxStream, StreamExt};

pub use bollard;
pub use error::ConnectError;

/// Capabilities every container goes without, beyond Docker's own reduced
/// default set: raw sockets (spoofing on the org's bridge), device nodes,
/// chroot, the audit log, and changing file ownership or signalling
/// processes it does not own are not what an instance needs, and each has
/// been a step in container escapes.
pub const DROPPED_CAPS: &[&str] = &[
    "NET_RAW",
    "MKNOD",
    "SYS_CHROOT",
    "AUDIT_WRITE",
    "SETFCAP",
    "NET_BIND_SERVICE",
];

/// Each container's log (json-file) is at most this many files of this size,
/// so that one chatty instance cannot fill the host's disk.
pub const LOG_MAX_SIZE: &str = "10m";
pub const LOG_MAX_FILES: &str = "3";

/// The engine's default endpoint when `DOCKER_HOST` is not set.
pub const DEFAULT_ENDPOINT: &str = "unix:///var/run/docker.sock";

/// How long engine calls may take before they fail with
/// `RuntimeError::Timeout` (retryable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Every call but builds and stops (a stop also gets its grace period).
    pub call: Duration,
    /// `build_image`, which streams the whole build.
    pub build: Duration,
    /// Reaching an engine and negotiating its API version at construction.
    pub connect: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            call: Duration::from_secs(30),
            build: Duration::from_secs(300),
            connect: Duration::from_secs(10),
        }
    }
}

/// bollard's own limit on waiting for response headers, set above every
/// limit of ours (which cover whole operations, bodies included) so that
/// ours are the ones that fire.
const TRANSPORT_TIMEOUT_SECS: u64 = 3600;

/// The pseudo-network a container is created on (see the module docs).
const NO_NETWORK: &str = "none";

/// Attributes Docker adds to a container event next to the container's
/// labels; everything else in the attributes is a label.
const EVENT_ATTRIBUTES: &[&str] = &["name", "image", "exitCode", "signal", "execDuration"];

/// [`ContainerRuntime`] on one or more Docker engines.
pub struct DockerRuntime {
    engines: HashMap<HostId, Arc<Engine>>,
    timeouts: Timeouts,
}

struct Engine {
    endpoint: String,
    docker: Docker,
    /// Held across look-up and create of a network: this engine may accept
    /// two networks of one name (API < 1.44 only refuses a duplicate when
    /// asked to, and bollard's request type can no longer ask).
    network_create: tokio::sync::Mutex<()>,
}

impl DockerRuntime {
    /// Connects to every `(host, endpoint)` (`unix:///path/docker.sock`,
    /// `tcp://host:port` or `http://host:port`), checks that each engine
    /// answers, and negotiates each one's API version (the highest both it
    /// and bollard speak). Fails on the first endpoint without an engine:
    /// "no Docker engine at unix:///var/run/docker.sock: …".
    pub async fn connect(hosts: Vec<(HostId, String)>) -> Result<Self, ConnectError> {
        Self::connect_with(hosts, Timeouts::default()).await
    }

    /// [`DockerRuntime::connect`] with other timeouts.
    pub async fn connect_with(
        hosts: Vec<(HostId, String)>,
        timeouts: Timeouts,
    ) -> Result<Self, ConnectError> {
        let mut engines = HashMap::new();
        for (host, endpoint) in hosts {
            let docker = open(&host, &endpoint, timeouts.connect).await?;
            tracing::debug!(%host, %endpoint, api = %version_string(&docker), "Docker engine connected");
            let engine = Engine {
                endpoint,
                docker,
                network_create: tokio::sync::Mutex::new(()),
            };
            engines.insert(host, Arc::new(engine));
        }
        Ok(DockerRuntime { engines, timeouts })
    }

    /// The local engine as host `local`: `DOCKER_HOST` if set, else
    /// [`DEFAULT_ENDPOINT`].
    pub async fn local() -> Result<Self, ConnectError> {
        Self::connect(vec![(HostId::new(LOCAL), local_endpoint())]).await
    }

    /// Changes the timeouts of later calls.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The hosts this runtime fronts.
    pub fn hosts(&self) -> Vec<HostId> {
        let mut hosts: Vec<HostId> = self.engines.keys().cloned().collect();
        hosts.sort();
        hosts
    }

    /// The endpoint a host was connected through.
    pub fn endpoint(&self, host: &HostId) -> Option<&str> {
        self.engines.get(host).map(|e| e.endpoint.as_str())
    }

    /// The negotiated API version of a host's engine, e.g. `1.41`.
    pub fn api_version(&self, host: &HostId) -> Option<String> {
        self.engines.get(host).map(|e| version_string(&e.docker))
    }

    /// The bollard client of a host, for what the trait does not cover
    /// (tests use it to exec into containers).
    pub fn client(&self, host: &HostId) -> Option<&Docker> {
        self.engines.get(host).map(|e| &e.docker)
    }

    fn engine(&self, host: &HostId) -> Result<&Arc<Engine>, RuntimeError> {
        self.engines
            .get(host)
            .ok_or_else(|| RuntimeError::Unavailable {
                host: host.clone(),
                message: "no Docker engine is configured for this host".to_owned(),
            })
    }

    /// Runs one operation under a deadline.
    async fn timed<T>(
        &self,
        host: &HostId,
        op: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or_else(|_| Err(RuntimeError::timeout(host, op)))
    }
}

/// `DOCKER_HOST`, or the default socket.
pub fn local_endpoint() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned())
}

/// A client for `endpoint` at the highest API version both sides speak.
///
/// bollard's `negotiate_version` asks `/v<its version>/version`, which an
/// older engine refuses outright ("client version 1.53 is too new. Maximum
/// supported API version is 1.41"). That refusal names the engine's version,
/// so it is read from there and the client re-made at that version.
async fn open(host: &HostId, endpoint: &str, limit: Duration) -> Result<Docker, ConnectError> {
    let fail = |message: String| ConnectError {
        host: host.clone(),
        endpoint: endpoint.to_owned(),
        message,
    };
    let first =
        client(endpoint, bollard::API_DEFAULT_VERSION).map_err(|e| fail(error::chain(&e)))?;
    let refusal = match tokio::time::timeout(limit, first.negotiate_version()).await {
        Err(_) => return Err(fail(format!("no answer within {limit:?}"))),
        Ok(Ok(docker)) => return ping(docker, limit).await.map_err(fail),
        Ok(Err(e)) => e,
    };
    let Some(version) = error::server_message(&refusal).and_then(max_supported) else {
        return Err(fail(error::chain(&refusal)));
    };
    let second = client(endpoint, &version).map_err(|e| fail(error::chain(&e)))?;
    match tokio::time::timeout(limit, second.negotiate_version()).await {
        Err(_) => Err(fail(format!("no answer within {limit:?}"))),
        Ok(Ok(docker)) => ping(docker, limit).await.map_err(fail),
        Ok(Err(e)) => Err(fail(error::chain(&e))),
    }
}

/// A last check that plain requests work at the negotiated version.
async fn ping(docker: Docker, limit: Duration) -> Result<Docker, String> {
    match tokio::time::timeout(limit, docker.ping()).await {
        Err(_) => Err(format!("no answer to ping within {limit:?}")),
        Ok(Err(e)) => Err(error::chain(&e)),
        Ok(Ok(_)) => Ok(docker),
    }
}

fn client(endpoint: &str, version: &ClientVersion) -> Result<Docker, BollardError> {
    if endpoint.starts_with("unix://") {
        Docker::connect_with_unix(endpoint, TRANSPORT_TIMEOUT_SECS, version)
    } else if endpoint.starts_with("tcp://") || endpoint.starts_with("http://") {
        Docker::connect_with_http(endpoint, TRANSPORT_TIMEOUT_SECS, version)
    } else {
        Err(BollardError::UnsupportedURISchemeError {
            uri: endpoint.to_owned(),
        })
    }
}

/// The version in "… Maximum supported API version is 1.41".
fn max_supported(message: &str) -> Option<ClientVersion> {
    let (_, rest) = message.split_once("Maximum supported API version is ")?;
    let v = rest.split_whitespace().next()?;
    let (major, minor) = v.split_once('.')?;
    Some(ClientVersion {
        major_version: major.parse().ok()?,
        minor_version: minor
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()?,
    })
}

fn version_string(docker: &Docker) -> String {
    let v = docker.client_version();
    format!("{}.{}", v.major_version, v.minor_version)
}

/// Docker refuses empty names with a confusing message (or, for a tag,
/// builds an untagged image); refuse them plainly, as the simulator does.
fn check_name(host: &HostId, what: &str, name: &str) -> Result<(), RuntimeError> {
    if name.trim().is_empty() {
        return Err(RuntimeError::invalid(host, format!("empty {what} name")));
    }
    Ok(())
}

fn failed<T: Send + 'static>(e: RuntimeError) -> BoxStream<'static, Result<T, RuntimeError>> {
    stream::once(async move { Err(e) }).boxed()
}

fn labels(map: Option<HashMap<String, String>>) -> Labels {
    map.unwrap_or_default().into_iter().collect()
}

fn filters(pairs: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    let mut f: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in pairs {
        f.entry((*k).to_owned()).or_default().push((*v).to_owned());
    }
    f
}

/// A Berth timestamp as Docker's `since` (`seconds.nanoseconds`).
fn docker_time(t: Timestamp) -> String {
    let us = t.as_micros().max(0);
    format!("{}.{:09}", us / 1_000_000, (us % 1_000_000) * 1000)
}

impl Engine {
    /// The network named exactly `name`. Listing by name filter matches
    /// substrings, and inspecting by name also matches id prefixes, so the
    /// name is compared here; of duplicates (see `network_create`) the one
    /// with the lowest id is the network, so every caller picks the same.
    async fn network(
        &self,
        host: &HostId,
        op: &str,
        name: &str,
    ) -> Result<Option<NetworkInfo>, RuntimeError> {
        let mut all = self.networks_named(host, op, name).await?;
        Ok(if all.is_empty() {
            None
        } else {
            Some(all.remove(0))
        })
    }

    /// Every network named exactly `name`, lowest id first.
    async fn networks_named(
        &self,
        host: &HostId,
        op: &str,
        name: &str,
    ) -> Result<Vec<NetworkInfo>, RuntimeError> {
        let opts = ListNetworksOptions {
            filters: Some(filters(&[("name", name)])),
        };
        let list = self
            .docker
            .list_networks(Some(opts))
            .await
            .map_err(|e| error::map(host, op, "network", name, e))?;
        let mut found: Vec<NetworkInfo> = list
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name))
            .map(|n| NetworkInfo {
                id: n.id.unwrap_or_default(),
                name: name.to_owned(),
                labels: labels(n.labels),
            })
            .collect();
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    /// The container named exactly `name`, as Docker describes it.
    async fn inspect(
        &self,
        host: &HostId,
        op: &str,
        name: &str,
    ) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self
            .docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
        {
            // Inspecting by name also matches a container whose id starts
            // with `name`; that one is not ours.
            Ok(c) if c.name.as_deref().map(|n| n.trim_start_matches('/')) == Some(name) => {
                Ok(Some(c))
            }
            Ok(_) => Ok(None),
            Err(e) if error::status(&e) == Some(404) => Ok(None),
            Err(e) => Err(error::map(host, op, "container", name, e)),
        }
    }

    /// The image named exactly `reference`, by its tags or digests: the
    /// engine's inspect also answers ids and id prefixes, and those are not
    /// names (anyone could guess at them).
    async fn image(
        &self,
        host: &HostId,
        op: &str,
        reference: &str,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(i) => {
                let wanted = berth_runtime::normal_reference(reference);
                let named = i
                    .repo_tags
                    .iter()
                    .flatten()
                    .chain(i.repo_digests.iter().flatten())
                    .any(|t| berth_runtime::normal_reference(t) == wanted);
                if !named {
                    return Ok(None);
                }
                Ok(Some(ImageInfo {
                    id: i.id.unwrap_or_default(),
                    tag: reference.to_owned(),
                    labels: labels(i.config.and_then(|c| c.labels)),
                }))
            }
            Err(e) if error::status(&e) == Some(404) => Ok(None),
            // A reference the engine cannot parse names nothing.
            Err(e) if error::status(&e) == Some(400) => Ok(None),
            Err(e) => Err(error::map(host, op, "image", reference, e)),
        }
    }
}

impl Engine {
    /// Whether a `FROM` of a build can be had: an image id exactly (what
    /// Berth pins bases to), or a name as [`Engine::image`] finds it.
    async fn has_image(&self, host: &HostId, op: &str, r: &str) -> Result<bool, RuntimeError> {
        if r.starts_with("sha256:") {
            return match self.docker.inspect_image(r).await {
                Ok(i) => Ok(i.id.as_deref() == Some(r)),
                Err(e) if matches!(error::status(&e), Some(404 | 400)) => Ok(false),
                Err(e) => Err(error::map(host, op, "image", r, e)),
            };
        }
        Ok(self.image(host, op, r).await?.is_some())
    }
}

fn container_info(c: ContainerInspectResponse) -> ContainerInfo {
    let config = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let exited = ContainerState::Exited {
        exit_code: state.exit_code.unwrap_or(0),
        oom_killed: state.oom_killed.unwrap_or(false),
    };
    let state = match state.status {
        Some(ContainerStateStatusEnum::CREATED) => ContainerState::Created,
        Some(ContainerStateStatusEnum::RUNNING | ContainerStateStatusEnum::PAUSED) => {
            ContainerState::Running
        }
        // Restarting means waiting out a restart back-off: not running now.
        _ => exited,
    };
    let networks = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter(|(name, _)| name != NO_NETWORK)
        .map(|(name, e)| (name, e.ip_address.unwrap_or_default()))
        .collect::<BTreeMap<_, _>>();
    ContainerInfo {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_owned(),
        image: config.image.unwrap_or_default(),
        labels: labels(config.labels),
        state,
        networks,
    }
}

/// An engine event as Berth sees it; `None` for actions Berth does not
/// follow.
fn engine_event(host: &HostId, m: EventMessage) -> Option<EngineEvent> {
    let actor = m.actor.unwrap_or_default();
    let mut attributes = actor.attributes.unwrap_or_default();
    let kind = match m.action.as_deref()? {
        "start" => EngineEventKind::Start,
        // A die without a readable exit code still ended the container;
        // -1 says "unknown" rather than pretending success.
        "die" => EngineEventKind::Die {
            exit_code: attributes
                .get("exitCode")
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1),
        },
        "oom" => EngineEventKind::Oom,
        _ => return None,
    };
    let at = match (m.time_nano, m.time) {
        (Some(ns), _) => Timestamp::from_micros(ns / 1000),
        (None, Some(s)) => Timestamp::from_micros(s.saturating_mul(1_000_000)),
        (None, None) => Timestamp::ZERO,
    };
    let container = attributes.remove("name").or(actor.id).unwrap_or_default();
    for k in EVENT_ATTRIBUTES {
        attributes.remove(*k);
    }
    Some(EngineEvent {
        at,
        host: host.clone(),
        container,
        labels: attributes.into_iter().collect(),
        kind,
    })
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ping(&self, host: &HostId) -> Result<(), RuntimeError> {
        let e = self.engine(host)?;
        self.timed(host, "ping", self.timeouts.call, async {
            e.docker
                .ping()
                .await
                .map(drop)
                .map_err(|err| error::map(host, "ping", "engine", host.as_str(), err))
        })
        .await
    }

    async fn find_network(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<NetworkInfo>, RuntimeError> {
        let e = self.engine(host)?;
        self.timed(
            host,
            "find_network",
            self.timeouts.call,
            e.network(host, "find_network", name),
        )
        .await
    }

    async fn create_network(
        &self,
        host: &HostId,
        spec: &NetworkSpec,
    ) -> Result<NetworkInfo, RuntimeError> {
        const OP: &str = "create_network";
        check_name(host, "network", &spec.name)?;
        let e = self.engine(host)?;
        let name = spec.name.as_str();
        self.timed(host, OP, self.timeouts.call, async {
            let _serial = e.network_create.lock().await;
            if e.network(host, OP, name).await?.is_some() {
                return Err(RuntimeError::conflict(host, "network", name));
            }
            let request = NetworkCreateRequest {
                name: name.to_owned(),
                driver: Some("bridge".to_owned()),
                labels: Some(spec.labels.clone().into_iter().collect()),
                ..Default::default()
            };
            let created = e
                .docker
                .create_network(request)
                .await
                .map_err(|err| error::map(host, OP, "network", name, err))?;
            // Another process on this engine may have created it since we
            // looked. An engine before API 1.44 then creates a duplicate but
            // says so in a warning: ours goes away again. (Two creates that
            // pass the engine's own check at the same instant both come back
            // without a warning; the duplicate is then harmless, since every
            // operation takes the lowest id and removal removes all.)
            if created.warning.contains("already exists") {
                tracing::warn!(%host, network = name, warning = %created.warning, "removing the duplicate network just created");
                match e.docker.remove_network(&created.id).await {
                    Ok(()) => {}
                    Err(err) if error::status(&err) == Some(404) => {}
                    Err(err) => return Err(error::map(host, OP, "network", name, err)),
                }
                return Err(RuntimeError::conflict(host, "network", name));
            }
            Ok(NetworkInfo {
                id: created.id,
                name: name.to_owned(),
                labels: spec.labels.clone(),
            })
        })
        .await
    }

    async fn remove_network(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "remove_network";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            // By id, every duplicate: removing by an ambiguous name fails.
            for n in e.networks_named(host, OP, name).await? {
                match e.docker.remove_network(&n.id).await {
                    Ok(()) => {}
                    Err(err) if error::status(&err) == Some(404) => {}
                    // "network … has active endpoints": not retryable by
                    // waiting; the caller must detach first.
                    Err(err)
                        if error::server_message(&err)
                            .is_some_and(|m| m.contains("active endpoints")) =>
                    {
                        return Err(RuntimeError::in_use(host, "network", name));
                    }
                    Err(err) => return Err(error::map(host, OP, "network", name, err)),
                }
            }
            Ok(())
        })
        .await
    }

    async fn find_image(
        &self,
        host: &HostId,
        tag: &str,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        let e = self.engine(host)?;
        self.timed(
            host,
            "find_image",
            self.timeouts.call,
            e.image(host, "find_image", tag),
        )
        .await
    }

    async fn build_image(
        &self,
        host: &HostId,
        spec: &BuildSpec,
    ) -> Result<BuildOutput, RuntimeError> {
        const OP: &str = "build_image";
        check_name(host, "image", &spec.tag)?;
        let e = self.engine(host)?;
        let dockerfile = berth_runtime::context::dockerfile_of(&spec.context)
            .map_err(|why| RuntimeError::invalid(host, why.to_string()))?;
        let bases = berth_runtime::context::base_images(&dockerfile)
            .map_err(|why| RuntimeError::invalid(host, why.to_string()))?;
        self.timed(host, OP, self.timeouts.build, async {
            // Checked first: the classic builder would otherwise try to pull
            // a missing base, which here can only fail, slowly and vaguely.
            // The caller pins bases to ids, which `image` (names only) does
            // not answer, so ids are looked up as such here.
            for base in &bases {
                if !e.has_image(host, OP, base).await? {
                    return Err(RuntimeError::not_found(host, "image", base));
                }
            }
            let options = BuildImageOptions {
                dockerfile: "Dockerfile".to_owned(),
                t: Some(spec.tag.clone()),
                rm: true,
                forcerm: true,
                // No step gets a network: a build reaches nothing and
                // nothing reaches it.
                networkmode: Some("none".to_owned()),
                labels: Some(spec.labels.clone().into_iter().collect()),
                ..Default::default()
            };
            let body = bollard::body_full(spec.context.to_vec().into());
            let mut output = e.docker.build_image(options, None, Some(body));
            let mut tail = build::Tail::default();
            let mut failure = None;
            while let Some(item) = output.next().await {
                match item {
                    Ok(info) => {
                        if let Some(s) = info.stream.as_deref().or(info.status.as_deref()) {
                            tail.push(s);
                        }
                        if let Some(err) = info.error_detail.and_then(|d| d.message) {
                            failure = Some(err);
                            break;
                        }
                    }
                    Err(BollardError::DockerStreamError { error }) => {
                        failure = Some(error);
                        break;
                    }
                    Err(err) => return Err(error::map(host, OP, "image", &spec.tag, err)),
                }
            }
            let step = tail.step().map(str::to_owned);
            let log_tail = tail.finish();
            if let Some(why) = failure {
                // A base may have gone since it was checked.
                for base in &bases {
                    if !e.has_image(host, OP, base).await? {
                        return Err(RuntimeError::not_found(host, "image", base));
                    }
                }
                return Err(build::failure(host, step, why, log_tail));
            }
            let image =
                e.image(host, OP, &spec.tag)
                    .await?
                    .ok_or_else(|| RuntimeError::Unavailable {
                        host: host.clone(),
                        message: format!(
                            "the build of {} ended but the image is not there:\n{}",
                            spec.tag,
                            log_tail.join("\n")
                        ),
                    })?;
            tracing::debug!(%host, tag = %spec.tag, id = %image.id, "image built");
            Ok(BuildOutput { image, log_tail })
        })
        .await
    }

    async fn remove_image(&self, host: &HostId, tag: &str) -> Result<(), RuntimeError> {
        const OP: &str = "remove_image";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            // Forced, like `docker rmi -f`: a container still using the image
            // keeps it (untagged) until it goes, which is the simulator's
            // semantics too.
            let options = RemoveImageOptions {
                force: true,
                noprune: false,
                platforms: None,
            };
            match e.docker.remove_image(tag, Some(options), None).await {
                Ok(_) => Ok(()),
                Err(err) if error::status(&err) == Some(404) => Ok(()),
                Err(err) => Err(error::map(host, OP, "image", tag, err)),
            }
        })
        .await
    }

    async fn find_container(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<ContainerInfo>, RuntimeError> {
        let e = self.engine(host)?;
        self.timed(host, "find_container", self.timeouts.call, async {
            Ok(e.inspect(host, "find_container", name)
                .await?
                .map(container_info))
        })
        .await
    }

    async fn create_container(
        &self,
        host: &HostId,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, RuntimeError> {
        const OP: &str = "create_container";
        check_name(host, "container", &spec.name)?;
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            let host_config = HostConfig {
                memory: spec.limits.memory_bytes,
                // No swap on top: the memory limit is the limit.
                memory_swap: spec.limits.memory_bytes,
                nano_cpus: spec.limits.nano_cpus,
                pids_limit: spec.limits.pids,
                privileged: Some(false),
                security_opt: Some(vec!["no-new-privileges:true".to_owned()]),
                cap_drop: Some(DROPPED_CAPS.iter().map(|c| (*c).to_owned()).collect()),
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".to_owned()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), LOG_MAX_SIZE.to_owned()),
                        ("max-file".to_owned(), LOG_MAX_FILES.to_owned()),
                    ])),
                }),
                network_mode: Some(NO_NETWORK.to_owned()),
                publish_all_ports: Some(false),
                binds: None,
                mounts: None,
                ..Default::default()
            };
            let body = ContainerCreateBody {
                image: Some(spec.image.clone()),
                labels: Some(spec.labels.clone().into_iter().collect()),
                env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                cmd: spec.cmd.clone(),
                host_config: Some(host_config),
                ..Default::default()
            };
            let options = CreateContainerOptions {
                name: Some(spec.name.clone()),
                platform: String::new(),
            };
            match e.docker.create_container(Some(options), body).await {
                Ok(_) => {}
                // The only thing a create can miss is its image.
                Err(err) if error::status(&err) == Some(404) => {
                    return Err(RuntimeError::not_found(host, "image", &spec.image));
                }
                Err(err) => return Err(error::map(host, OP, "container", &spec.name, err)),
            }
            e.inspect(host, OP, &spec.name)
                .await?
                .map(container_info)
                // Removed between create and inspect by someone else.
                .ok_or_else(|| RuntimeError::not_found(host, "container", &spec.name))
        })
        .await
    }

    async fn start_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "start_container";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            // 304 (already running) counts as success in bollard.
            e.docker
                .start_container(name, None)
                .await
                .map_err(|err| error::map(host, OP, "container", name, err))
        })
        .await
    }

    async fn stop_container(
        &self,
        host: &HostId,
        name: &str,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        const OP: &str = "stop_container";
        let e = self.engine(host)?;
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        // The engine answers only after the grace period and the kill.
        let limit = self.timeouts.call.saturating_add(grace);
        self.timed(host, OP, limit, async {
            let options = StopContainerOptions {
                signal: None,
                t: Some(seconds),
            };
            e.docker
                .stop_container(name, Some(options))
                .await
                .map_err(|err| error::map(host, OP, "container", name, err))
        })
        .await
    }

    async fn remove_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        const OP: &str = "remove_container";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            // Only ever by exact name: never let an id prefix pick another.
            if e.inspect(host, OP, name).await?.is_none() {
                return Ok(());
            }
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                link: false,
            };
            match e.docker.remove_container(name, Some(options)).await {
                Ok(()) => Ok(()),
                Err(err) if error::status(&err) == Some(404) => Ok(()),
                // "removal … is already in progress": it is going.
                Err(err)
                    if error::status(&err) == Some(409)
                        && error::server_message(&err)
                            .is_some_and(|m| m.contains("already in progress")) =>
                {
                    Ok(())
                }
                Err(err) => Err(error::map(host, OP, "container", name, err)),
            }
        })
        .await
    }

    async fn connect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
        alias: &str,
    ) -> Result<String, RuntimeError> {
        const OP: &str = "connect_network";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            let net = e
                .network(host, OP, network)
                .await?
                .ok_or_else(|| RuntimeError::not_found(host, "network", network))?;
            let Some(c) = e.inspect(host, OP, container).await? else {
                return Err(RuntimeError::not_found(host, "container", container));
            };
            let info = container_info(c);
            if let Some(ip) = info.networks.get(network) {
                return Ok(ip.clone());
            }
            // Off `none` first: Docker refuses a second network next to it.
            // (`container_info` hides `none`, so "no networks" means on it
            // or on nothing, and leaving `none` when not on it is a 404.)
            if info.networks.is_empty() {
                let request = NetworkDisconnectRequest {
                    container: container.to_owned(),
                    force: Some(false),
                };
                match e.docker.disconnect_network(NO_NETWORK, request).await {
                    Ok(()) => {}
                    Err(err) if error::status(&err) == Some(404) => {}
                    // On no network at all (made elsewhere, then detached).
                    Err(err)
                        if error::server_message(&err)
                            .is_some_and(|m| m.contains("is not connected")) => {}
                    Err(err) => return Err(error::map(host, OP, "container", container, err)),
                }
            }
            let request = NetworkConnectRequest {
                container: container.to_owned(),
                endpoint_config: Some(EndpointSettings {
                    aliases: Some(vec![alias.to_owned()]),
                    ..Default::default()
                }),
            };
            // By id: the name could be ambiguous on this engine (see
            // `network_create`).
            if let Err(err) = e.docker.connect_network(&net.id, request).await {
                let attached_meanwhile =
                    error::server_message(&err).is_some_and(|m| m.contains("already exists"));
                if !attached_meanwhile {
                    return Err(match error::status(&err) {
                        Some(404) => match e.inspect(host, OP, container).await? {
                            None => RuntimeError::not_found(host, "container", container),
                            Some(_) => RuntimeError::not_found(host, "network", network),
                        },
                        _ => error::map(host, OP, "network", network, err),
                    });
                }
            }
            // Docker gives a running container its address at connect time
            // and a stopped one at its next start: "" until then.
            let after = e
                .inspect(host, OP, container)
                .await?
                .ok_or_else(|| RuntimeError::not_found(host, "container", container))?;
            Ok(container_info(after)
                .networks
                .remove(network)
                .unwrap_or_default())
        })
        .await
    }

    async fn disconnect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
    ) -> Result<(), RuntimeError> {
        const OP: &str = "disconnect_network";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            let attached = |c: Option<ContainerInspectResponse>| -> Option<String> {
                c?.network_settings?
                    .networks?
                    .remove(network)
                    .map(|ep| ep.network_id.unwrap_or_else(|| network.to_owned()))
            };
            let Some(network_id) = attached(e.inspect(host, OP, container).await?) else {
                return Ok(());
            };
            let request = NetworkDisconnectRequest {
                container: container.to_owned(),
                force: Some(false),
            };
            match e.docker.disconnect_network(&network_id, request).await {
                Ok(()) => Ok(()),
                Err(err) if error::status(&err) == Some(404) => Ok(()),
                Err(err) => {
                    if attached(e.inspect(host, OP, container).await?).is_none() {
                        Ok(())
                    } else {
                        Err(error::map(host, OP, "network", network, err))
                    }
                }
            }
        })
        .await
    }

    async fn list_labelled(&self, host: &HostId, key: &str) -> Result<Vec<Resource>, RuntimeError> {
        const OP: &str = "list_labelled";
        let e = self.engine(host)?;
        self.timed(host, OP, self.timeouts.call, async {
            let by_label = || Some(filters(&[("label", key)]));
            let map = |err| error::map(host, OP, "label", key, err);
            let mut out = Vec::new();

            let networks = e
                .docker
                .list_networks(Some(ListNetworksOptions {
                    filters: by_label(),
                }))
                .await
                .map_err(map)?;
            out.extend(networks.into_iter().map(|n| Resource {
                kind: ResourceKind::Network,
                name: n.name.unwrap_or_default(),
                labels: labels(n.labels),
                running: false,
            }));

            let images = e
                .docker
                .list_images(Some(ListImagesOptions {
                    filters: by_label(),
                    ..Default::default()
                }))
                .await
                .map_err(map)?;
            for i in images {
                let tags: Vec<String> = i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect();
                let image_labels: Labels = i.labels.into_iter().collect();
                // An untagged (dangling) image is still Berth's to sweep; it
                // goes by its id.
                let names = if tags.is_empty() { vec![i.id] } else { tags };
                out.extend(names.into_iter().map(|name| Resource {
                    kind: ResourceKind::Image,
                    name,
                    labels: image_labels.clone(),
                    running: false,
                }));
            }

            let containers = e
                .docker
                .list_containers(Some(ListContainersOptions {
                    all: true,
                    filters: by_label(),
                    ..Default::default()
                }))
                .await
                .map_err(map)?;
            out.extend(containers.into_iter().map(|c| {
                Resource {
                    kind: ResourceKind::Container,
                    name: c
                        .names
                        .and_then(|n| n.into_iter().next())
                        .unwrap_or_default()
                        .trim_start_matches('/')
                        .to_owned(),
                    labels: labels(c.labels),
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                }
            }));
            Ok(out)
        })
        .await
    }

    /// Docker's event stream, filtered by the engine to container
    /// start/die/oom events carrying label `key`. With `since`, Docker first
    /// replays what its in-memory buffer (its last 256 events, of every
    /// kind) holds from then on; without, the stream starts at the call.
    /// Event times are truncated to microseconds, so resubscribing from the
    /// last seen `at` replays that event too (at-or-after). An error item
    /// ends the stream, as a dropped connection does.
    fn events(
        &self,
        host: &HostId,
        key: &str,
        since: Option<Timestamp>,
    ) -> BoxStream<'static, Result<EngineEvent, RuntimeError>> {
        let e = match self.engine(host) {
            Ok(e) => e.clone(),
            Err(err) => return failed(err),
        };
        let mut f = filters(&[("type", "container"), ("label", key)]);
        f.insert(
            "event".to_owned(),
            vec!["start".to_owned(), "die".to_owned(), "oom".to_owned()],
        );
        // The request goes out when the stream is first polled; without a
        // `since`, events between this call and that poll would be lost, so
        // "live" starts now. (Engine and Berth read the same clock on a local
        // host; a remote engine's skew shifts this start by as much.)
        let since = since.unwrap_or_else(|| Timestamp::from_system_time(SystemTime::now()));
        let options = EventsOptions {
            since: Some(docker_time(since)),
            until: None,
            filters: Some(f),
        };
        let source = e.docker.events(Some(options)).boxed();
        let host = host.clone();
        let key = key.to_owned();
        stream::unfold(Some(source), move |source| {
            let host = host.clone();
            let key = key.clone();
            async move {
                let mut source = source?;
                loop {
                    match source.next().await? {
                        Ok(m) => {
                            if let Some(ev) = engine_event(&host, m) {
                                return Some((Ok(ev), Some(source)));
                            }
                        }
                        Err(err) => {
                            let err = error::map(&host, "events", "label", &key, err);
                            return Some((Err(err), None));
                        }
                    }
                }
            }
        })
        .boxed()
    }

    /// `docker logs --tail N [--follow]`, stdout and stderr interleaved as
    /// the engine sends them, one item per line. Following a container that
    /// is not running ends after the existing lines.
    fn logs(
        &self,
        host: &HostId,
        container: &str,
        tail: usize,
        follow: bool,
    ) -> BoxStream<'static, Result<String, RuntimeError>> {
        let e = match self.engine(host) {
            Ok(e) => e.clone(),
            Err(err) => return failed(err),
        };
        let options = LogsOptions {
            follow,
            stdout: true,
            stderr: true,
            tail: if tail == usize::MAX {
                "all".to_owned()
            } else {
                tail.to_string()
            },
            ..Default::default()
        };
        let source = e.docker.logs(container, Some(options)).boxed();
        let host = host.clone();
        let name = container.to_owned();
        let frames = stream::unfold(Some(source), move |source| {
            let host = host.clone();
            let name = name.clone();
            async move {
                let mut source = source?;
                match source.next().await? {
                    Ok(frame) => {
                        // A frame is normally one line; a long one may carry
                        // several, and always ends with its line break.
                        let text = String::from_utf8_lossy(frame.as_ref()).into_owned();
                        let lines: Vec<Result<String, RuntimeError>> = text
                            .strip_suffix('\n')
                            .unwrap_or(&text)
                            .split('\n')
                            .map(|l| Ok(l.strip_suffix('\r').unwrap_or(l).to_owned()))
                            .collect();
                        Some((stream::iter(lines), Some(source)))
                    }
                    Err(err) => {
                        let err = error::map(&host, "logs", "container", &name, err);
                        Some((stream::iter(vec![Err(err)]), None))
                    }
                }
            }
        });
        frames.flatten().boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engines_maximum_version_is_read_from_its_refusal() {
        let v =
            max_supported("client version 1.53 is too new. Maximum supported API version is 1.41");
        assert_eq!(v.map(|v| (v.major_version, v.minor_version)), Some((1, 41)));
        assert!(max_supported("something else").is_none());
    }

    #[test]
    fn since_is_seconds_dot_nanoseconds() {
        assert_eq!(
            docker_time(Timestamp::from_micros(1_700_000_000_123_456)),
            "1700000000.123456000"
        );
        assert_eq!(docker_time(Timestamp::from_micros(-5)), "0.000000000");
    }

    #[test]
    fn die_events_carry_the_exit_code_and_the_labels() {
        let m = EventMessage {
            action: Some("die".into()),
            actor: Some(bollard::models::EventActor {
                id: Some("abc".into()),
                attributes: Some(HashMap::from([
                    ("name".to_owned(), "berth-o-web-g1".to_owned()),
                    ("image".to_owned(), "berth/o/web:g1".to_owned()),
                    ("exitCode".to_owned(), "137".to_owned()),
                    ("berth.org".to_owned(), "o".to_owned()),
                ])),
            }),
            time: Some(1_700_000_000),
            time_nano: Some(1_700_000_000_123_456_789),
            ..Default::default()
        };
        let ev = engine_event(&HostId::new("local"), m);
        let Some(ev) = ev else {
            panic!("a die event is followed")
        };
        assert_eq!(ev.kind, EngineEventKind::Die { exit_code: 137 });
        assert_eq!(ev.container, "berth-o-web-g1");
        assert_eq!(ev.at, Timestamp::from_micros(1_700_000_000_123_456));
        assert_eq!(
            ev.labels,
            Labels::from([("berth.org".to_owned(), "o".to_owned())])
        );
        let other = EventMessage {
            action: Some("exec_start".into()),
            ..Default::default()
        };
        assert!(engine_event(&HostId::new("local"), other).is_none());
    }
}
