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
    assert!(v["dispatch_samples"].as_u64().unwrap() >= 100);
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

/// A seed is a reproduction: the same seed and arguments give the same run,
/// to the event log's digest — which is what makes a failing seed worth
/// printing.
#[test]
fn chaos_rerun_of_one_seed_gives_the_same_run() {
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_berth-bench"))
            .args([
                "chaos",
                "--seed",
                "7",
                "--flows",
                "80",
                "--fault-rate",
                "0.3",
                "--crash-every",
                "60",
            ])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "berth-bench chaos failed: {stderr}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let last = stdout
            .lines()
            .last()
            .expect("a last line on stdout")
            .to_owned();
        serde_json::from_str::<serde_json::Value>(&last).unwrap()
    };
    let (a, b) = (run(), run());
    for key in [
        "violations",
        "faults_injected",
        "crashes",
        "simulated_s",
        "digest",
    ] {
        assert_eq!(a[key], b[key], "{key} differs between two runs: {a} vs {b}");
    }
    // The run did something worth repeating: faults, and a crash or more.
    assert!(a["faults_injected"].as_u64().unwrap() > 0, "{a}");
    assert!(a["crashes"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(a["seeds"], 1);
}
