//! `berth-bench chaos`: the real workers, store, dispatcher, reconciler and
//! engine-event listener against the simulated runtime behind the fault
//! wrapper, driven by user actions drawn from a seed, with engine faults of
//! every kind, engine events at any moment (deaths, OOM kills, removals
//! behind Berth's back), engine outages and process crashes (the dispatcher
//! stopped with no grace, in-flight attempts abandoned, the store reopened
//! so that nothing of the process's memory survives); then quiescence and
//! the design's invariants.
//!
//! First slice: runs are *seeded* (actions, fault kinds and rates, crash
//! points come from the seed) but not yet *deterministic*: they run on the
//! system clock with a multi-threaded runtime and SQLite's own thread, so
//! a seed replays the same plan, not the same interleaving. `simulated_s`
//! is the time the runs took on that clock until a simulated clock drives
//! them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_core::domain::{InstanceName, InstanceStatus};
use berth_core::{Clock, IdGen, SeededRng, SystemClock};
use berth_flows::reconciler::{Reconciler, ReconcilerConfig};
use berth_flows::{Deps, names};
use berth_runtime::faulty::{Fault, FaultKind, FaultyRuntime, Op};
use berth_runtime::hosts::LocalProvider;
use berth_runtime::sim::{SimConfig, SimLatency, SimRuntime};
use berth_runtime::{ContainerRuntime, ContainerState, HostId, Limits, label};
use berth_store::instances::{self, Instance, InstanceSpec};
use berth_store::{Store, StoreOptions};
use berth_worker::policy::BackoffConfig;
use berth_worker::{BusOptions, Policies, PolicyConfig, Registry, Workers, WorkersConfig};
use tokio_util::sync::CancellationToken;

use crate::report::table;

#[derive(clap::Args)]
pub struct Args {
    /// How many seeds to run (1..=S), unless `--seed` names one.
    #[arg(long, default_value_t = 10)]
    seeds: u64,
    /// User actions per seed.
    #[arg(long, default_value_t = 200)]
    flows: usize,
    /// Chance that any runtime operation fails (kinds drawn per operation).
    #[arg(long, default_value_t = 0.1)]
    fault_rate: f64,
    /// A simulated crash about every K handled deliveries (0: none).
    #[arg(long, default_value_t = 300)]
    crash_every: u64,
    /// Run this seed only (to reproduce a failure).
    #[arg(long)]
    seed: Option<u64>,
}

const KINDS: [FaultKind; 5] = [
    FaultKind::Transient,
    FaultKind::Permanent,
    FaultKind::Timeout,
    FaultKind::Hang,
    FaultKind::LostReply,
];

/// What one seed's run found.
struct SeedRun {
    violations: Vec<String>,
    converged: bool,
    faults: u64,
    crashes: u64,
    elapsed: Duration,
}

pub async fn run(args: Args) -> anyhow::Result<String> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.fault_rate),
        "--fault-rate must be 0 to 1, got {}",
        args.fault_rate
    );
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (1..=args.seeds.max(1)).collect(),
    };
    let t0 = Instant::now();
    let (mut converged, mut faults, mut crashes, mut simulated) = (0u64, 0u64, 0u64, 0f64);
    let mut violations = 0usize;
    let mut samples: Vec<String> = Vec::new();
    for &seed in &seeds {
        let r = run_seed(seed, &args)
            .await
            .with_context(|| format!("seed {seed}"))?;
        converged += u64::from(r.converged);
        faults += r.faults;
        crashes += r.crashes;
        simulated += r.elapsed.as_secs_f64();
        violations += r.violations.len();
        for v in &r.violations {
            eprintln!(
                "seed {seed}: {v} (re-run: berth-bench chaos --seed {seed} --flows {} --fault-rate {} --crash-every {})",
                args.flows, args.fault_rate, args.crash_every
            );
            if samples.len() < 5 {
                samples.push(format!("seed {seed}: {v}"));
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    table(
        "berth-bench chaos",
        &[
            (
                "seeds × actions",
                format!("{} × {}", seeds.len(), args.flows),
            ),
            ("fault rate", format!("{}", args.fault_rate)),
            ("crash every", format!("~{} deliveries", args.crash_every)),
            ("converged", format!("{converged} of {}", seeds.len())),
            ("violations", violations.to_string()),
            ("faults injected", faults.to_string()),
            ("crashes", crashes.to_string()),
            ("wall", format!("{wall:.1} s")),
        ],
    );
    Ok(serde_json::json!({
        "bench": "chaos",
        "seeds": seeds.len(),
        "flows": args.flows,
        "fault_rate": args.fault_rate,
        "crash_every": args.crash_every,
        "converged": converged,
        "violations": violations,
        "violation_samples": samples,
        "faults_injected": faults,
        "crashes": crashes,
        "simulated_s": (simulated * 10.0).round() / 10.0,
        "wall_s": (wall * 10.0).round() / 10.0,
    })
    .to_string())
}

fn host() -> HostId {
    HostId::new(berth_runtime::hosts::LOCAL)
}

/// Fast retries and short timeouts, so that faults and hangs resolve in
/// milliseconds.
fn policies(reg: &Registry) -> anyhow::Result<Policies> {
    let mut cfg = WorkersConfig::new();
    cfg.insert(
        "default".into(),
        PolicyConfig {
            max_attempts: Some(6),
            timeout: Some(Duration::from_millis(300)),
            backoff: Some(BackoffConfig {
                initial: Some(Duration::from_millis(2)),
                multiplier: Some(2.0),
                max: Some(Duration::from_millis(40)),
                jitter: None,
            }),
            concurrency: Some(64),
            on_exhausted: None,
        },
    );
    Policies::resolve(&cfg, reg.names()).map_err(|e| anyhow::anyhow!("bad chaos policy: {e:?}"))
}

/// One "process": the store opened anew, its workers, listener and reconciler.
struct Process {
    store: Store,
    workers: Workers,
    cancel: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn boot(
    path: &Path,
    seed: u64,
    generation: u64,
    deps: &Arc<Deps>,
) -> anyhow::Result<(Process, Arc<Deps>)> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let rng = Arc::new(SeededRng::new(seed ^ generation.rotate_left(32)));
    let ids = Arc::new(IdGen::new(clock.clone(), rng.clone()));
    let store = Store::open(path, StoreOptions::default(), clock, ids).await?;
    let deps = Arc::new(deps.with_install(store.install_id()));
    let mut reg = Registry::new();
    berth_flows::register(&mut reg, deps.clone())?;
    let workers = Workers::start(
        store.clone(),
        &reg,
        &policies(&reg)?,
        BusOptions {
            shutdown_grace: Duration::ZERO,
            rng,
            ..BusOptions::default()
        },
    )
    .await?;
    let cancel = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(berth_flows::exits::listen(
            workers.bus(),
            deps.clone(),
            host(),
            cancel.clone(),
        )),
        tokio::spawn(Reconciler::new(reconciler_config()).run(
            workers.bus(),
            deps.clone(),
            cancel.clone(),
        )),
    ];
    Ok((
        Process {
            store,
            workers,
            cancel,
            tasks,
        },
        deps,
    ))
}

fn reconciler_config() -> ReconcilerConfig {
    ReconcilerConfig {
        period: Duration::from_millis(200),
        grace: Duration::from_millis(400),
        flow_deadline: Duration::from_secs(2),
        max_republish: 3,
    }
}

impl Process {
    /// A crash: nothing in flight finishes, nothing in memory survives.
    async fn crash(self) {
        self.cancel.cancel();
        for t in self.tasks {
            t.abort();
        }
        // No grace: attempts still running are abandoned to the next start.
        let _ = self.workers.shutdown().await;
        self.store.pool().close().await;
    }
}

async fn run_seed(seed: u64, args: &Args) -> anyhow::Result<SeedRun> {
    let start = Instant::now();
    let dir = tempfile::tempdir().context("cannot create the run's directory")?;
    let path = dir.path().join("chaos.db");
    let rng = SeededRng::new(seed);
    let sim = Arc::new(SimRuntime::new(
        SimConfig::new(vec![host()]).with_latency(SimLatency::uniform(Duration::from_millis(1))),
    ));
    sim.add_base_image(&host(), "busybox");
    let faulty = Arc::new(FaultyRuntime::new(sim.clone(), seed));
    let rates: Vec<(Op, Fault)> = Op::ALL
        .iter()
        .map(|op| {
            let kind = KINDS[usize::try_from(rng.between(0, 4)).unwrap_or(0)];
            (*op, Fault::new(args.fault_rate, kind))
        })
        .collect();
    let set_rates = |on: bool| {
        for (op, f) in &rates {
            faulty.set_fault(*op, on.then_some(*f));
        }
    };
    set_rates(true);
    let template = Arc::new(Deps {
        runtime: faulty.clone(),
        hosts: Arc::new(LocalProvider),
        limits: Limits::default(),
        install: String::new(),
        builds: Default::default(),
    });
    let mut generation = 0u64;
    let (mut proc, mut deps) = boot(&path, seed, generation, &template).await?;
    let mut crashes = 0u64;
    let mut next_crash = jittered(&rng, args.crash_every);
    let orgs = ["orga", "orgb", "orgc"];
    let mut known: Vec<(String, String)> = Vec::new();
    for n in 0..args.flows {
        let roll = rng.between(0, 99);
        let store = proc.store.clone();
        match roll {
            0..=54 => {
                let org = choose(&rng, &orgs).copied().unwrap_or("orga");
                let spec = InstanceSpec {
                    image: "busybox".into(),
                    build: None,
                    env: Default::default(),
                    cmd: None,
                    ports: vec![],
                    restart: if rng.between(0, 3) == 0 {
                        berth_core::domain::RestartPolicy::OnFailure { max: Some(2) }
                    } else {
                        Default::default()
                    },
                    limits: None,
                };
                let name = InstanceName::parse(&format!("i{n}"))?;
                if let Ok((i, _)) =
                    berth_flows::create_instance_on(&proc.workers.bus(), org, name, spec, Some(50))
                        .await
                {
                    known.push((org.to_owned(), i.id));
                }
            }
            55..=66 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::delete_instance(&store, &org, &id).await;
                }
            }
            67..=74 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::stop_instance(&store, &org, &id).await;
                }
            }
            75..=82 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::start_instance(&store, &org, &id).await;
                }
            }
            83..=88 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::restart_instance(&store, &org, &id).await;
                }
            }
            89..=94 => {
                // An engine event at any moment: a death or an OOM kill of a
                // container, whatever its flow is doing.
                let all = sim.containers(&host());
                if let Some(c) = choose(&rng, &all) {
                    let _ = sim.kill(
                        &host(),
                        &c.name,
                        1 + rng.between(0, 2) as i64,
                        rng.between(0, 3) == 0,
                    );
                }
            }
            95..=96 => {
                // Removed behind Berth's back.
                let all = sim.containers(&host());
                if let Some(c) = choose(&rng, &all) {
                    let _ = sim.remove_container(&host(), &c.name).await;
                }
            }
            _ => {
                // An engine outage: every call fails for a stretch.
                faulty.set_fault_all(Some(Fault::new(1.0, FaultKind::Transient)));
                tokio::time::sleep(Duration::from_millis(rng.between(5, 50))).await;
                set_rates(true);
            }
        }
        // A little time between actions, so that flows overlap them.
        tokio::time::sleep(Duration::from_micros(rng.between(0, 2_000))).await;
        let handled = proc
            .workers
            .bus()
            .stats()
            .handled
            .load(std::sync::atomic::Ordering::Relaxed);
        if args.crash_every > 0 && handled >= next_crash {
            proc.crash().await;
            crashes += 1;
            generation += 1;
            (proc, deps) = boot(&path, seed, generation, &template).await?;
            next_crash = jittered(&rng, args.crash_every);
        }
    }
    // Quiescence: faults off, the reconciler running, until nothing moves.
    set_rates(false);
    faulty.set_fault_all(None);
    let converged = quiesce(&proc.store, Duration::from_secs(30)).await?;
    // Orphans go after the grace period: two explicit passes that far apart.
    let mut r = Reconciler::new(reconciler_config());
    let bus = proc.workers.bus();
    let _ = r.pass(&bus, &deps).await;
    tokio::time::sleep(reconciler_config().grace + Duration::from_millis(50)).await;
    let _ = r.pass(&bus, &deps).await;
    let converged = converged && quiesce(&proc.store, Duration::from_secs(10)).await?;
    let violations = check(&proc.store, &sim, &deps).await?;
    let faults = faulty.injected();
    proc.crash().await;
    Ok(SeedRun {
        violations,
        converged,
        faults,
        crashes,
        elapsed: start.elapsed(),
    })
}

/// One of `items`, drawn from `rng`; `None` when there are none.
fn choose<'a, T>(rng: &SeededRng, items: &'a [T]) -> Option<&'a T> {
    let last = u64::try_from(items.len().checked_sub(1)?).ok()?;
    items.get(usize::try_from(rng.between(0, last)).ok()?)
}

/// `every` ± half, at least 1.
fn jittered(rng: &SeededRng, every: u64) -> u64 {
    (every / 2 + rng.between(0, every)).max(1)
}

/// Waits until no delivery is left and every instance is in a terminal
/// status, for at most `limit`; whether it got there.
async fn quiesce(store: &Store, limit: Duration) -> anyhow::Result<bool> {
    let end = Instant::now() + limit;
    loop {
        let pending: i64 = berth_store::sqlx::query_scalar("SELECT COUNT(*) FROM deliveries")
            .fetch_one(store.pool())
            .await?;
        let all = {
            let mut c = store.pool().acquire().await?;
            instances::list(&mut c, None).await?
        };
        if pending == 0 && all.iter().all(|i| i.status.is_terminal()) {
            return Ok(true);
        }
        if Instant::now() > end {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// DESIGN §8's invariants, and that what the store says is true.
async fn check(store: &Store, sim: &SimRuntime, deps: &Deps) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let all: Vec<Instance> = {
        let mut c = store.pool().acquire().await?;
        instances::list(&mut c, None).await?
    };
    let by_id: HashMap<&str, &Instance> = all.iter().map(|i| (i.id.as_str(), i)).collect();
    let live = |i: &Instance| !matches!(i.status, InstanceStatus::Failed | InstanceStatus::Deleted);
    for i in &all {
        if !i.status.is_terminal() {
            out.push(format!(
                "flow did not end: instance {} is {}",
                i.name, i.status
            ));
        }
    }
    let containers = sim.containers(&host());
    let mut per_generation: HashMap<(String, String), usize> = HashMap::new();
    for c in &containers {
        if c.labels.get(label::INSTALL) != Some(&deps.install) {
            continue;
        }
        let Some(id) = c.labels.get(label::INSTANCE) else {
            continue;
        };
        let generation = c.labels.get(label::GENERATION).cloned().unwrap_or_default();
        *per_generation.entry((id.clone(), generation)).or_default() += 1;
        match by_id.get(id.as_str()) {
            None => out.push(format!("container {} has no record", c.name)),
            Some(i) if !live(i) => out.push(format!(
                "container {} outlives its {} instance {}",
                c.name, i.status, i.name
            )),
            _ => {}
        }
    }
    for (k, n) in per_generation {
        if n > 1 {
            out.push(format!("{n} containers for instance generation {k:?}"));
        }
    }
    let orgs_live: HashSet<&str> = all
        .iter()
        .filter(|i| live(i))
        .map(|i| i.org_id.as_str())
        .collect();
    for n in sim.networks(&host()) {
        if let Some(org) = n.labels.get(label::ORG)
            && !orgs_live.contains(org.as_str())
        {
            out.push(format!(
                "network {} outlives every instance of its org",
                n.name
            ));
        }
    }
    // What the API says is true.
    for i in all.iter().filter(|i| live(i)) {
        let name = names::container(i);
        let state = containers.iter().find(|c| c.name == name).map(|c| c.state);
        match (i.status, state) {
            (InstanceStatus::Running, Some(ContainerState::Running)) => {}
            (InstanceStatus::Running, s) => out.push(format!(
                "instance {} is running but its container is {s:?}",
                i.name
            )),
            (InstanceStatus::Exited | InstanceStatus::Stopped, Some(ContainerState::Running)) => {
                out.push(format!(
                    "instance {} is {} but its container runs",
                    i.name, i.status
                ))
            }
            _ => {}
        }
    }
    // No event lost: every delivery was handled or dead-lettered (a
    // delivery row goes only with its inbox row or its dead letter).
    let left: Vec<(String, String, i64, i64, Option<String>)> = berth_store::sqlx::query_as(
        "SELECT d.worker, e.type, d.attempt, d.not_before, d.lease_owner
           FROM deliveries d JOIN events e ON e.id = d.event_id",
    )
    .fetch_all(store.pool())
    .await?;
    let now = store.now().as_micros();
    for (worker, event_type, attempt, not_before, lease) in left {
        out.push(format!(
            "a delivery never handled: {worker} of {event_type}, attempt {attempt}, due in {} ms, lease {lease:?}",
            (not_before - now) / 1000
        ));
    }
    Ok(out)
}
