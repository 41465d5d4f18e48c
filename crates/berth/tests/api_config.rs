//! The API's settings: `listen`, `runtime.kind` (docker|sim), the admin
//! token from `BERTH_ADMIN_TOKEN` (kept a string, never printed, refused
//! when short without showing it) or generated once and kept hashed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use berth::config::RuntimeKind;
use berth::{App, Config};
use serde_json::json;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn listen_runtime_and_admin_token_come_from_the_environment() {
    let c = Config::load(None, Vec::new()).unwrap();
    assert_eq!(c.listen, "127.0.0.1:7077".parse::<SocketAddr>().unwrap());
    assert_eq!(
        c.runtime.kind,
        RuntimeKind::Docker,
        "the local engine by default"
    );
    assert!(c.admin_token.is_none());
    let c = Config::load(
        None,
        env(&[
            ("BERTH_LISTEN", "0.0.0.0:8080"),
            ("BERTH_RUNTIME__KIND", "sim"),
            ("BERTH_ADMIN_TOKEN", "12345678901234567890"),
        ]),
    )
    .unwrap();
    assert_eq!(c.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
    assert_eq!(c.runtime.kind, RuntimeKind::Sim);
    // Digits stay a string, and the secret shows in neither output.
    assert_eq!(
        c.admin_token.as_ref().unwrap().expose(),
        "12345678901234567890"
    );
    assert!(!format!("{c:?}").contains("1234567890"));
    assert!(!c.to_toml().contains("1234567890"));
    assert!(c.to_toml().contains("listen = \"0.0.0.0:8080\""));
    assert_eq!("sim".parse::<RuntimeKind>().unwrap(), RuntimeKind::Sim);
    assert!("podman".parse::<RuntimeKind>().is_err());
}

#[test]
fn a_short_admin_token_is_refused_without_showing_it() {
    let err = Config::load(None, env(&[("BERTH_ADMIN_TOKEN", "hunter2")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("environment variable BERTH_ADMIN_TOKEN"),
        "{err}"
    );
    assert!(err.contains("admin_token"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    let err = Config::load(None, env(&[("BERTH_LISTEN", "localhost")]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("BERTH_LISTEN"), "{err}");
}

#[tokio::test]
async fn a_start_with_no_docker_engine_fails_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.runtime.kind = RuntimeKind::Docker;
    config.runtime.docker_host = Some("unix:///nonexistent/docker.sock".into());
    let err = App::build(config, "test").await.unwrap_err().to_string();
    assert!(
        err.contains("no Docker engine at unix:///nonexistent/docker.sock"),
        "{err}"
    );
    assert!(!dir.path().join("berth.db").exists(), "nothing was started");
}

#[tokio::test]
async fn an_admin_token_is_generated_once_and_kept_hashed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    let app = App::build(config.clone(), "test").await.unwrap();
    let token = app
        .generated_admin_token
        .clone()
        .expect("a generated token");
    let stored = app.store.admin_token_hash().await.unwrap().unwrap();
    assert!(!stored.contains(&token) && stored.len() == 64);
    app.shutdown().await.unwrap();

    // The next start generates none, and the first token still works.
    let app = App::build(config.clone(), "test").await.unwrap();
    assert!(app.generated_admin_token.is_none());
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/orgs", app.api_addr().unwrap());
    let resp = http
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({ "name": "acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    app.shutdown().await.unwrap();

    // A configured token replaces it.
    config.admin_token = Some(berth::config::Secret("configured-admin-token".into()));
    let app = App::build(config, "test").await.unwrap();
    assert!(app.generated_admin_token.is_none());
    let url = format!("http://{}/v1/orgs", app.api_addr().unwrap());
    for (tok, status) in [(token.as_str(), 401), ("configured-admin-token", 201)] {
        let resp = http
            .post(&url)
            .bearer_auth(tok)
            .json(&json!({ "name": format!("org-{status}") }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
    }
    // Org names are unique.
    let resp = http
        .post(&url)
        .bearer_auth("configured-admin-token")
        .json(&json!({ "name": "acme" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    app.shutdown().await.unwrap();
}
