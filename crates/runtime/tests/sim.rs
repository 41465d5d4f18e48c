//! The simulated runtime keeps the promises of the `ContainerRuntime` trait
//! that Berth's workers rely on: conflicts, idempotent removals, error codes,
//! stable addresses, engine events with history, output, and latency.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use berth_core::{Clock, Timestamp};
use berth_runtime::sim::{SimConfig, SimLatency, SimRuntime};
use berth_runtime::{
    BuildSpec, ContainerRuntime, ContainerSpec, ContainerState, EngineEvent, EngineEventKind,
    HostId, Labels, Limits, NetworkSpec, ResourceKind, RuntimeError, label,
};
use futures::StreamExt;
use futures::stream::BoxStream;

const BASE: &str = "alpine:3";
/// Bound on waits in tests that run on real time, so a bug fails instead of
/// hanging.
const WAIT: Duration = Duration::from_secs(5);

/// A clock the test sets by hand, to place events at known times.
struct ManualClock(AtomicI64);

impl ManualClock {
    fn set(&self, us: i64) {
        self.0.store(us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.0.load(Ordering::SeqCst))
    }
}

fn h1() -> HostId {
    HostId::new("h1")
}

fn h2() -> HostId {
    HostId::new("h2")
}

fn managed(extra: &[(&str, &str)]) -> Labels {
    let mut l = Labels::new();
    l.insert(label::MANAGED.to_owned(), "true".to_owned());
    for (k, v) in extra {
        l.insert((*k).to_owned(), (*v).to_owned());
    }
    l
}

fn sim() -> SimRuntime {
    sim_with(SimConfig::new(vec![h1(), h2()]))
}

fn sim_with(config: SimConfig) -> SimRuntime {
    let hosts = config.hosts.clone();
    let sim = SimRuntime::new(config);
    for h in &hosts {
        sim.add_base_image(h, BASE);
    }
    sim
}

fn net(name: &str) -> NetworkSpec {
    NetworkSpec {
        name: name.to_owned(),
        labels: managed(&[]),
    }
}

fn image(tag: &str, base: &str) -> BuildSpec {
    BuildSpec::dockerfile_only(
        tag,
        &format!("FROM {base}\nCMD [\"serve\"]\n"),
        managed(&[]),
    )
    .unwrap()
}

fn container(name: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        labels: managed(&[(label::ORG, "org-a")]),
        limits: Limits::default(),
        env: vec![("PORT".to_owned(), "80".to_owned())],
        cmd: None,
    }
}

/// Builds `img` and creates container `name` from it on `host`.
async fn created(sim: &SimRuntime, host: &HostId, name: &str) {
    let img = format!("img-{name}");
    sim.build_image(host, &image(&img, BASE)).await.unwrap();
    sim.create_container(host, &container(name, &img))
        .await
        .unwrap();
}

async fn next_event(
    s: &mut BoxStream<'static, Result<EngineEvent, RuntimeError>>,
) -> Option<Result<EngineEvent, RuntimeError>> {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("event stream stalled")
}

async fn next_line(
    s: &mut BoxStream<'static, Result<String, RuntimeError>>,
) -> Option<Result<String, RuntimeError>> {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("log stream stalled")
}

#[tokio::test]
async fn create_conflicts_on_a_taken_name_and_removal_is_idempotent() {
    let sim = sim();
    let h = h1();
    let n = sim.create_network(&h, &net("n1")).await.unwrap();
    assert_eq!(n.name, "n1");
    let err = sim.create_network(&h, &net("n1")).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Conflict { ref what, .. } if what == "network"));
    assert_eq!(err.code(), "conflict");
    assert!(!err.is_retryable());
    assert_eq!(sim.find_network(&h, "n1").await.unwrap(), Some(n));

    created(&sim, &h, "c1").await;
    let err = sim
        .create_container(&h, &container("c1", "img-c1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict");

    // Removing twice, or something never created, is fine: compensations repeat.
    for _ in 0..2 {
        sim.remove_container(&h, "c1").await.unwrap();
        sim.remove_image(&h, "img-c1").await.unwrap();
        sim.remove_network(&h, "n1").await.unwrap();
    }
    assert!(sim.find_container(&h, "c1").await.unwrap().is_none());
    assert!(sim.find_image(&h, "img-c1").await.unwrap().is_none());
    assert!(sim.find_network(&h, "n1").await.unwrap().is_none());
    assert!(sim.containers(&h).is_empty() && sim.images(&h).is_empty());
    assert!(sim.networks(&h).is_empty());
}

#[tokio::test]
async fn hosts_are_separate() {
    let sim = sim();
    sim.create_network(&h1(), &net("n")).await.unwrap();
    sim.create_network(&h2(), &net("n")).await.unwrap();
    assert_eq!(sim.networks(&h1()).len(), 1);
    assert_eq!(sim.networks(&h2()).len(), 1);
}

#[tokio::test]
async fn a_missing_base_image_is_image_not_found_naming_the_base() {
    let sim = sim();
    let err = sim
        .build_image(&h1(), &image("app:g1", "debian:12"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "image_not_found");
    assert!(!err.is_retryable());
    assert!(matches!(err, RuntimeError::NotFound { ref name, .. } if name == "debian:12"));

    sim.add_base_image(&h1(), "debian:12");
    let out = sim
        .build_image(&h1(), &image("app:g1", "debian:12"))
        .await
        .unwrap();
    assert_eq!(out.image.tag, "app:g1");
    assert!(out.log_tail.iter().any(|l| l.contains("app:g1")));
    assert_eq!(
        sim.find_image(&h1(), "app:g1").await.unwrap(),
        Some(out.image)
    );

    // Bases are per host.
    let err = sim
        .build_image(&h2(), &image("app:g1", "debian:12"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "image_not_found");
}

#[tokio::test]
async fn creating_a_container_needs_its_image() {
    let sim = sim();
    let err = sim
        .create_container(&h1(), &container("c1", "nope:1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "image_not_found");
    assert!(matches!(err, RuntimeError::NotFound { ref name, .. } if name == "nope:1"));
}

#[tokio::test]
async fn containers_inherit_image_labels_and_keep_their_limits() {
    let sim = sim();
    let mut spec = image("img", BASE);
    spec.labels
        .insert("from-image".to_owned(), "yes".to_owned());
    spec.labels
        .insert(label::ORG.to_owned(), "image-org".to_owned());
    sim.build_image(&h1(), &spec).await.unwrap();
    let mut c = container("c1", "img");
    c.limits.memory_bytes = Some(64 << 20);
    let info = sim.create_container(&h1(), &c).await.unwrap();
    assert_eq!(info.state, ContainerState::Created);
    assert_eq!(info.labels["from-image"], "yes");
    assert_eq!(info.labels[label::ORG], "org-a", "the container's own win");
    assert_eq!(
        sim.limits(&h1(), "c1").unwrap().memory_bytes,
        Some(64 << 20)
    );
}

#[tokio::test]
async fn unknown_or_down_hosts_are_unavailable_and_retryable() {
    let sim = sim();
    let nowhere = HostId::new("nowhere");
    let err = sim.ping(&nowhere).await.unwrap_err();
    assert!(matches!(err, RuntimeError::Unavailable { .. }));
    assert!(err.is_retryable());
    let err = sim.create_network(&nowhere, &net("n")).await.unwrap_err();
    assert_eq!(err.code(), "engine_unavailable");
    let first = sim.events(&nowhere, label::MANAGED, None).next().await;
    assert!(matches!(first, Some(Err(RuntimeError::Unavailable { .. }))));

    sim.create_network(&h1(), &net("n")).await.unwrap();
    sim.set_available(&h1(), false);
    assert_eq!(
        sim.ping(&h1()).await.unwrap_err().code(),
        "engine_unavailable"
    );
    sim.set_available(&h1(), true);
    sim.ping(&h1()).await.unwrap();
    assert!(
        sim.find_network(&h1(), "n").await.unwrap().is_some(),
        "state survives an outage"
    );
}

#[tokio::test]
async fn starting_or_stopping_a_missing_container_is_not_found() {
    let sim = sim();
    let err = sim.start_container(&h1(), "ghost").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { ref what, .. } if what == "container"));
    assert_eq!(err.code(), "not_found");
    let err = sim
        .stop_container(&h1(), "ghost", Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
}

#[tokio::test]
async fn start_and_stop_are_idempotent() {
    let sim = sim();
    let h = h1();
    created(&sim, &h, "c1").await;
    // Stopping a container that never ran is fine and says nothing.
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap();
    sim.start_container(&h, "c1").await.unwrap();
    sim.start_container(&h, "c1").await.unwrap();
    let state = |sim: &SimRuntime| sim.containers(&h)[0].state;
    assert_eq!(state(&sim), ContainerState::Running);
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap();
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap();
    assert_eq!(
        state(&sim),
        ContainerState::Exited {
            exit_code: 137,
            oom_killed: false
        }
    );
    let kinds: Vec<_> = sim.event_history(&h).into_iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        vec![
            EngineEventKind::Start,
            EngineEventKind::Die { exit_code: 137 }
        ],
        "one start and one die, whatever the repetitions"
    );
    // An exited container starts again.
    sim.start_container(&h, "c1").await.unwrap();
    assert_eq!(state(&sim), ContainerState::Running);
}

#[tokio::test]
async fn addresses_are_stable_on_reattach_and_distinct_per_container() {
    let sim = sim();
    let h = h1();
    sim.create_network(&h, &net("n1")).await.unwrap();
    created(&sim, &h, "a").await;
    created(&sim, &h, "b").await;
    let ip_a = sim.connect_network(&h, "n1", "a", "web").await.unwrap();
    let ip_b = sim.connect_network(&h, "n1", "b", "db").await.unwrap();
    assert_ne!(ip_a, ip_b);
    assert!(ip_a.parse::<std::net::Ipv4Addr>().is_ok(), "{ip_a}");
    assert_eq!(
        sim.connect_network(&h, "n1", "a", "web").await.unwrap(),
        ip_a
    );
    let a = sim.find_container(&h, "a").await.unwrap().unwrap();
    assert_eq!(a.networks.get("n1"), Some(&ip_a));

    // The same calls on a fresh runtime give the same addresses.
    let again = self::sim();
    again.create_network(&h, &net("n1")).await.unwrap();
    created(&again, &h, "a").await;
    assert_eq!(
        again.connect_network(&h, "n1", "a", "web").await.unwrap(),
        ip_a
    );

    // Missing sides are named.
    let err = sim.connect_network(&h, "nope", "a", "x").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { ref what, .. } if what == "network"));
    let err = sim
        .connect_network(&h, "n1", "nope", "x")
        .await
        .unwrap_err();
    assert!(matches!(err, RuntimeError::NotFound { ref what, .. } if what == "container"));

    // Disconnecting is idempotent, also when either side is gone.
    sim.disconnect_network(&h, "n1", "a").await.unwrap();
    sim.disconnect_network(&h, "n1", "a").await.unwrap();
    sim.disconnect_network(&h, "gone", "a").await.unwrap();
    sim.disconnect_network(&h, "n1", "gone").await.unwrap();
    let a = sim.find_container(&h, "a").await.unwrap().unwrap();
    assert!(a.networks.is_empty());
}

#[tokio::test]
async fn names_resolve_only_across_a_shared_network() {
    let sim = sim();
    let h = h1();
    sim.create_network(&h, &net("org-a")).await.unwrap();
    sim.create_network(&h, &net("org-b")).await.unwrap();
    for c in ["a1", "a2", "b1"] {
        created(&sim, &h, c).await;
    }
    let ip_a2 = sim.connect_network(&h, "org-a", "a2", "db").await.unwrap();
    sim.connect_network(&h, "org-a", "a1", "web").await.unwrap();
    sim.connect_network(&h, "org-b", "b1", "web").await.unwrap();
    assert_eq!(sim.resolve(&h, "a1", "db"), Some(ip_a2.clone()));
    assert_eq!(
        sim.resolve(&h, "a1", "a2"),
        Some(ip_a2),
        "container names too"
    );
    assert_eq!(sim.resolve(&h, "b1", "db"), None);
    assert_eq!(sim.resolve(&h, "b1", "a2"), None);
}

#[tokio::test]
async fn a_network_with_attached_containers_cannot_be_removed() {
    let sim = sim();
    let h = h1();
    sim.create_network(&h, &net("n1")).await.unwrap();
    created(&sim, &h, "a").await;
    created(&sim, &h, "b").await;
    sim.connect_network(&h, "n1", "a", "a").await.unwrap();
    sim.connect_network(&h, "n1", "b", "b").await.unwrap();

    let err = sim.remove_network(&h, "n1").await.unwrap_err();
    assert!(matches!(err, RuntimeError::InUse { .. }), "{err:?}");
    assert_eq!(err.code(), "in_use");
    assert_eq!(err.to_string(), "network 'n1' is still in use on host h1");
    assert!(!err.is_retryable());

    sim.disconnect_network(&h, "n1", "a").await.unwrap();
    assert!(
        sim.remove_network(&h, "n1").await.is_err(),
        "b is still there"
    );
    // Removing a container detaches it.
    sim.start_container(&h, "b").await.unwrap();
    sim.remove_container(&h, "b").await.unwrap();
    sim.remove_network(&h, "n1").await.unwrap();
    assert!(sim.networks(&h).is_empty());
}

#[tokio::test]
async fn events_replay_history_from_since_then_follow_live() {
    let clock = Arc::new(ManualClock(AtomicI64::new(1_000)));
    let sim = sim_with(SimConfig::new(vec![h1(), h2()]).with_clock(clock.clone()));
    let h = h1();
    created(&sim, &h, "c1").await;
    sim.start_container(&h, "c1").await.unwrap(); // at 1000
    clock.set(2_000);
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap(); // at 2000

    // Without the label, and on another host: not ours.
    let img = "plain";
    let mut unlabelled = container("plain", img);
    unlabelled.labels.clear();
    let mut img_spec = image(img, BASE);
    img_spec.labels.clear();
    sim.build_image(&h, &img_spec).await.unwrap();
    sim.create_container(&h, &unlabelled).await.unwrap();
    sim.start_container(&h, "plain").await.unwrap();
    created(&sim, &h2(), "other").await;
    sim.start_container(&h2(), "other").await.unwrap();

    let mut all = sim.events(&h, label::MANAGED, None);
    let e = next_event(&mut all).await.unwrap().unwrap();
    assert_eq!((e.kind, e.at.as_micros()), (EngineEventKind::Start, 1_000));
    assert_eq!(e.container, "c1");
    assert_eq!(e.host, h);
    assert_eq!(e.labels[label::ORG], "org-a");

    // `since` is inclusive.
    let mut from = sim.events(&h, label::MANAGED, Some(Timestamp::from_micros(2_000)));
    let e = next_event(&mut from).await.unwrap().unwrap();
    assert_eq!(
        (e.kind, e.at.as_micros()),
        (EngineEventKind::Die { exit_code: 137 }, 2_000)
    );

    // Then live, in order, on both subscriptions.
    clock.set(3_000);
    sim.start_container(&h, "c1").await.unwrap();
    let e = next_event(&mut from).await.unwrap().unwrap();
    assert_eq!((e.kind, e.at.as_micros()), (EngineEventKind::Start, 3_000));
    let kinds: Vec<_> = [next_event(&mut all).await, next_event(&mut all).await]
        .into_iter()
        .map(|e| e.unwrap().unwrap().kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            EngineEventKind::Die { exit_code: 137 },
            EngineEventKind::Start
        ]
    );

    // A dropped connection ends the stream; resubscribing from the last
    // seen time picks up what was missed.
    sim.drop_event_streams(&h);
    assert!(next_event(&mut from).await.is_none());
    clock.set(4_000);
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap();
    let mut resumed = sim.events(&h, label::MANAGED, Some(Timestamp::from_micros(3_000)));
    let kinds: Vec<_> = [
        next_event(&mut resumed).await,
        next_event(&mut resumed).await,
    ]
    .into_iter()
    .map(|e| e.unwrap().unwrap().kind)
    .collect();
    assert_eq!(
        kinds,
        vec![
            EngineEventKind::Start,
            EngineEventKind::Die { exit_code: 137 }
        ]
    );
}

#[tokio::test]
async fn kill_exits_with_the_code_and_emits_oom_then_die() {
    let sim = sim();
    let h = h1();
    created(&sim, &h, "c1").await;
    sim.start_container(&h, "c1").await.unwrap();
    let mut events = sim.events(&h, label::MANAGED, None);
    assert_eq!(
        next_event(&mut events).await.unwrap().unwrap().kind,
        EngineEventKind::Start
    );

    sim.kill(&h, "c1", 137, true).unwrap();
    assert_eq!(
        next_event(&mut events).await.unwrap().unwrap().kind,
        EngineEventKind::Oom
    );
    assert_eq!(
        next_event(&mut events).await.unwrap().unwrap().kind,
        EngineEventKind::Die { exit_code: 137 }
    );
    assert_eq!(
        sim.containers(&h)[0].state,
        ContainerState::Exited {
            exit_code: 137,
            oom_killed: true
        }
    );

    // A plain crash: no OOM event. Killing a stopped container does nothing.
    sim.start_container(&h, "c1").await.unwrap();
    sim.kill(&h, "c1", 3, false).unwrap();
    sim.kill(&h, "c1", 9, false).unwrap();
    let kinds: Vec<_> = sim
        .event_history(&h)
        .into_iter()
        .skip(3)
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            EngineEventKind::Start,
            EngineEventKind::Die { exit_code: 3 }
        ]
    );
    assert_eq!(
        sim.kill(&h, "ghost", 1, false).unwrap_err().code(),
        "not_found"
    );
}

#[tokio::test]
async fn removing_a_running_container_emits_die() {
    let sim = sim();
    let h = h1();
    created(&sim, &h, "c1").await;
    sim.start_container(&h, "c1").await.unwrap();
    sim.remove_container(&h, "c1").await.unwrap();
    let last = sim.event_history(&h).pop().unwrap();
    assert_eq!(last.kind, EngineEventKind::Die { exit_code: 137 });
    assert!(sim.containers(&h).is_empty());
}

#[tokio::test]
async fn list_labelled_finds_every_kind_carrying_the_key() {
    let sim = sim();
    let h = h1();
    sim.create_network(&h, &net("n1")).await.unwrap();
    sim.create_network(
        &h,
        &NetworkSpec {
            name: "foreign".to_owned(),
            labels: Labels::new(),
        },
    )
    .await
    .unwrap();
    created(&sim, &h, "c1").await;
    created(&sim, &h2(), "elsewhere").await;

    let found = sim.list_labelled(&h, label::MANAGED).await.unwrap();
    let mut names: Vec<_> = found.iter().map(|r| (r.kind, r.name.as_str())).collect();
    names.sort_by_key(|(_, n)| n.to_string());
    assert_eq!(
        names,
        vec![
            (ResourceKind::Container, "c1"),
            (ResourceKind::Image, "img-c1:latest"),
            (ResourceKind::Network, "n1"),
        ]
    );
    let by_org = sim.list_labelled(&h, label::ORG).await.unwrap();
    assert_eq!(by_org.len(), 1, "only the container carries the org label");
    assert!(sim.list_labelled(&h, "absent").await.unwrap().is_empty());
}

#[tokio::test]
async fn logs_tail_and_follow_until_the_container_stops() {
    let sim = sim();
    let h = h1();
    created(&sim, &h, "c1").await;
    for l in ["one", "two", "three"] {
        sim.print(&h, "c1", l).unwrap();
    }
    let tail: Vec<_> = sim.logs(&h, "c1", 2, false).collect().await;
    let tail: Vec<_> = tail.into_iter().map(Result::unwrap).collect();
    assert_eq!(tail, ["two", "three"]);
    let all = sim.logs(&h, "c1", usize::MAX, false).count().await;
    assert_eq!(all, 3);

    // Following a container that is not running ends after the existing lines.
    let followed = sim.logs(&h, "c1", 1, true).count().await;
    assert_eq!(followed, 1);

    sim.start_container(&h, "c1").await.unwrap();
    let mut follow = sim.logs(&h, "c1", 1, true);

    assert_eq!(next_line(&mut follow).await.unwrap().unwrap(), "three");
    sim.print(&h, "c1", "four").unwrap();
    assert_eq!(next_line(&mut follow).await.unwrap().unwrap(), "four");
    sim.stop_container(&h, "c1", Duration::ZERO).await.unwrap();
    assert!(
        next_line(&mut follow).await.is_none(),
        "ends when the container stops"
    );

    let missing = sim.logs(&h, "ghost", 10, false).next().await;
    assert!(matches!(missing, Some(Err(RuntimeError::NotFound { .. }))));
    assert_eq!(sim.print(&h, "ghost", "x").unwrap_err().code(), "not_found");
}

#[tokio::test(start_paused = true)]
async fn latency_is_honoured_on_the_paused_clock() {
    let latency = SimLatency {
        container_create: Duration::from_millis(250),
        image_build: Duration::from_secs(3),
        ..SimLatency::default()
    };
    let sim = sim_with(SimConfig::new(vec![h1()]).with_latency(latency));
    let h = h1();

    let t0 = tokio::time::Instant::now();
    sim.create_network(&h, &net("n")).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO, "zero latency: no sleep");

    let t0 = tokio::time::Instant::now();
    sim.build_image(&h, &image("img", BASE)).await.unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(3));

    // A caller that gives up before the latency has passed changes nothing.
    let early = tokio::time::timeout(
        Duration::from_millis(100),
        sim.create_container(&h, &container("c", "img")),
    )
    .await;
    assert!(early.is_err());
    assert!(sim.containers(&h).is_empty());

    let t0 = tokio::time::Instant::now();
    sim.create_container(&h, &container("c", "img"))
        .await
        .unwrap();
    assert_eq!(t0.elapsed(), Duration::from_millis(250));
}

#[tokio::test(start_paused = true)]
async fn uniform_latency_applies_to_every_operation() {
    let d = Duration::from_millis(10);
    let sim = sim_with(SimConfig::new(vec![h1()]).with_latency(SimLatency::uniform(d)));
    let h = h1();
    let t0 = tokio::time::Instant::now();
    sim.ping(&h).await.unwrap();
    sim.create_network(&h, &net("n")).await.unwrap();
    sim.build_image(&h, &image("img", BASE)).await.unwrap();
    sim.create_container(&h, &container("c", "img"))
        .await
        .unwrap();
    sim.connect_network(&h, "n", "c", "c").await.unwrap();
    sim.start_container(&h, "c").await.unwrap();
    sim.stop_container(&h, "c", Duration::from_secs(30))
        .await
        .unwrap();
    sim.remove_container(&h, "c").await.unwrap();
    sim.remove_image(&h, "img").await.unwrap();
    assert_eq!(t0.elapsed(), d * 9, "the stop grace is not waited for");
}

#[tokio::test]
async fn ids_follow_the_seed_and_operations_are_counted() {
    let a = sim_with(SimConfig::new(vec![h1()]).with_seed(7));
    let b = sim_with(SimConfig::new(vec![h1()]).with_seed(7));
    let c = sim_with(SimConfig::new(vec![h1()]).with_seed(8));
    let id = |s: SimRuntime| async move { s.create_network(&h1(), &net("n")).await.unwrap().id };
    let (ia, ib, ic) = (id(a).await, id(b).await, id(c).await);
    assert_eq!(ia, ib);
    assert_ne!(ia, ic);
    assert_eq!(ia.len(), 64);

    let sim = sim();
    assert_eq!(sim.op_count(), 0);
    sim.ping(&h1()).await.unwrap();
    let _ = sim.start_container(&h1(), "ghost").await;
    let _ = sim.ping(&HostId::new("nowhere")).await;
    sim.add_base_image(&h1(), "x");
    let _ = sim.containers(&h1());
    assert_eq!(sim.op_count(), 3, "failures count, hooks do not");
}

#[tokio::test]
async fn empty_names_are_invalid_requests() {
    let sim = sim();
    let err = sim.create_network(&h1(), &net("")).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request");
    assert!(!err.is_retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_of_one_name_have_one_winner() {
    let sim = Arc::new(sim());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let sim = sim.clone();
        tasks.push(tokio::spawn(async move {
            sim.create_network(&h1(), &net("shared")).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => assert_eq!(e.code(), "conflict"),
        }
    }
    assert_eq!(ok, 1);
}
