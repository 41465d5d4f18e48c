//! Live progress over the API: `retry` messages on the org's event stream
//! (and only on its own), an instance's `progress` while its flow backs
//! off, and the list's `status` (incl. `retrying`) and `name` filters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{CONFIG, messages_until, spawn_faulty};
use berth_runtime::faulty::{FaultKind, Op};
use serde_json::{Value, json};

fn is_status(m: &Value, id: &str, status: &str) -> bool {
    m["kind"] == "status" && m["instance_id"] == id && m["status"] == status
}

#[tokio::test]
async fn a_retry_reaches_its_org_and_no_other() {
    let (t, faulty) = spawn_faulty(CONFIG).await;
    let (_, a) = t.org("acme").await;
    let (_, b) = t.org("other").await;
    let mut ws_a = t.ws(&a, "").await;
    let mut ws_b = t.ws(&b, "").await;
    // One transient failure of the attach: one retry, then it runs.
    faulty.fail_next(Op::ConnectNetwork, 1, FaultKind::Transient);
    let created = t
        .post(
            "/v1/instances",
            &a,
            json!({ "name": "web", "image": "busybox" }),
        )
        .await;
    let id = created.ok(202)["id"].as_str().unwrap().to_owned();
    let msgs = messages_until(&mut ws_a, |m| is_status(m, &id, "running")).await;
    let retry = msgs
        .iter()
        .find(|m| m["kind"] == "retry")
        .unwrap_or_else(|| panic!("no retry message in {msgs:#?}"));
    assert_eq!(retry["instance_id"], id.as_str());
    assert_eq!(retry["step"], "network.attach");
    assert_eq!(retry["attempt"], 1);
    assert_eq!(retry["max_attempts"], 3);
    assert_eq!(retry["error"]["code"], "engine_unavailable", "{retry}");
    assert!(
        retry["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    assert!(retry["next_attempt_at"].as_str().is_some(), "{retry}");
    assert_eq!(retry["flow_id"], created.json["flow_id"]);
    // Org B's stream: its own instance's messages up to its running, and
    // nothing of A's — though A's retry was broadcast while B listened.
    let theirs = t
        .post(
            "/v1/instances",
            &b,
            json!({ "name": "web", "image": "busybox" }),
        )
        .await;
    let bid = theirs.ok(202)["id"].as_str().unwrap().to_owned();
    let seen = messages_until(&mut ws_b, |m| is_status(m, &bid, "running")).await;
    for m in &seen {
        assert_eq!(m["instance_id"], bid.as_str(), "org B saw {m}");
        assert_ne!(m["kind"], "retry", "org B saw {m}");
    }
    t.shutdown().await;
}

#[tokio::test]
async fn an_instance_backing_off_shows_its_progress_and_lists_as_retrying() {
    let (t, faulty) = spawn_faulty(&api_support::slow_host()).await;
    let (_, a) = t.org("acme").await;
    let (_, b) = t.org("other").await;
    let mut ws = t.ws(&a, "").await;
    t.running(&a, "ok").await;
    faulty.fail_next(Op::Ping, 1, FaultKind::Transient);
    let created = t
        .post(
            "/v1/instances",
            &a,
            json!({ "name": "slow", "image": "busybox" }),
        )
        .await;
    let id = created.ok(202)["id"].as_str().unwrap().to_owned();
    messages_until(&mut ws, |m| m["kind"] == "retry" && m["instance_id"] == id).await;
    // Backing off for 30 s from here.
    let v = t.get(&format!("/v1/instances/{id}"), &a).await;
    let p = &v.ok(200)["progress"];
    assert_eq!(p["step"], "host.ensure", "{p}");
    assert_eq!(p["attempt"], 2, "the next attempt: {p}");
    assert_eq!(p["max_attempts"], 20, "{p}");
    assert_eq!(p["last_error"]["code"], "engine_unavailable", "{p}");
    assert!(p["next_attempt_at"].as_str().is_some(), "{p}");
    // A settled instance has no progress.
    let ok = t.get("/v1/instances?name=ok", &a).await;
    let ok = &ok.ok(200)["instances"];
    assert_eq!(ok.as_array().unwrap().len(), 1, "{ok}");
    assert!(ok[0]["progress"].is_null(), "{ok}");

    let names = |v: &Value| -> Vec<String> {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let r = t.get("/v1/instances?status=retrying", &a).await;
    assert_eq!(names(r.ok(200)), ["slow"]);
    assert_eq!(r.json["instances"][0]["progress"]["step"], "host.ensure");
    let r = t.get("/v1/instances?status=running", &a).await;
    assert_eq!(names(r.ok(200)), ["ok"]);
    let r = t.get("/v1/instances?status=requested", &a).await;
    assert_eq!(names(r.ok(200)), ["slow"]);
    let r = t.get("/v1/instances?name=slow", &a).await;
    assert_eq!(names(r.ok(200)), ["slow"]);
    // Another org sees none of it, by status or by name.
    let r = t.get("/v1/instances?status=retrying", &b).await;
    assert!(names(r.ok(200)).is_empty());
    let r = t.get("/v1/instances?name=slow", &b).await;
    assert!(names(r.ok(200)).is_empty());

    let e = t.get("/v1/instances?status=sleeping", &a).await;
    let e = e.bad(422, "invalid_value", "status");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("\"sleeping\""), "{msg}");
    assert!(msg.contains("running") && msg.contains("retrying"), "{msg}");
    t.get("/v1/instances?name=Not_A_Name", &a)
        .await
        .bad(422, "invalid_value", "name");
    t.shutdown().await;
}

#[tokio::test]
async fn the_document_declares_the_new_fields_and_parameters() {
    let (t, _faulty) = spawn_faulty(CONFIG).await;
    let doc = t
        .call(reqwest::Method::GET, "/v1/openapi.json", None, None)
        .await;
    let doc = doc.ok(200);
    let params = doc["paths"]["/v1/instances"]["get"]["parameters"]
        .as_array()
        .unwrap();
    let names: Vec<&str> = params.iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(
        names.contains(&"status") && names.contains(&"name"),
        "{names:?}"
    );
    let status = params.iter().find(|p| p["name"] == "status").unwrap();
    let text = status.to_string();
    assert!(text.contains("StatusFilter"), "{text}");
    let filter = &doc["components"]["schemas"]["StatusFilter"];
    assert!(filter.to_string().contains("retrying"), "{filter}");
    let view = &doc["components"]["schemas"]["InstanceView"]["properties"];
    assert!(view.get("progress").is_some(), "{view}");
    let progress = &doc["components"]["schemas"]["ProgressView"]["properties"];
    for f in [
        "step",
        "attempt",
        "max_attempts",
        "last_error",
        "next_attempt_at",
    ] {
        assert!(
            progress.get(f).is_some(),
            "ProgressView lacks {f}: {progress}"
        );
    }
    let msg = &doc["components"]["schemas"]["StreamMessage"]["properties"];
    for f in ["step", "attempt", "max_attempts", "next_attempt_at"] {
        assert!(msg.get(f).is_some(), "StreamMessage lacks {f}: {msg}");
    }
    let events = doc["paths"]["/v1/events"]["get"]["parameters"].to_string();
    assert!(events.contains("\"from\""), "{events}");
    t.shutdown().await;
}

#[tokio::test]
async fn the_stream_replays_from_the_start_only_for_its_org() {
    let (t, _faulty) = spawn_faulty(CONFIG).await;
    let (_, a) = t.org("acme").await;
    let (_, b) = t.org("other").await;
    let web = t.running(&a, "web").await;
    let theirs = t.running(&b, "web").await;
    let mut ws = t.ws(&a, "?from=start").await;
    let seen = messages_until(&mut ws, |m| {
        is_status(m, web["id"].as_str().unwrap(), "running")
    })
    .await;
    assert!(
        is_status(&seen[0], web["id"].as_str().unwrap(), "requested"),
        "{seen:#?}"
    );
    assert!(seen.iter().all(|m| m["instance_id"] != theirs["id"]));
    let both = t
        .call(
            reqwest::Method::GET,
            "/v1/events?from=start&after=01ARZ3NDEKTSV4RRFFQ69G5FAV",
            Some(&a),
            None,
        )
        .await;
    both.bad(400, "invalid_parameter", "from");
    t.shutdown().await;
}
