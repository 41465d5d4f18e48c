//! Issue 10's crash test, on the real engine: `berth serve` as a process on
//! a SQLite file and the local Docker engine; 60 instances created over
//! HTTP (a few with a command that exits), some deleted (some while their
//! creation is still in flight), the process killed with SIGKILL at five
//! moments drawn from a seeded generator and started again on the same data
//! dir each time. Once it settles, the engine itself is compared with the
//! database: every flow ended and none failed, at most one container per
//! instance generation, nothing labelled by this installation without a
//! live record, `running` exactly when its container runs, `exited` when it
//! does not, the org's network there exactly while the org has a live
//! instance. `BERTH_CRASH_SEED=<n>` replays a seed's kill moments and
//! choices (the engine's timing is not replayed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_core::domain::InstanceStatus;
use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_docker::bollard::Docker;
use berth_docker::bollard::query_parameters::{ListContainersOptions, ListImagesOptions};
use berth_store::instances::Instance;
use berth_store::{RowRead, Store, StoreOptions};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

const BASE: &str = "berth-test-base:latest";
const ADMIN: &str = "test-admin-token-0123456789";
const INSTANCES: usize = 60;
const KILLS: usize = 5;
/// Creations are sent one per this on average, so that the flows run
/// through the kills rather than all at the start.
const PACE: Duration = Duration::from_millis(120);
/// How long a request keeps trying while the server is down or restarting.
const REQUEST_DEADLINE: Duration = Duration::from_secs(45);
/// How long everything may take to settle after the last restart.
const SETTLE_DEADLINE: Duration = Duration::from_secs(60);
/// How long the same disagreement may last once every flow ended: a few
/// reconciler passes past the grace (see `CONFIG`).
const STABLE: Duration = Duration::from_secs(10);

/// Short reconciler periods so that recovery happens within the test;
/// retries fast and many, so that attempts a kill cut short (they count)
/// do not exhaust a step. Timeouts are generous: two cores and a real engine.
const CONFIG: &str = r#"
[bus]
shutdown_grace = "2s"

[reconciler]
period = "1s"
grace = "3s"
flow_deadline = "8s"
max_republish = 3

[workers.default]
max_attempts = 8
timeout = "20s"
backoff = { initial = "10ms", max = "300ms" }
"#;

/// What one instance of the workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    /// Runs `sleep 3600`: must end `running`.
    Run,
    /// Its command exits at once: must end `exited`.
    Exit,
    /// Deleted right after its creation is accepted, while the flow runs.
    DeleteInFlight,
    /// Deleted once every creation was sent.
    DeleteLater,
}

/// What the test shares with its killer and its clean-up: the current
/// process and where it listens, and what the sweep needs to know.
struct Shared {
    bin: PathBuf,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
    base: Mutex<String>,
    install: Mutex<Option<String>>,
    org: Mutex<Option<String>>,
}

impl Shared {
    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("berth.log")
    }

    fn base(&self) -> String {
        self.base.lock().unwrap().clone()
    }

    /// The last lines of the servers' logs, for a failure message.
    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts `berth serve` on the data dir (its stderr appended to the
    /// log); waits for the address it prints.
    fn start(&self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        // `BERTH_…` variables are configuration to the server: the test's
        // own (`BERTH_CRASH_SEED`) would be refused as unknown keys.
        for (k, _) in std::env::vars() {
            if k.starts_with("BERTH_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .args([
                "serve",
                "--runtime",
                "docker",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(self.dir.path().join("berth.toml"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .env("BERTH_ADMIN_TOKEN", ADMIN)
            .env("NO_COLOR", "1")
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_CRASH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let rx = api_support::listening_address(child.stdout.take().unwrap());
        *self.child.lock().unwrap() = Some(child);
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => *self.base.lock().unwrap() = format!("http://{addr}"),
            Err(_) => panic!("berth serve did not start: {}", self.log_tail(40)),
        }
    }

    /// SIGKILL (what `Child::kill` sends), then reap it.
    fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap().take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills the server and sweeps the engine of everything this installation
/// and org made — also when the test panics.
struct Guard(Arc<Shared>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.kill();
        let install = self.0.install.lock().unwrap().clone();
        let org = self.0.org.lock().unwrap().clone();
        let mut labels = Vec::new();
        labels.extend(install.map(|i| format!("berth.install={i}")));
        labels.extend(org.map(|o| format!("berth.org={o}")));
        if labels.is_empty() {
            return;
        }
        // Drop cannot await, and the test's runtime may be the one
        // panicking: the sweep gets a thread and a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let Ok(docker) = berth_docker::DockerRuntime::local().await else {
                    return;
                };
                let client = docker
                    .client(&berth_runtime::HostId::new("local"))
                    .unwrap()
                    .clone();
                for l in labels {
                    api_support::sweep_label(&client, &l).await;
                }
            });
        })
        .join();
    }
}

/// A request to whichever server runs now, tried again while none answers
/// (killed, restarting) or it is stopping; returns status and body.
async fn call(
    shared: &Shared,
    http: &reqwest::Client,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let start = Instant::now();
    loop {
        let mut req = http
            .request(method.clone(), format!("{}{path}", shared.base()))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10));
        if let Some(b) = &body {
            req = req.json(b);
        }
        let answer = match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.text().await {
                    Ok(text) => Some((status, serde_json::from_str(&text).unwrap_or(Value::Null))),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        match answer {
            Some((503 | 429, _)) | None => {}
            Some(a) => return a,
        }
        assert!(
            start.elapsed() < REQUEST_DEADLINE,
            "{method} {path}: no answer within {REQUEST_DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The id of the org's instance `name` (a creation whose answer a kill
/// cut off, then refused as `name_taken`, did happen).
async fn id_by_name(shared: &Shared, http: &reqwest::Client, token: &str, name: &str) -> String {
    let (code, list) = call(
        shared,
        http,
        Method::GET,
        "/v1/instances?all=true&limit=1000",
        token,
        None,
    )
    .await;
    assert_eq!(code, 200, "{list}");
    list["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .find(|i| i["name"] == name)
        .and_then(|i| i["id"].as_str())
        .unwrap_or_else(|| panic!("{name} was refused as taken but is not listed: {list}"))
        .to_owned()
}

/// Creates instance `name`; returns its id.
async fn create(
    shared: &Shared,
    http: &reqwest::Client,
    token: &str,
    name: &str,
    plan: Plan,
) -> String {
    let cmd = if plan == Plan::Exit {
        json!(["sh", "-c", "exit 3"])
    } else {
        json!(["sleep", "3600"])
    };
    let body = json!({ "name": name, "image": BASE, "cmd": cmd });
    let (code, ans) = call(
        shared,
        http,
        Method::POST,
        "/v1/instances",
        token,
        Some(body),
    )
    .await;
    match code {
        202 => ans["id"].as_str().unwrap().to_owned(),
        409 if ans["error"]["code"] == "name_taken" => id_by_name(shared, http, token, name).await,
        _ => panic!("creating {name}: {code} {ans}"),
    }
}

async fn delete(shared: &Shared, http: &reqwest::Client, token: &str, id: &str) {
    let path = format!("/v1/instances/{id}");
    let (code, ans) = call(shared, http, Method::DELETE, &path, token, None).await;
    assert!(matches!(code, 200 | 202), "deleting {id}: {code} {ans}");
}

/// The engine's view of this installation.
struct Engine {
    /// (name, instance, generation, running)
    containers: Vec<(String, String, String, bool)>,
    networks: Vec<(String, String)>,
    images: Vec<String>,
}

async fn engine_state(docker: &Docker, install: &str) -> Engine {
    let label = format!("berth.install={install}");
    let filters = HashMap::from([("label".to_owned(), vec![label])]);
    let containers = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters.clone()),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            let labels = c.labels.unwrap_or_default();
            let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
            (
                c.names
                    .and_then(|n| n.into_iter().next())
                    .unwrap_or_default()
                    .trim_start_matches('/')
                    .to_owned(),
                get("berth.instance"),
                get("berth.generation"),
                c.state == Some(berth_docker::bollard::models::ContainerSummaryStateEnum::RUNNING),
            )
        })
        .collect();
    let networks = docker
        .list_networks(None)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|n| {
            let labels = n.labels.unwrap_or_default();
            (labels.get("berth.install").map(String::as_str) == Some(install)).then(|| {
                (
                    n.name.unwrap_or_default(),
                    labels.get("berth.org").cloned().unwrap_or_default(),
                )
            })
        })
        .collect();
    let images = docker
        .list_images(Some(ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    Engine {
        containers,
        networks,
        images,
    }
}

/// What the database holds: every instance, the deliveries still queued
/// or in flight, and the dead letters as `worker: code` — read through a
/// store of its own on the file (the server keeps writing; WAL lets a
/// reader in).
async fn rows(data: &Path) -> (Vec<Instance>, i64, Vec<String>) {
    let store = open(data).await;
    let all = store.instances(None).await.unwrap();
    let queued = store.inspect().count("deliveries").await.unwrap();
    let dead: Vec<String> = store
        .inspect()
        .rows(
            "SELECT worker || ': ' || json_extract(error, '$.code') FROM dead_letters ORDER BY dead_at",
            [],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.text(0).unwrap())
        .collect();
    store.close().await;
    (all, queued, dead)
}

async fn install_id(data: &Path) -> String {
    let store = open(data).await;
    let id = store.install_id().to_owned();
    store.close().await;
    id
}

/// A store on the server's database file, beside the server.
async fn open(data: &Path) -> Store {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ids = Arc::new(IdGen::new(clock.clone(), Arc::new(SeededRng::new(1))));
    Store::open(&data.join("berth.db"), StoreOptions::default(), clock, ids)
        .await
        .unwrap()
}

/// Every way the database and the engine disagree, or a flow went wrong;
/// empty when the invariants hold.
fn violations(all: &[Instance], plans: &HashMap<String, Plan>, engine: &Engine) -> Vec<String> {
    let mut out = Vec::new();
    let by_id: HashMap<&str, &Instance> = all.iter().map(|i| (i.id.as_str(), i)).collect();
    let live = |i: &Instance| !matches!(i.status, InstanceStatus::Failed | InstanceStatus::Deleted);
    for i in all {
        let plan = plans.get(&i.id).copied();
        if !i.status.is_terminal() {
            out.push(format!("{} is still {}", i.name, i.status));
            continue;
        }
        let expected = match plan {
            Some(Plan::Run) => InstanceStatus::Running,
            Some(Plan::Exit) => InstanceStatus::Exited,
            Some(Plan::DeleteInFlight | Plan::DeleteLater) => InstanceStatus::Deleted,
            None => {
                out.push(format!("{} was never asked for", i.name));
                continue;
            }
        };
        if i.status != expected {
            out.push(format!(
                "{} ({plan:?}) is {}, not {expected}; error {:?}",
                i.name, i.status, i.error
            ));
        }
    }
    let mut per_generation: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for (name, id, generation, _) in &engine.containers {
        per_generation
            .entry((id.as_str(), generation.as_str()))
            .or_default()
            .push(name);
        match by_id.get(id.as_str()) {
            None => out.push(format!("container {name} has no record")),
            Some(i) if !live(i) => out.push(format!(
                "container {name} survives its {} instance",
                i.status
            )),
            Some(i) if i.generation.to_string() != *generation => out.push(format!(
                "container {name} is of generation {generation}, its instance of {}",
                i.generation
            )),
            Some(_) => {}
        }
    }
    for ((id, generation), names) in &per_generation {
        if names.len() > 1 {
            out.push(format!(
                "{} containers for {id} generation {generation}: {names:?}",
                names.len()
            ));
        }
    }
    let running: HashMap<&str, bool> = engine
        .containers
        .iter()
        .map(|(name, _, _, running)| (name.as_str(), *running))
        .collect();
    for i in all.iter().filter(|i| live(i)) {
        let state = i.container.as_deref().and_then(|c| running.get(c).copied());
        match (i.status, state) {
            (InstanceStatus::Running, Some(true)) => {}
            (InstanceStatus::Exited | InstanceStatus::Stopped, Some(false)) => {}
            (status, state) => out.push(format!(
                "{} is {status} but its container {:?} is {}",
                i.name,
                i.container,
                match state {
                    None => "missing",
                    Some(true) => "running",
                    Some(false) => "not running",
                }
            )),
        }
    }
    let live_orgs: HashSet<&str> = all
        .iter()
        .filter(|i| live(i))
        .map(|i| i.org_id.as_str())
        .collect();
    let orgs: HashSet<&str> = all.iter().map(|i| i.org_id.as_str()).collect();
    for org in orgs {
        let name = berth_flows::names::network(org);
        let there = engine.networks.iter().any(|(n, _)| *n == name);
        if there != live_orgs.contains(org) {
            out.push(format!(
                "network {name} {} while the org has {} live instance",
                if there { "exists" } else { "is missing" },
                if live_orgs.contains(org) { "a" } else { "no" }
            ));
        }
    }
    for (name, org) in &engine.networks {
        if !all.iter().any(|i| i.org_id == *org) {
            out.push(format!("network {name} of an unknown org {org}"));
        }
    }
    for image in &engine.images {
        out.push(format!(
            "image {image} labelled by Berth, with no build asked for"
        ));
    }
    out
}

/// The plan of instance `n`, from the seeded generator.
fn plan_of(rng: &SeededRng) -> Plan {
    match rng.between(0, 99) {
        0..=9 => Plan::Exit,
        10..=29 => Plan::DeleteInFlight,
        30..=44 => Plan::DeleteLater,
        _ => Plan::Run,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_while_creating_and_deleting_leaves_engine_and_records_agreeing() {
    let Some(docker) = api_support::docker_engine().await else {
        return;
    };
    let seed = std::env::var("BERTH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| SeededRng::from_entropy().seed());
    eprintln!("crash test seed: {seed} (replay with BERTH_CRASH_SEED={seed})");
    let rng = SeededRng::new(seed);
    let plans: Vec<Plan> = (0..INSTANCES).map(|_| plan_of(&rng)).collect();
    // Each kill comes this long after the previous start printed its
    // address: early in a process's life (recovery under way) and later.
    let gaps: Vec<Duration> = (0..KILLS)
        .map(|_| Duration::from_millis(rng.between(200, 2_000)))
        .collect();
    // When each creation is sent, from the start.
    let send_at: Vec<Duration> = (0..INSTANCES)
        .map(|n| PACE * n as u32 + Duration::from_millis(rng.between(0, PACE.as_millis() as u64)))
        .collect();
    // How long after its creation each later delete comes.
    let late_delay: Vec<Duration> = (0..INSTANCES)
        .map(|_| Duration::from_millis(rng.between(0, 4_000)))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("berth.toml"), CONFIG).unwrap();
    let shared = Arc::new(Shared {
        bin: PathBuf::from(env!("CARGO_BIN_EXE_berth")),
        dir,
        child: Mutex::new(None),
        base: Mutex::new(String::new()),
        install: Mutex::new(None),
        org: Mutex::new(None),
    });
    let _guard = Guard(shared.clone());
    let t0 = Instant::now();
    shared.start();
    let install = install_id(&shared.data_dir()).await;
    *shared.install.lock().unwrap() = Some(install.clone());
    let http = reqwest::Client::new();
    let (code, org) = call(
        &shared,
        &http,
        Method::POST,
        "/v1/orgs",
        ADMIN,
        Some(json!({ "name": "crash" })),
    )
    .await;
    assert_eq!(code, 201, "{org}");
    let org_id = org["id"].as_str().unwrap().to_owned();
    let token = org["token"].as_str().unwrap().to_owned();
    *shared.org.lock().unwrap() = Some(org_id.clone());

    // The killer: SIGKILL after each gap, then a start on the same dir.
    let killer = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut at = Vec::new();
            for gap in gaps {
                tokio::time::sleep(gap).await;
                let shared = shared.clone();
                at.push(t0.elapsed());
                tokio::task::spawn_blocking(move || {
                    shared.kill();
                    shared.start();
                })
                .await
                .unwrap();
            }
            at
        })
    };

    // The workload: creations paced over the kills; in-flight deletes right
    // after their creation is accepted; the later ones after a delay.
    let created: Vec<(String, Plan, Option<tokio::task::JoinHandle<()>>)> =
        futures::stream::iter(plans.iter().copied().enumerate())
            .map(|(n, plan)| {
                let (shared, http, token) = (shared.clone(), http.clone(), token.clone());
                let delay = late_delay[n];
                let at = send_at[n];
                async move {
                    tokio::time::sleep(at.saturating_sub(t0.elapsed())).await;
                    let name = format!("c{n:02}");
                    let id = create(&shared, &http, &token, &name, plan).await;
                    let later = match plan {
                        Plan::DeleteInFlight => {
                            delete(&shared, &http, &token, &id).await;
                            None
                        }
                        // Off the creations' slots: the delay must not slow them.
                        Plan::DeleteLater => {
                            let (shared, http, token, id) =
                                (shared.clone(), http.clone(), token.clone(), id.clone());
                            Some(tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                delete(&shared, &http, &token, &id).await;
                            }))
                        }
                        Plan::Run | Plan::Exit => None,
                    };
                    (id, plan, later)
                }
            })
            .buffer_unordered(INSTANCES)
            .collect()
            .await;
    let sent = t0.elapsed();
    let mut plans = HashMap::new();
    for (id, plan, later) in created {
        if let Some(task) = later {
            task.await.unwrap();
        }
        plans.insert(id, plan);
    }
    let deletes_sent = t0.elapsed();
    let kills = killer.await.unwrap();
    eprintln!(
        "{} creations sent by {sent:?}, their deletes by {deletes_sent:?}; killed at {kills:?}",
        plans.len(),
    );
    let want_deleted = plans
        .values()
        .filter(|p| matches!(p, Plan::DeleteInFlight | Plan::DeleteLater))
        .count();

    // Settle: poll the database and the engine until they agree, or fail
    // with what still does not.
    let settle = Instant::now();
    let mut last = Vec::new();
    let mut stable_since = Instant::now();
    let mut dead_letters;
    loop {
        let (all, queued, dead) = rows(&shared.data_dir()).await;
        dead_letters = dead;
        let deleted = all
            .iter()
            .filter(|i| i.status == InstanceStatus::Deleted)
            .count();
        let mut v = violations(&all, &plans, &engine_state(&docker, &install).await);
        if queued > 0 {
            v.push(format!("{queued} deliveries queued or in flight"));
        }
        if all.len() != INSTANCES {
            v.push(format!("{} instances recorded, not {INSTANCES}", all.len()));
        }
        if v.is_empty() && deleted == want_deleted {
            break;
        }
        // Every flow ended and the same things disagree for longer than
        // the reconciler needs to sweep an orphan: nothing will change.
        let ended = queued == 0 && all.iter().all(|i| i.status.is_terminal());
        if !ended || v != last {
            stable_since = Instant::now();
        }
        last = v;
        if settle.elapsed() > SETTLE_DEADLINE || stable_since.elapsed() > STABLE {
            let tally: BTreeMap<String, usize> = all.iter().fold(BTreeMap::new(), |mut m, i| {
                *m.entry(i.status.to_string()).or_default() += 1;
                m
            });
            panic!(
                "seed {seed}: not settled after {:?} ({tally:?}; dead letters {dead_letters:?}):\n  {}\n--- log tail ---\n{}",
                settle.elapsed(),
                last.join("\n  "),
                shared.log_tail(60)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // What the safety net had to do: a flow that needed it is worth a look
    // even when the end state is right.
    let log = std::fs::read_to_string(shared.log()).unwrap_or_default();
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    eprintln!(
        "settled in {:?} (total {:?}); reconciler: {} orphans removed, {} flows re-nudged, {} timed out; {} starts waited for an unfinished create; dead letters: {dead_letters:?}",
        settle.elapsed(),
        t0.elapsed(),
        count("removed an orphan"),
        count("re-published its last event"),
        count("flow timed out"),
        count("code=container_not_ready"),
    );
}
