//! What `POST /v1/instances` and `POST /v1/builds` refuse before anything is
//! written — image ids, both or neither of image and build, limits out of
//! range, contexts that are not tars or cannot be checked, uploads over the
//! size limit — and the org quotas (instances, builds), which hold under
//! concurrent creations and free up again on delete. On the simulated
//! runtime; `tenancy_docker` tries the same on the real engine.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{CONFIG, spawn, spawn_with};
use reqwest::Method;
use serde_json::json;

const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn tar(dockerfile: &str) -> Vec<u8> {
    berth_runtime::context::tar_of(&[("Dockerfile", dockerfile.as_bytes())]).unwrap()
}

/// The test configuration (the simulated runtime) with these variables.
fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn image_ids_and_unclear_requests_are_refused_and_nothing_is_written() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    for (body, field) in [
        (json!({ "name": "a", "image": ID }), "image"),
        (json!({ "name": "a", "image": &ID[7..] }), "image"),
        (json!({ "name": "a", "image": "sha256:01" }), "image"),
        (
            json!({ "name": "a", "image": "busybox", "build": "b0" }),
            "build",
        ),
        (json!({ "name": "a", "build": "Not An Id" }), "build"),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "memory": "5MiB" } }),
            "limits.memory",
        ),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "memory": "5GiB" } }),
            "limits.memory",
        ),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "cpus": 0 } }),
            "limits.cpus",
        ),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "cpus": 4.5 } }),
            "limits.cpus",
        ),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "pids": 0 } }),
            "limits.pids",
        ),
        (
            json!({ "name": "a", "image": "busybox", "limits": { "pids": 5000 } }),
            "limits.pids",
        ),
    ] {
        let a = t.post("/v1/instances", &tok, body.clone()).await;
        a.bad(422, "invalid_value", field);
        assert!(
            a.json["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field.split('.').next_back().unwrap()),
            "{body}: the message names what is wrong: {}",
            a.text
        );
    }
    // A well-formed build id the org has nothing under is not found.
    let a = t
        .post(
            "/v1/instances",
            &tok,
            json!({ "name": "a", "build": "bdoesnotexist" }),
        )
        .await;
    a.bad(404, "not_found", "build");
    let a = t.post("/v1/instances", &tok, json!({ "name": "a" })).await;
    a.bad(400, "missing_field", "image");
    t.assert_nothing_written().await;
    // What is accepted shows its limits, the defaults filling what is left out.
    let a = t
        .post(
            "/v1/instances?wait=true",
            &tok,
            json!({ "name": "ok", "image": "busybox", "limits": { "memory": "128MiB" } }),
        )
        .await;
    assert_eq!(
        a.ok(200)["limits"],
        json!({ "memory": "128MiB", "cpus": 1.0, "pids": 512 })
    );
    t.shutdown().await;
}

#[tokio::test]
async fn the_instance_quota_holds_under_concurrent_creations() {
    let t = spawn_with(CONFIG, env(&[("BERTH_LIMITS__MAX_INSTANCES_PER_ORG", "3")])).await;
    let (_, a) = t.org("alpha").await;
    let (_, b) = t.org("beta").await;
    // Ten at once: exactly three get in.
    let mut calls = Vec::new();
    for n in 0..10 {
        calls.push(t.post(
            "/v1/instances",
            &a,
            json!({ "name": format!("i{n}"), "image": "busybox" }),
        ));
    }
    let answers = futures::future::join_all(calls).await;
    let ok = answers.iter().filter(|x| x.status.as_u16() == 202).count();
    assert_eq!(
        ok,
        3,
        "{:?}",
        answers.iter().map(|x| &x.text).collect::<Vec<_>>()
    );
    for x in answers.iter().filter(|x| x.status.as_u16() != 202) {
        x.error(409, "quota_exceeded");
        assert!(x.text.contains("max_instances_per_org"), "{}", x.text);
    }
    assert_eq!(
        t.count("instances").await,
        3,
        "nothing written past the quota"
    );
    // Another org has its own quota.
    let x = t
        .post(
            "/v1/instances",
            &b,
            json!({ "name": "i0", "image": "busybox" }),
        )
        .await;
    assert_eq!(x.status.as_u16(), 202, "{}", x.text);
    // A name taken is still name_taken, not the quota, below it.
    let first = answers.iter().find(|x| x.status.as_u16() == 202).unwrap();
    let id = first.json["id"].as_str().unwrap();
    let gone = t
        .call(
            Method::DELETE,
            &format!("/v1/instances/{id}?wait=true"),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(gone.status.as_u16(), 200, "{}", gone.text);
    let name = t.get(&format!("/v1/instances/{id}"), &a).await.json["name"].clone();
    let again = t
        .post(
            "/v1/instances",
            &a,
            json!({ "name": "i-new", "image": "busybox" }),
        )
        .await;
    assert_eq!(
        again.status.as_u16(),
        202,
        "a deleted instance frees its place: {}",
        again.text
    );
    let dup = t
        .post(
            "/v1/instances",
            &a,
            json!({ "name": name, "image": "busybox" }),
        )
        .await;
    dup.error(409, "quota_exceeded");
    t.shutdown().await;
}

#[tokio::test]
async fn build_contexts_are_checked_at_upload() {
    let t = spawn_with(
        CONFIG,
        env(&[
            ("BERTH_LIMITS__MAX_BUILD_CONTEXT", "4KiB"),
            ("BERTH_LIMITS__MAX_BUILDS_PER_ORG", "2"),
        ]),
    )
    .await;
    let (_, a) = t.org("alpha").await;
    let (_, b) = t.org("beta").await;
    let ok = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM busybox\nCMD [\"true\"]\n"),
        )
        .await;
    let v = ok.ok(201).clone();
    assert!(v["digest"].as_str().unwrap().starts_with("sha256:"), "{v}");
    assert_eq!(v["bases"], json!(["busybox"]));
    // Content-addressed within the org: the same bytes, the same build.
    let same = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM busybox\nCMD [\"true\"]\n"),
        )
        .await;
    assert_eq!(same.ok(200)["id"], v["id"]);
    // Another org uploading the same bytes learns nothing: its own build.
    let theirs = t
        .raw(
            "/v1/builds",
            &b,
            "application/x-tar",
            tar("FROM busybox\nCMD [\"true\"]\n"),
        )
        .await;
    assert_eq!(theirs.status.as_u16(), 201, "{}", theirs.text);
    assert_ne!(theirs.json["id"], v["id"]);
    let peek = t
        .get(&format!("/v1/builds/{}", v["id"].as_str().unwrap()), &b)
        .await;
    peek.error(404, "not_found");
    assert_eq!(
        t.get("/v1/builds", &b).await.json["builds"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let json_body = t.post("/v1/builds", &a, json!({})).await;
    json_body.error(415, "unsupported_media_type");
    let big = t
        .raw("/v1/builds", &a, "application/x-tar", vec![0u8; 8192])
        .await;
    big.error(413, "payload_too_large");
    for (body, needle) in [
        (b"definitely not a tar".to_vec(), "tar archive"),
        (
            berth_runtime::context::tar_of(&[("README", b"x")]).unwrap(),
            "no Dockerfile",
        ),
        (tar("ARG B=busybox\nFROM $B\n"), "variable"),
        (tar(&format!("FROM {ID}\n")), "image id"),
        (
            tar("FROM busybox\nCOPY --from=alpine:3 /x /x\n"),
            "no earlier stage",
        ),
        // A FROM hidden from the check by another escape character.
        (
            tar("# escape=`\nFROM busybox\nRUN echo \\\nFROM berth/other/build:1\n"),
            "escape",
        ),
    ] {
        let x = t.raw("/v1/builds", &a, "application/x-tar", body).await;
        x.bad(422, "invalid_build", "body");
        assert!(x.text.contains(needle), "{needle}: {}", x.text);
    }
    // The build quota.
    let second = t
        .raw("/v1/builds", &a, "application/x-tar", tar("FROM busybox\n"))
        .await;
    second.ok(201);
    let third = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM busybox:1\n"),
        )
        .await;
    third.error(409, "quota_exceeded");
    assert_eq!(t.count("builds").await, 3, "A's two and B's one");
    t.shutdown().await;
}

#[tokio::test]
async fn an_instance_from_a_build_runs_and_a_failing_build_says_where() {
    let t = spawn().await;
    let (_, a) = t.org("alpha").await;
    let ok = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM busybox\nCMD [\"true\"]\n"),
        )
        .await;
    let id = ok.ok(201)["id"].clone();
    let one = t
        .post(
            "/v1/instances?wait=true",
            &a,
            json!({ "name": "one", "build": id }),
        )
        .await;
    let one = one.ok(200).clone();
    assert_eq!(one["build"], id);
    assert!(
        one["image_id"].as_str().unwrap().starts_with("sha256:"),
        "{one}"
    );
    let two = t
        .post(
            "/v1/instances?wait=true",
            &a,
            json!({ "name": "two", "build": id }),
        )
        .await;
    assert_eq!(
        two.ok(200)["image_id"],
        one["image_id"],
        "one image per context"
    );
    let broken = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM busybox\nRUN exit 2\n"),
        )
        .await;
    let x = t
        .post(
            "/v1/instances?wait=true",
            &a,
            json!({ "name": "broken", "build": broken.ok(201)["id"] }),
        )
        .await;
    let err = x.error(409, "build_failed");
    assert_eq!(err["step"], "image.build", "{}", x.text);
    assert!(
        err["message"].as_str().unwrap().contains("RUN exit 2"),
        "{}",
        x.text
    );
    // A base the host does not have reads like one that is another org's.
    let missing = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar("FROM nothere:1\n"),
        )
        .await;
    let x = t
        .post(
            "/v1/instances?wait=true",
            &a,
            json!({ "name": "missing", "build": missing.ok(201)["id"] }),
        )
        .await;
    x.error(409, "image_not_found");
    t.shutdown().await;
}
