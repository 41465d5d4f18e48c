//! Bad input to the HTTP API (issue 5's list): each case answers 4xx in the
//! one error shape with a stable code and the field at fault, and writes
//! nothing; env values never come back unless asked for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{ADMIN, TestApp, spawn};
use reqwest::Method;
use serde_json::{Value, json};

fn valid() -> Value {
    json!({ "name": "web", "image": "busybox", "env": { "PASSWORD": "hunter2-secret" } })
}

async fn with_org() -> (TestApp, String) {
    let t = spawn().await;
    let (_, token) = t.org("acme").await;
    (t, token)
}

#[tokio::test]
async fn malformed_json_is_refused() {
    let (t, tok) = with_org().await;
    for body in [
        &b"{\"name\": \"web\", "[..],
        b"not json",
        b"{\"name\":\"web\",\"image\":\"busybox\"} trailing",
        b"",
    ] {
        let a = t
            .raw("/v1/instances", &tok, "application/json", body.to_vec())
            .await;
        a.bad(400, "malformed_json", "body");
    }
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn wrong_types_name_the_field() {
    let (t, tok) = with_org().await;
    for (body, field) in [
        (json!({ "name": 5, "image": "busybox" }), "name"),
        (json!({ "name": "web", "image": ["busybox"] }), "image"),
        (
            json!({ "name": "web", "image": "busybox", "ports": ["80"] }),
            "ports[0]",
        ),
        (
            json!({ "name": "web", "image": "busybox", "cmd": "sh -c x" }),
            "cmd",
        ),
        (
            json!({ "name": "web", "image": "busybox", "env": ["A=1"] }),
            "env",
        ),
        (json!([1, 2]), "body"),
    ] {
        let a = t.post("/v1/instances", &tok, body).await;
        a.bad(400, "invalid_type", field);
    }
    // A non-string env value is refused without quoting it: it is a secret.
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "env": { "TOKEN": 987654321 } }),
        )
        .await;
    a.bad(400, "invalid_type", "env.TOKEN");
    assert!(!a.text.contains("987654321"), "{}", a.text);
    // Out-of-range numbers break a rule rather than a type.
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "ports": [70000] }),
        )
        .await;
    a.bad(422, "invalid_value", "ports[0]");
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "ports": [80, 8080.5] }),
        )
        .await;
    a.bad(422, "invalid_value", "ports[1]");
    t.assert_nothing_written().await;
    // A whole number written with a fraction is that number (JSON Schema's
    // `integer`, which the document promises).
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "ports": [80.0] }),
        )
        .await;
    let id = a.ok(202)["id"].as_str().unwrap().to_owned();
    let got = t.get(&format!("/v1/instances/{id}"), &tok).await;
    assert_eq!(got.ok(200)["ports"], json!([80]), "{}", got.text);
    t.shutdown().await;
}

#[tokio::test]
async fn missing_fields_are_named() {
    let (t, tok) = with_org().await;
    let a = t
        .post("/v1/instances", &tok, json!({ "name": "web" }))
        .await;
    a.bad(400, "missing_field", "image");
    let a = t
        .post("/v1/instances", &tok, json!({ "image": "busybox" }))
        .await;
    a.bad(400, "missing_field", "name");
    let a = t
        .call(Method::POST, "/v1/orgs", Some(ADMIN), Some(json!({})))
        .await;
    a.bad(400, "missing_field", "name");
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn unknown_fields_are_refused() {
    let (t, tok) = with_org().await;
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "imagee": "x" }),
        )
        .await;
    let e = a.bad(400, "unknown_field", "imagee");
    assert!(
        e["message"].as_str().unwrap().contains("image"),
        "{}",
        a.text
    );
    // Unknown query parameters too: a typo must not be ignored.
    let a = t.post("/v1/instances?wiat=true", &tok, valid()).await;
    a.bad(400, "invalid_parameter", "wiat");
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn a_body_over_one_mib_is_refused() {
    let (t, tok) = with_org().await;
    let mut body = br#"{"name":"web","image":"busybox","cmd":[""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    body.extend(br#""]}"#);
    let a = t.raw("/v1/instances", &tok, "application/json", body).await;
    a.bad(413, "payload_too_large", "body");
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_by_content_type() {
    let (t, tok) = with_org().await;
    let a = t
        .raw(
            "/v1/instances",
            &tok,
            "text/plain",
            serde_json::to_vec(&valid()).unwrap(),
        )
        .await;
    a.bad(415, "unsupported_media_type", "content-type");
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn instance_names_follow_the_dns_label_rule() {
    let (t, tok) = with_org().await;
    let long = "a".repeat(64);
    for name in ["", "-web", "Web", "web_1", "web.1", "wéb", long.as_str()] {
        let a = t
            .post(
                "/v1/instances",
                &tok,
                json!({ "name": name, "image": "busybox" }),
            )
            .await;
        let e = a.bad(422, "invalid_value", "name");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("^[a-z0-9][a-z0-9-]{0,62}$"),
            "{}",
            a.text
        );
    }
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn a_name_taken_in_the_org_is_refused_and_writes_nothing() {
    let (t, tok) = with_org().await;
    t.post("/v1/instances", &tok, valid()).await.ok(202);
    let (instances, events) = (t.count("instances").await, t.count("events").await);
    let a = t.post("/v1/instances", &tok, valid()).await;
    let e = a.bad(409, "name_taken", "name");
    assert!(!a.text.contains("hunter2"), "{}", e);
    assert_eq!(t.count("instances").await, instances);
    // Events may only have grown by the first instance's own flow.
    let own = t
        .app
        .store
        .inspect()
        .number(
            "SELECT COUNT(*) FROM events WHERE type = 'instance.requested'",
            [],
        )
        .await
        .unwrap();
    assert_eq!(own, 1, "one creation only (events before: {events})");
    // The same name in another org is fine.
    let (_, other) = t.org("other").await;
    t.post("/v1/instances", &other, valid()).await.ok(202);
    t.shutdown().await;
}

#[tokio::test]
async fn invalid_image_references_are_refused() {
    let (t, tok) = with_org().await;
    for image in [
        "",
        "BusyBox",
        "busybox:",
        "busybox:-1",
        "a//b",
        "has space",
        "app@sha256:1234",
        "registry:port/app",
        "-busybox",
    ] {
        let a = t
            .post(
                "/v1/instances",
                &tok,
                json!({ "name": "web", "image": image }),
            )
            .await;
        a.bad(422, "invalid_value", "image");
    }
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn env_keys_count_and_size_are_limited() {
    let (t, tok) = with_org().await;
    for key in ["1ABC", "A-B", "A B", "", "É"] {
        let a = t
            .post(
                "/v1/instances",
                &tok,
                json!({ "name": "web", "image": "busybox", "env": { key: "secret-value-1" } }),
            )
            .await;
        let e = a.bad(422, "invalid_value", &format!("env.{key}"));
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("^[A-Za-z_][A-Za-z0-9_]*$"),
            "{}",
            a.text
        );
        assert!(!a.text.contains("secret-value-1"), "{}", a.text);
    }
    let many: serde_json::Map<String, Value> = (0..257)
        .map(|i| (format!("K{i}"), Value::String("secret-value-2".into())))
        .collect();
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "env": many }),
        )
        .await;
    a.bad(422, "invalid_value", "env");
    assert!(
        a.json["error"]["message"].as_str().unwrap().contains("256"),
        "{}",
        a.text
    );
    assert!(!a.text.contains("secret-value-2"), "{}", a.text);
    let big = "s".repeat(33 * 1024);
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "web", "image": "busybox", "env": { "A": big, "B": big } }),
        )
        .await;
    a.bad(422, "invalid_value", "env");
    assert!(!a.text.contains("sss"), "{}", a.text);
    // At the limits, it is accepted.
    let at: serde_json::Map<String, Value> = (0..256)
        .map(|i| (format!("K{i}"), Value::String("v".into())))
        .collect();
    t.post(
        "/v1/instances",
        &tok,
        json!({ "name": "ok", "image": "busybox", "env": at }),
    )
    .await
    .ok(202);
    t.shutdown().await;
}

#[tokio::test]
async fn unknown_ids_answer_404_naming_the_field() {
    let (t, tok) = with_org().await;
    let id = "01jzzzzzzzzzzzzzzzzzzzzzzz";
    for (method, path) in [
        (Method::GET, format!("/v1/instances/{id}")),
        (Method::DELETE, format!("/v1/instances/{id}")),
        (Method::POST, format!("/v1/instances/{id}/stop")),
        (Method::POST, format!("/v1/instances/{id}/start")),
        (Method::POST, format!("/v1/instances/{id}/restart")),
        (Method::GET, format!("/v1/instances/{id}/wait")),
        (Method::GET, format!("/v1/instances/{id}/logs")),
        (Method::POST, format!("/v1/dead-letters/{id}/redrive")),
        (Method::DELETE, format!("/v1/tokens/{id}")),
    ] {
        let a = t.call(method.clone(), &path, Some(&tok), None).await;
        a.bad(404, "not_found", "id");
    }
    for flow in ["01JZZZZZZZZZZZZZZZZZZZZZZZ", "not-a-flow-id"] {
        let a = t.get(&format!("/v1/flows/{flow}"), &tok).await;
        a.bad(404, "not_found", "flow_id");
    }
    let a = t.get("/v1/nowhere", &tok).await;
    a.error(404, "route_not_found");
    let a = t.call(Method::PUT, "/v1/instances", Some(&tok), None).await;
    a.error(405, "method_not_allowed");
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn missing_malformed_unknown_and_revoked_tokens_answer_401() {
    let (t, tok) = with_org().await;
    let a = t.call(Method::GET, "/v1/instances", None, None).await;
    a.bad(401, "missing_token", "authorization");
    assert_eq!(a.headers["www-authenticate"], "Bearer");
    for header in ["Basic dXNlcjpwYXNz", "Bearer", "Bearer  ", "tok"] {
        let resp = t
            .http
            .get(t.url("/v1/instances"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{header}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "malformed_token", "{header}");
    }
    let a = t.get("/v1/instances", "berth_0000").await;
    a.bad(401, "invalid_token", "authorization");
    // The admin token does not open an org's endpoints, and an org token
    // does not create orgs.
    let a = t.get("/v1/instances", ADMIN).await;
    a.bad(401, "org_token_required", "authorization");
    let a = t.post("/v1/orgs", &tok, json!({ "name": "evil" })).await;
    a.bad(401, "admin_token_required", "authorization");
    let a = t.post("/v1/instances", "berth_0000", valid()).await;
    a.error(401, "invalid_token");
    // A second token works; once revoked, it does not.
    let second = t.call(Method::POST, "/v1/tokens", Some(&tok), None).await;
    let second = second.ok(201).clone();
    let token2 = second["token"].as_str().unwrap();
    t.get("/v1/instances", token2).await.ok(200);
    let path = format!("/v1/tokens/{}", second["id"].as_str().unwrap());
    let r = t.call(Method::DELETE, &path, Some(&tok), None).await;
    assert!(r.ok(200)["revoked_at"].is_string());
    let a = t.get("/v1/instances", token2).await;
    a.bad(401, "invalid_token", "authorization");
    let a = t.post("/v1/instances", token2, valid()).await;
    a.error(401, "invalid_token");
    t.get("/v1/instances", &tok).await.ok(200);
    t.assert_nothing_written().await;
    t.shutdown().await;
}

#[tokio::test]
async fn bad_query_parameters_are_refused_before_anything_is_done() {
    let (t, tok) = with_org().await;
    let a = t.post("/v1/instances?wait=maybe", &tok, valid()).await;
    a.bad(400, "invalid_parameter", "wait");
    // Flags are booleans, as the document declares them: `true` or
    // `false`, never `1` or a bare `?wait`.
    for q in ["wait=1", "wait", "wait=0"] {
        let a = t.post(&format!("/v1/instances?{q}"), &tok, valid()).await;
        a.bad(400, "invalid_parameter", "wait");
    }
    let a = t
        .post("/v1/instances?wait=true&timeout=soon", &tok, valid())
        .await;
    a.bad(400, "invalid_parameter", "timeout");
    let a = t
        .post("/v1/instances?wait=true&timeout=1h", &tok, valid())
        .await;
    a.bad(422, "invalid_value", "timeout");
    t.assert_nothing_written().await;
    let created = t.post("/v1/instances", &tok, valid()).await;
    let id = created.ok(202)["id"].as_str().unwrap().to_owned();
    let a = t
        .get(&format!("/v1/instances/{id}/wait?state=building"), &tok)
        .await;
    a.bad(422, "invalid_value", "state");
    let a = t
        .get(&format!("/v1/instances/{id}/logs?tail=-1"), &tok)
        .await;
    a.bad(400, "invalid_parameter", "tail");
    let a = t
        .get(&format!("/v1/instances/{id}?reveal=please"), &tok)
        .await;
    a.bad(400, "invalid_parameter", "reveal");
    let a = t.get("/v1/dead-letters?limit=0", &tok).await;
    a.bad(400, "invalid_parameter", "limit");
    let a = t.get("/v1/events", &tok).await;
    a.error(400, "websocket_required");
    t.shutdown().await;
}

#[tokio::test]
async fn env_values_are_secrets() {
    let (t, tok) = with_org().await;
    let secret = "hunter2-secret";
    let v = t.running(&tok, "web").await;
    let created = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "api", "image": "busybox", "env": { "PASSWORD": secret, "EMPTY": "" } }),
        )
        .await;
    let created = created.ok(200).clone();
    assert_eq!(created["env"]["PASSWORD"], "***");
    assert_eq!(created["env"]["EMPTY"], "***");
    let id = created["id"].as_str().unwrap();
    let a = t.get(&format!("/v1/instances/{id}"), &tok).await;
    assert_eq!(a.ok(200)["env"]["PASSWORD"], "***");
    assert!(!a.text.contains(secret));
    let a = t.get("/v1/instances", &tok).await;
    assert!(!a.text.contains(secret), "{}", a.text);
    assert!(!a.text.contains("web-env-value"), "{}", a.text);
    assert_eq!(v["env"]["SECRET"], "***");
    // Asked for, they are shown.
    let a = t
        .get(&format!("/v1/instances/{id}?reveal=true"), &tok)
        .await;
    assert_eq!(a.ok(200)["env"]["PASSWORD"], secret);
    let a = t.get("/v1/instances?reveal=true", &tok).await;
    assert!(a.text.contains(secret));
    // Never in the flow trace or the event log.
    let flow = created["flow_id"].as_str().unwrap();
    let a = t.get(&format!("/v1/flows/{flow}"), &tok).await;
    a.ok(200);
    assert!(!a.text.contains(secret), "{}", a.text);
    let leaked = t
        .app
        .store
        .inspect()
        .number(
            "SELECT (SELECT COUNT(*) FROM events WHERE payload LIKE '%hunter2%')
              + (SELECT COUNT(*) FROM attempts WHERE error LIKE '%hunter2%')",
            [],
        )
        .await
        .unwrap();
    assert_eq!(leaked, 0);
    t.shutdown().await;
}
