//! The fault-injecting wrapper is reproducible from its seed, fails exactly
//! the calls it is told to, and classifies each kind of fault as the worker
//! framework expects (retryable or not, or never answering).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use berth_runtime::faulty::{Fault, FaultKind, FaultyRuntime, Op};
use berth_runtime::sim::{SimConfig, SimRuntime};
use berth_runtime::{ContainerRuntime, ContainerSpec, HostId, Labels, Limits, NetworkSpec, label};
use futures::StreamExt;

fn h() -> HostId {
    HostId::new("h1")
}

fn net(name: &str) -> NetworkSpec {
    NetworkSpec {
        name: name.to_owned(),
        labels: Labels::new(),
    }
}

/// A faulty runtime over a fresh sim, and the sim (for its hooks).
fn faulty(seed: u64) -> (FaultyRuntime, Arc<SimRuntime>) {
    let sim = Arc::new(SimRuntime::new(SimConfig::new(vec![h()])));
    sim.add_base_image(&h(), "alpine:3");
    (FaultyRuntime::new(sim.clone(), seed), sim)
}

/// Which of `n` pings fail, under a 30 % transient fault.
async fn ping_failures(seed: u64, n: usize) -> Vec<bool> {
    let (rt, _) = faulty(seed);
    rt.set_fault(Op::Ping, Some(Fault::new(0.3, FaultKind::Transient)));
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // Calls of operations without a fault must not shift the sequence.
        if i % 3 == 0 {
            rt.find_network(&h(), "n").await.unwrap();
        }
        out.push(rt.ping(&h()).await.is_err());
    }
    out
}

#[tokio::test]
async fn the_same_seed_gives_the_same_faults() {
    let a = ping_failures(42, 300).await;
    let b = ping_failures(42, 300).await;
    let c = ping_failures(43, 300).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    let failed = a.iter().filter(|f| **f).count();
    assert!((40..=140).contains(&failed), "about 30 % of 300: {failed}");
}

#[tokio::test]
async fn rates_of_zero_and_one_are_never_and_always() {
    let (rt, _) = faulty(1);
    rt.set_fault(Op::Ping, Some(Fault::new(0.0, FaultKind::Transient)));
    for _ in 0..100 {
        rt.ping(&h()).await.unwrap();
    }
    rt.set_fault_all(Some(Fault::new(1.0, FaultKind::Permanent)));
    for _ in 0..10 {
        assert!(rt.ping(&h()).await.is_err());
        assert!(rt.find_container(&h(), "c").await.is_err());
    }
    assert_eq!(rt.injected(), 20);
    rt.set_fault(Op::Ping, None);
    rt.ping(&h()).await.unwrap();
    rt.clear();
    rt.find_container(&h(), "c").await.unwrap();
    assert_eq!(rt.injected(), 20);
}

#[tokio::test]
async fn fail_next_fails_exactly_n_calls_then_passes_through() {
    let (rt, sim) = faulty(1);
    rt.fail_next(Op::CreateNetwork, 3, FaultKind::Transient);
    assert_eq!(rt.pending(Op::CreateNetwork), 3);
    for _ in 0..3 {
        let err = rt.create_network(&h(), &net("n")).await.unwrap_err();
        assert_eq!(err.code(), "engine_unavailable");
    }
    assert_eq!(
        sim.op_count(),
        0,
        "an injected fault never reaches the engine"
    );
    assert!(sim.networks(&h()).is_empty());
    rt.create_network(&h(), &net("n")).await.unwrap();
    assert_eq!(rt.injected(), 3);
    assert_eq!(rt.pending(Op::CreateNetwork), 0);

    // Other operations are untouched, and queued failures run in order.
    rt.fail_next(Op::RemoveNetwork, 1, FaultKind::Timeout);
    rt.fail_next(Op::RemoveNetwork, 1, FaultKind::Permanent);
    rt.find_network(&h(), "n").await.unwrap().unwrap();
    let codes = [
        rt.remove_network(&h(), "n").await.unwrap_err().code(),
        rt.remove_network(&h(), "n").await.unwrap_err().code(),
    ];
    assert_eq!(codes, ["engine_timeout", "invalid_request"]);
    rt.remove_network(&h(), "n").await.unwrap();
    assert!(sim.networks(&h()).is_empty());
}

#[tokio::test]
async fn forced_failures_take_precedence_over_rates() {
    let (rt, _) = faulty(1);
    rt.set_fault(Op::Ping, Some(Fault::new(1.0, FaultKind::Transient)));
    rt.fail_next(Op::Ping, 1, FaultKind::Permanent);
    assert_eq!(rt.ping(&h()).await.unwrap_err().code(), "invalid_request");
    assert_eq!(
        rt.ping(&h()).await.unwrap_err().code(),
        "engine_unavailable"
    );
}

#[tokio::test]
async fn each_kind_is_classified_for_retrying() {
    let cases = [
        (FaultKind::Transient, true, "engine_unavailable"),
        (FaultKind::Permanent, false, "invalid_request"),
        (FaultKind::Timeout, true, "engine_timeout"),
        (FaultKind::LostReply, true, "engine_timeout"),
    ];
    for (kind, retryable, code) in cases {
        let (rt, _) = faulty(1);
        rt.fail_next(Op::StartContainer, 1, kind);
        let err = rt.start_container(&h(), "c").await.unwrap_err();
        assert_eq!(err.is_retryable(), retryable, "{kind:?}");
        assert_eq!(err.code(), code, "{kind:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_hang_never_answers() {
    let (rt, sim) = faulty(1);
    rt.fail_next(Op::Ping, 1, FaultKind::Hang);
    let hung = tokio::time::timeout(Duration::from_secs(3600), rt.ping(&h())).await;
    assert!(hung.is_err(), "the caller's timeout has to fire");
    assert_eq!(sim.op_count(), 0);
    assert_eq!(rt.injected(), 1);
    rt.ping(&h()).await.unwrap();
}

#[tokio::test]
async fn a_lost_reply_takes_effect_but_reports_a_timeout() {
    let (rt, sim) = faulty(1);
    rt.fail_next(Op::CreateNetwork, 1, FaultKind::LostReply);
    let err = rt.create_network(&h(), &net("n")).await.unwrap_err();
    assert_eq!(err.code(), "engine_timeout");
    assert_eq!(sim.networks(&h()).len(), 1, "the engine did it");
    // A blind retry now conflicts: why workers look before they create.
    let err = rt.create_network(&h(), &net("n")).await.unwrap_err();
    assert_eq!(err.code(), "conflict");
}

#[tokio::test]
async fn events_and_logs_pass_through() {
    let (rt, sim) = faulty(1);
    rt.set_fault_all(Some(Fault::new(1.0, FaultKind::Transient)));
    let hst = h();
    sim.build_image(
        &hst,
        &berth_runtime::BuildSpec::dockerfile_only(
            "img",
            "FROM alpine:3\n",
            Labels::from([(label::MANAGED.to_owned(), "true".to_owned())]),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    sim.create_container(
        &hst,
        &ContainerSpec {
            name: "c".to_owned(),
            image: "img".to_owned(),
            labels: Labels::new(),
            limits: Limits::default(),
            env: vec![],
            cmd: None,
        },
    )
    .await
    .unwrap();
    sim.start_container(&hst, "c").await.unwrap();
    sim.print(&hst, "c", "hello").unwrap();

    let e = rt.events(&hst, label::MANAGED, None).next().await;
    assert_eq!(e.unwrap().unwrap().container, "c");
    let line = rt.logs(&hst, "c", 10, false).next().await;
    assert_eq!(line.unwrap().unwrap(), "hello");
    assert_eq!(rt.injected(), 0);
}
