//! The reconciler: the safety net under the event-driven flows. On a period
//! it (1) lists every resource this installation labelled on every host (an
//! engine may be shared with another Berth) and removes
//! those without a live record once they have stayed orphaned past a grace
//! period (a resource seen once may belong to a flow that has not recorded
//! it yet), and (2) re-publishes, as a fresh copy, the last event of any
//! instance stuck in a non-terminal state past the flow deadline — the
//! workers are idempotent, so a copy only moves forward what stalled — and
//! after `max_republish` copies fails the flow with `flow_timeout`, which the
//! `compensate.timeout` worker cleans up like any other failure, and (3)
//! records the exit of any `running` instance whose container exited while
//! no engine event reached Berth.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use berth_core::domain::InstanceStatus;
use berth_core::events::instance as ev;
use berth_core::events::{WORKER_FAILED_VERSION, WorkerFailed};
use berth_core::{Envelope, ErrorInfo, EventPayload, NewEvent, Timestamp};
use berth_runtime::{ContainerState, HostId, ResourceKind, RuntimeError, label};
use berth_store::instances::Instance;
use berth_store::{Cause, Store};
use berth_worker::Bus;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{Deps, names};

/// The failure event the reconciler emits for a flow past its deadline.
pub const TIMEOUT_EVENT: &str = "instance.flow.timeout";

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// Time between passes.
    pub period: Duration,
    /// How long a resource must stay orphaned before it is removed.
    pub grace: Duration,
    /// How long an instance may stay in a non-terminal state without change.
    pub flow_deadline: Duration,
    /// Copies of a stuck flow's last event before the flow is failed.
    pub max_republish: u32,
    /// How long one engine call of a pass may take: past it, the pass goes
    /// on as if the engine had answered "unavailable".
    pub call_timeout: Duration,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        ReconcilerConfig {
            period: Duration::from_secs(30),
            grace: Duration::from_secs(120),
            flow_deadline: Duration::from_secs(600),
            max_republish: 3,
            call_timeout: Duration::from_secs(30),
        }
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassReport {
    pub removed: Vec<(HostId, ResourceKind, String)>,
    pub republished: Vec<String>,
    pub timed_out: Vec<String>,
    /// Instances recorded `running` whose container had exited unseen.
    pub exited: Vec<String>,
}

/// Memory between passes: when each orphan was first seen, and how often
/// each stuck instance's flow was nudged.
#[derive(Debug, Default)]
pub struct Reconciler {
    config: ReconcilerConfig,
    first_seen: HashMap<(HostId, ResourceKind, String), Timestamp>,
    nudged: HashMap<String, (i64, u32)>,
}

impl Reconciler {
    pub fn new(config: ReconcilerConfig) -> Self {
        Reconciler {
            config,
            ..Default::default()
        }
    }

    /// Runs passes until cancelled; a failed pass is logged and the next one
    /// tries again.
    pub async fn run(mut self, bus: Bus, deps: Arc<Deps>, cancel: CancellationToken) {
        loop {
            let stop = berth_core::sched::idle(async {
                tokio::select! {
                    _ = cancel.cancelled() => true,
                    _ = tokio::time::sleep(self.config.period) => false,
                }
            })
            .await;
            if stop {
                return;
            }
            match self.pass(&bus, &deps).await {
                Ok(r) if r != PassReport::default() => info!(
                    removed = r.removed.len(),
                    republished = r.republished.len(),
                    timed_out = r.timed_out.len(),
                    exited = r.exited.len(),
                    "reconciler pass"
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %format!("{e:#}"), "reconciler pass failed"),
            }
        }
    }

    pub async fn pass(&mut self, bus: &Bus, deps: &Deps) -> anyhow::Result<PassReport> {
        let store = bus.store();
        let all = store.instances(None).await?;
        let mut report = PassReport::default();
        let running = self.sweep(store, deps, &all, &mut report).await?;
        self.unstick(bus, &all, &mut report).await?;
        let limit = self.config.call_timeout;
        observe(bus, deps, limit, &all, &running, &mut report).await?;
        Ok(report)
    }

    async fn sweep(
        &mut self,
        store: &Store,
        deps: &Deps,
        all: &[Instance],
        report: &mut PassReport,
    ) -> anyhow::Result<Running> {
        let mut running = Running::new();
        let now = store.now();
        let by_id: HashMap<&str, &Instance> = all.iter().map(|i| (i.id.as_str(), i)).collect();
        let live = |i: &Instance| !matches!(i.status.as_str(), "failed" | "deleted");
        // What live records name, looked up once per resource.
        let live_orgs: HashSet<&str> = all
            .iter()
            .filter(|i| live(i))
            .map(|i| i.org_id.as_str())
            .collect();
        let live_images: HashSet<(&str, &str, i64)> = all
            .iter()
            .filter(|i| live(i))
            .map(|i| (i.org_id.as_str(), i.name.as_str(), i.generation))
            .collect();
        let live_builds: HashSet<(&str, &str)> = all
            .iter()
            .filter(|i| live(i))
            .filter_map(|i| Some((i.org_id.as_str(), i.spec.build.as_ref()?.digest.as_str())))
            .collect();
        let mut still = HashMap::new();
        for host in deps.hosts.hosts() {
            let limit = self.config.call_timeout;
            let listing = deps.runtime.list_labelled(&host, label::MANAGED);
            let resources = match bounded(limit, &host, "list_labelled", listing).await {
                Ok(r) => r,
                Err(e) => {
                    warn!(%host, error = %e, "cannot list Berth's resources; skipping the host");
                    continue;
                }
            };
            for r in resources {
                // Another installation's, on a shared engine (or from before
                // installs were labelled): never ours to remove.
                if r.labels.get(label::INSTALL) != Some(&deps.install) {
                    continue;
                }
                if r.running {
                    running.insert((host.clone(), r.name.clone()));
                }
                let orphan = match r.kind {
                    ResourceKind::Network => r
                        .labels
                        .get(label::ORG)
                        .is_none_or(|org| !live_orgs.contains(org.as_str())),
                    // A build image lives while an instance of its org is
                    // made from its context.
                    ResourceKind::Image if r.labels.contains_key(label::BUILD) => {
                        names::parse_build_image(&r.name).is_none_or(|(org, digest)| {
                            !live_builds.contains(&(org, digest.as_str()))
                        })
                    }
                    // An image of an earlier version names its instance by
                    // its tag (it carries only its org's labels).
                    ResourceKind::Image if !r.labels.contains_key(label::INSTANCE) => {
                        names::parse_image(&r.name).is_none_or(|tag| !live_images.contains(&tag))
                    }
                    ResourceKind::Container | ResourceKind::Image => {
                        match r
                            .labels
                            .get(label::INSTANCE)
                            .and_then(|id| by_id.get(id.as_str()))
                        {
                            None => true,
                            Some(i) => {
                                !live(i)
                                    || r.labels.get(label::GENERATION)
                                        != Some(&i.generation.to_string())
                            }
                        }
                    }
                };
                if !orphan {
                    continue;
                }
                let key = (host.clone(), r.kind, r.name.clone());
                let first = self.first_seen.get(&key).copied().unwrap_or(now);
                if now.since(first) >= self.config.grace && self.first_seen.contains_key(&key) {
                    let rt = &deps.runtime;
                    let done = match r.kind {
                        ResourceKind::Container => {
                            let call = rt.remove_container(&host, &r.name);
                            bounded(limit, &host, "remove_container", call).await
                        }
                        ResourceKind::Image => {
                            let call = rt.remove_image(&host, &r.name);
                            bounded(limit, &host, "remove_image", call).await
                        }
                        ResourceKind::Network => {
                            let call = rt.remove_network(&host, &r.name);
                            bounded(limit, &host, "remove_network", call).await
                        }
                    };
                    match done {
                        Ok(()) => {
                            info!(%host, kind = ?r.kind, name = %r.name, "removed an orphan");
                            report.removed.push(key);
                            continue;
                        }
                        // A network still in use is removed on a later pass.
                        Err(RuntimeError::InUse { .. }) => {}
                        Err(e) => {
                            warn!(%host, name = %r.name, error = %e, "cannot remove an orphan")
                        }
                    }
                }
                still.insert(key, first);
            }
        }
        self.first_seen = still;
        Ok(running)
    }

    async fn unstick(
        &mut self,
        bus: &Bus,
        all: &[Instance],
        report: &mut PassReport,
    ) -> anyhow::Result<()> {
        let store = bus.store();
        let now = store.now();
        let mut seen = HashMap::new();
        for i in all {
            let busy =
                i.status.is_creating() || matches!(i.status.as_str(), "deleting" | "stopping");
            if !busy || now.since(i.updated_at) < self.config.flow_deadline {
                continue;
            }
            // Nudges count per version of the row: progress resets them.
            let (version, count) = self
                .nudged
                .get(&i.id)
                .copied()
                .filter(|(v, _)| *v == i.version)
                .unwrap_or((i.version, 0));
            let events = store.events_of_flow(i.flow_id).await?;
            let Some(mut last) = events.last() else {
                continue;
            };
            // A flow whose last event is a worker's failure (a stop or a
            // delete that failed for good: no compensation follows those)
            // is nudged with the event that worker failed on, a new round
            // of its attempts; the failure event itself has no one to move.
            if let Ok(failed) = last.payload_as::<WorkerFailed>()
                && let Some(cause) = events.iter().rev().find(|e| e.id == failed.event_id)
            {
                last = cause;
            }
            // A stop or a delete has no failed end state to give up to: it
            // is re-run every deadline until it succeeds (as a Kubernetes
            // finalizer is), while a creation gives up after a few nudges.
            let endless = matches!(
                i.status,
                InstanceStatus::Stopping | InstanceStatus::Deleting
            );
            if count < self.config.max_republish || endless {
                // A flow stuck at the join: only the delivery of the branch
                // that finished last acts, and the log's last event may be
                // the other branch's, so both branches' events go again.
                let join = [ev::NetworkReady::TYPE, ev::ImageBuilt::TYPE];
                let again: Vec<&Envelope> = if join.contains(&last.event_type.as_str()) {
                    join.iter()
                        .filter_map(|t| events.iter().rev().find(|e| e.event_type == *t))
                        .collect()
                } else {
                    vec![last]
                };
                let copies = again
                    .into_iter()
                    .map(|e| {
                        let mut copy = e.clone();
                        copy.id = store.ids().event_id();
                        copy.created_at = now;
                        copy.not_before = None;
                        copy
                    })
                    .collect();
                bus.publish_all(copies).await?;
                warn!(instance = %i.id, event = %last.event_type, nudge = count + 1, "flow stuck; re-published its last event");
                report.republished.push(i.id.clone());
                seen.insert(i.id.clone(), (version, count + 1));
            } else if i.status.is_creating() {
                let payload = WorkerFailed {
                    worker: "reconciler".into(),
                    event_id: last.id,
                    event_type: last.event_type.clone(),
                    attempts: count,
                    reason: "flow_timeout".into(),
                    error: ErrorInfo::new(
                        "flow_timeout",
                        format!(
                            "the flow made no progress for {} after {count} re-tries of its last step ({})",
                            humantime::format_duration(self.config.flow_deadline),
                            last.event_type
                        ),
                    ),
                };
                let ev = NewEvent::with_type(TIMEOUT_EVENT, WORKER_FAILED_VERSION, &payload)?;
                bus.publish(ev, Cause::Event(last)).await?;
                warn!(instance = %i.id, "flow timed out");
                report.timed_out.push(i.id.clone());
                seen.insert(i.id.clone(), (version, count + 1));
            } else {
                seen.insert(i.id.clone(), (version, count));
            }
        }
        self.nudged = seen;
        Ok(())
    }
}

/// Berth's containers the sweep's listings saw running, by host and name.
type Running = HashSet<(HostId, String)>;

/// Compares each `running` instance with its container: one that exited
/// while nobody listened (Berth was down; the engine replays only its last
/// events) gets the `engine.container.died` event its death would have
/// caused, so that the instance becomes `exited` and its restart policy
/// applies. A container that is gone altogether (removed outside Berth)
/// gets the same event marked `gone`: the instance becomes `exited` without
/// an exit code, and starting it again makes a new container.
async fn observe(
    bus: &Bus,
    deps: &Deps,
    limit: Duration,
    all: &[Instance],
    running: &Running,
    report: &mut PassReport,
) -> anyhow::Result<()> {
    let store = bus.store();
    for i in all.iter().filter(|i| i.status == InstanceStatus::Running) {
        let (Some(host), Some(container)) = (i.host.clone(), i.container.clone()) else {
            continue;
        };
        let host = HostId::new(host);
        // The sweep's listing saw it running: no need to ask. Only the
        // others (and all on a host that could not be listed) are looked
        // at one by one.
        if running.contains(&(host.clone(), container.clone())) {
            continue;
        }
        let call = deps.runtime.find_container(&host, &container);
        let info = match bounded(limit, &host, "find_container", call).await {
            Ok(info) => info,
            Err(e) => {
                warn!(%host, error = %e, "cannot look at a running instance's container");
                continue;
            }
        };
        let (exit_code, oom_killed, gone) = match info.map(|c| c.state) {
            Some(ContainerState::Exited {
                exit_code,
                oom_killed,
            }) => (exit_code, oom_killed, false),
            Some(_) => continue,
            None => {
                warn!(instance = %i.id, %container, "the container of a running instance is gone");
                (-1, false, true)
            }
        };
        let event = NewEvent::of(&ev::ContainerDied {
            instance_id: i.id.clone(),
            generation: i.generation,
            exit_code,
            oom_killed,
            container,
            at: store.now(),
            gone,
        })?
        .org(i.org_id.clone())
        .subject(i.id.clone());
        bus.publish(
            event,
            Cause::Root {
                flow_id: store.ids().flow_id(),
            },
        )
        .await?;
        if gone {
            info!(instance = %i.id, "recorded the instance's container as gone");
        } else {
            info!(instance = %i.id, exit_code, "a container exited unseen; recorded its exit");
        }
        report.exited.push(i.id.clone());
    }
    Ok(())
}

/// An engine call of a pass, bounded by `limit`. A hung engine costs one
/// pass a timeout; unbounded, one hung call stopped every later pass and
/// with them every nudge of a stuck flow (found by `berth-bench chaos`,
/// seed 60 at 1000 actions: 19 flows never ended).
async fn bounded<T>(
    limit: Duration,
    host: &HostId,
    op: &str,
    call: impl std::future::Future<Output = Result<T, RuntimeError>>,
) -> Result<T, RuntimeError> {
    let out = tokio::time::timeout(limit, call).await;
    // In the simulator the dropped call may have given up the baton.
    berth_core::sched::hold().await;
    out.unwrap_or_else(|_| {
        Err(RuntimeError::Timeout {
            host: host.clone(),
            op: op.into(),
        })
    })
}
