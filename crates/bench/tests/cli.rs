//! The `berth-bench bus` contract: a table on stderr and, as the last line
//! on stdout, one JSON object with the documented fields. (Speed is measured
//! by running the benchmark, never asserted in a test.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn bus_prints_a_table_and_a_json_last_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args([
            "bus",
            "--events",
            "500",
            "--latency-secs",
            "1",
            "--latency-rate",
            "200",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "berth-bench failed: {stderr}");
    assert!(stderr.contains("events/s"), "no table on stderr: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a last line on stdout");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "events_per_s",
        "dispatch_p50_us",
        "dispatch_p99_us",
        "raw_commits_per_s",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} missing or zero in {last}"
        );
    }
    assert_eq!(v["events"], 500);
    assert_eq!(v["store"], "sqlite");
    assert!(v["dispatch_samples"].as_u64().unwrap() >= 100);
}

/// Runs `berth-bench` with `args`, which must succeed; its stderr and its
/// JSON last line.
fn bench(args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "berth-bench {args:?} failed: {stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a last line on stdout");
    (stderr, serde_json::from_str(last).unwrap())
}

/// A small `flows` run: flows_per_s and the database it ran on.
fn flows(more: &[&str]) -> serde_json::Value {
    let mut args = vec!["flows", "--count", "60", "--concurrency", "12"];
    args.extend_from_slice(more);
    let (stderr, v) = bench(&args);
    assert!(
        stderr.contains("event-driven flows/s"),
        "no table: {stderr}"
    );
    assert!(v["flows_per_s"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert_eq!(v["count"], 60);
    v
}

#[test]
fn flows_prints_its_store_and_dispatchers() {
    let v = flows(&[]);
    assert_eq!(v["store"], "sqlite");
    assert_eq!(v["workers"], 1);
}

/// SQLite's dispatcher lock allows one dispatcher per database: more is
/// refused up front, naming the flag, rather than failing to start.
#[test]
fn flows_refuses_several_dispatchers_on_sqlite() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args(["flows", "--count", "10", "--workers", "3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--workers 3") && stderr.contains("single dispatcher lock"),
        "{stderr}"
    );
}

/// Both benchmarks on the suites' PostgreSQL server (skipped without one,
/// except under CI=true): each on a fresh database of its own, `flows`
/// with three dispatchers sharing the work, no password printed.
#[test]
fn bus_and_flows_run_on_postgres() {
    let Some(server) = berth_store::postgres::test_server().unwrap() else {
        eprintln!("skipped: no PostgreSQL server (BERTH_TEST_POSTGRES_URL)");
        return;
    };
    let (stderr, v) = bench(&[
        "bus",
        "--store",
        &server,
        "--events",
        "500",
        "--latency-secs",
        "1",
        "--latency-rate",
        "200",
    ]);
    assert_eq!(v["store"], "postgres");
    for key in ["events_per_s", "raw_commits_per_s"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key}: {v}");
    }
    assert!(stderr.contains("postgres://"), "no store row: {stderr}");
    let redacted = berth_store::postgres::redact(&server);
    if redacted != server {
        assert!(!stderr.contains(&server), "password printed: {stderr}");
    }
    let v = flows(&["--store", &server, "--workers", "3"]);
    assert_eq!(v["store"], "postgres");
    assert_eq!(v["workers"], 3);
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args(["bus", "--events", "10", "--synchronous", "sometimes"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--synchronous must be full or normal"),
        "{stderr}"
    );
}

/// Runs `berth-bench chaos` with `args`; its stderr and its JSON last line.
fn chaos(args: &[&str]) -> (String, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .arg("chaos")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "berth-bench chaos failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().expect("a last line on stdout");
    (stderr, serde_json::from_str(last).unwrap())
}

/// A seed is a reproduction: the same seed and arguments give the same run,
/// to the event log's digest — which is what makes a failing seed worth
/// printing. Seed 4 at 300 actions is one whose runs diverged (one in three)
/// while the executor still chose who ran next.
#[test]
fn chaos_rerun_of_one_seed_gives_the_same_run() {
    let args = [
        "--seed",
        "4",
        "--flows",
        "300",
        "--fault-rate",
        "0.3",
        "--crash-every",
        "100",
    ];
    let (_, a) = chaos(&args);
    for _ in 0..2 {
        let (_, b) = chaos(&args);
        for key in [
            "violations",
            "faults_injected",
            "crashes",
            "simulated_s",
            "digest",
        ] {
            assert_eq!(a[key], b[key], "{key} differs between two runs: {a} vs {b}");
        }
    }
    // The run did something worth repeating: faults, and a crash or more.
    assert!(a["faults_injected"].as_u64().unwrap() > 0, "{a}");
    assert!(a["crashes"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["seeds"], 1);
}

/// Seed 3 with `flows` actions, a crash about every 60 deliveries, and `more`.
fn seed_3<'a>(flows: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--seed",
        "3",
        "--flows",
        flows,
        "--fault-rate",
        "0.3",
        "--crash-every",
        "60",
    ];
    args.extend_from_slice(more);
    args
}

/// A failing seed is reported with the fewest actions that still break an
/// invariant, and those reproduce it. The bug is planted (a worker's record
/// of having handled an event erased after action 20), so the shortest run
/// is known: 21 actions.
#[test]
fn chaos_a_failing_seed_is_shrunk_to_its_shortest_run() {
    let (stderr, v) = chaos(&seed_3("60", &["--plant-lost-event", "20"]));
    assert!(v["violations"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        stderr.contains("lost: host.ensure neither handled nor dead-lettered it"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shortest failing run: 21 of 60 actions"),
        "{stderr}"
    );
    let (_, short) = chaos(&seed_3("21", &["--plant-lost-event", "20", "--no-shrink"]));
    assert!(short["violations"].as_u64().unwrap() >= 1, "{short}");
}

/// The state machine is checked on the run, not only at its end: a planted
/// move of a `failed` instance back to `starting` is reported.
#[test]
fn chaos_a_move_out_of_failed_is_a_violation() {
    let (stderr, v) = chaos(&seed_3("60", &["--plant-revived", "40", "--no-shrink"]));
    assert!(v["violations"].as_u64().unwrap() >= 1, "{v}");
    assert!(
        stderr.contains("moved failed → starting within generation"),
        "{stderr}"
    );
}
