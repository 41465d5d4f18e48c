//! The tenancy matrix: two orgs, every endpoint of the OpenAPI document,
//! and every access by one org to the other's ids answering 404 (exactly
//! as for an id that does not exist) or 401, with no byte of the other
//! org's data, the WebSocket stream included.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::collections::BTreeSet;

use api_support::{ADMIN, Answer, TestApp, messages_until, spawn};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// What org A has, as B must never see it.
struct Alpha {
    org: String,
    token: String,
    running: Value,
    failed: Value,
    dead_letter: String,
    second_token: String,
    event: String,
    build: String,
}

impl Alpha {
    /// Strings that appear in nothing of B's unless leaked.
    fn markers(&self) -> Vec<String> {
        let mut m = vec![
            "alpha".to_owned(),
            self.org.clone(),
            self.dead_letter.clone(),
            self.second_token.clone(),
            self.event.clone(),
            self.build.clone(),
        ];
        for i in [&self.running, &self.failed] {
            for k in ["id", "flow_id", "name"] {
                m.push(i[k].as_str().unwrap().to_owned());
            }
        }
        m.push(self.running["ip"].as_str().unwrap().to_owned());
        m
    }
}

async fn alpha(t: &TestApp) -> Alpha {
    let (org, token) = t.org("alpha-corp").await;
    let mut ws = t.ws(&token, "").await;
    let running = t.running(&token, "alpha-web").await;
    let failed = t
        .post(
            "/v1/instances?wait=true",
            &token,
            json!({ "name": "alpha-broken", "image": "alpha-missing-base" }),
        )
        .await;
    let failed = failed.json["instance"].clone();
    let msgs = messages_until(&mut ws, |m| {
        m["instance_id"] == failed["id"] && m["status"] == "failed"
    })
    .await;
    let dls = t.get("/v1/dead-letters", &token).await;
    let dead_letter = dls.ok(200)["dead_letters"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = t.call(Method::POST, "/v1/tokens", Some(&token), None).await;
    let second_token = second.ok(201)["id"].as_str().unwrap().to_owned();
    let tar = berth_runtime::context::tar_of(&[("Dockerfile", b"FROM busybox\nLABEL alpha=1\n")])
        .unwrap();
    let build = t.raw("/v1/builds", &token, "application/x-tar", tar).await;
    let build = build.ok(201)["id"].as_str().unwrap().to_owned();
    Alpha {
        build,
        org,
        token,
        running,
        failed,
        dead_letter,
        second_token,
        event: msgs[0]["id"].as_str().unwrap().to_owned(),
    }
}

/// `answer` is the same as `baseline` except where it quotes the id the
/// caller sent: another org's id is indistinguishable from a made-up one.
#[track_caller]
fn same_as_unknown(answer: &Answer, id: &str, baseline: &Answer, fake: &str) {
    assert_eq!(answer.status, baseline.status, "{}", answer.text);
    assert_eq!(
        answer.text.replace(id, "<id>"),
        baseline.text.replace(fake, "<id>"),
    );
}

#[tokio::test]
async fn one_org_never_sees_another() {
    let t = spawn().await;
    let (_, b) = t.org("beta-corp").await;
    let mut b_ws = t.ws(&b, "").await;
    let a = alpha(&t).await;
    let markers = a.markers();
    let clean = |what: &str, ans: &Answer| {
        for m in &markers {
            assert!(
                !ans.text.contains(m.as_str()),
                "{what}: B's answer shows A's {m:?}: {}",
                ans.text
            );
        }
    };
    let fake = "01jzzzzzzzzzzzzzzzzzzzzzzz";
    let run = a.running["id"].as_str().unwrap();
    let run_flow = a.running["flow_id"].as_str().unwrap();
    let failed_flow = a.failed["flow_id"].as_str().unwrap();

    // (method, path template, the id of A's it is filled with): every
    // documented route must be here.
    let cases: Vec<(Method, &str, Option<&str>)> = vec![
        (Method::POST, "/v1/orgs", None),
        (Method::POST, "/v1/tokens", None),
        (Method::GET, "/v1/tokens", None),
        (Method::DELETE, "/v1/tokens/{id}", Some(&a.second_token)),
        (Method::POST, "/v1/builds", None),
        (Method::GET, "/v1/builds", None),
        (Method::GET, "/v1/builds/{id}", Some(&a.build)),
        (Method::POST, "/v1/instances", None),
        (Method::GET, "/v1/instances", None),
        (Method::GET, "/v1/instances/{id}", Some(run)),
        (Method::DELETE, "/v1/instances/{id}", Some(run)),
        (Method::POST, "/v1/instances/{id}/stop", Some(run)),
        (Method::POST, "/v1/instances/{id}/start", Some(run)),
        (Method::POST, "/v1/instances/{id}/restart", Some(run)),
        (Method::GET, "/v1/instances/{id}/wait", Some(run)),
        (Method::GET, "/v1/instances/{id}/logs", Some(run)),
        (Method::GET, "/v1/flows/{flow_id}", Some(run_flow)),
        (Method::GET, "/v1/dead-letters", None),
        (
            Method::POST,
            "/v1/dead-letters/{id}/redrive",
            Some(&a.dead_letter),
        ),
        (Method::GET, "/v1/events", None),
        (Method::GET, "/v1/openapi.json", None),
        (Method::GET, "/healthz", None),
        (Method::GET, "/metrics", None),
    ];
    let doc = t.call(Method::GET, "/v1/openapi.json", None, None).await;
    let mut documented = BTreeSet::new();
    for (path, item) in doc.json["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let covered: BTreeSet<(String, String)> = cases
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(
        covered, documented,
        "the matrix covers every documented route"
    );

    for (method, template, id) in &cases {
        let public = ["/v1/openapi.json", "/healthz", "/metrics"].contains(template);
        let path = |id: &str| template.replace("{id}", id).replace("{flow_id}", id);
        match id {
            Some(id) => {
                let theirs = t.call(method.clone(), &path(id), Some(&b), None).await;
                let unknown = t.call(method.clone(), &path(fake), Some(&b), None).await;
                assert_eq!(
                    theirs.status.as_u16(),
                    404,
                    "{method} {template}: {}",
                    theirs.text
                );
                same_as_unknown(&theirs, id, &unknown, fake);
            }
            None if public => {
                let ans = t.call(method.clone(), template, None, None).await;
                assert_eq!(ans.status.as_u16(), 200, "{template}");
                clean(template, &ans);
            }
            None => {
                let body = match (method.clone(), *template) {
                    (Method::POST, "/v1/orgs") => Some(json!({ "name": "gamma-corp" })),
                    (Method::POST, "/v1/instances") => {
                        Some(json!({ "name": "beta-web", "image": "busybox" }))
                    }
                    _ => None,
                };
                let ans = t.call(method.clone(), template, Some(&b), body).await;
                match *template {
                    "/v1/orgs" => ans.error(401, "admin_token_required"),
                    // A JSON call is no build context.
                    "/v1/builds" if *method == Method::POST => {
                        ans.error(415, "unsupported_media_type")
                    }
                    "/v1/events" => ans.error(400, "websocket_required"),
                    _ => {
                        assert!(ans.status.is_success(), "{method} {template}: {}", ans.text);
                        &ans.json
                    }
                };
                clean(&format!("{method} {template}"), &ans);
            }
        }
        if !public {
            // Without a token, or with the admin token (which is no org's),
            // nothing either.
            let p = path(id.unwrap_or(fake));
            let none = t.call(method.clone(), &p, None, None).await;
            none.error(401, "missing_token");
            if *template != "/v1/orgs" {
                let admin = t.call(method.clone(), &p, Some(ADMIN), None).await;
                admin.error(401, "org_token_required");
            }
        }
    }
    // A's other flow and the unfiltered lists.
    let ans = t.get(&format!("/v1/flows/{failed_flow}"), &b).await;
    ans.error(404, "not_found");
    for p in [
        "/v1/instances?all=true&reveal=true",
        "/v1/dead-letters?all=true",
        "/v1/tokens",
    ] {
        let ans = t.get(p, &b).await;
        ans.ok(200);
        clean(p, &ans);
    }
    let ans = t.get("/v1/dead-letters?all=true", &b).await;
    assert_eq!(ans.json["dead_letters"], json!([]));

    // A's stream cursor is not B's.
    let mut req = format!("{}/v1/events?after={}", t.ws_base, a.event)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {b}").parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404);
            let body = String::from_utf8(resp.body().clone().unwrap_or_default()).unwrap();
            assert_eq!(
                body.replace(&a.event, "<id>"),
                format!(
                    "{{\"error\":{{\"code\":\"not_found\",\"message\":\"no event with id '<id>'\",\"field\":\"after\"}}}}"
                )
            );
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // B's stream saw nothing of A: B's own instance's messages come first.
    let b_inst = t.get("/v1/instances", &b).await;
    let b_id = b_inst.json["instances"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let msgs = messages_until(&mut b_ws, |m| {
        m["instance_id"] == b_id.as_str() && m["status"] == "running"
    })
    .await;
    for m in &msgs {
        assert_eq!(m["instance_id"], b_id.as_str(), "B's stream: {m}");
        let text = m.to_string();
        for k in &markers {
            assert!(
                !text.contains(k.as_str()),
                "B's stream shows A's {k}: {text}"
            );
        }
    }

    // A is untouched by all of B's attempts.
    let ans = t.get(&format!("/v1/instances/{run}"), &a.token).await;
    assert_eq!(ans.ok(200)["status"], "running");
    assert_eq!(ans.json["flow_id"], run_flow);
    let ans = t.get("/v1/dead-letters", &a.token).await;
    assert_eq!(ans.ok(200)["dead_letters"][0]["redriven_at"], Value::Null);
    let ans = t.get("/v1/tokens", &a.token).await;
    assert!(
        ans.ok(200)["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .all(|tk| tk["revoked_at"].is_null())
    );
    // And A's stream saw nothing of B.
    let mut a_ws = t.ws(&a.token, &format!("?after={}", a.event)).await;
    t.call(
        Method::POST,
        &format!("/v1/instances/{run}/stop"),
        Some(&a.token),
        None,
    )
    .await
    .ok(202);
    let msgs = messages_until(&mut a_ws, |m| {
        m["instance_id"] == run && m["status"] == "stopped"
    })
    .await;
    for m in &msgs {
        assert!(
            !m.to_string().contains(&b_id),
            "A's stream shows B's instance: {m}"
        );
    }
    // Names are per org: B may use A's.
    t.post(
        "/v1/instances",
        &b,
        json!({ "name": "alpha-web", "image": "busybox" }),
    )
    .await
    .ok(202);
    t.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_cannot_open_the_stream() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let second = t.call(Method::POST, "/v1/tokens", Some(&tok), None).await;
    let second = second.ok(201).clone();
    let token2 = second["token"].as_str().unwrap();
    t.ws(token2, "").await;
    t.call(
        Method::DELETE,
        &format!("/v1/tokens/{}", second["id"].as_str().unwrap()),
        Some(&tok),
        None,
    )
    .await
    .ok(200);
    for token in [Some(token2), None, Some("berth_bogus")] {
        let mut req = format!("{}/v1/events", t.ws_base)
            .into_client_request()
            .unwrap();
        if let Some(tk) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {tk}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 401, "{token:?}");
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    let url = format!("{}/v1/events?access_token={token2}", t.ws_base);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
        }
        other => panic!("expected 401, got {other:?}"),
    }
    t.shutdown().await;
}
