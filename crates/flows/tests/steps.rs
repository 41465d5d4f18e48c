//! Steps tried alone: one handler on one envelope against a store and the
//! simulated engine, with no dispatcher running, and what it *declares* —
//! its writes and its emitted events — looked at directly. The scenarios
//! check whole flows; these check what each step decides.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use berth_core::domain::{ConditionKind, InstanceStatus, RestartPolicy};
use berth_core::events::instance as ev;
use berth_core::{Envelope, EventPayload, NewEvent};
use berth_store::instances::{Instance, InstanceSpec};
use berth_store::writes::Write;
use berth_testkit::{Kit, TestWorld};
use berth_worker::testing::StepOutput;

const CONFIG: &str = r#"
[workers.default]
max_attempts = 3
timeout = "5s"
backoff = { initial = "1ms", max = "4ms" }
"#;

fn spec() -> InstanceSpec {
    InstanceSpec {
        image: "busybox".into(),
        env: BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        ports: vec![],
        restart: RestartPolicy::No,
        build: None,
        limits: None,
    }
}

/// The one event a step emitted, as the next step receives it.
fn only_event(w: &TestWorld, out: &StepOutput, cause: &Envelope, ty: &str) -> Envelope {
    let types: Vec<&str> = out.emitted.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, vec![ty], "what the step emitted");
    w.emitted(out.emitted[0].clone(), Some(cause))
}

/// The instance row a step declared it writes (a version-guarded update).
fn written_row(out: &StepOutput) -> &Instance {
    let rows: Vec<&Instance> = out
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Instance(i) => Some(&**i),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 1, "one row written: {:?}", out.writes);
    rows[0]
}

/// Runs `worker` on `env`, applies what it declared (as the dispatcher's
/// commit would) and returns it.
async fn step_and_apply(w: &TestWorld, worker: &str, env: &Envelope) -> StepOutput {
    let out = w
        .step(worker, env.clone())
        .await
        .unwrap_or_else(|e| panic!("{worker}: {e:?}"));
    assert!(out.tx.is_none(), "{worker} declares its writes");
    assert!(w.apply(&out.writes).await, "{worker}'s guards held");
    out
}

/// The creation steps up to `container.attached`, one at a time; returns
/// the instance and the `container.attached` envelope.
async fn up_to_attached(w: &TestWorld) -> (Instance, Envelope) {
    let (inst, requested) = w.create("orga", "web", spec()).await;
    let out = step_and_apply(w, "host.ensure", &requested).await;
    assert!(
        out.writes
            .iter()
            .any(|x| matches!(x, Write::ClaimHost { org, .. } if org == "orga")),
        "host.ensure claims the host for the org: {:?}",
        out.writes
    );
    let host_ready = only_event(w, &out, &requested, ev::HostReady::TYPE);
    // The two branches, the network's recorded first.
    let out = step_and_apply(w, "network.ensure", &host_ready).await;
    let network_ready = only_event(w, &out, &host_ready, ev::NetworkReady::TYPE);
    let out = step_and_apply(w, "image.build", &host_ready).await;
    let image_built = only_event(w, &out, &host_ready, ev::ImageBuilt::TYPE);
    // The join acts on the delivery of the branch recorded last only.
    let early = w.step("container.start", network_ready).await.unwrap();
    assert!(
        early.emitted.is_empty() && early.writes.is_empty(),
        "the earlier branch's delivery defers: {early:?}"
    );
    let started = step_and_apply(w, "container.start", &image_built).await;
    let container_started = only_event(w, &started, &image_built, ev::ContainerStarted::TYPE);
    let row = written_row(&started);
    assert_eq!(row.status, InstanceStatus::Starting);
    assert!(row.conditions.holds(ConditionKind::ContainerStarted));
    let container = row.container.clone().expect("the container is recorded");
    let sim = w.sim();
    assert!(
        sim.containers(&w.host())
            .iter()
            .any(|c| c.name == container),
        "the container exists on the engine"
    );
    let out = step_and_apply(w, "network.attach", &container_started).await;
    let attached = only_event(w, &out, &container_started, ev::ContainerAttached::TYPE);
    (inst, attached)
}

#[tokio::test]
async fn container_start_creates_the_container_and_declares_the_started_row() {
    let w = Kit::new(CONFIG).compose().await;
    let (inst, attached) = up_to_attached(&w).await;
    // Nothing was published for real: no dispatcher runs, and the steps'
    // events went only where the test took them.
    let stored = w.get(&inst.id).await;
    assert_eq!(stored.status, InstanceStatus::Starting);
    assert!(stored.ip.is_some(), "network.attach recorded the address");
    assert_eq!(attached.org_id.as_deref(), Some("orga"));
    assert_eq!(attached.subject.as_deref(), Some(inst.id.as_str()));
    assert_eq!(attached.flow_id, inst.flow_id, "the same flow throughout");
}

#[tokio::test]
async fn instance_finish_on_a_running_container_writes_running() {
    let w = Kit::new(CONFIG).compose().await;
    let (_, attached) = up_to_attached(&w).await;
    let out = w.step("instance.finish", attached.clone()).await.unwrap();
    assert_eq!(written_row(&out).status, InstanceStatus::Running);
    only_event(&w, &out, &attached, ev::Running::TYPE);
}

#[tokio::test]
async fn instance_finish_on_a_dead_container_writes_exited_with_its_code() {
    let w = Kit::new(CONFIG).compose().await;
    let (inst, attached) = up_to_attached(&w).await;
    let container = w.get(&inst.id).await.container.unwrap();
    // It dies before the last step looks (`exit 3`).
    w.sim().kill(&w.host(), &container, 3, false).unwrap();
    let out = w.step("instance.finish", attached.clone()).await.unwrap();
    let row = written_row(&out);
    assert_eq!(row.status, InstanceStatus::Exited, "not running");
    assert_eq!(row.exit_code, Some(3));
    assert!(!row.oom_killed);
    let exited = only_event(&w, &out, &attached, ev::Exited::TYPE);
    let p: ev::Exited = exited.payload().unwrap();
    assert_eq!((p.exit_code, p.oom_killed, p.gone), (3, false, false));
}

#[tokio::test]
async fn a_step_of_a_stale_generation_declares_nothing() {
    let w = Kit::new(CONFIG).compose().await;
    let (inst, _) = w.create("orga", "web", spec()).await;
    let stale = w.envelope(
        &ev::Requested {
            instance_id: inst.id.clone(),
            generation: inst.generation + 1,
        },
        "orga",
        &inst.id,
        None,
    );
    let out = w.step("host.ensure", stale).await.unwrap();
    assert!(out.writes.is_empty(), "{:?}", out.writes);
    assert!(out.emitted.is_empty(), "{:?}", out.emitted);
}

#[tokio::test]
async fn an_unknown_worker_or_a_malformed_payload_is_fatal() {
    let w = Kit::new(CONFIG).compose().await;
    let env = w.emitted(
        NewEvent::with_type(ev::HostReady::TYPE, 1, &serde_json::json!({ "nope": 1 })).unwrap(),
        None,
    );
    let err = w.step("network.ensure", env.clone()).await.unwrap_err();
    assert_eq!(err.kind, berth_worker::FailureKind::Malformed);
    let err = w.step("no.such.worker", env).await.unwrap_err();
    assert_eq!(err.kind, berth_worker::FailureKind::Fatal);
}
