//! What the API tests share: booting the real application on port 0 with
//! the simulated runtime and a temporary SQLite directory (through the test
//! kit, as `berth serve` boots), a real HTTP client and a real WebSocket
//! client, and helpers that wait on events or on the store's commits.
#![allow(dead_code)]

pub mod procs;

use std::time::Duration;

use berth::App;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ADMIN: &str = "test-admin-token-0123456789";
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Fast retries so failures end in milliseconds; `host.ensure` retries
/// slowly and long, so a test can hold a flow at its first step by taking
/// the engine away.
pub const CONFIG: &str = r#"
listen = "127.0.0.1:0"

[runtime]
kind = "sim"

[bus]
shutdown_grace = "2s"

[workers.default]
max_attempts = 3
timeout = "5s"
backoff = { initial = "1ms", max = "4ms" }

[workers."host.ensure"]
max_attempts = 100
backoff = { initial = "50ms", max = "50ms", jitter = "none" }
"#;

/// `CONFIG` but `host.ensure` backs off for long after each failure, so
/// that a test can look at an instance (or a client) while it waits.
pub fn slow_host() -> String {
    let fast = "[workers.\"host.ensure\"]\nmax_attempts = 100\nbackoff = { initial = \"50ms\", max = \"50ms\", jitter = \"none\" }";
    assert!(CONFIG.contains(fast), "CONFIG's host.ensure policy changed");
    CONFIG.replace(
        fast,
        "[workers.\"host.ensure\"]\nmax_attempts = 20\nbackoff = { initial = \"30s\", max = \"30s\", jitter = \"none\" }",
    )
}

pub struct TestApp {
    pub app: App,
    pub base: String,
    pub ws_base: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Boots Berth as `berth serve` would, on a free port.
pub async fn spawn() -> TestApp {
    spawn_with(CONFIG, Vec::new()).await
}

/// The test configuration on the local Docker engine instead of the
/// simulated one.
pub fn docker_config() -> String {
    // A real build on a loaded CI machine can take longer than the 5 s
    // that keeps the sim suites quick; one timed out and retried leaves a
    // second image, which the build-sharing test counts.
    CONFIG.replace("kind = \"sim\"", "kind = \"docker\"")
        + "\n[workers.\"image.build\"]\ntimeout = \"60s\"\n"
}

/// Boots Berth with configuration file `config` and `BERTH_…` variables
/// `env` on a free port.
pub async fn spawn_with(config: &str, env: Vec<(String, String)>) -> TestApp {
    if let Ok(filter) = std::env::var("BERTH_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
    let (app, dir) = berth_testkit::app(config, env, |c| {
        c.admin_token = Some(berth::config::Secret(ADMIN.to_owned()));
    })
    .await;
    let addr = app.api_addr().expect("the app serves the API");
    TestApp {
        app,
        base: format!("http://{addr}"),
        ws_base: format!("ws://{addr}"),
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

/// Boots Berth with configuration `config` on the test kit's simulated
/// engine behind its fault wrapper (seeded; it injects nothing until told
/// to), on a free port; returns the wrapper to steer it.
pub async fn spawn_faulty(
    config: &str,
) -> (
    TestApp,
    std::sync::Arc<berth_runtime::faulty::FaultyRuntime>,
) {
    // Top-level keys go before the first table.
    let config = format!("admin_token = \"{ADMIN}\"\n{config}");
    let world = berth_testkit::Kit::new(&config).compose().await;
    let (world, faulty, dir) = world.into_app_parts();
    let app = App::start(world).await.unwrap();
    let addr = app.api_addr().expect("the app serves the API");
    (
        TestApp {
            app,
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            http: reqwest::Client::new(),
            _dir: dir,
        },
        faulty.expect("the kit's simulated engine has a fault wrapper"),
    )
}

/// An answer: status, headers and body (JSON when it parses).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub json: Value,
}

impl Answer {
    /// Asserts the API's error shape with this status and code; returns
    /// the error object.
    #[track_caller]
    pub fn error(&self, status: u16, code: &str) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        let e = &self.json["error"];
        assert_eq!(e["code"], code, "{}", self.text);
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
        e
    }

    /// Asserts an error naming `field`.
    #[track_caller]
    pub fn bad(&self, status: u16, code: &str, field: &str) -> &Value {
        let e = self.error(status, code);
        assert_eq!(e["field"], field, "{}", self.text);
        e
    }

    #[track_caller]
    pub fn ok(&self, status: u16) -> &Value {
        assert_eq!(self.status.as_u16(), status, "{}", self.text);
        &self.json
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with an optional bearer token and JSON body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await.unwrap()).await
    }

    /// A request with a raw body and content type.
    pub async fn raw(&self, path: &str, token: &str, content_type: &str, body: Vec<u8>) -> Answer {
        let resp = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        answer(resp).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    /// Creates an org; returns (id, token).
    pub async fn org(&self, name: &str) -> (String, String) {
        let a = self
            .call(
                Method::POST,
                "/v1/orgs",
                Some(ADMIN),
                Some(json!({ "name": name })),
            )
            .await;
        let v = a.ok(201);
        (
            v["id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
        )
    }

    /// Creates an instance and waits for it to run; returns its view.
    pub async fn running(&self, token: &str, name: &str) -> Value {
        let a = self
            .post(
                "/v1/instances?wait=true",
                token,
                json!({ "name": name, "image": "busybox", "env": { "SECRET": format!("{name}-env-value") } }),
            )
            .await;
        a.ok(200).clone()
    }

    /// Opens the org's event stream.
    pub async fn ws(&self, token: &str, query: &str) -> Ws {
        let mut req = format!("{}/v1/events{query}", self.ws_base)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 101);
        ws
    }

    /// Rows in a table of the app's database.
    pub async fn count(&self, table: &str) -> i64 {
        self.app.store.inspect().count(table).await.unwrap()
    }

    /// Asserts that no instance or event exists: a refused request wrote
    /// nothing.
    pub async fn assert_nothing_written(&self) {
        assert_eq!(self.count("instances").await, 0, "instances written");
        assert_eq!(self.count("events").await, 0, "events written");
    }

    pub async fn shutdown(self) {
        self.app.shutdown().await.unwrap();
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        text,
        json,
    }
}

/// The next JSON message of a stream, within the deadline.
pub async fn next_message(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("no message on the event stream before the deadline")
            .expect("the event stream ended")
            .expect("the event stream failed");
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Close(f) => panic!("the event stream closed: {f:?}"),
            _ => continue,
        }
    }
}

/// Messages until one satisfies `done`, which is returned last.
pub async fn messages_until(ws: &mut Ws, done: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let m = next_message(ws).await;
        let stop = done(&m);
        out.push(m);
        if stop {
            return out;
        }
    }
}

impl TestApp {
    /// Re-runs `f` after each commit of the app's store until it returns
    /// `Some`, failing at the deadline: for what the database decides
    /// (statuses, attempts and what is read from them).
    pub async fn wait_for<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        berth_testkit::wait_for(&self.app.store, what, f).await
    }
}

/// Tries `f` until it returns `Some`, failing at the deadline: only for
/// state no commit marks (a slot the server gives back when a client
/// leaves), which nothing signals to a test; a short pause between tries
/// keeps it from spinning on a shared machine.
pub async fn poll_until<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A client of the local Docker engine with the test base image on it;
/// `None` (after saying why) without an engine, which under `CI=true` is a
/// failure rather than a skip.
pub async fn docker_engine() -> Option<berth_docker::bollard::Docker> {
    const BASE: &str = "berth-test-base:latest";
    let docker = match berth_docker::DockerRuntime::local().await {
        Ok(rt) => rt,
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but there is no Docker engine: {e}"
            );
            eprintln!("SKIPPED: {e} (this test needs a Docker engine)");
            return None;
        }
    };
    let client = docker
        .client(&berth_runtime::HostId::new("local"))
        .unwrap()
        .clone();
    if client.inspect_image(BASE).await.is_err() {
        let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts/test-image.sh");
        let out = tokio::task::spawn_blocking(move || std::process::Command::new(script).output())
            .await
            .unwrap()
            .unwrap();
        assert!(out.status.success(), "test-image.sh: {out:?}");
    }
    Some(client)
}

/// Removes every container, image and network carrying `label` (`k=v`),
/// ignoring failures: a sweep after a test, also after one that panicked.
pub async fn sweep_label(docker: &berth_docker::bollard::Docker, label: &str) {
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
    let containers = docker
        .list_containers(Some(
            berth_docker::bollard::query_parameters::ListContainersOptions {
                all: true,
                filters: Some(filters.clone()),
                ..Default::default()
            },
        ))
        .await
        .unwrap_or_default();
    for c in containers {
        if let Some(id) = c.id {
            let _ = docker
                .remove_container(
                    &id,
                    Some(
                        berth_docker::bollard::query_parameters::RemoveContainerOptions {
                            force: true,
                            ..Default::default()
                        },
                    ),
                )
                .await;
        }
    }
    let images = docker
        .list_images(Some(
            berth_docker::bollard::query_parameters::ListImagesOptions {
                filters: Some(filters.clone()),
                ..Default::default()
            },
        ))
        .await
        .unwrap_or_default();
    for i in images {
        let _ = docker
            .remove_image(
                &i.id,
                Some(
                    berth_docker::bollard::query_parameters::RemoveImageOptions {
                        force: true,
                        ..Default::default()
                    },
                ),
                None,
            )
            .await;
    }
    let (key, value) = label.split_once('=').unwrap();
    for n in docker.list_networks(None).await.unwrap_or_default() {
        if n.labels.unwrap_or_default().get(key).map(String::as_str) == Some(value)
            && let Some(id) = n.id
        {
            let _ = docker.remove_network(&id).await;
        }
    }
}

/// The address `berth serve` prints once it listens, read from its stdout
/// on a thread of its own (the child's pipe is blocking).
pub fn listening_address(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("berth API listening on http://") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    rx
}
