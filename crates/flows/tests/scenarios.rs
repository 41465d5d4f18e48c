//! The instance lifecycle end to end on the simulated runtime, through the
//! real worker framework on a real SQLite file: the happy path's event tree,
//! a failure injected at each step (transient, then permanent), a missing
//! base image, deletion, duplicates and replays — with the invariants of
//! DESIGN §8 checked after every scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use berth_core::domain::{ConditionKind, InstanceName, InstanceStatus, RestartPolicy};
use berth_core::{Clock, Envelope, Timestamp};
use berth_flows::{
    FlowError, create_instance, delete_instance, names, restart_instance, start_instance,
    stop_instance,
};
use berth_runtime::ContainerState;
use berth_runtime::faulty::{FaultKind, FaultyRuntime, Op};
use berth_runtime::sim::{SimLatency, SimRuntime};
use berth_runtime::{HostId, Limits, label};
use berth_store::instances::{self, Instance, InstanceSpec};
use berth_testkit::{Kit, TestWorld};

/// A kit world on the simulated host, with its engine at hand.
struct World {
    kit: TestWorld,
    sim: Arc<SimRuntime>,
    faulty: Arc<FaultyRuntime>,
    host: HostId,
}

impl Deref for World {
    type Target = TestWorld;
    fn deref(&self) -> &TestWorld {
        &self.kit
    }
}

impl DerefMut for World {
    fn deref_mut(&mut self) -> &mut TestWorld {
        &mut self.kit
    }
}

/// Fast retries so failure scenarios finish in milliseconds.
const POLICIES: &str = r#"
[workers.default]
max_attempts = 3
timeout = "5s"
backoff = { initial = "1ms", max = "4ms" }
"#;

async fn world() -> World {
    world_with(POLICIES).await
}

async fn world_with(config: &str) -> World {
    world_of(Kit::new(config)).await
}

/// The kit's world, started.
async fn world_of(kit: Kit) -> World {
    let kit = kit.start().await;
    World {
        sim: kit.sim().clone(),
        faulty: kit.faulty().clone(),
        host: kit.host(),
        kit,
    }
}

fn spec(image: &str) -> InstanceSpec {
    spec_with(image, RestartPolicy::No)
}

fn spec_with(image: &str, restart: RestartPolicy) -> InstanceSpec {
    InstanceSpec {
        image: image.into(),
        env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        ports: vec![],
        restart,
        build: None,
        limits: None,
    }
}

impl World {
    async fn create(&self, org: &str, name: &str, image: &str) -> (Instance, Envelope) {
        self.kit.create(org, name, spec(image)).await
    }

    fn container_state(&self, name: &str) -> Option<ContainerState> {
        self.sim
            .containers(&self.host)
            .into_iter()
            .find(|c| c.name == name)
            .map(|c| c.state)
    }

    /// DESIGN §8, on the simulated host: every flow ended; at most one
    /// container per instance generation; nothing labelled by Berth without a
    /// live record; nothing left of a failed or deleted instance.
    async fn check_invariants(&self) {
        // Under the write gate, no commit sits between its write and its
        // update of the instance cache (the last turn may still be there).
        let gate = self.store.write_gate().await;
        let all = self.all().await;
        let by_id: HashMap<&str, &Instance> = all.iter().map(|i| (i.id.as_str(), i)).collect();
        for i in &all {
            // Steps read rows from the instance cache: it must never hold
            // anything but what the database holds.
            if let Some(cached) = self.store.cached_instance(&i.id) {
                assert_eq!(
                    &cached, i,
                    "the cached row of {} is not the stored one",
                    i.name
                );
            }
        }
        drop(gate);
        for i in &all {
            assert!(
                i.status.is_terminal(),
                "instance {} ended in {}",
                i.name,
                i.status
            );
        }
        let live =
            |i: &Instance| !matches!(i.status, InstanceStatus::Failed | InstanceStatus::Deleted);
        let mut per_generation: HashMap<(String, String), usize> = HashMap::new();
        for c in self.sim.containers(&self.host) {
            let id = c.labels.get(label::INSTANCE).expect("labelled container");
            let inst = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("container {} has no record", c.name));
            assert!(
                live(inst),
                "container {} survives its {} instance",
                c.name,
                inst.status
            );
            let generation = c.labels.get(label::GENERATION).cloned().unwrap_or_default();
            *per_generation.entry((id.clone(), generation)).or_default() += 1;
        }
        for (k, n) in per_generation {
            assert!(n <= 1, "{n} containers for instance generation {k:?}");
        }
        for img in self.sim.images(&self.host) {
            if !img.labels.contains_key(label::MANAGED) {
                continue; // a base image
            }
            // A build image lives while an instance of its org uses it.
            if let Some((org, digest)) = names::parse_build_image(&img.tag) {
                assert!(
                    all.iter().any(|i| live(i)
                        && i.org_id == org
                        && i.spec.build.as_ref().is_some_and(|b| b.digest == digest)),
                    "build image {} survives every instance of its context",
                    img.tag
                );
                continue;
            }
            // An image of an earlier version names its instance by its tag.
            let (org, name, generation) = names::parse_image(&img.tag)
                .unwrap_or_else(|| panic!("image {} is not an instance's", img.tag));
            // A name is reused once its instance is deleted: some record of
            // that name and generation must be live.
            let records: Vec<&Instance> = all
                .iter()
                .filter(|i| {
                    i.org_id == org && i.name.as_str() == name && i.generation == generation
                })
                .collect();
            assert!(!records.is_empty(), "image {} has no record", img.tag);
            assert!(
                records.iter().any(|i| live(i)),
                "image {} survives its instance ({:?})",
                img.tag,
                records.iter().map(|i| i.status).collect::<Vec<_>>()
            );
        }
        for n in self.sim.networks(&self.host) {
            let org = n.labels.get(label::ORG).expect("labelled network");
            assert!(
                all.iter().any(|i| &i.org_id == org && live(i)),
                "network {} outlives every instance of org {org}",
                n.name
            );
        }
    }
}

#[tokio::test]
async fn the_happy_path_emits_the_expected_event_tree() {
    let mut w = world().await;
    let (inst, root) = w.create("orga", "web", "busybox").await;
    let done = w.settle(&inst.id).await;
    assert_eq!(done.status, InstanceStatus::Running, "{:?}", done.error);
    for k in [
        ConditionKind::HostReady,
        ConditionKind::NetworkReady,
        ConditionKind::ImageBuilt,
        ConditionKind::ContainerStarted,
        ConditionKind::NetworkAttached,
    ] {
        assert!(done.conditions.holds(k), "{k:?} not true");
    }
    assert!(done.ip.is_some());
    w.quiesce().await;
    let events = w.store.events_of_flow(root.flow_id).await.unwrap();
    let ty = |id| {
        events
            .iter()
            .find(|e| e.id == id)
            .map(|e| e.event_type.as_str())
    };
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    for expected in [
        "instance.requested",
        "host.ready",
        "network.ready",
        "image.built",
        "container.started",
        "container.attached",
        "instance.running",
    ] {
        assert_eq!(
            types.iter().filter(|t| **t == expected).count(),
            1,
            "{expected} in {types:?}"
        );
    }
    // The causal tree: each event was caused by its predecessor; the join
    // (container.started) by one of the two parallel branches.
    for e in &events {
        let parent = e.causation_id.and_then(ty);
        let ok = match e.event_type.as_str() {
            "instance.requested" => parent.is_none(),
            "host.ready" => parent == Some("instance.requested"),
            "network.ready" | "image.built" => parent == Some("host.ready"),
            "container.started" => matches!(parent, Some("network.ready" | "image.built")),
            "container.attached" => parent == Some("container.started"),
            "instance.running" => parent == Some("container.attached"),
            _ => true,
        };
        assert!(ok, "{} caused by {parent:?}", e.event_type);
        assert_eq!(e.org_id.as_deref(), Some("orga"));
        assert_eq!(e.subject.as_deref(), Some(inst.id.as_str()));
    }
    w.check_invariants().await;
    w.stop().await;
}

/// A clock that never moves: every handler reads the same time.
struct FrozenClock;

impl Clock for FrozenClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(1_800_000_000_000_000)
    }
}

#[tokio::test]
async fn the_join_acts_once_when_its_branches_commit_apart_whatever_the_clocks_say() {
    // The image is built at once and the network takes a while, so the two
    // branches land in different commits; the frozen clock gives both the
    // same handler time. Ordered by handlers' clocks (a tie names the image)
    // the join waited for the image's delivery, which had read the row
    // before the network was ready: neither delivery acted and the flow
    // hung until the reconciler's nudge. Ordered by commits, the network's
    // delivery (the later one, which sees both) acts.
    let latency = SimLatency {
        network: Duration::from_millis(30),
        ..SimLatency::default()
    };
    let mut w = world_of(
        Kit::new(POLICIES)
            .clock(Arc::new(FrozenClock))
            .latency(latency),
    )
    .await;
    let mut made = Vec::new();
    for name in ["web", "db", "cache"] {
        made.push(w.create("orga", name, "busybox").await);
    }
    for (inst, root) in &made {
        let done = w.settle(&inst.id).await;
        assert_eq!(done.status, InstanceStatus::Running, "{:?}", done.error);
        w.quiesce().await;
        let events = w.store.events_of_flow(root.flow_id).await.unwrap();
        let started: Vec<_> = events
            .iter()
            .filter(|e| e.event_type == "container.started")
            .collect();
        assert_eq!(started.len(), 1, "the join acted once");
        let cause = events
            .iter()
            .find(|e| Some(e.id) == started[0].causation_id);
        assert_eq!(
            cause.map(|e| e.event_type.as_str()),
            Some("network.ready"),
            "the branch committed last acted"
        );
    }
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn orgs_reach_their_own_instances_by_name_and_never_another_orgs() {
    let mut w = world().await;
    let mut ids = Vec::new();
    for (org, name) in [
        ("orga", "api"),
        ("orga", "db"),
        ("orgb", "db"),
        ("orgb", "cache"),
    ] {
        ids.push(w.create(org, name, "busybox").await.0.id);
    }
    let mut running = Vec::new();
    for id in &ids {
        let i = w.settle(id).await;
        assert_eq!(i.status, InstanceStatus::Running, "{:?}", i.error);
        running.push(i);
    }
    let api = running[0].container.clone().unwrap();
    let a_db = running[1].ip.clone().unwrap();
    assert_eq!(
        w.sim.resolve(&w.host, &api, "db"),
        Some(a_db),
        "org A's db by name"
    );
    assert_eq!(
        w.sim.resolve(&w.host, &api, "cache"),
        None,
        "org B's cache is invisible"
    );
    let b_cache = running[3].container.clone().unwrap();
    assert_eq!(w.sim.resolve(&w.host, &b_cache, "api"), None);
    assert_eq!(
        w.sim.resolve(&w.host, &b_cache, "db"),
        running[2].ip.clone(),
        "its own db"
    );
    assert_eq!(w.sim.networks(&w.host).len(), 2, "one network per org");
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

/// Each step's engine operation, and the worker that calls it.
const STEPS: &[(Op, &str)] = &[
    (Op::Ping, "host.ensure"),
    (Op::FindNetwork, "network.ensure"),
    (Op::FindImage, "image.build"),
    (Op::CreateContainer, "container.start"),
    (Op::StartContainer, "container.start"),
    (Op::ConnectNetwork, "network.attach"),
];

#[tokio::test]
async fn a_transient_failure_at_each_step_is_retried_to_running() {
    for (op, worker) in STEPS {
        let mut w = world().await;
        w.faulty.fail_next(*op, 2, FaultKind::Transient);
        let (inst, root) = w.create("orga", "web", "busybox").await;
        let done = w.settle(&inst.id).await;
        assert_eq!(
            done.status,
            InstanceStatus::Running,
            "{op:?}: {:?}",
            done.error
        );
        w.quiesce().await;
        let attempts = w.store.attempts_of_flow(root.flow_id).await.unwrap();
        // Retries of the injected fault; both join deliveries may see both
        // branches done and act, and the one that loses the write is
        // retried too, for `concurrent_update`.
        let retries = attempts
            .iter()
            .filter(|a| {
                a.worker == *worker
                    && a.outcome == berth_store::Outcome::Retry
                    && a.error
                        .as_ref()
                        .is_none_or(|e| e.code != "concurrent_update")
            })
            .count();
        assert_eq!(retries, 2, "{op:?}: two retried attempts of {worker}");
        w.check_invariants().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn a_permanent_failure_at_each_step_ends_in_its_compensation() {
    for (op, worker) in STEPS {
        let mut w = world().await;
        // A neighbour of the same org, so the org's network must survive.
        let (other, _) = w.create("orga", "other", "busybox").await;
        assert_eq!(w.settle(&other.id).await.status, InstanceStatus::Running);
        w.faulty.fail_next(*op, 1, FaultKind::Permanent);
        let (inst, root) = w.create("orga", "web", "busybox").await;
        let done = w.settle(&inst.id).await;
        assert_eq!(done.status, InstanceStatus::Failed, "{op:?}");
        let err = done
            .error
            .clone()
            .expect("a failed instance carries its error");
        assert_eq!(err.step, *worker, "{op:?}");
        assert_eq!(err.code, "invalid_request", "{op:?}");
        assert_eq!(err.attempts, 1, "{op:?}: permanent errors are not retried");
        w.quiesce().await;
        let events = w.store.events_of_flow(root.flow_id).await.unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        let failure = format!("{worker}.failed");
        assert!(types.contains(&failure.as_str()), "{op:?}: {types:?}");
        assert_eq!(
            types.iter().filter(|t| **t == "instance.failed").count(),
            1,
            "{types:?}"
        );
        assert!(!types.contains(&"instance.running"), "{types:?}");
        assert_eq!(
            w.get(&other.id).await.status,
            InstanceStatus::Running,
            "neighbour untouched"
        );
        w.check_invariants().await;
        w.stop().await;
    }
}

#[tokio::test]
async fn a_missing_base_image_fails_with_image_not_found_and_leaves_nothing() {
    let mut w = world().await;
    let (inst, _) = w.create("orga", "web", "no-such-image:1").await;
    let done = w.settle(&inst.id).await;
    assert_eq!(done.status, InstanceStatus::Failed);
    let err = done.error.unwrap();
    assert_eq!(err.code, "image_not_found");
    assert_eq!(err.step, "image.build");
    assert!(err.message.contains("'no-such-image:1'"), "{}", err.message);
    w.quiesce().await;
    assert!(w.sim.containers(&w.host).is_empty());
    assert!(
        w.sim.networks(&w.host).is_empty(),
        "the org had nothing else"
    );
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn deleting_every_instance_leaves_nothing_behind() {
    let mut w = world().await;
    let (a, _) = w.create("orga", "a", "busybox").await;
    let (b, _) = w.create("orga", "b", "busybox").await;
    for id in [&a.id, &b.id] {
        assert_eq!(w.settle(id).await.status, InstanceStatus::Running);
    }
    for id in [&a.id, &b.id] {
        assert!(
            delete_instance(&w.store, "orga", id)
                .await
                .unwrap()
                .is_some()
        );
    }
    assert!(
        delete_instance(&w.store, "orgb", &a.id).await.is_err(),
        "another org cannot delete it"
    );
    for id in [&a.id, &b.id] {
        assert_eq!(w.settle(id).await.status, InstanceStatus::Deleted);
    }
    w.quiesce().await;
    assert!(w.sim.containers(&w.host).is_empty());
    assert!(w.sim.networks(&w.host).is_empty());
    assert!(w.sim.images(&w.host).is_empty());
    assert!(
        delete_instance(&w.store, "orga", &a.id)
            .await
            .unwrap()
            .is_none(),
        "already deleted"
    );
    let (again, _) = w.create("orga", "a", "busybox").await;
    assert_eq!(
        w.settle(&again.id).await.status,
        InstanceStatus::Running,
        "the name is free again"
    );
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn a_duplicate_of_every_event_creates_nothing_twice() {
    let mut w = world().await;
    let (inst, root) = w.create("orga", "web", "busybox").await;
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.quiesce().await;
    let before = w.get(&inst.id).await;
    let events = w.store.events_of_flow(root.flow_id).await.unwrap();
    let ops_before = w.sim.op_count();

    // Every event again under a new id, as a replaying producer would send
    // it: past the inbox, so only the workers' own idempotency stands.
    let mut replays = Vec::new();
    for e in &events {
        let mut copy = e.clone();
        copy.id = w.store.ids().event_id();
        replays.push(copy);
    }
    let n = replays.len();
    let mut tx = w.store.begin().await.unwrap();
    let fresh = tx.publish(&replays).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(fresh.len(), n);
    // And every delivery of the originals again, as a redelivering bus would.
    let mut tx = w.store.begin().await.unwrap();
    tx.execute_for_test(
        "INSERT INTO deliveries (event_id, worker, round, attempt, not_before)
         SELECT event_id, worker, 0, 0, 0 FROM inbox
          WHERE event_id IN (SELECT id FROM events WHERE flow_id = ?)",
        [root.flow_id.into()],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    w.store
        .notify_committed(berth_flows::WORKERS.iter().map(|s| s.to_string()));
    w.quiesce().await;

    let after = w.get(&inst.id).await;
    assert_eq!(after.status, InstanceStatus::Running);
    assert_eq!(after.version, before.version, "the row did not change");
    assert_eq!(w.sim.containers(&w.host).len(), 1);
    assert_eq!(w.sim.networks(&w.host).len(), 1);
    assert!(
        w.sim.images(&w.host).is_empty(),
        "a base image is used as it is: nothing is built"
    );
    let all_events = w.store.events_of_flow(root.flow_id).await.unwrap();
    assert_eq!(
        all_events.len(),
        2 * n,
        "no worker emitted anything for a duplicate"
    );
    // Replays may look (find_*), never create: the counts above hold.
    assert!(w.sim.op_count() >= ops_before);
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn stop_start_and_restart_move_the_container_and_the_status() {
    let mut w = world().await;
    let (inst, _) = w.create("orga", "web", "busybox").await;
    let running = w.settle(&inst.id).await;
    let container = running.container.clone().unwrap();
    assert!(
        stop_instance(&w.store, "orga", &inst.id)
            .await
            .unwrap()
            .is_some()
    );
    w.until(&inst.id, InstanceStatus::Stopped).await;
    assert!(matches!(
        w.container_state(&container),
        Some(ContainerState::Exited { .. })
    ));
    assert!(
        stop_instance(&w.store, "orga", &inst.id)
            .await
            .unwrap()
            .is_none(),
        "already stopped"
    );
    assert!(
        start_instance(&w.store, "orga", &inst.id)
            .await
            .unwrap()
            .is_some()
    );
    w.until(&inst.id, InstanceStatus::Running).await;
    assert_eq!(w.container_state(&container), Some(ContainerState::Running));
    assert!(
        start_instance(&w.store, "orga", &inst.id)
            .await
            .unwrap()
            .is_none(),
        "already running"
    );
    let starts_before = w.sim.event_history(&w.host).len();
    assert!(
        restart_instance(&w.store, "orga", &inst.id)
            .await
            .unwrap()
            .is_some()
    );
    w.quiesce().await;
    let after = w.until(&inst.id, InstanceStatus::Running).await;
    assert!(
        w.sim.event_history(&w.host).len() > starts_before,
        "the engine saw a stop and a start"
    );
    assert_eq!(
        after.container,
        Some(container.clone()),
        "same container, same generation"
    );
    assert!(matches!(
        stop_instance(&w.store, "orgb", &inst.id).await,
        Err(FlowError::NotFound)
    ));
    let (bad, _) = w.create("orga", "bad", "missing:1").await;
    assert_eq!(w.settle(&bad.id).await.status, InstanceStatus::Failed);
    assert!(matches!(
        stop_instance(&w.store, "orga", &bad.id).await,
        Err(FlowError::InvalidState {
            status: InstanceStatus::Failed,
            action: "stop"
        })
    ));
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn a_container_that_exits_makes_its_instance_exited_with_the_code() {
    let mut w = world().await;
    let listener = w.listen();
    let (inst, _) = w.create("orga", "job", "busybox").await;
    let container = w.settle(&inst.id).await.container.unwrap();
    w.sim.kill(&w.host, &container, 3, false).unwrap();
    let exited = w.until(&inst.id, InstanceStatus::Exited).await;
    assert_eq!(exited.exit_code, Some(3));
    assert!(!exited.oom_killed);
    w.quiesce().await;
    assert_eq!(
        w.get(&inst.id).await.status,
        InstanceStatus::Exited,
        "restart policy no: stays down"
    );

    let (hog, _) = w.create("orga", "hog", "busybox").await;
    let c = w.settle(&hog.id).await.container.unwrap();
    w.sim.kill(&w.host, &c, 137, true).unwrap();
    let killed = w.until(&hog.id, InstanceStatus::Exited).await;
    assert_eq!(killed.exit_code, Some(137));
    assert!(killed.oom_killed, "the OOM event was seen");
    listener.cancel();
    w.stop().await;
}

#[tokio::test]
async fn a_death_no_listener_saw_is_recorded_by_the_reconciler() {
    // No engine-event listener: Berth was down when the container died.
    let mut w = world().await;
    let (inst, _) = w.create("orga", "job", "busybox").await;
    let (other, _) = w.create("orga", "web", "busybox").await;
    let container = w.settle(&inst.id).await.container.unwrap();
    w.settle(&other.id).await;
    w.sim.kill(&w.host, &container, 2, false).unwrap();
    w.quiesce().await;
    assert_eq!(w.get(&inst.id).await.status, InstanceStatus::Running);

    let bus = w.bus();
    let report = reconciler().pass(&bus, &w.deps).await.unwrap();
    assert_eq!(report.exited, vec![inst.id.clone()]);
    let exited = w.until(&inst.id, InstanceStatus::Exited).await;
    assert_eq!(exited.exit_code, Some(2));
    assert_eq!(
        w.get(&other.id).await.status,
        InstanceStatus::Running,
        "a running container is left alone"
    );
    w.quiesce().await;
    let ops = w.sim.op_count();
    let again = reconciler().pass(&bus, &w.deps).await.unwrap();
    assert!(again.exited.is_empty(), "recorded once");
    assert_eq!(
        w.sim.op_count() - ops,
        1,
        "one listing; a container it shows running is not inspected"
    );
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn a_container_removed_outside_berth_is_recorded_and_made_again_on_start() {
    use berth_runtime::ContainerRuntime;
    let mut w = world().await;
    let (web, _) = w.create("orga", "web", "busybox").await;
    let (job, _) = create_instance(
        &w.store,
        "orga",
        InstanceName::parse("job").unwrap(),
        spec_with("busybox", RestartPolicy::Always),
    )
    .await
    .unwrap();
    for i in [&web, &job] {
        let running = w.settle(&i.id).await;
        // `docker rm -f` behind Berth's back, while no listener runs.
        w.sim
            .remove_container(&w.host, running.container.as_deref().unwrap())
            .await
            .unwrap();
    }
    w.quiesce().await;
    let bus = w.bus();
    let mut report = reconciler().pass(&bus, &w.deps).await.unwrap();
    report.exited.sort();
    let mut both = vec![web.id.clone(), job.id.clone()];
    both.sort();
    assert_eq!(report.exited, both);

    // Restart policy `no`: exited, saying why, with no exit code to show.
    let gone = w.until(&web.id, InstanceStatus::Exited).await;
    assert_eq!(gone.exit_code, None);
    let cond = gone
        .conditions
        .get(ConditionKind::ContainerStarted)
        .unwrap();
    assert!(!cond.status);
    assert_eq!(cond.reason, "ContainerGone");

    // A made-again container is as the flow made it: running, attached to
    // the org's network under the instance's name.
    let check_made_again = |i: &Instance| {
        let name = i.container.as_deref().unwrap();
        let c = w
            .sim
            .containers(&w.host)
            .into_iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("{name} was not made again"));
        assert_eq!(c.state, ContainerState::Running);
        let network = i.network.as_deref().unwrap();
        assert_eq!(
            c.networks.get(network),
            i.ip.as_ref(),
            "attached, IP recorded"
        );
        assert!(i.conditions.holds(ConditionKind::ContainerStarted));
        assert!(i.conditions.holds(ConditionKind::NetworkAttached));
    };
    // Restart policy `always`: made again at once.
    let job_again = w.until_restarted(&job.id, 1).await;
    check_made_again(&job_again);
    assert_eq!(
        w.sim
            .resolve(&w.host, job_again.container.as_deref().unwrap(), "job"),
        job_again.ip,
        "reachable by name again"
    );

    // And `web` when the user starts it.
    assert!(
        start_instance(&w.store, "orga", &web.id)
            .await
            .unwrap()
            .is_some()
    );
    let web_again = w.until(&web.id, InstanceStatus::Running).await;
    check_made_again(&web_again);
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn on_failure_restarts_up_to_its_limit() {
    let mut w = world().await;
    let listener = w.listen();
    let (inst, _) = create_instance(
        &w.store,
        "orga",
        InstanceName::parse("flaky").unwrap(),
        spec_with("busybox", RestartPolicy::OnFailure { max: Some(1) }),
    )
    .await
    .unwrap();
    let container = w.settle(&inst.id).await.container.unwrap();
    w.sim.kill(&w.host, &container, 1, false).unwrap();
    // Exited, then restarted after the back-off.
    w.until_restarted(&inst.id, 1).await;
    assert_eq!(w.container_state(&container), Some(ContainerState::Running));
    w.sim.kill(&w.host, &container, 1, false).unwrap();
    let down = w.until(&inst.id, InstanceStatus::Exited).await;
    w.quiesce().await;
    assert_eq!(
        w.get(&inst.id).await.status,
        InstanceStatus::Exited,
        "the limit of 1 is reached"
    );
    assert_eq!(down.restarts, 1);
    listener.cancel();
    w.stop().await;
}

fn reconciler_config() -> berth_flows::reconciler::ReconcilerConfig {
    berth_flows::reconciler::ReconcilerConfig {
        period: Duration::from_secs(3600),
        grace: Duration::ZERO,
        flow_deadline: Duration::ZERO,
        max_republish: 1,
        call_timeout: Duration::from_secs(5),
    }
}

fn reconciler() -> berth_flows::reconciler::Reconciler {
    berth_flows::reconciler::Reconciler::new(reconciler_config())
}

#[tokio::test]
async fn the_reconciler_removes_orphans_after_the_grace_period_and_nothing_else() {
    use berth_runtime::{BuildSpec, ContainerRuntime, ContainerSpec, NetworkSpec};
    let mut w = world().await;
    let (inst, _) = w.create("orga", "web", "busybox").await;
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.quiesce().await;
    // What a crashed flow could leave: resources of an instance and an org
    // that have no record.
    let mut labels = berth_runtime::Labels::new();
    labels.insert(label::MANAGED.into(), "true".into());
    labels.insert(label::ORG.into(), "ghostorg".into());
    labels.insert(label::INSTANCE.into(), "ghost".into());
    labels.insert(label::GENERATION.into(), "1".into());
    labels.insert(label::INSTALL.into(), w.deps.install.clone());
    let rt: &dyn ContainerRuntime = &*w.sim;
    // Another installation's network on the same engine: never touched.
    let mut foreign = labels.clone();
    foreign.insert(label::INSTALL.into(), "another-install".into());
    rt.create_network(
        &w.host,
        &NetworkSpec {
            name: "berth-theirs".into(),
            labels: foreign,
        },
    )
    .await
    .unwrap();
    rt.create_network(
        &w.host,
        &NetworkSpec {
            name: "berth-ghostorg".into(),
            labels: labels.clone(),
        },
    )
    .await
    .unwrap();
    rt.build_image(
        &w.host,
        &BuildSpec::dockerfile_only("berth/ghostorg/ghost:g1", "FROM busybox\n", labels.clone())
            .unwrap(),
    )
    .await
    .unwrap();
    rt.create_container(
        &w.host,
        &ContainerSpec {
            name: "berth-ghost".into(),
            image: "berth/ghostorg/ghost:g1".into(),
            labels,
            limits: Limits::default(),
            env: vec![],
            cmd: None,
        },
    )
    .await
    .unwrap();
    rt.start_container(&w.host, "berth-ghost").await.unwrap();
    // An image of a live org whose instance (named by the tag) is gone.
    let gone = format!("berth/{}/gone:g1", inst.org_id);
    rt.build_image(
        &w.host,
        &BuildSpec::dockerfile_only(
            gone.clone(),
            "FROM busybox\n",
            names::org_labels(&w.deps.install, &inst.org_id),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    // A build image of a live org that no instance is made from.
    let unused = names::build_image(&inst.org_id, "sha256:0123abcd");
    let mut build_labels = names::org_labels(&w.deps.install, &inst.org_id);
    build_labels.insert(label::BUILD.into(), "bunused".into());
    rt.build_image(
        &w.host,
        &BuildSpec::dockerfile_only(unused.clone(), "FROM busybox\n", build_labels).unwrap(),
    )
    .await
    .unwrap();

    let bus = w.bus();
    let mut r = reconciler();
    let first = r.pass(&bus, &w.deps).await.unwrap();
    assert!(first.removed.is_empty(), "seen once: not removed yet");
    let second = r.pass(&bus, &w.deps).await.unwrap();
    let mut removed: Vec<String> = second.removed.iter().map(|(_, _, n)| n.clone()).collect();
    removed.sort();
    let mut expected = vec![
        "berth-ghost".to_owned(),
        "berth-ghostorg".to_owned(),
        "berth/ghostorg/ghost:g1".to_owned(),
        gone,
        unused,
    ];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(
        w.sim
            .networks(&w.host)
            .iter()
            .any(|n| n.name == "berth-theirs"),
        "another installation's network stays"
    );
    rt.remove_network(&w.host, "berth-theirs").await.unwrap();
    assert_eq!(w.get(&inst.id).await.status, InstanceStatus::Running);
    assert!(
        w.sim.images(&w.host).is_empty(),
        "no image of Berth's is left: the live instance runs its base image"
    );
    assert_eq!(
        w.sim.containers(&w.host).len(),
        1,
        "the live instance's container stays"
    );
    w.check_invariants().await;
    w.stop().await;
}

const NO_FAILURE_EVENT: &str = r#"
[workers.default]
max_attempts = 3
timeout = "5s"
backoff = { initial = "1ms", max = "4ms" }
[workers."host.ensure"]
max_attempts = 1
on_exhausted = ""
"#;

#[tokio::test]
async fn a_stuck_flow_is_nudged_forward_by_the_reconciler() {
    let mut w = world_with(NO_FAILURE_EVENT).await;
    w.faulty.fail_next(Op::Ping, 1, FaultKind::Permanent);
    let (inst, _) = w.create("orga", "web", "busybox").await;
    w.quiesce().await;
    assert_eq!(
        w.get(&inst.id).await.status,
        InstanceStatus::Requested,
        "stuck: dead letter, no failure event"
    );
    let bus = w.bus();
    let mut r = reconciler();
    let report = r.pass(&bus, &w.deps).await.unwrap();
    assert_eq!(report.republished, vec![inst.id.clone()]);
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

/// Found by `berth-bench chaos` (seed 60 at 1000 actions): an engine call
/// of the reconciler that never answered stopped every later pass, and no
/// stuck flow was nudged again. A pass now bounds each call.
#[tokio::test]
async fn chaos_a_hung_engine_call_does_not_stop_the_reconcilers_passes() {
    let mut w = world_with(NO_FAILURE_EVENT).await;
    w.faulty.fail_next(Op::Ping, 1, FaultKind::Permanent);
    let (inst, _) = w.create("orga", "web", "busybox").await;
    w.quiesce().await;
    assert_eq!(w.get(&inst.id).await.status, InstanceStatus::Requested);
    // The sweep's listing hangs, for good.
    w.faulty.fail_next(Op::ListLabelled, 1, FaultKind::Hang);
    let bus = w.bus();
    let mut r =
        berth_flows::reconciler::Reconciler::new(berth_flows::reconciler::ReconcilerConfig {
            call_timeout: Duration::from_millis(100),
            ..reconciler_config()
        });
    let report = tokio::time::timeout(Duration::from_secs(20), r.pass(&bus, &w.deps))
        .await
        .expect("the pass ended though the engine hung")
        .unwrap();
    assert_eq!(report.republished, vec![inst.id.clone()]);
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

const JOIN_FAILS_QUIETLY: &str = r#"
[workers.default]
max_attempts = 3
timeout = "5s"
backoff = { initial = "1ms", max = "4ms" }
[workers."container.start"]
max_attempts = 1
on_exhausted = ""
"#;

#[tokio::test]
async fn a_flow_stuck_at_the_join_is_nudged_forward_whichever_branch_came_last() {
    let mut w = world_with(JOIN_FAILS_QUIETLY).await;
    w.faulty
        .fail_next(Op::CreateContainer, 1, FaultKind::Permanent);
    let (inst, _) = w.create("orga", "web", "busybox").await;
    w.quiesce().await;
    let stuck = w.get(&inst.id).await;
    assert!(
        stuck.status.is_creating(),
        "stuck at the join: {}",
        stuck.status
    );
    assert!(stuck.conditions.holds(ConditionKind::NetworkReady));
    assert!(stuck.conditions.holds(ConditionKind::ImageBuilt));
    let bus = w.bus();
    let report = reconciler().pass(&bus, &w.deps).await.unwrap();
    assert_eq!(report.republished, vec![inst.id.clone()]);
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn a_flow_that_stays_stuck_fails_with_flow_timeout() {
    let mut w = world_with(NO_FAILURE_EVENT).await;
    w.faulty.fail_next(Op::Ping, 10, FaultKind::Permanent);
    let (inst, _) = w.create("orga", "web", "busybox").await;
    w.quiesce().await;
    let bus = w.bus();
    let mut r = reconciler();
    assert_eq!(r.pass(&bus, &w.deps).await.unwrap().republished.len(), 1);
    w.quiesce().await;
    let report = r.pass(&bus, &w.deps).await.unwrap();
    assert_eq!(report.timed_out, vec![inst.id.clone()]);
    let failed = w.settle(&inst.id).await;
    assert_eq!(failed.status, InstanceStatus::Failed);
    let err = failed.error.unwrap();
    assert_eq!(err.code, "flow_timeout");
    assert_eq!(err.step, "reconciler");
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn a_name_is_unique_among_an_orgs_live_instances_on_both_paths() {
    let mut w = world().await;
    let bus = w.bus();
    let name = || InstanceName::parse("dup").unwrap();
    create_instance(&w.store, "orga", name(), spec("busybox"))
        .await
        .unwrap();
    let e = berth_flows::create_instance_on(&bus, "orga", name(), spec("busybox"), None)
        .await
        .unwrap_err();
    assert!(e.downcast_ref::<instances::NameTaken>().is_some(), "{e:#}");
    let e = create_instance(&w.store, "orga", name(), spec("busybox"))
        .await
        .unwrap_err();
    assert!(e.downcast_ref::<instances::NameTaken>().is_some(), "{e:#}");
    berth_flows::create_instance_on(&bus, "orgb", name(), spec("busybox"), None)
        .await
        .unwrap();
    w.quiesce().await;
    assert_eq!(
        w.all().await.len(),
        2,
        "nothing written by the refused creations"
    );
    w.check_invariants().await;
    w.stop().await;
}

/// What a receiver saw: (signature header, body) per request.
type Seen = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A webhook receiver on loopback answering `status`.
async fn receiver(status: u16) -> (String, Seen) {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let s = s.clone();
            async move {
                let sig = headers
                    .get(berth_flows::notify::SIGNATURE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                s.lock().unwrap().push((sig, body.to_vec()));
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), seen)
}

#[tokio::test]
async fn a_webhook_that_fails_forever_delays_no_flow_and_fails_no_instance() {
    let (good_url, good) = receiver(200).await;
    let (bad_url, bad) = receiver(500).await;
    // Configured as `berth serve` reads them: `[[webhooks]]`, a policy for
    // the one that fails.
    let hook = |name: &str, url: String| {
        format!("[[webhooks]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret = \"s3cret\"\n")
    };
    let config = format!(
        "{}{}{POLICIES}\n[workers.\"notify.down\"]\nmax_attempts = 3\nbackoff = {{ initial = \"1ms\", max = \"2ms\" }}\n",
        hook("up", good_url),
        hook("down", bad_url)
    );
    let mut w = world_with(&config).await;
    let mut ids = Vec::new();
    for name in ["a", "bb", "ccc"] {
        ids.push(w.create("orga", name, "busybox").await.0.id);
    }
    for id in &ids {
        assert_eq!(w.settle(id).await.status, InstanceStatus::Running);
    }
    w.quiesce().await;
    for id in &ids {
        assert_eq!(
            w.get(id).await.status,
            InstanceStatus::Running,
            "still running"
        );
    }
    let good = good.lock().unwrap().clone();
    assert_eq!(good.len(), 3, "one notification per running instance");
    for (sig, body) in &good {
        assert_eq!(
            sig,
            &berth_flows::notify::sign("s3cret", body),
            "signed body"
        );
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["type"], "instance.running");
        assert_eq!(v["org_id"], "orga");
        assert!(ids.iter().any(|id| v["instance_id"] == id.as_str()));
    }
    assert_eq!(
        bad.lock().unwrap().len(),
        9,
        "three attempts for each of three events"
    );
    let dead = w.store.dead_letters(None, true, 50).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        dead.iter()
            .all(|d| d.worker == "notify.down" && d.error.code == "webhook_failed")
    );
    w.check_invariants().await;
    w.stop().await;
}

#[tokio::test]
async fn pool_hosts_are_dedicated_per_org_and_released_with_its_last_instance() {
    // A pool of two hosts, configured as `berth serve` reads it.
    let mut w = world_with(&format!(
        "[hosts]\nprovider = \"pool\"\npool = [\"h1\", \"h2\"]\n{POLICIES}"
    ))
    .await;
    let store = w.store.clone();
    let bus = w.bus();
    let settle = |id: String| {
        let w = &w;
        async move { w.settle(&id).await }
    };
    let create = |org: &'static str, name: &'static str| {
        let bus = bus.clone();
        async move {
            berth_flows::create_instance_on(
                &bus,
                org,
                InstanceName::parse(name).unwrap(),
                spec("busybox"),
                None,
            )
            .await
            .unwrap()
            .0
        }
    };
    let a1 = settle(create("orga", "one").await.id).await;
    let a2 = settle(create("orga", "two").await.id).await;
    let b1 = settle(create("orgb", "one").await.id).await;
    for i in [&a1, &a2, &b1] {
        assert_eq!(i.status, InstanceStatus::Running, "{:?}", i.error);
    }
    assert_eq!(a1.host, a2.host, "an org stays on its host");
    assert_ne!(a1.host, b1.host, "each org has a host of its own");
    // The pool is full: a third org cannot be placed.
    let c1 = settle(create("orgc", "one").await.id).await;
    assert_eq!(c1.status, InstanceStatus::Failed);
    assert_eq!(c1.error.unwrap().code, "no_host_available");
    // Org B's last instance goes: its host is released and org C gets it.
    delete_instance(&store, "orgb", &b1.id).await.unwrap();
    assert_eq!(settle(b1.id.clone()).await.status, InstanceStatus::Deleted);
    let c2 = settle(create("orgc", "two").await.id).await;
    assert_eq!(c2.status, InstanceStatus::Running, "{:?}", c2.error);
    assert_eq!(c2.host, b1.host, "the released host was claimed again");
    let claims = store.host_claims().await.unwrap();
    assert_eq!(claims.len(), 2);
    assert!(claims.values().all(|orgs| orgs.len() == 1), "{claims:?}");
    w.stop().await;
}

/// Regression (tenancy issue): a container that dies while its creation
/// flow is still starting it used to be reported `running` (the die found
/// an instance that was not running yet and was dropped) until the
/// reconciler's next pass. It must end `exited` with its exit code.
#[tokio::test]
async fn a_container_that_dies_during_its_creation_ends_exited_not_running() {
    use berth_runtime::{ContainerRuntime, EngineEventKind};
    use futures::StreamExt;
    let mut w = world().await;
    let listening = w.listen();
    // The attach fails once, so the death lands while the flow is starting.
    w.faulty
        .fail_next(Op::ConnectNetwork, 1, FaultKind::Transient);
    let sim = w.sim.clone();
    let host = w.host.clone();
    let mut events = sim.events(&host, label::INSTANCE, None);
    let killer = tokio::spawn(async move {
        while let Some(Ok(e)) = events.next().await {
            if e.kind == EngineEventKind::Start {
                sim.kill(&host, &e.container, 7, false).unwrap();
                return;
            }
        }
    });
    let (inst, _) = w.create("orga", "quick", "busybox").await;
    let done = w
        .until_is(&inst.id, "exited", |i| i.status == InstanceStatus::Exited)
        .await;
    assert_eq!(done.exit_code, Some(7));
    killer.await.unwrap();
    w.quiesce().await;
    let after = w.get(&inst.id).await;
    assert_eq!(after.status, InstanceStatus::Exited, "and it stays so");
    listening.cancel();
    w.check_invariants().await;
    w.stop().await;
}

/// Issue 10, found by the crash test (`crash_docker`, seed 1): an attempt
/// of `container.start` killed mid-create leaves Docker finishing that
/// create — the name is taken, so the next attempt's create conflicts, yet
/// starting that name is a 404 until the engine is done. That used to be a
/// fatal `not_found` and a failed instance; it is retried, and the next
/// attempt finds the container made.
#[tokio::test]
async fn issue_10_a_start_that_finds_its_earlier_create_not_yet_made_is_retried() {
    let mut w = world().await;
    // The first create takes effect but its answer is lost (the attempt
    // killed); the second conflicts with it; the start then finds nothing
    // of that name, once.
    w.faulty
        .fail_next(Op::CreateContainer, 1, FaultKind::LostReply);
    w.faulty
        .fail_next(Op::StartContainer, 1, FaultKind::NotFound);
    let (inst, root) = w.create("orga", "web", "busybox").await;
    let done = w.settle(&inst.id).await;
    assert_eq!(done.status, InstanceStatus::Running, "{:?}", done.error);
    w.quiesce().await;
    let attempts = w.store.attempts_of_flow(root.flow_id).await.unwrap();
    assert!(
        attempts.iter().any(|a| a.worker == "container.start"
            && a.error
                .as_ref()
                .is_some_and(|e| e.code == "container_not_ready")),
        "the missing container was a retry: {attempts:?}"
    );
    assert_eq!(w.sim.containers(&w.host).len(), 1);
    w.check_invariants().await;
    w.stop().await;
}

/// Regression (found by `berth-bench chaos`): a stop that failed for good
/// left the instance `stopping` for ever: the flow's last event was the
/// failure event, and the reconciler's nudge re-published that, which no
/// worker acts on. The nudge now re-runs the stop.
#[tokio::test]
async fn chaos_a_stop_that_failed_for_good_is_re_run_by_the_reconciler() {
    let mut w = world().await;
    let (inst, _) = w.create("orga", "web", "busybox").await;
    assert_eq!(w.settle(&inst.id).await.status, InstanceStatus::Running);
    w.faulty
        .fail_next(Op::StopContainer, 1, FaultKind::Permanent);
    stop_instance(&w.store, "orga", &inst.id)
        .await
        .unwrap()
        .unwrap();
    w.quiesce().await;
    assert_eq!(
        w.get(&inst.id).await.status,
        InstanceStatus::Stopping,
        "the stop is dead-lettered and nothing follows it"
    );
    let bus = w.bus();
    let report = reconciler().pass(&bus, &w.deps).await.unwrap();
    assert_eq!(report.republished, vec![inst.id.clone()]);
    let done = w
        .until_is(&inst.id, "stopped", |i| i.status == InstanceStatus::Stopped)
        .await;
    assert!(matches!(
        w.container_state(done.container.as_deref().unwrap()),
        Some(ContainerState::Exited { .. })
    ));
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}

/// Regression (found by `berth-bench chaos`, seed 8 of 300 actions at fault
/// rate 0.3): a stop of an instance whose container had been removed
/// outside Berth failed `not_found` on every attempt, and every nudge of
/// the reconciler failed the same way: the instance stayed `stopping` for
/// good. Nothing runs, which is what a stop asks for: it ends `stopped`, and
/// a start makes the container again.
#[tokio::test]
async fn chaos_a_stop_whose_container_was_removed_outside_berth_ends_stopped() {
    use berth_runtime::ContainerRuntime;
    let mut w = world().await;
    let (inst, _) = w.create("orga", "web", "busybox").await;
    let running = w.settle(&inst.id).await;
    assert_eq!(running.status, InstanceStatus::Running);
    let container = running.container.clone().unwrap();
    w.sim.remove_container(&w.host, &container).await.unwrap();
    // Stop before the listener's news of the removal is handled.
    stop_instance(&w.store, "orga", &inst.id)
        .await
        .unwrap()
        .unwrap();
    let done = w
        .until_is(&inst.id, "stopped", |i| {
            matches!(i.status, InstanceStatus::Stopped | InstanceStatus::Exited)
        })
        .await;
    assert_ne!(done.status, InstanceStatus::Stopping);
    w.quiesce().await;
    assert_eq!(
        w.store.dead_letters(None, true, 10).await.unwrap().len(),
        0,
        "the stop succeeded"
    );
    start_instance(&w.store, "orga", &inst.id)
        .await
        .unwrap()
        .unwrap();
    let again = w
        .until_is(&inst.id, "running", |i| i.status == InstanceStatus::Running)
        .await;
    assert!(matches!(
        w.container_state(again.container.as_deref().unwrap()),
        Some(ContainerState::Running)
    ));
    w.quiesce().await;
    w.check_invariants().await;
    w.stop().await;
}
