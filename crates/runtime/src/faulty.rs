//! The fault-injecting wrapper: a [`ContainerRuntime`] that passes every call
//! to another runtime, except the ones it fails — at a configured rate per
//! operation, drawn from a seeded generator (same seed and same call sequence,
//! same faults), or deterministically for the next `n` calls of an operation
//! (how scenario tests inject a failure at each step in turn).
//!
//! `events` and `logs` always pass through: their failures are the stream
//! ending, which the sim's hooks cover.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use berth_core::{SeededRng, Timestamp};
use futures::stream::BoxStream;

use crate::{
    BuildOutput, BuildSpec, ContainerInfo, ContainerRuntime, ContainerSpec, EngineEvent, HostId,
    ImageInfo, NetworkInfo, NetworkSpec, Resource, RuntimeError,
};

/// The operations faults can be injected into (every trait method but
/// `events` and `logs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Ping,
    FindNetwork,
    CreateNetwork,
    RemoveNetwork,
    FindImage,
    BuildImage,
    RemoveImage,
    FindContainer,
    CreateContainer,
    StartContainer,
    StopContainer,
    RemoveContainer,
    ConnectNetwork,
    DisconnectNetwork,
    ListLabelled,
}

impl Op {
    /// Every operation, in declaration order (to configure them all at once).
    pub const ALL: [Op; 15] = [
        Op::Ping,
        Op::FindNetwork,
        Op::CreateNetwork,
        Op::RemoveNetwork,
        Op::FindImage,
        Op::BuildImage,
        Op::RemoveImage,
        Op::FindContainer,
        Op::CreateContainer,
        Op::StartContainer,
        Op::StopContainer,
        Op::RemoveContainer,
        Op::ConnectNetwork,
        Op::DisconnectNetwork,
        Op::ListLabelled,
    ];

    /// The trait method's name (`create_container`), as put in errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Ping => "ping",
            Op::FindNetwork => "find_network",
            Op::CreateNetwork => "create_network",
            Op::RemoveNetwork => "remove_network",
            Op::FindImage => "find_image",
            Op::BuildImage => "build_image",
            Op::RemoveImage => "remove_image",
            Op::FindContainer => "find_container",
            Op::CreateContainer => "create_container",
            Op::StartContainer => "start_container",
            Op::StopContainer => "stop_container",
            Op::RemoveContainer => "remove_container",
            Op::ConnectNetwork => "connect_network",
            Op::DisconnectNetwork => "disconnect_network",
            Op::ListLabelled => "list_labelled",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an injected fault shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// `RuntimeError::Unavailable` (retryable); the call is not made.
    Transient,
    /// `RuntimeError::Invalid` (not retryable); the call is not made.
    Permanent,
    /// `RuntimeError::Timeout` (retryable); the call is not made.
    Timeout,
    /// Never answers, so the caller's own timeout has to fire; the call is
    /// not made.
    Hang,
    /// The call *is* made and takes effect, then `RuntimeError::Timeout` is
    /// returned instead of its result: the engine did it but the answer was
    /// lost, the case that makes find-before-create necessary.
    LostReply,
    /// `RuntimeError::NotFound` for what the operation is about (not
    /// retryable by its class); the call is not made. What Docker answers
    /// about a container whose creation a killed client started and the
    /// engine has not finished: its name is taken (a create conflicts) but
    /// nothing of that name can be started or inspected yet.
    NotFound,
}

/// A fault injected into a `rate` fraction (0.0–1.0) of an operation's calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub rate: f64,
    pub kind: FaultKind,
}

impl Fault {
    pub fn new(rate: f64, kind: FaultKind) -> Self {
        Fault { rate, kind }
    }
}

/// A [`ContainerRuntime`] that fails some of the calls it forwards to `inner`.
/// Keep an `Arc` of the inner runtime (e.g. an `Arc<SimRuntime>`) to reach its
/// hooks.
pub struct FaultyRuntime {
    inner: Arc<dyn ContainerRuntime>,
    rng: SeededRng,
    plan: Mutex<Plan>,
    injected: AtomicU64,
}

struct Plan {
    /// By `Op::index`.
    rates: [Option<Fault>; Op::ALL.len()],
    /// Forced failures, consumed front first: runs of (calls left, kind).
    queued: [VecDeque<(u64, FaultKind)>; Op::ALL.len()],
}

impl FaultyRuntime {
    /// Wraps `inner` with no faults configured; `seed` drives the rate draws.
    pub fn new(inner: Arc<dyn ContainerRuntime>, seed: u64) -> Self {
        FaultyRuntime {
            inner,
            rng: SeededRng::new(seed),
            plan: Mutex::new(Plan {
                rates: [None; Op::ALL.len()],
                queued: std::array::from_fn(|_| VecDeque::new()),
            }),
            injected: AtomicU64::new(0),
        }
    }

    pub fn inner(&self) -> &Arc<dyn ContainerRuntime> {
        &self.inner
    }

    pub fn seed(&self) -> u64 {
        self.rng.seed()
    }

    /// Sets (or with `None` clears) the random fault of one operation.
    pub fn set_fault(&self, op: Op, fault: Option<Fault>) {
        self.plan().rates[op.index()] = fault;
    }

    /// Sets (or clears) the same random fault for every operation.
    pub fn set_fault_all(&self, fault: Option<Fault>) {
        self.plan().rates = [fault; Op::ALL.len()];
    }

    /// Makes the next `n` calls of `op` fail with `kind`, whatever the rate.
    /// Calls add up: `fail_next(op, 1, Transient)` then `fail_next(op, 1,
    /// Permanent)` fails the next call transiently and the one after
    /// permanently. While forced failures are pending no rate is drawn for
    /// `op`.
    pub fn fail_next(&self, op: Op, n: u64, kind: FaultKind) {
        if n > 0 {
            self.plan().queued[op.index()].push_back((n, kind));
        }
    }

    /// Forced failures of `op` not yet used.
    pub fn pending(&self, op: Op) -> u64 {
        self.plan().queued[op.index()].iter().map(|(n, _)| n).sum()
    }

    /// Clears every configured fault and every pending forced failure.
    pub fn clear(&self) {
        let mut plan = self.plan();
        plan.rates = [None; Op::ALL.len()];
        plan.queued.iter_mut().for_each(VecDeque::clear);
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn plan(&self) -> MutexGuard<'_, Plan> {
        // Poisoning only means a panic elsewhere; the plan is plain data.
        self.plan.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault for this call of `op`, if any: a forced one first, else a
    /// draw against the rate. The generator is only drawn from for operations
    /// that have a rate, so unrelated calls do not shift the sequence.
    fn decide(&self, op: Op) -> Option<FaultKind> {
        let mut plan = self.plan();
        let queue = &mut plan.queued[op.index()];
        let kind = if let Some((left, kind)) = queue.front_mut() {
            let kind = *kind;
            *left -= 1;
            if *left == 0 {
                queue.pop_front();
            }
            Some(kind)
        } else {
            let fault = plan.rates[op.index()]?;
            (self.rng.next_f64() < fault.rate).then_some(fault.kind)
        };
        if kind.is_some() {
            self.injected.fetch_add(1, Ordering::Relaxed);
        }
        kind
    }

    /// Runs `call` (lazy: a future does nothing until awaited) unless a fault
    /// is injected.
    async fn guard<T, F>(&self, op: Op, host: &HostId, call: F) -> Result<T, RuntimeError>
    where
        F: Future<Output = Result<T, RuntimeError>> + Send,
    {
        let Some(kind) = self.decide(op) else {
            return call.await;
        };
        tracing::debug!(%host, op = op.as_str(), ?kind, "injecting runtime fault");
        match kind {
            FaultKind::Transient => Err(RuntimeError::Unavailable {
                host: host.clone(),
                message: format!("injected transient fault in {op}"),
            }),
            FaultKind::Permanent => Err(RuntimeError::Invalid {
                host: host.clone(),
                message: format!("injected permanent fault in {op}"),
            }),
            FaultKind::Timeout => Err(RuntimeError::timeout(host, op.as_str())),
            FaultKind::Hang => berth_core::sched::idle(std::future::pending()).await,
            FaultKind::LostReply => {
                // The outcome is dropped on purpose: that is the fault.
                let _ = call.await;
                Err(RuntimeError::timeout(host, op.as_str()))
            }
            FaultKind::NotFound => {
                let what = op.as_str().rsplit('_').next().unwrap_or("resource");
                Err(RuntimeError::not_found(host, what, "(injected)"))
            }
        }
    }
}

#[async_trait]
impl ContainerRuntime for FaultyRuntime {
    async fn ping(&self, host: &HostId) -> Result<(), RuntimeError> {
        self.guard(Op::Ping, host, self.inner.ping(host)).await
    }

    async fn find_network(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<NetworkInfo>, RuntimeError> {
        self.guard(Op::FindNetwork, host, self.inner.find_network(host, name))
            .await
    }

    async fn create_network(
        &self,
        host: &HostId,
        spec: &NetworkSpec,
    ) -> Result<NetworkInfo, RuntimeError> {
        self.guard(
            Op::CreateNetwork,
            host,
            self.inner.create_network(host, spec),
        )
        .await
    }

    async fn remove_network(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        self.guard(
            Op::RemoveNetwork,
            host,
            self.inner.remove_network(host, name),
        )
        .await
    }

    async fn find_image(
        &self,
        host: &HostId,
        tag: &str,
    ) -> Result<Option<ImageInfo>, RuntimeError> {
        self.guard(Op::FindImage, host, self.inner.find_image(host, tag))
            .await
    }

    async fn build_image(
        &self,
        host: &HostId,
        spec: &BuildSpec,
    ) -> Result<BuildOutput, RuntimeError> {
        self.guard(Op::BuildImage, host, self.inner.build_image(host, spec))
            .await
    }

    async fn remove_image(&self, host: &HostId, tag: &str) -> Result<(), RuntimeError> {
        self.guard(Op::RemoveImage, host, self.inner.remove_image(host, tag))
            .await
    }

    async fn find_container(
        &self,
        host: &HostId,
        name: &str,
    ) -> Result<Option<ContainerInfo>, RuntimeError> {
        self.guard(
            Op::FindContainer,
            host,
            self.inner.find_container(host, name),
        )
        .await
    }

    async fn create_container(
        &self,
        host: &HostId,
        spec: &ContainerSpec,
    ) -> Result<ContainerInfo, RuntimeError> {
        self.guard(
            Op::CreateContainer,
            host,
            self.inner.create_container(host, spec),
        )
        .await
    }

    async fn start_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        self.guard(
            Op::StartContainer,
            host,
            self.inner.start_container(host, name),
        )
        .await
    }

    async fn stop_container(
        &self,
        host: &HostId,
        name: &str,
        grace: Duration,
    ) -> Result<(), RuntimeError> {
        self.guard(
            Op::StopContainer,
            host,
            self.inner.stop_container(host, name, grace),
        )
        .await
    }

    async fn remove_container(&self, host: &HostId, name: &str) -> Result<(), RuntimeError> {
        self.guard(
            Op::RemoveContainer,
            host,
            self.inner.remove_container(host, name),
        )
        .await
    }

    async fn connect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
        alias: &str,
    ) -> Result<String, RuntimeError> {
        self.guard(
            Op::ConnectNetwork,
            host,
            self.inner.connect_network(host, network, container, alias),
        )
        .await
    }

    async fn disconnect_network(
        &self,
        host: &HostId,
        network: &str,
        container: &str,
    ) -> Result<(), RuntimeError> {
        self.guard(
            Op::DisconnectNetwork,
            host,
            self.inner.disconnect_network(host, network, container),
        )
        .await
    }

    async fn list_labelled(&self, host: &HostId, key: &str) -> Result<Vec<Resource>, RuntimeError> {
        self.guard(Op::ListLabelled, host, self.inner.list_labelled(host, key))
            .await
    }

    fn events(
        &self,
        host: &HostId,
        key: &str,
        since: Option<Timestamp>,
    ) -> BoxStream<'static, Result<EngineEvent, RuntimeError>> {
        self.inner.events(host, key, since)
    }

    fn logs(
        &self,
        host: &HostId,
        container: &str,
        tail: usize,
        follow: bool,
    ) -> BoxStream<'static, Result<String, RuntimeError>> {
        self.inner.logs(host, container, tail, follow)
    }
}
