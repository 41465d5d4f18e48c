//! The Docker runtime's operations on the engine of this machine, one by one:
//! connecting, building without pulling, containers (limits, isolation,
//! idempotent removal), networks (aliases, duplicates, detaching), engine
//! events (start, die with the exit code, replay from `since`), logs (tail,
//! follow) and the labelled sweep.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use berth_docker::DockerRuntime;
use berth_docker::bollard::query_parameters::{InspectContainerOptions, KillContainerOptions};
use berth_runtime::{
    BuildSpec, ContainerRuntime, ContainerSpec, ContainerState, EngineEvent, EngineEventKind,
    HostId, Labels, Limits, NetworkSpec, ResourceKind, RuntimeError,
};
use common::{BASE, Sweep, exec, local, reaches, unique};
use futures::StreamExt;
use futures::stream::BoxStream;

const TEST_LABEL: &str = "berth.test";
const WAIT: Duration = Duration::from_secs(20);

fn labels(run: &str) -> Labels {
    Labels::from([(TEST_LABEL.to_owned(), run.to_owned())])
}

/// An image of `BASE` whose command is `cmd`, from a context holding only
/// its Dockerfile.
fn image_spec(run: &str, name: &str, cmd: &[&str]) -> BuildSpec {
    dockerfile_spec(
        run,
        name,
        &format!("FROM {BASE}\nCMD {}\n", serde_json::to_string(cmd).unwrap()),
    )
}

fn dockerfile_spec(run: &str, name: &str, dockerfile: &str) -> BuildSpec {
    BuildSpec::dockerfile_only(
        format!("berth-test/{run}/{name}:1"),
        dockerfile,
        labels(run),
    )
    .unwrap()
}

fn container_spec(run: &str, name: &str, image: &str) -> ContainerSpec {
    ContainerSpec {
        name: format!("berth-test-{run}-{name}"),
        image: image.to_owned(),
        labels: labels(run),
        limits: Limits::default(),
        env: vec![],
        cmd: None,
    }
}

/// Builds an image running `cmd` and creates a container from it.
async fn container(rt: &DockerRuntime, run: &str, name: &str, cmd: &[&str]) -> String {
    let host = local();
    let built = rt
        .build_image(&host, &image_spec(run, name, cmd))
        .await
        .unwrap();
    let spec = container_spec(run, name, &built.image.tag);
    rt.create_container(&host, &spec).await.unwrap();
    spec.name
}

async fn next_event(
    events: &mut BoxStream<'static, Result<EngineEvent, RuntimeError>>,
) -> EngineEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("no engine event in time")
        .expect("the event stream ended")
        .expect("an event, not an error")
}

#[tokio::test]
async fn connecting_where_no_engine_answers_says_where() {
    let host = HostId::new("h1");
    for endpoint in [
        "unix:///nonexistent/docker.sock",
        "tcp://127.0.0.1:1",
        "ftp://example",
    ] {
        let Err(e) = DockerRuntime::connect(vec![(host.clone(), endpoint.to_owned())]).await else {
            panic!("{endpoint} connected");
        };
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("no Docker engine at {endpoint}: ")),
            "{msg}"
        );
        assert!(msg.len() > endpoint.len() + 22, "the cause is given: {msg}");
        assert!(RuntimeError::from(e).is_retryable());
    }
}

#[tokio::test]
async fn the_api_version_is_negotiated_down_to_the_engines() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let v = rt.api_version(&local()).unwrap();
    let (major, minor) = v.split_once('.').unwrap();
    assert_eq!(major, "1");
    assert!(minor.parse::<u32>().unwrap() >= 24, "{v}");
    eprintln!("engine API {v} at {}", rt.endpoint(&local()).unwrap());
    rt.ping(&local()).await.unwrap();
    let unknown = rt.ping(&HostId::new("nowhere")).await.unwrap_err();
    assert_eq!(unknown.code(), "engine_unavailable");
}

#[tokio::test]
async fn env_and_cmd_go_to_the_container_never_into_the_image() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("img");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let docker = rt.client(&host).unwrap();
    let mut spec = image_spec(&run, "env", &["true"]);
    spec.labels.insert("berth.org".to_owned(), "o".to_owned());
    let built = rt.build_image(&host, &spec).await.unwrap();
    assert_eq!(built.image.tag, spec.tag);
    assert!(built.image.id.starts_with("sha256:"), "{:?}", built.image);
    assert_eq!(built.image.labels.get(TEST_LABEL), Some(&run));
    assert!(
        built
            .log_tail
            .iter()
            .any(|l| l.contains("Successfully tagged")),
        "{:?}",
        built.log_tail
    );
    assert!(built.log_tail.len() <= 20);
    let found = rt.find_image(&host, &spec.tag).await.unwrap().unwrap();
    assert_eq!(found.id, built.image.id);
    assert_eq!(found.labels.get("berth.org").map(String::as_str), Some("o"));

    // The env and the command are the container's, taken literally.
    let tricky = r#"a "quoted" $HOME and \ backslash"#;
    let secret = format!("s3cret-{run}");
    let mut c = container_spec(&run, "env", &built.image.id);
    c.env = vec![
        ("GREETING".to_owned(), "hi there".to_owned()),
        ("TRICKY".to_owned(), tricky.to_owned()),
        ("SECRET".to_owned(), secret.clone()),
    ];
    c.cmd = Some(
        ["sh", "-c", "echo \"$GREETING\"; echo \"$TRICKY\""]
            .map(str::to_owned)
            .to_vec(),
    );
    rt.create_container(&host, &c).await.unwrap();
    rt.start_container(&host, &c.name).await.unwrap();
    // Followed, not polled: the stream yields each line as it is written.
    let lines: Vec<String> = tokio::time::timeout(
        WAIT,
        rt.logs(&host, &c.name, 10, true)
            .take(2)
            .map(|l| l.unwrap())
            .collect(),
    )
    .await
    .expect("the container's output");
    assert_eq!(lines, vec!["hi there".to_owned(), tricky.to_owned()]);

    // Nothing of the env is in the image: not its config, not a layer.
    let inspected = docker.inspect_image(&built.image.id).await.unwrap();
    let all = serde_json::to_string(&inspected).unwrap();
    assert!(!all.contains(&secret), "image inspect holds the secret");
    let history = docker.image_history(&built.image.id).await.unwrap();
    let all = serde_json::to_string(&history).unwrap();
    assert!(!all.contains(&secret) && !all.contains("GREETING"), "{all}");

    // Rebuilding replaces the tag; removing twice is fine.
    rt.build_image(&host, &spec).await.unwrap();
    rt.remove_container(&host, &c.name).await.unwrap();
    rt.remove_image(&host, &spec.tag).await.unwrap();
    rt.remove_image(&host, &spec.tag).await.unwrap();
    assert!(rt.find_image(&host, &spec.tag).await.unwrap().is_none());
}

#[tokio::test]
async fn images_are_found_by_name_never_by_id_or_id_prefix() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let host = local();
    let base = rt.find_image(&host, BASE).await.unwrap().unwrap();
    assert!(base.id.starts_with("sha256:"));
    // The same image by its implicit tag and by Docker Hub's long form.
    let bare = BASE.trim_end_matches(":latest");
    assert_eq!(
        rt.find_image(&host, bare).await.unwrap().map(|i| i.id),
        Some(base.id.clone())
    );
    assert_eq!(
        rt.find_image(&host, &format!("docker.io/library/{BASE}"))
            .await
            .unwrap()
            .map(|i| i.id),
        Some(base.id.clone())
    );
    let hex = base.id.trim_start_matches("sha256:");
    for probe in [
        base.id.clone(),
        hex.to_owned(),
        hex[..12].to_owned(),
        hex[..4].to_owned(),
        hex[..2].to_owned(),
        format!("{}:latest", &hex[..2]),
    ] {
        assert_eq!(
            rt.find_image(&host, &probe).await.unwrap(),
            None,
            "{probe} found"
        );
    }
}

#[tokio::test]
async fn a_missing_base_is_image_not_found_and_nothing_is_pulled() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("nobase");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let missing = format!("berth-no-such-base-{run}:1");
    let spec = dockerfile_spec(&run, "web", &format!("FROM {missing}\nCMD [\"true\"]\n"));
    let err = rt.build_image(&host, &spec).await.unwrap_err();
    assert_eq!(err.code(), "image_not_found", "{err}");
    assert!(
        matches!(&err, RuntimeError::NotFound { what, name, .. } if what == "image" && *name == missing),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(rt.find_image(&host, &spec.tag).await.unwrap().is_none());

    // A context without a Dockerfile is an invalid request.
    let bare = BuildSpec {
        tag: spec.tag.clone(),
        context: berth_runtime::context::tar_of(&[("x", b"y")])
            .unwrap()
            .into(),
        labels: labels(&run),
    };
    let err = rt.build_image(&host, &bare).await.unwrap_err();
    assert_eq!(err.code(), "invalid_request", "{err}");

    // A container of a missing image is image_not_found too.
    let err = rt
        .create_container(&host, &container_spec(&run, "x", "berth-no-such-image:1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "image_not_found", "{err}");
}

#[tokio::test]
async fn a_failing_instruction_is_build_failed_with_its_step_and_tail() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("bfail");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let spec = dockerfile_spec(
        &run,
        "web",
        &format!("FROM {BASE}\nRUN echo building-{run}\nRUN exit 3\nCMD [\"true\"]\n"),
    );
    let err = rt.build_image(&host, &spec).await.unwrap_err();
    assert_eq!(err.code(), "build_failed", "{err}");
    assert!(!err.is_retryable());
    let RuntimeError::BuildFailed {
        step,
        message,
        log_tail,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(
        step.starts_with("Step 3/") && step.ends_with(" : RUN exit 3"),
        "{err:?}"
    );
    assert!(message.contains("non-zero code: 3"), "{message}");
    assert!(
        log_tail
            .iter()
            .any(|l| l.contains(&format!("building-{run}"))),
        "{log_tail:?}"
    );
    assert!(rt.find_image(&host, &spec.tag).await.unwrap().is_none());

    // A build has no network.
    let spec = dockerfile_spec(
        &run,
        "net",
        &format!(
            "FROM {BASE}\nRUN cat /proc/net/route | wc -l > /routes\nRUN test \"$(cat /routes)\" = 1\n"
        ),
    );
    let built = rt.build_image(&host, &spec).await;
    assert!(built.is_ok(), "a build step saw a route: {built:?}");
}

#[tokio::test]
async fn containers_get_their_limits_no_privileges_and_no_network_until_attached() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("ctr");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let docker = rt.client(&host).unwrap();
    let built = rt
        .build_image(&host, &image_spec(&run, "c", &["sleep", "3600"]))
        .await
        .unwrap();
    let mut spec = container_spec(&run, "c", &built.image.tag);
    spec.limits = Limits {
        memory_bytes: Some(64 * 1024 * 1024),
        nano_cpus: Some(500_000_000),
        pids: Some(64),
    };
    let created = rt.create_container(&host, &spec).await.unwrap();
    assert_eq!(created.name, spec.name);
    assert_eq!(created.image, spec.image);
    assert_eq!(created.state, ContainerState::Created);
    assert_eq!(created.labels.get(TEST_LABEL), Some(&run));
    assert!(created.networks.is_empty(), "{:?}", created.networks);

    let inspected = docker
        .inspect_container(&spec.name, None::<InspectContainerOptions>)
        .await
        .unwrap();
    let hc = inspected.host_config.unwrap();
    assert_eq!(hc.memory, Some(64 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(500_000_000));
    assert_eq!(hc.pids_limit, Some(64));
    assert_eq!(
        hc.memory_swap,
        Some(64 * 1024 * 1024),
        "no swap beyond the limit"
    );
    assert_eq!(hc.privileged, Some(false));
    assert_eq!(
        hc.security_opt.unwrap_or_default(),
        vec!["no-new-privileges:true".to_owned()]
    );
    let dropped = hc.cap_drop.unwrap_or_default();
    for cap in ["NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE"] {
        assert!(
            dropped.iter().any(|c| c == cap),
            "{cap} not dropped: {dropped:?}"
        );
    }
    let log = hc.log_config.unwrap();
    assert_eq!(log.typ.as_deref(), Some("json-file"));
    let log = log.config.unwrap_or_default();
    assert_eq!(
        log.get("max-size").map(String::as_str),
        Some(berth_docker::LOG_MAX_SIZE)
    );
    assert_eq!(
        log.get("max-file").map(String::as_str),
        Some(berth_docker::LOG_MAX_FILES)
    );
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert!(hc.binds.unwrap_or_default().is_empty());
    assert!(hc.mounts.unwrap_or_default().is_empty());

    let again = rt.create_container(&host, &spec).await.unwrap_err();
    assert_eq!(again.code(), "conflict", "{again}");

    rt.start_container(&host, &spec.name).await.unwrap();
    rt.start_container(&host, &spec.name).await.unwrap();
    let running = rt.find_container(&host, &spec.name).await.unwrap().unwrap();
    assert_eq!(running.state, ContainerState::Running);
    // Only loopback: the container is on no network yet.
    let (code, out) = exec(docker, &spec.name, &["cat", "/proc/net/route"]).await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1, "no route but the header: {out}");

    rt.stop_container(&host, &spec.name, Duration::ZERO)
        .await
        .unwrap();
    let stopped = rt.find_container(&host, &spec.name).await.unwrap().unwrap();
    assert!(
        matches!(
            stopped.state,
            ContainerState::Exited {
                exit_code: 137,
                oom_killed: false
            }
        ),
        "{:?}",
        stopped.state
    );
    rt.stop_container(&host, &spec.name, Duration::ZERO)
        .await
        .unwrap();

    let missing = format!("berth-test-{run}-missing");
    let err = rt.start_container(&host, &missing).await.unwrap_err();
    assert!(
        matches!(&err, RuntimeError::NotFound { what, .. } if what == "container"),
        "{err:?}"
    );
    let err = rt
        .stop_container(&host, &missing, Duration::ZERO)
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    assert!(rt.find_container(&host, &missing).await.unwrap().is_none());

    // Removal stops a running container first, and repeats.
    rt.start_container(&host, &spec.name).await.unwrap();
    rt.remove_container(&host, &spec.name).await.unwrap();
    rt.remove_container(&host, &spec.name).await.unwrap();
    assert!(
        rt.find_container(&host, &spec.name)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn networks_attach_by_alias_once_and_refuse_duplicates() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("net");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let docker = rt.client(&host).unwrap();
    let net = format!("berth-test-{run}");
    let spec = NetworkSpec {
        name: net.clone(),
        labels: labels(&run),
    };

    // Racing creates (API 1.41 would accept duplicates): one network.
    let results = futures::future::join_all((0..4).map(|_| rt.create_network(&host, &spec))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code() == "conflict"),
        "{results:?}"
    );
    let found = rt.find_network(&host, &net).await.unwrap().unwrap();
    assert_eq!(found.labels.get(TEST_LABEL), Some(&run));
    let same_name = rt
        .list_labelled(&host, TEST_LABEL)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == ResourceKind::Network && r.name == net)
        .count();
    assert_eq!(same_name, 1);

    let server = container(&rt, &run, "srv", &["httpd", "-f", "-p", "8080"]).await;
    let client = container(&rt, &run, "cli", &["sleep", "3600"]).await;
    for c in [&server, &client] {
        rt.start_container(&host, c).await.unwrap();
    }
    let ip = rt
        .connect_network(&host, &net, &server, "web")
        .await
        .unwrap();
    assert!(!ip.is_empty());
    assert_eq!(
        rt.connect_network(&host, &net, &server, "web")
            .await
            .unwrap(),
        ip,
        "attaching twice gives the same IP"
    );
    let info = rt.find_container(&host, &server).await.unwrap().unwrap();
    assert_eq!(info.networks, BTreeMap::from([(net.clone(), ip.clone())]));

    rt.connect_network(&host, &net, &client, "cli")
        .await
        .unwrap();
    assert!(reaches(docker, &client, "web", 8080).await, "by alias");
    assert!(reaches(docker, &client, &ip, 8080).await, "by IP");

    // A container attached before it starts gets its address at start.
    let late = container(&rt, &run, "late", &["httpd", "-f", "-p", "8080"]).await;
    rt.connect_network(&host, &net, &late, "late")
        .await
        .unwrap();
    rt.start_container(&host, &late).await.unwrap();
    let late_ip = rt
        .find_container(&host, &late)
        .await
        .unwrap()
        .unwrap()
        .networks[&net]
        .clone();
    assert!(!late_ip.is_empty());
    assert!(reaches(docker, &client, "late", 8080).await);

    let err = rt.remove_network(&host, &net).await.unwrap_err();
    assert_eq!(err.code(), "in_use", "{err}");
    assert!(err.to_string().contains("still in use"), "{err}");
    rt.disconnect_network(&host, &net, &server).await.unwrap();
    rt.disconnect_network(&host, &net, &server).await.unwrap();
    assert!(!reaches(docker, &client, "web", 8080).await, "detached");
    rt.disconnect_network(&host, &net, "berth-test-no-such-container")
        .await
        .unwrap();
    let err = rt
        .connect_network(&host, &format!("{net}-missing"), &server, "web")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RuntimeError::NotFound { what, .. } if what == "network"),
        "{err:?}"
    );

    for c in [&server, &client, &late] {
        rt.remove_container(&host, c).await.unwrap();
    }
    rt.remove_network(&host, &net).await.unwrap();
    rt.remove_network(&host, &net).await.unwrap();
    assert!(rt.find_network(&host, &net).await.unwrap().is_none());
}

#[tokio::test]
async fn engine_events_report_start_and_die_and_replay_from_since() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("ev");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    // A label key only this run's containers carry, so other tests' events
    // stay out of this stream.
    let key = format!("berth.test.{run}");
    let mut spec = image_spec(&run, "ev", &["sh", "-c", "exit 3"]);
    spec.labels.insert(key.clone(), "yes".to_owned());
    let built = rt.build_image(&host, &spec).await.unwrap();
    let name = container_spec(&run, "ev", &built.image.tag).name;
    rt.create_container(&host, &container_spec(&run, "ev", &built.image.tag))
        .await
        .unwrap();

    let mut live = rt.events(&host, &key, None);
    rt.start_container(&host, &name).await.unwrap();
    let start = next_event(&mut live).await;
    assert_eq!(start.kind, EngineEventKind::Start);
    assert_eq!(start.container, name);
    assert_eq!(start.host, host);
    assert_eq!(start.labels.get(&key).map(String::as_str), Some("yes"));
    assert_eq!(start.labels.get(TEST_LABEL), Some(&run));
    let die = next_event(&mut live).await;
    assert_eq!(die.kind, EngineEventKind::Die { exit_code: 3 });
    assert!(die.at >= start.at);
    let exited = rt.find_container(&host, &name).await.unwrap().unwrap();
    assert!(
        matches!(exited.state, ContainerState::Exited { exit_code: 3, .. }),
        "{:?}",
        exited.state
    );

    // Resubscribing from the last seen time misses nothing.
    let mut replay = rt.events(&host, &key, Some(start.at));
    assert_eq!(next_event(&mut replay).await, start);
    assert_eq!(next_event(&mut replay).await, die);

    // Killed from outside: a die with the signal's exit code.
    let mut spec = image_spec(&run, "kill", &["sleep", "3600"]);
    spec.labels.insert(key.clone(), "yes".to_owned());
    let built = rt.build_image(&host, &spec).await.unwrap();
    let victim = container_spec(&run, "kill", &built.image.tag);
    rt.create_container(&host, &victim).await.unwrap();
    rt.start_container(&host, &victim.name).await.unwrap();
    assert_eq!(next_event(&mut live).await.kind, EngineEventKind::Start);
    rt.client(&host)
        .unwrap()
        .kill_container(&victim.name, None::<KillContainerOptions>)
        .await
        .unwrap();
    let killed = next_event(&mut live).await;
    assert_eq!(killed.container, victim.name);
    assert_eq!(killed.kind, EngineEventKind::Die { exit_code: 137 });
}

#[tokio::test]
async fn logs_give_the_tail_then_follow() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("logs");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    // Docker copies stdout and stderr separately, so their relative order
    // in the log is only certain with time between them.
    let script = "echo err >&2; sleep 0.3; echo one; echo two; echo three; \
                  while [ ! -e /tmp/go ]; do sleep 0.05; done; echo four; sleep 3600";
    let name = container(&rt, &run, "logs", &["sh", "-c", script]).await;
    rt.start_container(&host, &name).await.unwrap();
    let all: Vec<String> = tokio::time::timeout(
        WAIT,
        rt.logs(&host, &name, usize::MAX, true)
            .take(4)
            .map(|l| l.unwrap())
            .collect(),
    )
    .await
    .expect("four lines of output");
    assert_eq!(all, ["err", "one", "two", "three"], "stderr included");
    let last2: Vec<String> = rt
        .logs(&host, &name, 2, false)
        .map(|l| l.unwrap())
        .collect()
        .await;
    assert_eq!(last2, ["two", "three"]);

    let mut follow = rt.logs(&host, &name, 1, true);
    let first = tokio::time::timeout(WAIT, follow.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap(), "three");
    let (code, _) = exec(rt.client(&host).unwrap(), &name, &["touch", "/tmp/go"]).await;
    assert_eq!(code, 0);
    let next = tokio::time::timeout(WAIT, follow.next()).await.unwrap();
    assert_eq!(next.unwrap().unwrap(), "four");

    let err = rt
        .logs(&host, &format!("{name}-missing"), 5, false)
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), "not_found", "{err}");
}

#[tokio::test]
async fn the_labelled_sweep_lists_networks_images_and_containers() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("list");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let net = format!("berth-test-{run}");
    rt.create_network(
        &host,
        &NetworkSpec {
            name: net.clone(),
            labels: labels(&run),
        },
    )
    .await
    .unwrap();
    let name = container(&rt, &run, "l", &["true"]).await;
    let list = || async {
        let mut mine: Vec<(ResourceKind, String, bool)> = rt
            .list_labelled(&host, TEST_LABEL)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.labels.get(TEST_LABEL) == Some(&run))
            .map(|r| (r.kind, r.name, r.running))
            .collect();
        mine.sort_by_key(|(k, n, _)| (format!("{k:?}"), n.clone()));
        mine
    };
    assert_eq!(
        list().await,
        vec![
            (ResourceKind::Container, name.clone(), false),
            (ResourceKind::Image, format!("berth-test/{run}/l:1"), false),
            (ResourceKind::Network, net.clone(), false),
        ]
    );
    // The listing says which containers run (the reconciler inspects only
    // the others).
    let sleeper = container(&rt, &run, "s", &["sleep", "60"]).await;
    rt.start_container(&host, &sleeper).await.unwrap();
    let listed = list().await;
    assert!(
        listed.contains(&(ResourceKind::Container, sleeper, true)),
        "{listed:?}"
    );
    assert!(
        listed.contains(&(ResourceKind::Container, name, false)),
        "{listed:?}"
    );
}

#[tokio::test]
async fn duplicate_networks_made_elsewhere_resolve_to_one_and_are_all_removed() {
    let Some(rt) = common::engine().await else {
        return;
    };
    let run = unique("dup");
    let _sweep = Sweep::new(TEST_LABEL, &[&run]);
    let host = local();
    let docker = rt.client(&host).unwrap();
    let net = format!("berth-test-{run}");
    // Another process's duplicates, made behind the runtime's back (engines
    // before API 1.44 accept them; newer ones refuse the second).
    let mut ids = Vec::new();
    for _ in 0..2 {
        let request = berth_docker::bollard::models::NetworkCreateRequest {
            name: net.clone(),
            labels: Some(labels(&run).into_iter().collect()),
            ..Default::default()
        };
        if let Ok(created) = docker.create_network(request).await {
            ids.push(created.id);
        }
    }
    ids.sort();
    assert!(!ids.is_empty());
    let found = rt.find_network(&host, &net).await.unwrap().unwrap();
    assert_eq!(found.id, ids[0], "the lowest id");
    let err = rt
        .create_network(
            &host,
            &NetworkSpec {
                name: net.clone(),
                labels: labels(&run),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict");

    let c = container(&rt, &run, "c", &["sleep", "3600"]).await;
    rt.start_container(&host, &c).await.unwrap();
    let ip = rt.connect_network(&host, &net, &c, "c").await.unwrap();
    assert!(!ip.is_empty());
    rt.remove_container(&host, &c).await.unwrap();
    rt.remove_network(&host, &net).await.unwrap();
    assert!(rt.find_network(&host, &net).await.unwrap().is_none());
}
