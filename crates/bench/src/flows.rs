//! `berth-bench flows`: the instance creation flow, event-driven, against a
//! synchronous baseline on the same runtime in the same process.
//!
//! The event-driven side creates `--count` instances with at most
//! `--concurrency` in flight, each through `create_instance` and the
//! workers, and measures create → the commit of `instance.running` (the
//! bus's feed of committed events wakes the waiting task). The baseline is the seed's ten-line
//! function — save, ensure host, ensure network, build, save, create+start,
//! save, attach, save IP, notify — called directly with the same runtime,
//! store and concurrency. The floor under both is `raw`: the engine's own
//! create + start + connect of the same image, with the same limits, env
//! and concurrency, nothing recorded (`raw_docker_p50_ms` on Docker), so
//! that Berth's cost is a ratio measured in the same run.
//!
//! The database is a SQLite file or (`--store postgres://…`) a fresh
//! database on a PostgreSQL server. There, `--workers N` starts N
//! independent dispatchers, each on a `Store` handle of its own (N
//! processes' worth in one process), and the creations are spread over
//! them in turn.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_core::domain::{ConditionKind, InstanceName, InstanceStatus};
use berth_core::events::instance as ev;
use berth_core::{Clock, EventPayload, IdGen, SeededRng, SystemClock};
use berth_flows::{Deps, names};
use berth_runtime::hosts::LocalProvider;
use berth_runtime::sim::{SimConfig, SimLatency, SimRuntime};
use berth_runtime::{ContainerRuntime, ContainerSpec, HostId, Limits, NetworkSpec, RuntimeError};
use berth_store::instances::{Instance, InstanceSpec};
use berth_store::{Location, Store, StoreOptions, Synchronous};
use berth_worker::{Registry, Workers};
use tokio::sync::{Semaphore, oneshot};

use crate::report::{peak_rss_mb, per_second, quantile, start_workers, table};
use crate::scratch::{Scratch, StoreArg};

#[derive(clap::Args)]
pub struct Args {
    /// `sim` (in memory) or `docker` (the local engine; base image
    /// `berth-test-base:latest`, made by scripts/test-image.sh).
    #[arg(long, default_value = "sim")]
    runtime: String,
    /// Instances created by each side.
    #[arg(long, default_value_t = 5000)]
    count: usize,
    /// Creations in flight at once, on each side.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Simulated latency of every engine operation.
    #[arg(long, default_value_t = 0)]
    op_latency_ms: u64,
    /// SQLite `synchronous`: full or normal (SQLite only: PostgreSQL
    /// commits as its server's `synchronous_commit` says).
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// The database: sqlite (a fresh file) or a postgres:// server URL, on
    /// which a fresh database is made for the run and dropped after it.
    #[arg(long, value_name = "sqlite|URL", default_value = "sqlite")]
    store: String,
    /// Independent dispatchers sharing the event-driven side's work, each
    /// with a store handle of its own, as separate processes would have.
    /// More than 1 only on PostgreSQL.
    #[arg(long, default_value_t = 1)]
    workers: usize,
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<bool>>>>;

/// How long the event-driven side may go without a flow ending before the
/// run is called stuck: a hung run says where it stood instead of waiting
/// forever.
const STALL: Duration = Duration::from_secs(60);

pub async fn run(args: Args) -> anyhow::Result<String> {
    if args.runtime != "sim" && args.runtime != "docker" {
        anyhow::bail!("--runtime must be sim or docker, got '{}'", args.runtime);
    }
    let synchronous = match args.synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => anyhow::bail!("--synchronous must be full or normal, got '{other}'"),
    };
    let store_arg = StoreArg::parse(&args.store)?;
    if args.workers == 0 {
        anyhow::bail!("--workers must be at least 1");
    }
    match store_arg {
        StoreArg::Sqlite if args.workers > 1 => anyhow::bail!(
            "--workers {}: SQLite has a single dispatcher lock, so only --workers 1 runs on it; \
             more dispatchers need --store postgres://…",
            args.workers
        ),
        // Refused rather than ignored: a run labelled `normal` would not be.
        StoreArg::Postgres(_) if synchronous != Synchronous::Full => anyhow::bail!(
            "--synchronous is SQLite's setting; on PostgreSQL the server's synchronous_commit applies"
        ),
        _ => {}
    }
    let tmp = tempfile::tempdir().context("cannot create the benchmark directory")?;
    let scratch = Scratch::make(&store_arg, &tmp.path().join("bench.db")).await?;
    let location = scratch.location().clone();
    let result = scratch
        .run(measure(args, store_arg, synchronous, location))
        .await;
    // The SQLite file goes only once the run is over.
    drop(tmp);
    result
}

/// Both sides and the engine alone on the database at `location`.
async fn measure(
    args: Args,
    store_arg: StoreArg,
    synchronous: Synchronous,
    location: Location,
) -> anyhow::Result<String> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // One handle per dispatcher, as separate processes would each have
    // (pool, ids, jitter): distinct seeds, so that their ids never repeat
    // one another's.
    let mut handles: Vec<(Store, Arc<SeededRng>)> = Vec::with_capacity(args.workers);
    for seed in 1..=args.workers as u64 {
        let rng = Arc::new(SeededRng::new(seed));
        let ids = Arc::new(IdGen::new(clock.clone(), rng.clone()));
        let store = Store::open_at(
            &location,
            StoreOptions {
                synchronous,
                ..StoreOptions::default()
            },
            clock.clone(),
            ids,
        )
        .await?;
        handles.push((store, rng));
    }
    // The baseline and the engine alone run on the first handle.
    let store = handles
        .first()
        .map(|(s, _)| s.clone())
        .context("no store handle")?;
    let host = HostId::new("local");
    // Each run's orgs are new, so runs on a real engine never collide and
    // their resources can be swept afterwards.
    let run_id = format!("{:x}", std::process::id());
    let (runtime, base_image): (Arc<dyn ContainerRuntime>, &str) = if args.runtime == "docker" {
        let docker = berth_docker::DockerRuntime::local()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        (Arc::new(docker), DOCKER_BASE)
    } else {
        let sim = Arc::new(SimRuntime::new(
            SimConfig::new(vec![host.clone()]).with_latency(SimLatency::uniform(
                Duration::from_millis(args.op_latency_ms),
            )),
        ));
        sim.add_base_image(&host, "busybox");
        (sim, "busybox")
    };
    let event_org = format!("bench{run_id}");
    let base_org = format!("baseline{run_id}");
    let raw_org = format!("raw{run_id}");
    let sem = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let raw = raw_engine(&store, &runtime, &host, &raw_org, base_image, &args, &sem).await?;
    let waiters: Waiters = Arc::default();
    // Every worker may hold as many deliveries as there are flows in flight.
    let conc = i64::try_from(args.concurrency.max(16)).unwrap_or(1024);
    // Each dispatcher with its own registry and build locks, as in a
    // process of its own; the engine is the one they all drive.
    let mut workers: Vec<(Workers, Store)> = Vec::with_capacity(handles.len());
    for (store, rng) in &handles {
        let deps = Arc::new(Deps {
            runtime: runtime.clone(),
            hosts: Arc::new(LocalProvider),
            limits: Limits::default(),
            install: store.install_id().to_owned(),
            builds: Default::default(),
        });
        let mut reg = Registry::new();
        berth_flows::register(&mut reg, deps)?;
        let w = start_workers(store, &reg, conc, rng.clone())
            .await
            .with_context(|| format!("cannot start dispatcher {}", workers.len() + 1))?;
        workers.push((w, store.clone()));
    }

    // Each flow ends when its `instance.running` (or `instance.failed`) is
    // committed: the bus says so as it commits, with no worker of ours in
    // the way to add a delivery's latency and load. Any dispatcher may be
    // the one that commits it, so every one is watched.
    let watchers: Vec<_> = workers
        .iter()
        .map(|(w, store)| watch(w.bus().committed(), waiters.clone(), store.clone()))
        .collect();

    // Event-driven, the creations dealt to the dispatchers in turn.
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut lat = Vec::with_capacity(args.count);
    let stuck = |done: usize| stalled(&waiters, &store, done, args.count);
    for (n, (w, store)) in (0..args.count).zip(workers.iter().cycle()) {
        let permit = match tokio::time::timeout(STALL, sem.clone().acquire_owned()).await {
            Ok(p) => p?,
            Err(_) => return Err(stuck(lat.len()).await),
        };
        let store = store.clone();
        let bus = w.bus();
        let waiters = waiters.clone();
        let org = event_org.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let name = InstanceName::parse(&format!("i{n}"))?;
            let start = Instant::now();
            let (tx, rx) = oneshot::channel();
            let (inst, _) =
                // With a quota, as the API always asks: its count is part of the cost.
                berth_flows::create_instance_on(&bus, &org, name, spec(base_image), Some(u32::MAX))
                    .await?;
            waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(inst.id.clone(), tx);
            // The flow may have ended before the waiter was in place.
            let now = store.instance(&inst.id).await?;
            let ok = match now.map(|i| i.status) {
                Some(s) if s.is_terminal() => {
                    waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&inst.id);
                    s == InstanceStatus::Running
                }
                _ => rx.await.unwrap_or(false),
            };
            anyhow::ensure!(ok, "instance {} failed", inst.id);
            anyhow::Ok(start.elapsed().as_micros() as u64)
        });
        while let Some(r) = tasks.try_join_next() {
            lat.push(r??);
        }
    }
    loop {
        match tokio::time::timeout(STALL, tasks.join_next()).await {
            Ok(Some(r)) => lat.push(r??),
            Ok(None) => break,
            Err(_) => return Err(stuck(lat.len()).await),
        }
    }
    let elapsed = t0.elapsed();
    // Where the dispatchers' time went, for the human table: summed, and
    // each one's attempts, which show how the work was shared.
    let (mut turns, mut turn_ms, mut commit_ms, mut handled) = (0, 0, 0, 0);
    let (mut duplicates, mut retries, mut dead) = (0, 0, 0);
    let mut shares = Vec::with_capacity(workers.len());
    for (w, _) in &workers {
        let st = w.bus().stats().clone();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        turns += load(&st.commits);
        turn_ms += load(&st.turn_micros) / 1000;
        commit_ms += load(&st.commit_micros) / 1000;
        handled += load(&st.handled);
        duplicates += load(&st.duplicates);
        retries += load(&st.retries);
        dead += load(&st.dead_letters);
        shares.push(load(&st.handled).to_string());
    }
    for w in watchers {
        w.abort();
    }
    for (w, _) in workers {
        w.shutdown().await?;
    }

    // The synchronous baseline on the same runtime and store.
    let t1 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut base = Vec::with_capacity(args.count);
    for n in 0..args.count {
        let permit = sem.clone().acquire_owned().await?;
        let store = store.clone();
        let rt = runtime.clone();
        let host = host.clone();
        let org = base_org.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            create_synchronously(&store, &*rt, &host, &org, base_image, n).await?;
            anyhow::Ok(start.elapsed().as_micros() as u64)
        });
        while let Some(r) = tasks.try_join_next() {
            base.push(r??);
        }
    }
    while let Some(r) = tasks.join_next().await {
        base.push(r??);
    }
    let base_elapsed = t1.elapsed();
    for (s, _) in &handles {
        s.close().await;
    }
    if args.runtime == "docker" {
        sweep(&*runtime, &host, &[&event_org, &base_org, &raw_org]).await;
    }

    anyhow::ensure!(
        lat.len() == args.count && base.len() == args.count,
        "lost measurements: {} and {} of {}",
        lat.len(),
        base.len(),
        args.count
    );
    lat.sort_unstable();
    let mut raw = raw;
    raw.sort_unstable();
    base.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let p50 = ms(quantile(&lat, 0.5));
    let p99 = ms(quantile(&lat, 0.99));
    let b50 = ms(quantile(&base, 0.5));
    let b99 = ms(quantile(&base, 0.99));
    let flows_per_s = per_second(args.count as u64, elapsed);
    let base_per_s = per_second(args.count as u64, base_elapsed);
    let ratio = if b50 > 0.0 { p50 / b50 } else { 0.0 };
    let r50 = ms(quantile(&raw, 0.5));
    let r99 = ms(quantile(&raw, 0.99));
    let to_raw = if r50 > 0.0 { p50 / r50 } else { 0.0 };
    let rss = peak_rss_mb().unwrap_or(0.0);
    table(
        "berth-bench flows",
        &[
            (
                "runtime",
                if args.runtime == "docker" {
                    "docker (the local engine)".to_owned()
                } else {
                    format!("sim, {} ms per operation", args.op_latency_ms)
                },
            ),
            ("store", location.to_string()),
            ("dispatchers", args.workers.to_string()),
            (
                "flows × concurrency",
                format!("{} × {}", args.count, args.concurrency),
            ),
            ("event-driven flows/s", format!("{flows_per_s:.0}")),
            (
                "  create→running p50 / p99",
                format!("{p50:.2} ms / {p99:.2} ms"),
            ),
            ("synchronous flows/s", format!("{base_per_s:.0}")),
            (
                "  create→running p50 / p99",
                format!("{b50:.2} ms / {b99:.2} ms"),
            ),
            ("ratio p50 (event / sync)", format!("{ratio:.3}")),
            (
                "engine alone: create+start+connect p50 / p99",
                format!("{r50:.2} ms / {r99:.2} ms"),
            ),
            ("ratio p50 (event / engine alone)", format!("{to_raw:.3}")),
            (
                "event-driven group commits",
                format!(
                    "{turns} ({handled} attempts; busy {turn_ms} ms of {} ms, {commit_ms} ms in the final statement{})",
                    elapsed.as_millis(),
                    if args.workers > 1 {
                        format!("; summed over {} dispatchers", args.workers)
                    } else {
                        String::new()
                    }
                ),
            ),
            ("  attempts per dispatcher", shares.join(" / ")),
            (
                "  duplicates / retries / dead letters",
                format!("{duplicates} / {retries} / {dead}"),
            ),
            ("peak RSS", format!("{rss:.1} MiB")),
        ],
    );
    Ok(serde_json::json!({
        "bench": "flows",
        "store": store_arg.name(),
        "workers": args.workers,
        "runtime": args.runtime,
        "count": args.count,
        "concurrency": args.concurrency,
        "op_latency_ms": args.op_latency_ms,
        "flows_per_s": flows_per_s.round(),
        "create_to_running_p50_ms": (p50 * 100.0).round() / 100.0,
        "create_to_running_p99_ms": (p99 * 100.0).round() / 100.0,
        "baseline_flows_per_s": base_per_s.round(),
        "baseline_p50_ms": (b50 * 100.0).round() / 100.0,
        "baseline_p99_ms": (b99 * 100.0).round() / 100.0,
        "ratio_p50": (ratio * 1000.0).round() / 1000.0,
        "raw_p50_ms": (r50 * 100.0).round() / 100.0,
        "raw_p99_ms": (r99 * 100.0).round() / 100.0,
        "raw_docker_p50_ms": (args.runtime == "docker").then(|| (r50 * 100.0).round() / 100.0),
        "raw_docker_p99_ms": (args.runtime == "docker").then(|| (r99 * 100.0).round() / 100.0),
        "ratio_to_raw_p50": (to_raw * 1000.0).round() / 1000.0,
        "peak_rss_mb": (rss * 10.0).round() / 10.0,
    })
    .to_string())
}

/// Ends every waiting flow whose `instance.running` or `instance.failed`
/// the dispatcher of `committed` commits.
fn watch(
    mut committed: tokio::sync::broadcast::Receiver<Arc<berth_core::Envelope>>,
    waiters: Waiters,
    store: Store,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match committed.recv().await {
                Ok(env) => {
                    let ok = env.event_type == ev::Running::TYPE;
                    if (ok || env.event_type == ev::Failed::TYPE)
                        && let Some(id) = env.subject.as_deref()
                        && let Some(tx) =
                            waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(id)
                    {
                        let _ = tx.send(ok);
                    }
                }
                // Missed some: whoever already ended is in the table.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let ids: Vec<String> = waiters
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .keys()
                        .cloned()
                        .collect();
                    for id in ids {
                        if let Ok(Some(i)) = store.instance(&id).await
                            && i.status.is_terminal()
                            && let Some(tx) = waiters
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(&id)
                        {
                            let _ = tx.send(i.status == InstanceStatus::Running);
                        }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}

/// The error of a run in which no flow ended for [`STALL`]: where it stood
/// (flows ended, those waiting by status, deliveries left), so that a hang
/// is a report rather than a wait.
async fn stalled(waiters: &Waiters, store: &Store, done: usize, count: usize) -> anyhow::Error {
    let ids: Vec<String> = waiters
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .keys()
        .cloned()
        .collect();
    let mut by_status = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let status = match store.instance(id).await {
            Ok(Some(i)) => i.status.to_string(),
            Ok(None) => "missing".to_owned(),
            Err(e) => format!("unreadable ({e})"),
        };
        *by_status.entry(status).or_default() += 1;
    }
    let statuses: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let number = |sql: &'static str| async move {
        match store.inspect().number(sql, []).await {
            Ok(n) => n.to_string(),
            Err(e) => format!("? ({e})"),
        }
    };
    anyhow::anyhow!(
        "stuck: no flow ended for {}s; {done} of {count} ended, {} waiting ({}); \
         deliveries {} ({} leased), dead letters {}",
        STALL.as_secs(),
        ids.len(),
        statuses.join(", "),
        number("SELECT COUNT(*) FROM deliveries").await,
        number("SELECT COUNT(*) FROM deliveries WHERE lease_owner IS NOT NULL").await,
        number("SELECT COUNT(*) FROM dead_letters").await,
    )
}

/// The base image of `--runtime docker`.
const DOCKER_BASE: &str = "berth-test-base:latest";

/// Removes every resource the run's orgs left on the engine.
async fn sweep(rt: &dyn ContainerRuntime, host: &HostId, orgs: &[&str]) {
    let Ok(all) = rt.list_labelled(host, berth_runtime::label::ORG).await else {
        eprintln!("warning: could not list the run's resources to remove them");
        return;
    };
    let ours = |r: &berth_runtime::Resource| {
        r.labels
            .get(berth_runtime::label::ORG)
            .is_some_and(|o| orgs.contains(&o.as_str()))
    };
    for kind in [
        berth_runtime::ResourceKind::Container,
        berth_runtime::ResourceKind::Image,
        berth_runtime::ResourceKind::Network,
    ] {
        for r in all.iter().filter(|r| r.kind == kind && ours(r)) {
            let done = match kind {
                berth_runtime::ResourceKind::Container => rt.remove_container(host, &r.name).await,
                berth_runtime::ResourceKind::Image => rt.remove_image(host, &r.name).await,
                berth_runtime::ResourceKind::Network => rt.remove_network(host, &r.name).await,
            };
            if let Err(e) = done {
                eprintln!("warning: could not remove {}: {e}", r.name);
            }
        }
    }
}

/// What every side runs: the base image, one env var, a command, and the
/// default limits.
fn spec(image: &str) -> InstanceSpec {
    InstanceSpec {
        image: image.into(),
        env: [("BENCH".to_owned(), "1".to_owned())].into(),
        cmd: Some(vec!["sleep".into(), "3600".into()]),
        ports: vec![],
        restart: Default::default(),
        build: None,
        limits: Some(berth_store::instances::ResourceLimits::DEFAULT),
    }
}

/// The engine alone: create + start + connect of the base image (pinned by
/// id, as Berth runs it) with the same limits and env, `count` times at the
/// same concurrency, recording nothing. Returns each one's µs.
async fn raw_engine(
    store: &Store,
    runtime: &Arc<dyn ContainerRuntime>,
    host: &HostId,
    org: &str,
    base: &str,
    args: &Args,
    sem: &Arc<Semaphore>,
) -> anyhow::Result<Vec<u64>> {
    let image = runtime
        .find_image(host, base)
        .await
        .map_err(|e| anyhow::anyhow!(e))?
        .with_context(|| format!("base image {base} is not on the engine"))?;
    let net = names::network(org);
    match runtime
        .create_network(
            host,
            &NetworkSpec {
                name: net.clone(),
                labels: names::org_labels(store.install_id(), org),
            },
        )
        .await
    {
        Ok(_) | Err(RuntimeError::Conflict { .. }) => {}
        Err(e) => anyhow::bail!("cannot make the raw side's network: {e}"),
    }
    let l = berth_store::instances::ResourceLimits::DEFAULT;
    let s = spec(base);
    let mut tasks = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(args.count);
    for n in 0..args.count {
        let permit = sem.clone().acquire_owned().await?;
        let rt = runtime.clone();
        let host = host.clone();
        let net = net.clone();
        let container = ContainerSpec {
            name: format!("berth-{org}-r{n}"),
            image: image.id.clone(),
            labels: names::org_labels(store.install_id(), org),
            limits: Limits {
                memory_bytes: Some(l.memory_bytes),
                nano_cpus: Some(l.nano_cpus),
                pids: Some(l.pids),
            },
            env: s.env.clone().into_iter().collect(),
            cmd: s.cmd.clone(),
        };
        tasks.spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let e = |e: RuntimeError| anyhow::anyhow!(e);
            rt.create_container(&host, &container).await.map_err(e)?;
            rt.start_container(&host, &container.name)
                .await
                .map_err(e)?;
            rt.connect_network(&host, &net, &container.name, &container.name)
                .await
                .map_err(e)?;
            anyhow::Ok(start.elapsed().as_micros() as u64)
        });
        while let Some(r) = tasks.try_join_next() {
            out.push(r??);
        }
    }
    while let Some(r) = tasks.join_next().await {
        out.push(r??);
    }
    Ok(out)
}

/// The seed's synchronous function: every step in sequence, each record
/// saved as it goes, no retries and no compensation.
async fn create_synchronously(
    store: &Store,
    rt: &dyn ContainerRuntime,
    host: &HostId,
    org: &str,
    base: &str,
    n: usize,
) -> anyhow::Result<()> {
    let engine = |e: RuntimeError| anyhow::anyhow!(e);
    // save instance
    let mut inst = berth_flows::new_instance(
        store,
        org,
        InstanceName::parse(&format!("b{n}"))?,
        spec(base),
    );
    let mut tx = store.begin().await?;
    tx.insert_instance(&inst).await?;
    tx.commit().await?;
    // ensure host
    rt.ping(host).await.map_err(engine)?;
    inst.host = Some(host.to_string());
    // ensure network
    let net = names::network(&inst.org_id);
    if rt.find_network(host, &net).await.map_err(engine)?.is_none() {
        match rt
            .create_network(
                host,
                &NetworkSpec {
                    name: net.clone(),
                    labels: names::org_labels(store.install_id(), &inst.org_id),
                },
            )
            .await
        {
            Ok(_) | Err(RuntimeError::Conflict { .. }) => {}
            Err(e) => return Err(engine(e)),
        }
    }
    inst.network = Some(net.clone());
    // resolve the image, save it
    let image = rt
        .find_image(host, &inst.spec.image)
        .await
        .map_err(engine)?
        .with_context(|| format!("base image {} is not on the engine", inst.spec.image))?;
    let tag = image.id;
    inst.image_tag = Some(tag.clone());
    save(store, &mut inst, ConditionKind::ImageBuilt).await?;
    // create + start container, save container
    let name = names::container(&inst);
    rt.create_container(
        host,
        &ContainerSpec {
            name: name.clone(),
            image: tag,
            labels: names::instance_labels(store.install_id(), &inst),
            limits: Limits::default(),
            env: inst.spec.env.clone().into_iter().collect(),
            cmd: inst.spec.cmd.clone(),
        },
    )
    .await
    .map_err(engine)?;
    rt.start_container(host, &name).await.map_err(engine)?;
    inst.container = Some(name.clone());
    save(store, &mut inst, ConditionKind::ContainerStarted).await?;
    // attach, save IP
    let ip = rt
        .connect_network(host, &net, &name, inst.name.as_str())
        .await
        .map_err(engine)?;
    inst.ip = Some(ip);
    inst.status = InstanceStatus::Running;
    save(store, &mut inst, ConditionKind::NetworkAttached).await?;
    // notify: nothing listens in the seed either.
    Ok(())
}

async fn save(store: &Store, inst: &mut Instance, cond: ConditionKind) -> anyhow::Result<()> {
    inst.conditions.set(cond, true, "Done", "", store.now());
    let mut tx = store.begin().await?;
    anyhow::ensure!(
        tx.update_instance(inst, store.now()).await?,
        "lost update on {}",
        inst.id
    );
    tx.commit().await
}
