//! Tenancy on a shared engine, through the API on the real Docker engine:
//! two orgs on one engine, every way of naming another org's image tried
//! (its built tag, its id, id prefixes, a build context `FROM` it) — none
//! runs and no secret is read; no image Berth made holds an env value;
//! containers run with their limits and options; builds from uploaded
//! contexts (shared per context, failures with their step); a container
//! that exits at once is `exited`, not `running`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::collections::HashMap;

use api_support::{TestApp, docker_config, spawn_with};
use berth_docker::bollard::Docker;
use berth_docker::bollard::query_parameters::{
    InspectContainerOptions, ListContainersOptions, ListImagesOptions,
};
use futures::StreamExt;
use serde_json::{Value, json};

const BASE: &str = "berth-test-base:latest";

/// Berth on the local engine with the base image on it; `None` without an
/// engine (a failure under `CI=true`).
async fn docker_app() -> Option<(TestApp, Docker)> {
    let client = api_support::docker_engine().await?;
    let t = spawn_with(&docker_config(), Vec::new()).await;
    Some((t, client))
}

/// Removes everything of this app's installation from the engine.
async fn sweep(t: &TestApp, docker: &Docker) {
    let install = format!("berth.install={}", t.app.store.install_id());
    api_support::sweep_label(docker, &install).await;
}

/// Ids of every (tagged) image this installation made; `history` covers
/// the layers under each.
async fn berth_images(t: &TestApp, docker: &Docker) -> Vec<String> {
    let install = format!("berth.install={}", t.app.store.install_id());
    let filters = HashMap::from([("label".to_owned(), vec![install])]);
    docker
        .list_images(Some(ListImagesOptions {
            all: false,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect()
}

fn tar(dockerfile: &str) -> Vec<u8> {
    berth_runtime::context::tar_of(&[
        ("Dockerfile", dockerfile.as_bytes()),
        ("hello.txt", b"hello from the context\n"),
    ])
    .unwrap()
}

async fn upload(t: &TestApp, token: &str, dockerfile: &str) -> Value {
    t.raw("/v1/builds", token, "application/x-tar", tar(dockerfile))
        .await
        .json
        .clone()
}

/// Creates and waits; returns (HTTP status, body).
async fn create(t: &TestApp, token: &str, body: Value) -> (u16, Value) {
    let a = t
        .post("/v1/instances?wait=true&timeout=60s", token, body)
        .await;
    (a.status.as_u16(), a.json.clone())
}

/// The container of instance `id`, as the engine describes it.
async fn container_of(
    docker: &Docker,
    id: &str,
) -> berth_docker::bollard::models::ContainerInspectResponse {
    let filters = HashMap::from([("label".to_owned(), vec![format!("berth.instance={id}")])]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert_eq!(list.len(), 1, "one container for {id}");
    docker
        .inspect_container(
            list[0].id.as_deref().unwrap(),
            None::<InspectContainerOptions>,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn no_reference_reaches_another_orgs_image_or_secret() {
    let Some((t, docker)) = docker_app().await else {
        return;
    };
    let (a_org, a) = t.org("alpha").await;
    let (b_org, b) = t.org("beta").await;
    let secret = format!("alpha-secret-{}", t.app.store.install_id());
    let env = json!({ "SECRET": secret });
    let (code, web) = create(
        &t,
        &a,
        json!({ "name": "web", "image": BASE, "env": env, "cmd": ["sleep", "3600"] }),
    )
    .await;
    assert_eq!(code, 200, "{web}");
    let base_id = web["image_id"].as_str().unwrap().to_owned();
    assert!(base_id.starts_with("sha256:"), "{web}");
    let built = upload(
        &t,
        &a,
        &format!("FROM {BASE}\nCOPY hello.txt /hello.txt\nCMD [\"sleep\", \"3600\"]\n"),
    )
    .await;
    let build = built["id"].as_str().unwrap();
    let (code, app) = create(&t, &a, json!({ "name": "app", "build": build, "env": env })).await;
    assert_eq!(code, 200, "{app}");
    let a_image = app["image_id"].as_str().unwrap().to_owned();
    let a_tag = format!(
        "berth/{a_org}/build:{}",
        built["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    );
    assert_eq!(
        docker.inspect_image(&a_tag).await.unwrap().id.as_deref(),
        Some(a_image.as_str()),
        "A's build is tagged as guessed"
    );

    // B tries every way of naming A's images. Ids are refused as such; every
    // name fails the flow with the same words as a name nothing has.
    let unknown = format!("berth/{b_org}/build:{}", "0".repeat(64));
    let (_, never) = create(
        &t,
        &b,
        json!({ "name": "probe", "image": unknown, "cmd": ["sh", "-c", "echo $SECRET"] }),
    )
    .await;
    let never_msg = never["error"]["message"]
        .as_str()
        .unwrap()
        .replace(&unknown, "<ref>");
    let hex = a_image.trim_start_matches("sha256:");
    let base_hex = base_id.trim_start_matches("sha256:");
    let mut n = 0;
    for id in [
        a_image.clone(),
        hex.to_owned(),
        base_id.clone(),
        base_hex.to_owned(),
    ] {
        n += 1;
        let ans = t
            .post(
                "/v1/instances",
                &b,
                json!({ "name": format!("id{n}"), "image": id, "cmd": ["sh", "-c", "echo $SECRET"] }),
            )
            .await;
        ans.bad(422, "invalid_value", "image");
    }
    let guesses = [
        a_tag.clone(),
        format!("berth/{a_org}/web:g1"),
        hex[..12].to_owned(),
        hex[..4].to_owned(),
        hex[..2].to_owned(),
        format!("{}:latest", &hex[..2]),
        base_hex[..2].to_owned(),
    ];
    for (i, guess) in guesses.iter().enumerate() {
        let (code, ans) = create(
            &t,
            &b,
            json!({ "name": format!("guess{i}"), "image": guess, "cmd": ["sh", "-c", "echo $SECRET"] }),
        )
        .await;
        assert_eq!(code, 409, "{guess}: {ans}");
        assert_eq!(ans["error"]["code"], "image_not_found", "{guess}: {ans}");
        let msg = ans["error"]["message"]
            .as_str()
            .unwrap()
            .replace(guess.as_str(), "<ref>");
        assert_eq!(msg, never_msg, "{guess}: the words tell nothing");
    }
    // A build context of B's FROM A's image: refused the same way.
    let from_a = upload(
        &t,
        &b,
        &format!("FROM {a_tag}\nCMD [\"sh\", \"-c\", \"echo $SECRET\"]\n"),
    )
    .await;
    let (code, ans) = create(&t, &b, json!({ "name": "froma", "build": from_a["id"] })).await;
    assert_eq!(code, 409, "{ans}");
    assert_eq!(ans["error"]["code"], "image_not_found", "{ans}");
    // And one FROM an id is refused at upload.
    let ans = t
        .raw(
            "/v1/builds",
            &b,
            "application/x-tar",
            tar(&format!("FROM {a_image}\n")),
        )
        .await;
    ans.bad(422, "invalid_build", "body");
    // B's other org's build id is no build of B's.
    let ans = t
        .post(
            "/v1/instances",
            &b,
            json!({ "name": "steal", "build": build }),
        )
        .await;
    ans.bad(404, "not_found", "build");

    // Nothing of B's ever ran.
    let filters = HashMap::from([("label".to_owned(), vec![format!("berth.org={b_org}")])]);
    let b_containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap();
    assert!(b_containers.is_empty(), "{b_containers:?}");

    // No image Berth made holds an env value, in its config or a layer.
    let images = berth_images(&t, &docker).await;
    assert!(!images.is_empty());
    for id in images {
        let inspect = serde_json::to_string(&docker.inspect_image(&id).await.unwrap()).unwrap();
        let history = serde_json::to_string(&docker.image_history(&id).await.unwrap()).unwrap();
        for text in [inspect, history] {
            assert!(!text.contains(&secret), "{id} holds the secret");
            assert!(!text.contains("SECRET="), "{id} holds the env: {text}");
        }
    }
    // The secret is in A's container's configuration, where it belongs.
    let c = container_of(&docker, web["id"].as_str().unwrap()).await;
    let env = c.config.unwrap().env.unwrap_or_default();
    assert!(env.contains(&format!("SECRET={secret}")), "{env:?}");
    assert_eq!(
        c.image.as_deref(),
        Some(base_id.as_str()),
        "the container runs the pinned id"
    );
    sweep(&t, &docker).await;
    t.shutdown().await;
}

#[tokio::test]
async fn containers_run_with_their_limits_and_without_privileges() {
    let Some((t, docker)) = docker_app().await else {
        return;
    };
    let (_, a) = t.org("limited").await;
    let (code, small) = create(
        &t,
        &a,
        json!({
            "name": "small", "image": BASE, "cmd": ["sleep", "3600"],
            "limits": { "memory": "64MiB", "cpus": 0.5, "pids": 100 },
        }),
    )
    .await;
    assert_eq!(code, 200, "{small}");
    assert_eq!(
        small["limits"],
        json!({ "memory": "64MiB", "cpus": 0.5, "pids": 100 })
    );
    let (code, plain) = create(
        &t,
        &a,
        json!({ "name": "plain", "image": BASE, "cmd": ["sleep", "3600"] }),
    )
    .await;
    assert_eq!(code, 200, "{plain}");
    for (inst, memory, cpus, pids) in [
        (&small, 64 << 20, 500_000_000, 100),
        (&plain, 512 << 20, 1_000_000_000, 512),
    ] {
        let hc = container_of(&docker, inst["id"].as_str().unwrap())
            .await
            .host_config
            .unwrap();
        assert_eq!(hc.memory, Some(memory));
        assert_eq!(hc.memory_swap, Some(memory));
        assert_eq!(hc.nano_cpus, Some(cpus));
        assert_eq!(hc.pids_limit, Some(pids));
        assert_eq!(hc.privileged, Some(false));
        assert_eq!(
            hc.security_opt.clone().unwrap_or_default(),
            vec!["no-new-privileges:true".to_owned()]
        );
        let dropped = hc.cap_drop.clone().unwrap_or_default();
        for cap in ["NET_RAW", "MKNOD", "SYS_CHROOT", "AUDIT_WRITE"] {
            assert!(dropped.iter().any(|c| c == cap), "{cap}: {dropped:?}");
        }
        let log = hc.log_config.clone().unwrap();
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let opts = log.config.unwrap_or_default();
        assert_eq!(opts.get("max-size").map(String::as_str), Some("10m"));
        assert_eq!(opts.get("max-file").map(String::as_str), Some("3"));
    }
    // Asking for more than the maxima is refused, naming the field.
    let ans = t
        .post(
            "/v1/instances",
            &a,
            json!({ "name": "big", "image": BASE, "limits": { "memory": "64GiB" } }),
        )
        .await;
    ans.bad(422, "invalid_value", "limits.memory");
    sweep(&t, &docker).await;
    t.shutdown().await;
}

#[tokio::test]
async fn builds_are_shared_per_context_and_fail_with_their_step() {
    let Some((t, docker)) = docker_app().await else {
        return;
    };
    let (_, a) = t.org("builder").await;
    let dockerfile =
        format!("FROM {BASE}\nCOPY hello.txt /hello.txt\nCMD [\"cat\", \"/hello.txt\"]\n");
    let first = t
        .raw("/v1/builds", &a, "application/x-tar", tar(&dockerfile))
        .await;
    let first = first.ok(201).clone();
    let again = t
        .raw("/v1/builds", &a, "application/x-tar", tar(&dockerfile))
        .await;
    assert_eq!(
        again.ok(200)["id"],
        first["id"],
        "the same bytes are the same build"
    );
    // Two instances of it at once: one image.
    let (one, two) = tokio::join!(
        create(
            &t,
            &a,
            json!({ "name": "one", "build": first["id"], "cmd": ["sleep", "3600"] })
        ),
        create(
            &t,
            &a,
            json!({ "name": "two", "build": first["id"], "cmd": ["sleep", "3600"] })
        ),
    );
    assert_eq!(one.0, 200, "{}", one.1);
    assert_eq!(two.0, 200, "{}", two.1);
    assert_eq!(one.1["image_id"], two.1["image_id"]);
    assert_eq!(berth_images(&t, &docker).await.len(), 1, "one build");
    // The context's files are in the image; its default command runs.
    let (code, cat) = create(&t, &a, json!({ "name": "cat", "build": first["id"] })).await;
    assert_eq!(code, 409, "cat exits at once: {cat}");
    assert_eq!(cat["instance"]["status"], "exited", "{cat}");
    assert_eq!(cat["instance"]["exit_code"], 0, "{cat}");
    // Followed rather than polled: the engine may copy an exited
    // container's output a moment after the exit, and a followed log of a
    // stopped container ends with its last line.
    let logs = {
        let resp = t
            .http
            .get(t.url(&format!(
                "/v1/instances/{}/logs?follow=true",
                cat["instance"]["id"].as_str().unwrap()
            )))
            .bearer_auth(&a)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut body = resp.bytes_stream();
        let mut text = String::new();
        while !text.contains("hello from the context") {
            match tokio::time::timeout(api_support::DEADLINE, body.next()).await {
                Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
                other => panic!("the logs ended without the context's file: {other:?} ({text})"),
            }
        }
        text
    };
    assert!(logs.contains("hello from the context"));

    // A failing step fails the instance with build_failed and names it.
    let broken = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar(&format!("FROM {BASE}\nRUN echo compiling\nRUN exit 3\n")),
        )
        .await;
    let (code, ans) = create(
        &t,
        &a,
        json!({ "name": "broken", "build": broken.ok(201)["id"] }),
    )
    .await;
    assert_eq!(code, 409, "{ans}");
    assert_eq!(ans["error"]["code"], "build_failed", "{ans}");
    let msg = ans["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("RUN exit 3") && msg.contains("non-zero code: 3"),
        "{msg}"
    );
    assert!(msg.contains("compiling"), "the log tail: {msg}");
    // A step that wants the network has none.
    let net = t
        .raw(
            "/v1/builds",
            &a,
            "application/x-tar",
            tar(&format!(
                "FROM {BASE}\nRUN wget -q -T 2 -O /x http://1.1.1.1/\n"
            )),
        )
        .await;
    let (code, ans) = create(&t, &a, json!({ "name": "net", "build": net.ok(201)["id"] })).await;
    assert_eq!(code, 409, "{ans}");
    assert_eq!(ans["error"]["code"], "build_failed", "{ans}");
    sweep(&t, &docker).await;
    t.shutdown().await;
}

#[tokio::test]
async fn a_container_that_exits_at_once_is_exited_not_running() {
    let Some((t, docker)) = docker_app().await else {
        return;
    };
    let (_, a) = t.org("quick").await;
    let (code, ans) = create(
        &t,
        &a,
        json!({ "name": "quick", "image": BASE, "cmd": ["sh", "-c", "exit 3"] }),
    )
    .await;
    assert_eq!(code, 409, "{ans}");
    assert_eq!(ans["error"]["code"], "state_unreachable", "{ans}");
    assert_eq!(ans["instance"]["status"], "exited", "{ans}");
    assert_eq!(ans["instance"]["exit_code"], 3, "{ans}");
    // With a restart policy, the policy applies to such a death too.
    let (code, ans) = create(
        &t,
        &a,
        json!({ "name": "again", "image": BASE, "cmd": ["sh", "-c", "exit 4"], "restart": "on-failure:2" }),
    )
    .await;
    let id = ans["id"]
        .as_str()
        .or(ans["instance"]["id"].as_str())
        .unwrap_or_else(|| panic!("{code}: {ans}"))
        .to_owned();
    let done = t
        .wait_for("two restarts, then exited", || async {
            let v = t.get(&format!("/v1/instances/{id}"), &a).await.json.clone();
            (v["restarts"] == 2 && v["status"] == "exited").then_some(v)
        })
        .await;
    assert_eq!(done["exit_code"], 4, "{done}");
    sweep(&t, &docker).await;
    t.shutdown().await;
}
