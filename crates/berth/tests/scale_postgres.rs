//! Scale-out on PostgreSQL, with real processes on the real Docker engine:
//! one API process and three worker processes share one database; 100
//! instances are asked for; one worker process is killed with SIGKILL while
//! their flows are in flight and another is started. Every flow ends, no
//! instance has two containers, no event is lost (every subscribed worker
//! handled or dead-lettered each event of the log), and no delivery or
//! lease is left. (Deleting them all across the processes is not checked
//! yet: see the note on issue 12.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use api_support::ADMIN;
use api_support::procs::{Served, serve};
use berth_docker::bollard::Docker;
use berth_docker::bollard::query_parameters::ListContainersOptions;
use berth_store::{Location, RowRead, Store, StoreOptions};
use serde_json::{Value, json};

const INSTANCES: usize = 100;
const BASE: &str = "berth-test-base:latest";

/// What every process runs with: the engine, short polls, and retries
/// quick enough for a test (a killed worker's leases end after its
/// timeout plus the grace).
const CONFIG: &str = r#"
[runtime]
kind = "docker"

[bus]
poll_interval = "100ms"
lease_grace = "2s"
shutdown_grace = "2s"

[workers.default]
max_attempts = 10
timeout = "20s"
backoff = { initial = "50ms", max = "500ms" }
"#;

struct Cluster {
    dir: tempfile::TempDir,
    url: String,
    config: std::path::PathBuf,
}

impl Cluster {
    fn start(&self, role: &str, n: usize) -> Served {
        let data = self.dir.path().join(format!("{role}-{n}"));
        let config = self.config.to_str().unwrap();
        serve(
            &data,
            role,
            &["--store", &self.url],
            &[("BERTH_CONFIG", config), ("BERTH_LOG", "warn")],
        )
    }
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

/// Every instance of the org, by id, with its status.
async fn statuses(base: &str, token: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("{base}/v1/instances?limit=100&after={a}"),
            None => format!("{base}/v1/instances?limit=100"),
        };
        let page = call(reqwest::Method::GET, q, token, None).await;
        for i in page["instances"].as_array().unwrap() {
            out.insert(
                i["id"].as_str().unwrap().to_owned(),
                i["status"].as_str().unwrap().to_owned(),
            );
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return out,
        }
    }
}

/// Waits until every one of `ids` is in `state` (none ends otherwise).
async fn wait_all(
    base: &str,
    token: &str,
    ids: &HashSet<String>,
    state: &str,
    logs: &dyn Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let now = statuses(base, token).await;
        let ended: Vec<_> = now
            .iter()
            .filter(|(id, s)| ids.contains(*id) && matches!(s.as_str(), "failed" | "exited"))
            .collect();
        assert!(
            ended.is_empty() || state == "deleted",
            "flows ended badly: {ended:?}\n{}",
            logs()
        );
        // The list leaves deleted instances out.
        let pending = ids
            .iter()
            .filter(|id| match now.get(*id) {
                Some(s) => s != state,
                None => state != "deleted",
            })
            .count();
        if pending == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{pending} of {} instances not {state} in time\n{}",
            ids.len(),
            logs()
        );
        // Polling a real cluster: nothing in this process to wait on.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Containers on the engine labelled with this installation, by instance.
async fn containers(docker: &Docker, install: &str) -> HashMap<String, usize> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("berth.install={install}")])]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap();
    let mut out = HashMap::new();
    for c in list {
        let id = c
            .labels
            .unwrap_or_default()
            .get("berth.instance")
            .cloned()
            .unwrap_or_else(|| "(none)".into());
        *out.entry(id).or_insert(0) += 1;
    }
    out
}

async fn open(url: &str) -> Store {
    let clock: Arc<dyn berth_core::Clock> = Arc::new(berth_core::SystemClock);
    let ids = Arc::new(berth_core::IdGen::new(
        clock.clone(),
        Arc::new(berth_core::SeededRng::from_entropy()),
    ));
    let options = StoreOptions {
        max_connections: 2,
        instance_cache: false,
        ..StoreOptions::default()
    };
    Store::open_at(&Location::Postgres(url.to_owned()), options, clock, ids)
        .await
        .unwrap()
}

/// Every subscribed worker handled or dead-lettered every event in the
/// log, and no delivery is left: the list of what was lost (empty).
async fn lost_events(store: &Store, config: &Path) -> Vec<String> {
    let config = berth::Config::load(Some(config), Vec::<(String, String)>::new()).unwrap();
    let (deps, _) = berth::app::deps(&config).await.unwrap();
    let registry = berth::registry(&config, deps).unwrap();
    let subs = registry.subscriptions();
    let mut lost = Vec::new();
    for r in store
        .inspect()
        .rows("SELECT event_id, worker, lease_owner FROM deliveries", [])
        .await
        .unwrap()
    {
        lost.push(format!(
            "delivery left: {} to {} (lease {:?})",
            r.text(0).unwrap(),
            r.text(1).unwrap(),
            r.opt_text(2).unwrap()
        ));
    }
    let done: HashSet<(String, String)> = store
        .inspect()
        .rows(
            "SELECT worker, event_id FROM inbox UNION SELECT worker, event_id FROM dead_letters",
            [],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.text(0).unwrap(), r.text(1).unwrap()))
        .collect();
    for r in store
        .inspect()
        .rows("SELECT id, type FROM events", [])
        .await
        .unwrap()
    {
        let (id, ty) = (r.text(0).unwrap(), r.text(1).unwrap());
        for w in subs.workers_for(&ty) {
            if !done.contains(&(w.to_string(), id.clone())) {
                lost.push(format!(
                    "{ty} {id}: {w} neither handled nor dead-lettered it"
                ));
            }
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_worker_processes_on_postgres_survive_a_killed_worker() {
    let Some(server) = berth_store::postgres::test_server().unwrap() else {
        eprintln!(
            "SKIPPED: no PostgreSQL server ({})",
            berth_store::postgres::TEST_SERVER_VAR
        );
        return;
    };
    let Some(docker) = api_support::docker_engine().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("berth.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let url = berth_store::postgres::fresh_database(&server)
        .await
        .unwrap();
    let cluster = Cluster {
        dir,
        url: url.clone(),
        config: config.clone(),
    };

    let api = cluster.start("api", 0);
    let mut workers: Vec<Option<Served>> =
        (1..=3).map(|n| Some(cluster.start("worker", n))).collect();
    let base = format!("http://{}", api.addr());
    let store = open(&url).await;
    let install = store.install_id().to_owned();
    let logs_dir = cluster.dir.path().to_owned();
    // Every process's log, for a failure's message.
    let logs = move || {
        let mut out = String::new();
        for e in std::fs::read_dir(&logs_dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out.push_str(&format!("{}:\n{text}\n", e.path().display()));
            }
        }
        out
    };

    let org = call(
        reqwest::Method::POST,
        format!("{base}/v1/orgs"),
        ADMIN,
        Some(json!({ "name": "acme" })),
    )
    .await;
    let token = org["token"].as_str().unwrap().to_owned();

    // The requests, a few at a time, as clients would send them.
    let mut ids = HashSet::new();
    let mut killed = false;
    for chunk in (0..INSTANCES).collect::<Vec<_>>().chunks(10) {
        let made = futures::future::join_all(chunk.iter().map(|n| {
            call(
                reqwest::Method::POST,
                format!("{base}/v1/instances"),
                &token,
                Some(
                    json!({ "name": format!("app-{n}"), "image": BASE, "cmd": ["sleep", "3600"] }),
                ),
            )
        }))
        .await;
        ids.extend(made.iter().map(|v| v["id"].as_str().unwrap().to_owned()));
        if !killed && ids.len() >= INSTANCES / 2 {
            // Flows in flight in every worker process: one dies where it
            // stands, and another joins.
            killed = true;
            workers[0].take().unwrap().kill();
            workers.push(Some(cluster.start("worker", 4)));
        }
    }
    assert_eq!(ids.len(), INSTANCES);
    let t0 = std::time::Instant::now();
    wait_all(&base, &token, &ids, "running", &logs).await;
    eprintln!(
        "all {INSTANCES} running {:?} after the last request",
        t0.elapsed()
    );

    // One container per instance, none of another.
    let on_engine = containers(&docker, &install).await;
    let doubled: Vec<_> = on_engine.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        doubled.is_empty(),
        "instances with other than one container: {doubled:?}"
    );
    let known: HashSet<&String> = on_engine.keys().collect();
    assert_eq!(
        known,
        ids.iter().collect(),
        "containers and instances differ"
    );

    // Nothing left in flight, nothing lost. The last acknowledgements may
    // trail the last status by a turn: wait for an empty queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while store.queue_depth().await.unwrap() != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "deliveries left: {:?}",
            store.queue_depth().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lost = lost_events(&store, &config).await;
    assert!(lost.is_empty(), "lost: {lost:#?}");
    let abandoned = store
        .inspect()
        .number(
            "SELECT COUNT(*) FROM attempts WHERE outcome = 'abandoned'",
            [],
        )
        .await
        .unwrap();
    eprintln!("attempts abandoned by the killed worker and taken back: {abandoned}");

    // Not yet checked here: deleting all of them across the processes.
    // In one CI run of three, one delete of the hundred had not ended after
    // 240 s (its network was reported in use, retried); until that is
    // understood the engine is swept below instead (issue 12's note).

    for w in workers.into_iter().flatten() {
        let log = w.log();
        assert!(w.stop().success(), "a worker stops cleanly: {log}");
    }
    let log = api.log();
    assert!(api.stop().success(), "the API stops cleanly: {log}");
    store.close().await;
    api_support::sweep_label(&docker, &format!("berth.install={install}")).await;
    berth_store::postgres::drop_database(&server, &url)
        .await
        .ok();
}
