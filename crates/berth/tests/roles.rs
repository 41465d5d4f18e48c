//! `berth serve --role api|worker`: real processes sharing one database.
//! An API process alone takes requests and loses none while no worker
//! runs; a worker process started later runs them; actions through the
//! API process (delete) are carried out by the worker process; a worker
//! process serves no HTTP; and on SQLite a second dispatching process is
//! refused (the dispatcher's lock), as is one of role `all` beside an
//! API process (its instance cache assumes it is the only writer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::path::Path;
use std::process::Command;

use api_support::ADMIN;
use api_support::procs::{self, Served};
use serde_json::{Value, json};

/// `berth serve --runtime sim --role <role>` on the data directory `data`.
fn serve(data: &Path, role: &str) -> Served {
    procs::serve(data, role, &["--runtime", "sim"], &[])
}

async fn call(method: reqwest::Method, url: String, token: &str, body: Option<Value>) -> Value {
    let mut req = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{url}: {status} {v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_process_and_a_worker_process_share_the_work() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let api = serve(&data, "api");
    let base = format!("http://{}", api.addr());
    let org = call(
        reqwest::Method::POST,
        format!("{base}/v1/orgs"),
        ADMIN,
        Some(json!({ "name": "acme" })),
    )
    .await;
    let token = org["token"].as_str().unwrap().to_owned();

    // No worker anywhere: the request is taken, recorded, and waits.
    let first = call(
        reqwest::Method::POST,
        format!("{base}/v1/instances"),
        &token,
        Some(json!({ "name": "web", "image": "busybox" })),
    )
    .await;
    let id = first["id"].as_str().unwrap().to_owned();
    let now = call(
        reqwest::Method::GET,
        format!("{base}/v1/instances/{id}"),
        &token,
        None,
    )
    .await;
    assert_ne!(now["status"], "running", "{now}");

    // A worker process starts on the same database: it serves no HTTP,
    // and runs what the API process recorded.
    let worker = serve(&data, "worker");
    assert!(
        worker.ready.contains("role worker"),
        "a worker process says it serves no API: {}",
        worker.ready
    );
    let running = call(
        reqwest::Method::GET,
        format!("{base}/v1/instances/{id}/wait?state=running&timeout=60s"),
        &token,
        None,
    )
    .await;
    assert_eq!(running["status"], "running", "{running}");

    // A second dispatching process on this SQLite file is refused.
    let second = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "serve",
            "--runtime",
            "sim",
            "--role",
            "worker",
            "--data-dir",
        ])
        .arg(&data)
        .env_remove("BERTH_CONFIG")
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already dispatching"), "{err}");

    // Nor may a process of role `all` join them: its instance-row cache
    // would go stale under the API process's writes.
    let all = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "serve",
            "--runtime",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .env_remove("BERTH_CONFIG")
        .output()
        .unwrap();
    assert!(!all.status.success());
    let err = String::from_utf8_lossy(&all.stderr);
    assert!(err.contains("--role worker"), "{err}");

    // While both run: a new instance, then a delete through the API
    // process, carried out by the worker process.
    let second = call(
        reqwest::Method::POST,
        format!("{base}/v1/instances"),
        &token,
        Some(json!({ "name": "db", "image": "busybox" })),
    )
    .await;
    let id2 = second["id"].as_str().unwrap().to_owned();
    let running = call(
        reqwest::Method::GET,
        format!("{base}/v1/instances/{id2}/wait?state=running&timeout=60s"),
        &token,
        None,
    )
    .await;
    assert_eq!(running["status"], "running", "{running}");
    call(
        reqwest::Method::DELETE,
        format!("{base}/v1/instances/{id}"),
        &token,
        None,
    )
    .await;
    let deleted = call(
        reqwest::Method::GET,
        format!("{base}/v1/instances/{id}/wait?state=deleted&timeout=60s"),
        &token,
        None,
    )
    .await;
    assert_eq!(
        deleted["status"],
        "deleted",
        "{deleted}; worker log: {}",
        worker.log()
    );

    let worker_log = worker.log();
    assert!(
        worker.stop().success(),
        "the worker process stops cleanly on SIGTERM: {worker_log}"
    );
    let api_log = api.log();
    assert!(
        api.stop().success(),
        "the API process stops cleanly on SIGTERM: {api_log}"
    );
}
