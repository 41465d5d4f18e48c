//! The HTTP API end to end on the real application (sim runtime, SQLite in a
//! temporary directory): a failed flow reaching the org's WebSocket and
//! `wait`, the happy path and its trace, actions, the 408 of `wait`, a
//! resumed stream, logs, dead letters, health, metrics, the OpenAPI
//! document, and a graceful shutdown with a stream open.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::collections::BTreeSet;

use api_support::{DEADLINE, TestApp, messages_until, next_message, spawn};
use berth_runtime::HostId;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn is_status(m: &Value, id: &str, status: &str) -> bool {
    m["instance_id"] == id && m["kind"] == "status" && m["status"] == status
}

#[tokio::test]
async fn a_failed_flow_reaches_the_orgs_stream_and_wait() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let mut ws = t.ws(&tok, "").await;
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "broken", "image": "no-such-base:1" }),
        )
        .await;
    let created = a.ok(202).clone();
    let id = created["id"].as_str().unwrap().to_owned();
    let flow = created["flow_id"].as_str().unwrap().to_owned();
    assert_eq!(a.headers["berth-flow-id"], flow.as_str());
    assert_eq!(created["status"], "requested");

    let msgs = messages_until(&mut ws, |m| is_status(m, &id, "failed")).await;
    let failed = msgs.last().unwrap();
    assert_eq!(failed["type"], "instance.failed");
    assert_eq!(failed["flow_id"], flow.as_str());
    assert_eq!(failed["error"]["code"], "image_not_found");
    assert_eq!(failed["error"]["step"], "image.build");
    assert!(
        failed["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-base"),
        "{failed}"
    );
    let step_error = msgs
        .iter()
        .find(|m| m["kind"] == "error")
        .expect("the step's failure is streamed before the instance's");
    assert_eq!(step_error["type"], "image.build.failed");
    assert_eq!(step_error["error"]["code"], "image_not_found");
    assert_eq!(step_error["error"]["step"], "image.build");
    assert_eq!(msgs[0]["status"], "requested", "{msgs:?}");
    assert!(msgs.iter().all(|m| m["instance_id"] == id.as_str()));

    // `wait` answers at once with the error.
    let a = t
        .get(&format!("/v1/instances/{id}/wait?timeout=1m"), &tok)
        .await;
    let e = a.error(409, "image_not_found");
    assert_eq!(e["step"], "image.build");
    assert_eq!(e["attempts"], 1);
    assert_eq!(a.json["instance"]["status"], "failed");
    assert_eq!(a.json["instance"]["id"], id.as_str());

    // So does `POST ?wait=true`, with the flow in the header.
    let a = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "broken-too", "image": "missing/base" }),
        )
        .await;
    let e = a.error(409, "image_not_found");
    assert_eq!(e["step"], "image.build");
    let inst = &a.json["instance"];
    assert_eq!(inst["status"], "failed");
    assert_eq!(inst["error"]["code"], "image_not_found");
    assert_eq!(
        a.headers["berth-flow-id"],
        inst["flow_id"].as_str().unwrap()
    );

    // The instance shows its error.
    let a = t.get(&format!("/v1/instances/{id}"), &tok).await;
    let v = a.ok(200);
    assert_eq!(v["status"], "failed");
    assert_eq!(v["error"]["code"], "image_not_found");
    assert_eq!(v["error"]["step"], "image.build");

    // The failed step is a dead letter of the org, re-drivable once.
    let a = t.get("/v1/dead-letters", &tok).await;
    let list = a.ok(200)["dead_letters"].as_array().unwrap().clone();
    let dl = list
        .iter()
        .find(|d| d["flow_id"] == flow.as_str())
        .expect("the failed step is dead-lettered");
    assert_eq!(dl["worker"], "image.build");
    assert_eq!(dl["error"]["code"], "image_not_found");
    let path = format!("/v1/dead-letters/{}/redrive", dl["id"].as_str().unwrap());
    let a = t.call(Method::POST, &path, Some(&tok), None).await;
    assert_eq!(a.ok(202)["round"], 1);
    let a = t.call(Method::POST, &path, Some(&tok), None).await;
    a.bad(409, "already_redriven", "id");
    let a = t.get("/v1/dead-letters?all=true&limit=10", &tok).await;
    assert!(a.ok(200)["dead_letters"].as_array().unwrap().len() >= 2);

    // The flow's trace shows the failed attempt.
    let a = t.get(&format!("/v1/flows/{flow}"), &tok).await;
    assert!(
        a.ok(200).to_string().contains("\"outcome\":\"fatal\""),
        "{}",
        a.text
    );
    t.shutdown().await;
}

/// Every event of a flow tree, depth first.
fn walk<'a>(events: &'a [Value], out: &mut Vec<&'a Value>) {
    for e in events {
        out.push(e);
        walk(e["children"].as_array().unwrap(), out);
    }
}

#[tokio::test]
async fn an_instance_runs_and_its_flow_is_traced() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let a = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "web", "image": "busybox", "cmd": ["sh", "-c", "serve"], "ports": [8080], "restart": "on-failure:3" }),
        )
        .await;
    let v = a.ok(200).clone();
    assert_eq!(v["status"], "running");
    assert!(v["ip"].is_string(), "{v}");
    assert_eq!(v["ports"], json!([8080]));
    assert_eq!(v["restart"], "on-failure:3");
    assert_eq!(v["conditions"].as_array().unwrap().len(), 5, "{v}");
    let flow = v["flow_id"].as_str().unwrap();
    assert_eq!(a.headers["berth-flow-id"], flow);
    let id = v["id"].as_str().unwrap();
    assert_eq!(
        a.headers["location"],
        format!("/v1/instances/{id}").as_str()
    );

    let a = t.get(&format!("/v1/flows/{flow}"), &tok).await;
    let trace = a.ok(200).clone();
    assert_eq!(trace["flow_id"], flow);
    let roots = trace["events"].as_array().unwrap();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0]["type"], "instance.requested");
    let mut all = Vec::new();
    walk(roots, &mut all);
    let types: BTreeSet<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for ty in [
        "host.ready",
        "image.built",
        "container.started",
        "instance.running",
    ] {
        assert!(types.contains(ty), "{ty} missing from {types:?}");
    }
    let built = all.iter().find(|e| e["type"] == "host.ready").unwrap();
    // image.build and network.ensure race on the instance row; the loser
    // retries, so there may be an attempt before the one that succeeded.
    let attempt = built["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["worker"] == "image.build" && a["outcome"] == "ok")
        .expect("image.build handled host.ready");
    assert!(attempt["duration_us"].is_u64());
    assert!(attempt["started_at"].is_string());

    // Logs: the backlog, then followed lines.
    let inst = t.app.store.instance(id).await.unwrap().unwrap();
    let sim = t.app.sim.clone().unwrap();
    let host = HostId::new(inst.host.clone().unwrap());
    let container = inst.container.clone().unwrap();
    sim.print(&host, &container, "hello from web").unwrap();
    let resp = t
        .http
        .get(t.url(&format!("/v1/instances/{id}/logs?tail=10")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert!(resp.text().await.unwrap().contains("hello from web\n"));
    let resp = t
        .http
        .get(t.url(&format!("/v1/instances/{id}/logs?follow=true&tail=0")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    sim.print(&host, &container, "a later line").unwrap();
    let chunk = tokio::time::timeout(DEADLINE, body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(&chunk[..], b"a later line\n");
    drop(body);
    t.shutdown().await;
}

#[tokio::test]
async fn stop_start_restart_and_delete() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let v = t.running(&tok, "web").await;
    let id = v["id"].as_str().unwrap();
    let act = |action: &str| format!("/v1/instances/{id}/{action}");

    let a = t
        .call(Method::POST, &act("stop?wait=true"), Some(&tok), None)
        .await;
    assert_eq!(a.ok(200)["status"], "stopped");
    // Nothing to do: 200 with the current state.
    let a = t.call(Method::POST, &act("stop"), Some(&tok), None).await;
    assert_eq!(a.ok(200)["status"], "stopped");
    let a = t.call(Method::POST, &act("start"), Some(&tok), None).await;
    let started = a.ok(202).clone();
    assert_ne!(started["flow_id"], v["flow_id"]);
    assert_eq!(
        a.headers["berth-flow-id"],
        started["flow_id"].as_str().unwrap()
    );
    let a = t.get(&format!("/v1/instances/{id}/wait"), &tok).await;
    assert_eq!(a.ok(200)["status"], "running");
    let a = t
        .call(Method::POST, &act("restart?wait=true"), Some(&tok), None)
        .await;
    let v2 = a.ok(200).clone();
    assert_eq!(v2["status"], "running");
    // Waiting for a state the instance will not reach by itself.
    let a = t
        .get(&format!("/v1/instances/{id}/wait?state=stopped"), &tok)
        .await;
    a.error(409, "state_unreachable");
    assert_eq!(a.json["instance"]["status"], "running");

    // A failed instance cannot be stopped.
    let failed = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "broken", "image": "nothing-here" }),
        )
        .await;
    let fid = failed.json["instance"]["id"].as_str().unwrap().to_owned();
    let a = t
        .call(
            Method::POST,
            &format!("/v1/instances/{fid}/stop"),
            Some(&tok),
            None,
        )
        .await;
    a.bad(409, "invalid_state", "id");

    let a = t
        .call(
            Method::DELETE,
            &format!("/v1/instances/{id}?wait=true"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(a.ok(200)["status"], "deleted");
    let a = t
        .call(
            Method::DELETE,
            &format!("/v1/instances/{id}"),
            Some(&tok),
            None,
        )
        .await;
    assert_eq!(a.ok(200)["status"], "deleted");
    let a = t.get("/v1/instances", &tok).await;
    let names: Vec<&str> = a.ok(200)["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["broken"]);
    let a = t.get("/v1/instances?all=true", &tok).await;
    assert_eq!(a.ok(200)["instances"].as_array().unwrap().len(), 2);
    // The name is free again.
    t.running(&tok, "web").await;
    t.shutdown().await;
}

#[tokio::test]
async fn wait_answers_408_with_the_current_state() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let sim = t.app.sim.clone().unwrap();
    let host = HostId::new("local");
    // Without an engine, the flow stays at its first step (retrying).
    sim.set_available(&host, false);
    let a = t
        .post(
            "/v1/instances?wait=true&timeout=300ms",
            &tok,
            json!({ "name": "web", "image": "busybox" }),
        )
        .await;
    let e = a.error(408, "wait_timeout");
    assert!(
        e["message"].as_str().unwrap().contains("requested"),
        "{}",
        a.text
    );
    let inst = a.json["instance"].clone();
    assert_eq!(inst["status"], "requested");
    let id = inst["id"].as_str().unwrap();
    let a = t
        .get(&format!("/v1/instances/{id}/wait?timeout=0s"), &tok)
        .await;
    a.error(408, "wait_timeout");
    sim.set_available(&host, true);
    let a = t
        .get(&format!("/v1/instances/{id}/wait?timeout=30s"), &tok)
        .await;
    assert_eq!(a.ok(200)["status"], "running");
    t.shutdown().await;
}

#[tokio::test]
async fn the_stream_resumes_after_an_event_id() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let mut live = t.ws(&tok, "").await;
    let v = t.running(&tok, "web").await;
    let id = v["id"].as_str().unwrap();
    let first = messages_until(&mut live, |m| is_status(m, id, "running")).await;
    let statuses: Vec<&str> = first
        .iter()
        .map(|m| m["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "requested",
            "provisioning",
            "building",
            "starting",
            "running"
        ]
    );
    // From the first message's id on, the same messages again, in order.
    let after = first[0]["id"].as_str().unwrap();
    let mut resumed = t.ws(&tok, &format!("?after={after}")).await;
    let again = messages_until(&mut resumed, |m| is_status(m, id, "running")).await;
    assert_eq!(again, first[1..].to_vec());
    // Live messages keep coming on both.
    t.call(
        Method::POST,
        &format!("/v1/instances/{id}/stop"),
        Some(&tok),
        None,
    )
    .await
    .ok(202);
    for ws in [&mut live, &mut resumed] {
        let m = next_message(ws).await;
        assert!(is_status(&m, id, "stopping"), "{m}");
        let m = next_message(ws).await;
        assert!(is_status(&m, id, "stopped"), "{m}");
    }
    // An unknown cursor is refused before the upgrade.
    let mut req = format!("{}/v1/events?after=01JZZZZZZZZZZZZZZZZZZZZZZZ", t.ws_base)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {tok}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404);
        }
        other => panic!("expected 404, got {other:?}"),
    }
    // A browser-style token in the query works too.
    let url = format!("{}/v1/events?access_token={tok}", t.ws_base);
    let (mut q, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    t.call(
        Method::POST,
        &format!("/v1/instances/{id}/start"),
        Some(&tok),
        None,
    )
    .await
    .ok(202);
    let m = next_message(&mut q).await;
    assert!(is_status(&m, id, "starting"), "{m}");
    t.shutdown().await;
}

/// With the database out of reach (here: its pool closed under the
/// server), the server does not hang or answer 500: `/healthz` says
/// `degraded` and every request that needs the database answers 503
/// `store_unavailable` with a `Retry-After`, having done nothing.
#[tokio::test]
async fn without_its_database_the_server_answers_503_store_unavailable() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    t.app.store.close().await;
    let a = t.call(Method::GET, "/healthz", None, None).await;
    a.error(503, "store_unavailable");
    assert_eq!(a.json["status"], "degraded", "{}", a.text);
    assert_eq!(a.headers["retry-after"], "1");
    let a = t.get("/v1/instances", &tok).await;
    a.error(503, "store_unavailable");
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox" }),
        )
        .await;
    a.error(503, "store_unavailable");
    assert!(
        !a.text.contains("pool"),
        "no internals in the answer: {}",
        a.text
    );
    t.shutdown().await;
}

#[tokio::test]
async fn health_and_metrics_answer_without_a_token() {
    let t = spawn().await;
    let a = t.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(a.ok(200)["status"], "ok");
    let (_, tok) = t.org("acme").await;
    t.running(&tok, "web").await;
    t.post(
        "/v1/instances?wait=true",
        &tok,
        json!({ "name": "broken", "image": "nothing-here" }),
    )
    .await
    .error(409, "image_not_found");
    let text = t
        .wait_for("the finished attempts in /metrics", || async {
            let a = t.call(Method::GET, "/metrics", None, None).await;
            assert!(
                a.headers["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/plain")
            );
            a.text
                .contains("berth_attempts_total{worker=\"instance.finish\",outcome=\"ok\"} 1")
                .then_some(a.text)
        })
        .await;
    // Counts of image.build include the retries of lost races on the row.
    let value = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let ok = value("berth_attempts_total{worker=\"image.build\",outcome=\"ok\"}");
    let retries = value("berth_retries_total{worker=\"image.build\"}");
    assert_eq!(
        value("berth_step_duration_seconds_bucket{worker=\"image.build\",le=\"+Inf\"}"),
        ok + retries + 1
    );
    assert_eq!(
        value("berth_step_duration_seconds_count{worker=\"image.build\"}"),
        ok + retries + 1
    );
    for needle in [
        "# TYPE berth_step_duration_seconds histogram",
        "berth_step_duration_seconds_count{worker=\"host.ensure\"}",
        "berth_attempts_total{worker=\"image.build\",outcome=\"fatal\"} 1",
        "berth_dead_letters_open{worker=\"image.build\"} 1",
        "berth_queue_depth{state=\"waiting\"}",
        "berth_queue_depth{state=\"in_flight\"}",
        "berth_deliveries_total",
        "berth_dead_letters_total 1",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    t.shutdown().await;
}

/// Fills a path template with `id`.
fn fill(path: &str, id: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..].find('}').unwrap();
        out.push_str(id);
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

/// Every `$ref` in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref" {
                    out.push(x.as_str().unwrap());
                } else {
                    refs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_openapi_document_validates_and_has_every_route() {
    let t = spawn().await;
    let a = t.call(Method::GET, "/v1/openapi.json", None, None).await;
    let doc = a.ok(200).clone();
    // A typed parse of the whole document as OpenAPI 3.1.
    let spec = oas3::from_json(&a.text).expect("the document parses as OpenAPI 3.1");
    let version = spec.validate_version().expect("a supported version");
    assert_eq!((version.major, version.minor), (3, 1));
    // What is served is what the code generates.
    let generated: Value = serde_json::from_str(&berth_api::openapi().to_json().unwrap()).unwrap();
    assert_eq!(doc["paths"], generated["paths"]);

    let expected = [
        ("POST", "/v1/orgs"),
        ("POST", "/v1/tokens"),
        ("GET", "/v1/tokens"),
        ("DELETE", "/v1/tokens/{id}"),
        ("POST", "/v1/builds"),
        ("GET", "/v1/builds"),
        ("GET", "/v1/builds/{id}"),
        ("POST", "/v1/instances"),
        ("GET", "/v1/instances"),
        ("GET", "/v1/instances/{id}"),
        ("DELETE", "/v1/instances/{id}"),
        ("POST", "/v1/instances/{id}/stop"),
        ("POST", "/v1/instances/{id}/start"),
        ("POST", "/v1/instances/{id}/restart"),
        ("GET", "/v1/instances/{id}/wait"),
        ("GET", "/v1/instances/{id}/logs"),
        ("GET", "/v1/flows/{flow_id}"),
        ("GET", "/v1/dead-letters"),
        ("POST", "/v1/dead-letters/{id}/redrive"),
        ("GET", "/v1/events"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
    ];
    let documented: BTreeSet<(String, String)> = spec
        .operations()
        .map(|(path, method, _)| (method.to_string(), path))
        .collect();
    let wanted: BTreeSet<(String, String)> = expected
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, wanted, "documented routes");

    let mut op_ids = BTreeSet::new();
    for (path, method, op) in spec.operations() {
        assert!(
            !op.responses(&spec).is_empty(),
            "{method} {path} has no responses"
        );
        let id = op.operation_id.clone().expect("an operation id");
        assert!(op_ids.insert(id.clone()), "duplicate operation id {id}");
        // Every `{param}` of the path is declared as a required path
        // parameter.
        let params = op.parameters(&spec).expect("parameters resolve");
        for seg in path.split('/').filter(|s| s.starts_with('{')) {
            let name = seg.trim_matches(|c| c == '{' || c == '}');
            assert!(
                params.iter().any(|p| p.name == name
                    && p.location == oas3::spec::ParameterIn::Path
                    && p.required == Some(true)),
                "{method} {path}: path parameter {name} not declared"
            );
        }
        op.request_body(&spec).expect("the request body resolves");
        // The router serves what the document says: no route-level 404/405.
        let (tok, id) = ("berth_x", "01jzzzzzzzzzzzzzzzzzzzzzzz");
        let resp = t
            .http
            .request(method.clone(), t.url(&fill(&path, id)))
            .bearer_auth(tok)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert!(
            status != 405 && !text.contains("route_not_found"),
            "{method} {path} is documented but not routed: {status} {text}"
        );
    }
    // Every reference resolves to a component.
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let pointer = r.strip_prefix('#').expect("local reference");
        assert!(doc.pointer(pointer).is_some(), "dangling reference {r}");
    }
    // Bearer auth is declared, and the error shape is a schema.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
    t.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_open_streams_and_finishes() {
    let t: TestApp = spawn().await;
    let (_, tok) = t.org("acme").await;
    let mut ws = t.ws(&tok, "").await;
    let follower = t.running(&tok, "web").await;
    let id = follower["id"].as_str().unwrap().to_owned();
    // A follower of logs and a waiter are open too.
    let logs = t
        .http
        .get(t.url(&format!("/v1/instances/{id}/logs?follow=true")))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status().as_u16(), 200);
    let waiter = {
        let http = t.http.clone();
        let url = t.url(&format!("/v1/instances/{id}/wait?state=deleted&timeout=5m"));
        let tok = tok.clone();
        tokio::spawn(async move { http.get(url).bearer_auth(tok).send().await })
    };
    // The waiter may or may not have reached the server before shutdown:
    // either it is answered 503 or its connection is refused.
    tokio::time::timeout(DEADLINE, t.app.shutdown())
        .await
        .expect("shutdown finishes within the deadline")
        .unwrap();
    let closed = loop {
        match tokio::time::timeout(DEADLINE, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1001);
    let mut body = logs.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(DEADLINE, body.next()).await.unwrap() {
        if chunk.is_err() {
            break;
        }
    }
    let w = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    if let Ok(resp) = w {
        assert_eq!(resp.status().as_u16(), 503);
    }
}
