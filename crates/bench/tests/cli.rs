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
