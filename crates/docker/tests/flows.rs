//! The instance lifecycle through the real workers on the Docker engine of
//! this machine (issue 4's acceptance, short of the HTTP API): two orgs'
//! instances run and reach their own org's instances by name but never the
//! other org's; deleting them leaves nothing labelled behind; a missing base
//! image fails the instance with `image_not_found` and leaves nothing; and
//! injected transient
//! failures and lost replies around the Docker runtime are retried to the
//! same end state.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::domain::InstanceStatus;
use berth_docker::DockerRuntime;
use berth_flows::delete_instance;
use berth_runtime::faulty::{FaultKind, FaultyRuntime, Op};
use berth_runtime::{ContainerRuntime, ResourceKind, label};
use berth_store::instances::{Instance, InstanceSpec};
use berth_testkit::{Kit, TestWorld, wait_for_within};
use common::{BASE, Sweep, local, reaches, unique};

/// Generous for a 2-core machine building images; reached only on failure.
const DEADLINE: Duration = Duration::from_secs(90);
const PORT: u16 = 8080;

/// Quick retries; room for a transient failure and a lost reply per step;
/// the containers' default limits small, as a test machine wants them.
const CONFIG: &str = r#"
[workers.default]
max_attempts = 5
timeout = "60s"
backoff = { initial = "10ms", max = "200ms" }

[limits]
memory = "64MiB"
cpus = 0.5
pids = 64
"#;

/// A kit world on `runtime` (the engine, maybe behind the fault wrapper),
/// and the engine itself to look at.
struct World {
    kit: TestWorld,
    docker: Arc<DockerRuntime>,
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

async fn world(runtime: Arc<dyn ContainerRuntime>, docker: Arc<DockerRuntime>) -> World {
    World {
        kit: Kit::new(CONFIG).runtime(runtime).start().await,
        docker,
    }
}

/// An instance that serves TCP on [`PORT`] (busybox httpd in the foreground).
fn spec(image: &str) -> InstanceSpec {
    InstanceSpec {
        image: image.into(),
        env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
        cmd: Some(vec![
            "httpd".into(),
            "-f".into(),
            "-p".into(),
            PORT.to_string(),
        ]),
        ports: vec![],
        restart: Default::default(),
        build: None,
        limits: None,
    }
}

impl World {
    async fn create(&self, org: &str, name: &str, image: &str) -> Instance {
        self.kit.create(org, name, spec(image)).await.0
    }

    /// Waits until the instance's status is terminal; a stuck one fails
    /// with its status and its flow's attempts.
    async fn settle(&self, id: &str) -> Instance {
        until_instance(self, id, "a terminal status", |i| i.status.is_terminal()).await
    }

    async fn running(&self, id: &str) -> Instance {
        let i = self.settle(id).await;
        assert_eq!(
            i.status,
            InstanceStatus::Running,
            "{}: {:?}",
            i.name,
            i.error
        );
        i
    }

    /// Deletes every instance given and waits for each to be `deleted`.
    async fn delete_all(&self, all: &[&Instance]) {
        for i in all {
            assert!(
                delete_instance(&self.store, &i.org_id, &i.id)
                    .await
                    .unwrap()
                    .is_some()
            );
        }
        for i in all {
            let done = self.settle(&i.id).await;
            assert_eq!(done.status, InstanceStatus::Deleted, "{}", i.name);
        }
        self.quiesce().await;
    }

    /// Everything on the engine labelled as belonging to `org`.
    async fn leftovers(&self, org: &str) -> Vec<(ResourceKind, String)> {
        self.docker
            .list_labelled(&local(), label::MANAGED)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.labels.get(label::ORG).map(String::as_str) == Some(org))
            .map(|r| (r.kind, r.name))
            .collect()
    }
}

#[tokio::test]
async fn two_orgs_reach_their_own_instances_by_name_never_the_others_and_delete_cleanly() {
    let Some(docker) = common::engine().await else {
        return;
    };
    let started = Instant::now();
    let (a, b) = (unique("a"), unique("b"));
    let _sweep = Sweep::new(label::ORG, &[&a, &b]);
    let mut w = world(docker.clone(), docker.clone()).await;

    let created = [
        w.create(&a, "api", BASE).await,
        w.create(&a, "db", BASE).await,
        w.create(&b, "cache", BASE).await,
        w.create(&b, "queue", BASE).await,
    ];
    let mut run = Vec::new();
    for i in &created {
        run.push(w.running(&i.id).await);
    }
    eprintln!("4 instances running after {:?}", started.elapsed());
    let [a_api, a_db, b_cache, b_queue] = [&run[0], &run[1], &run[2], &run[3]];
    for i in &run {
        assert!(i.ip.as_deref().is_some_and(|ip| !ip.is_empty()), "{i:?}");
    }
    let host = local();
    let engine = docker.client(&host).unwrap();

    // The containers as the workers made them: labelled, limited, and on
    // their org's network only.
    let api = docker
        .find_container(&host, a_api.container.as_deref().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(api.labels.get(label::ORG), Some(&a));
    assert_eq!(api.labels.get(label::INSTANCE), Some(&a_api.id));
    assert_eq!(
        api.labels.get(label::INSTALL).map(String::as_str),
        Some(w.store.install_id()),
        "labelled with the installation that made it"
    );
    assert_eq!(
        api.networks,
        BTreeMap::from([(format!("berth-{a}"), a_api.ip.clone().unwrap())])
    );

    let from = a_api.container.as_deref().unwrap();
    assert!(
        reaches(engine, from, "db", PORT).await,
        "org A's api reaches org A's db by name"
    );
    assert!(reaches(engine, from, a_db.ip.as_deref().unwrap(), PORT).await);
    let b_side = b_cache.container.as_deref().unwrap();
    assert!(
        reaches(engine, b_side, "queue", PORT).await,
        "org B's instances reach each other too"
    );
    // Every way of naming org B's instances fails from org A, at once (each
    // blocked address costs nc's 2 s timeout).
    let targets: Vec<String> = [b_cache, b_queue]
        .iter()
        .flat_map(|i| {
            [
                i.name.to_string(),
                i.container.clone().unwrap(),
                i.ip.clone().unwrap(),
            ]
        })
        .collect();
    let probes = futures::future::join_all(
        targets
            .iter()
            .map(|t| async move { (t.clone(), reaches(engine, from, t, PORT).await) }),
    )
    .await;
    for (target, reached) in probes {
        assert!(!reached, "org A reached org B's {target}");
    }
    eprintln!("reachability checked after {:?}", started.elapsed());

    // Deleting every instance leaves nothing of either org on the engine.
    w.delete_all(&[a_api, a_db, b_cache, b_queue]).await;
    for org in [&a, &b] {
        assert_eq!(w.leftovers(org).await, vec![], "org {org}");
    }
    eprintln!("deleted after {:?}", started.elapsed());
    w.stop().await;
}

/// An instance of a missing base image, settled: it must have failed at
/// `image.build` with `image_not_found`, at once. Returns what its org has
/// left on the engine once the bus is idle.
async fn missing_base_leftovers(
    docker: Arc<DockerRuntime>,
    org: &str,
) -> Vec<(ResourceKind, String)> {
    let mut w = world(docker.clone(), docker).await;
    let base = format!("berth-no-such-base-{org}:1");
    let inst = w.create(org, "web", &base).await;
    let done = w.settle(&inst.id).await;
    assert_eq!(done.status, InstanceStatus::Failed);
    let err = done.error.unwrap();
    assert_eq!(err.code, "image_not_found", "{err:?}");
    assert_eq!(err.step, "image.build");
    assert_eq!(err.attempts, 1, "not retried");
    assert!(err.message.contains(&base), "{}", err.message);
    w.quiesce().await;
    let left = w.leftovers(org).await;
    w.stop().await;
    left
}

/// Regression: on a real engine the build fails (one inspect, ~10 ms)
/// before `network.ensure` has made the org network, so the compensation's
/// clean-up finds none; `network.ensure` must undo the network it then makes.
#[tokio::test]
async fn a_missing_base_image_fails_the_instance_and_leaves_nothing() {
    let Some(docker) = common::engine().await else {
        return;
    };
    let org = unique("c");
    let _sweep = Sweep::new(label::ORG, &[&org]);
    assert_eq!(missing_base_leftovers(docker, &org).await, vec![]);
}

#[tokio::test]
async fn flows_complete_through_engine_failures_and_lost_replies() {
    let Some(docker) = common::engine().await else {
        return;
    };
    let org = unique("d");
    let _sweep = Sweep::new(label::ORG, &[&org]);
    let faulty = Arc::new(FaultyRuntime::new(docker.clone(), 11));
    // Each step's engine call fails once as if the engine were down; the
    // creating calls then also lose their reply after taking effect, as
    // when the engine restarts mid-call: the retry must find, not re-make.
    let plan = [
        (Op::Ping, vec![FaultKind::Transient]),
        (Op::FindNetwork, vec![FaultKind::Transient]),
        (Op::CreateNetwork, vec![FaultKind::LostReply]),
        (
            Op::FindImage,
            vec![FaultKind::Transient, FaultKind::LostReply],
        ),
        (
            Op::CreateContainer,
            vec![FaultKind::Timeout, FaultKind::LostReply],
        ),
        (Op::StartContainer, vec![FaultKind::Transient]),
        (
            Op::ConnectNetwork,
            vec![FaultKind::Transient, FaultKind::LostReply],
        ),
        (Op::RemoveContainer, vec![FaultKind::Transient]),
        (Op::RemoveNetwork, vec![FaultKind::LostReply]),
    ];
    let mut planned = 0;
    for (op, kinds) in &plan {
        for kind in kinds {
            faulty.fail_next(*op, 1, *kind);
            planned += 1;
        }
    }
    let mut w = world(faulty.clone(), docker.clone()).await;
    let inst = w.create(&org, "web", BASE).await;
    let running = w.running(&inst.id).await;
    let container = running.container.clone().unwrap();
    let found = docker
        .find_container(&local(), &container)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        found.networks.get(&format!("berth-{org}")),
        running.ip.as_ref(),
        "the IP recorded is the container's"
    );
    let attempts = w.store.attempts_of_flow(running.flow_id).await.unwrap();
    let retried = attempts
        .iter()
        .filter(|a| a.outcome == berth_store::Outcome::Retry)
        .count();
    assert!(retried >= 9, "{retried} retried attempts");

    w.delete_all(&[&running]).await;
    for (op, _) in &plan {
        assert_eq!(faulty.pending(*op), 0, "{op:?}'s faults were all used");
    }
    assert_eq!(faulty.injected(), planned);
    assert_eq!(w.leftovers(&org).await, vec![]);
    w.stop().await;
}

/// Waits (re-checking on each commit) until `check` holds for the
/// instance, or fails naming `what` with its status and its flow's
/// attempts.
async fn until_instance(
    w: &World,
    id: &str,
    what: &str,
    check: impl Fn(&Instance) -> bool,
) -> Instance {
    let found = wait_for_within(&w.store, DEADLINE, || async {
        let i = w.get(id).await;
        check(&i).then_some(i)
    })
    .await;
    if let Ok(i) = found {
        return i;
    }
    let i = w.get(id).await;
    let attempts = w.store.attempts_of_flow(i.flow_id).await.unwrap();
    let tried: Vec<String> = attempts
        .iter()
        .map(|a| format!("{} #{} {:?} {:?}", a.worker, a.attempt, a.outcome, a.error))
        .collect();
    panic!(
        "{what}: instance {} is {} (exit {:?}, restarts {}, error {:?}); attempts:\n{}",
        i.name,
        i.status,
        i.exit_code,
        i.restarts,
        i.error,
        tried.join("\n")
    );
}

#[tokio::test]
async fn a_container_killed_from_outside_is_exited_and_on_failure_restarts_it() {
    let Some(docker) = common::engine().await else {
        return;
    };
    let org = unique("k");
    let _sweep = Sweep::new(label::ORG, &[&org]);
    let mut w = world(docker.clone(), docker).await;
    let listening = w.listen();
    let plain = w.create(&org, "plain", common::BASE).await;
    let mut restarting_spec = spec(common::BASE);
    restarting_spec.restart = berth_core::domain::RestartPolicy::OnFailure { max: Some(1) };
    let restarting = w.kit.create(&org, "restarting", restarting_spec).await.0;
    let plain = w.settle(&plain.id).await;
    let restarting = w.settle(&restarting.id).await;
    assert_eq!(plain.status, InstanceStatus::Running, "{:?}", plain.error);
    assert_eq!(
        restarting.status,
        InstanceStatus::Running,
        "{:?}",
        restarting.error
    );

    for i in [&plain, &restarting] {
        let out = std::process::Command::new("docker")
            .args(["kill", i.container.as_deref().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "docker kill: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let exited = until_instance(&w, &plain.id, "plain exits", |i| {
        i.status == InstanceStatus::Exited
    })
    .await;
    assert_eq!(exited.exit_code, Some(137), "SIGKILL");
    let back = until_instance(&w, &restarting.id, "restarting comes back", |i| {
        i.status == InstanceStatus::Running && i.restarts == 1
    })
    .await;
    assert_eq!(
        back.container, restarting.container,
        "the same container, restarted"
    );
    let (code, _) = common::exec(
        w.docker.client(&common::local()).unwrap(),
        back.container.as_deref().unwrap(),
        &["true"],
    )
    .await;
    assert_eq!(code, 0, "the restarted container runs");
    listening.cancel();
    w.quiesce().await;
    w.stop().await;
}
