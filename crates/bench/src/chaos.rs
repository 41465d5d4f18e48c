//! `berth-bench chaos`: a deterministic simulation of the control plane. The
//! real workers, store, dispatcher, reconciler and engine-event listener run
//! against the simulated runtime behind the fault wrapper, driven by user
//! actions drawn from a seed, with engine faults of every kind, engine
//! events at any moment (deaths, OOM kills, removals behind Berth's back),
//! engine outages, duplicate deliveries and process crashes (every attempt
//! stopped where it is, unrecorded, the store reopened so that nothing of
//! the process's memory survives); then quiescence, with simulated time
//! running on, and the design's invariants.
//!
//! Determinism: each seed runs on a runtime of its own, one thread, with
//! tokio's clock paused and moved only by the driver (a millisecond at a
//! time, once nothing is left to run at the current instant), and the tasks
//! take turns through [`berth_core::sched`], so that SQLite answering from
//! its own threads cannot reorder them. The same seed and arguments give
//! the same run: the same faults, crashes, violations and event log (the
//! `digest` of the log says so).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_core::domain::{InstanceName, InstanceStatus};
use berth_core::sched::{self, Sched};
use berth_core::{Clock, IdGen, SeededRng, Timestamp};
use berth_flows::reconciler::{Reconciler, ReconcilerConfig};
use berth_flows::{Deps, names};
use berth_runtime::faulty::{Fault, FaultKind, FaultyRuntime, Op};
use berth_runtime::hosts::LocalProvider;
use berth_runtime::sim::{SimConfig, SimLatency, SimRuntime};
use berth_runtime::{ContainerRuntime, ContainerState, HostId, Limits, label};
use berth_store::RowRead;
use berth_store::instances::{Instance, InstanceSpec};
use berth_store::ops::Arg;
use berth_store::{Store, StoreOptions, Synchronous};
use berth_worker::clock::TokioClock;
use berth_worker::policy::BackoffConfig;
use berth_worker::{BusOptions, Policies, PolicyConfig, Registry, Workers, WorkersConfig};
use tokio_util::sync::CancellationToken;

use crate::report::table;

#[derive(clap::Args, Clone, Debug)]
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
    /// Write each seed's final event log and records to FILE.<seed>, one
    /// line each: two runs of a seed give the same files.
    #[arg(long, value_name = "FILE")]
    log: Option<std::path::PathBuf>,
    /// Do not look for the shortest run of a failing seed (by default each
    /// failing seed is re-run with fewer actions, a bisection, to find the
    /// fewest that still break an invariant).
    #[arg(long)]
    no_shrink: bool,
    /// A planted bug, to test the checks and the shrinking: after action
    /// AT, the record that a worker handled an event is erased, so the
    /// event is lost from the bus's point of view.
    #[arg(long, value_name = "AT", hide = true)]
    plant_lost_event: Option<usize>,
    /// A planted bug: after action AT, a `failed` instance is written back
    /// to `starting` in the same generation, a move out of a final state.
    #[arg(long, value_name = "AT", hide = true)]
    plant_revived: Option<usize>,
}

const KINDS: [FaultKind; 5] = [
    FaultKind::Transient,
    FaultKind::Permanent,
    FaultKind::Timeout,
    FaultKind::Hang,
    FaultKind::LostReply,
];

/// The simulated clock starts here (2026-01-01T00:00:00Z), whatever the
/// wall clock says, so that timestamps, ids and the log repeat.
const EPOCH_MICROS: i64 = 1_767_225_600_000_000;

/// One broken invariant, and the instance it concerns (for its trace).
struct Violation {
    instance: Option<String>,
    what: String,
}

/// What one seed's run found.
struct SeedRun {
    violations: Vec<Violation>,
    /// The violating instances' events and attempts, one line each.
    traces: HashMap<String, Vec<String>>,
    converged: bool,
    faults: u64,
    crashes: u64,
    simulated: Duration,
    digest: u64,
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
    let mut digest = std::collections::hash_map::DefaultHasher::new();
    for &seed in &seeds {
        let a = args.clone();
        let r = tokio::task::spawn_blocking(move || run_isolated(seed, &a))
            .await
            .context("a seed's thread failed")?
            .with_context(|| format!("seed {seed}"))?;
        converged += u64::from(r.converged);
        faults += r.faults;
        crashes += r.crashes;
        simulated += r.simulated.as_secs_f64();
        violations += r.violations.len();
        r.digest.hash(&mut digest);
        for v in &r.violations {
            eprintln!(
                "seed {seed}: {} (re-run: berth-bench chaos --seed {seed} --flows {} --fault-rate {} --crash-every {})",
                v.what, args.flows, args.fault_rate, args.crash_every
            );
            if samples.len() < 5 {
                samples.push(format!("seed {seed}: {}", v.what));
            }
        }
        if r.violations.is_empty() {
            continue;
        }
        // The shortest run that still shows a violation, and its traces:
        // the actions of a seed are drawn one after another, so a run of
        // fewer actions is the start of the longer one.
        let (flows, short) = if args.no_shrink {
            (args.flows, r)
        } else {
            shrink(seed, &args, r).await?
        };
        eprintln!(
            "seed {seed}: shortest failing run: {flows} of {} actions (re-run: berth-bench chaos --seed {seed} --flows {flows} --fault-rate {} --crash-every {})",
            args.flows, args.fault_rate, args.crash_every
        );
        let mut shown: HashSet<&str> = HashSet::new();
        for v in &short.violations {
            eprintln!("  {}", v.what);
            if let Some(i) = &v.instance
                && shown.insert(i)
                && let Some(t) = short.traces.get(i)
            {
                eprintln!("  trace of instance {i}:");
                for line in t {
                    eprintln!("    {line}");
                }
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
            ("simulated", format!("{simulated:.1} s")),
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
        "digest": format!("{:016x}", digest.finish()),
    })
    .to_string())
}

/// Bisects the number of actions for the fewest with which `seed` still
/// breaks an invariant; returns that number and its run. Whether a shorter
/// run fails is not monotone in general, so this finds *a* short failing
/// run, not always the shortest; every run it returns did fail.
async fn shrink(seed: u64, args: &Args, full: SeedRun) -> anyhow::Result<(usize, SeedRun)> {
    let (mut lo, mut hi) = (1usize, args.flows);
    let mut best = full;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let mut a = args.clone();
        a.flows = mid;
        a.log = None;
        let r = tokio::task::spawn_blocking(move || run_isolated(seed, &a))
            .await
            .context("a seed's thread failed")?
            .with_context(|| format!("seed {seed} with {mid} actions"))?;
        if r.violations.is_empty() {
            lo = mid + 1;
        } else {
            hi = mid;
            best = r;
        }
    }
    Ok((hi, best))
}

/// Runs one seed on a runtime of its own: one thread, the clock paused, the
/// tasks taking turns.
fn run_isolated(seed: u64, args: &Args) -> anyhow::Result<SeedRun> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .context("cannot start the simulation's runtime")?;
    let s = Sched::new();
    sched::install(Some(s.clone()));
    let watchdog = Watchdog::start(seed, s.clone());
    let out = rt.block_on(sched::task(run_seed(seed, args, s)));
    watchdog.stop();
    sched::install(None);
    out
}

/// A deadlock in the simulation (a task waiting, holding the baton, on one
/// that needs it) would hang the run: a thread on the wall clock notices
/// when no task has taken a turn for a long while, says so, and ends the
/// process rather than hang CI.
struct Watchdog {
    done: std::sync::mpsc::Sender<()>,
}

impl Watchdog {
    const STUCK: Duration = Duration::from_secs(60);

    fn start(seed: u64, sched: Arc<Sched>) -> Watchdog {
        let (done, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let mut last = sched.turns();
            loop {
                match rx.recv_timeout(Self::STUCK) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let now = sched.turns();
                if now == last {
                    eprintln!(
                        "seed {seed}: the simulation is stuck (no task took a turn in {}s, {now} turns so far): a deadlock",
                        Self::STUCK.as_secs()
                    );
                    std::process::exit(3);
                }
                last = now;
            }
        });
        Watchdog { done }
    }

    fn stop(self) {
        let _ = self.done.send(());
    }
}

/// The driver's hold on time.
struct Time {
    sched: Arc<Sched>,
    elapsed: Duration,
}

impl Time {
    const TICK: Duration = Duration::from_millis(1);

    /// Lets everything due now run, then moves time one tick.
    async fn tick(&mut self) {
        let sched = self.sched.clone();
        sched::idle(async move {
            sched.settle().await;
            tokio::time::advance(Self::TICK).await;
            sched.settle().await;
        })
        .await;
        self.elapsed += Self::TICK;
    }

    async fn run_for(&mut self, d: Duration) {
        let end = self.elapsed + d;
        while self.elapsed < end {
            self.tick().await;
        }
    }
}

fn host() -> HostId {
    HostId::new(berth_runtime::hosts::LOCAL)
}

/// Fast retries and short timeouts, so that faults and hangs resolve in
/// simulated milliseconds.
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
    registry: Registry,
}

async fn boot(
    path: &Path,
    seed: u64,
    generation: u64,
    deps: &Arc<Deps>,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<(Process, Arc<Deps>)> {
    let rng = Arc::new(SeededRng::new(seed ^ generation.rotate_left(32)));
    let ids = Arc::new(IdGen::new(clock.clone(), rng.clone()));
    let options = StoreOptions {
        synchronous: Synchronous::Normal,
        // Enough that no reader ever waits for a connection another task
        // holds while it waits on the engine.
        max_connections: 256,
        ..StoreOptions::default()
    };
    let store = Store::open(path, options, clock, ids).await?;
    let deps = Arc::new(deps.with_install(store.install_id()));
    let mut reg = Registry::new();
    berth_flows::register(&mut reg, deps.clone())?;
    let workers = Workers::start(
        store.clone(),
        &reg,
        &policies(&reg)?,
        BusOptions {
            shutdown_grace: Duration::ZERO,
            // No background checkpoints: SQLite's own suffice here.
            checkpoint_interval: None,
            rng,
            ..BusOptions::default()
        },
    )
    .await?;
    let cancel = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(sched::task(berth_flows::exits::listen(
            workers.bus(),
            deps.clone(),
            host(),
            cancel.clone(),
        ))),
        tokio::spawn(sched::task(Reconciler::new(reconciler_config()).run(
            workers.bus(),
            deps.clone(),
            cancel.clone(),
        ))),
    ];
    Ok((
        Process {
            store,
            workers,
            cancel,
            tasks,
            registry: reg,
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
        call_timeout: Duration::from_millis(300),
    }
}

impl Process {
    /// A crash: every task stops where it is, nothing in memory survives.
    async fn crash(self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        self.workers.crash().await;
        self.store.close().await;
    }
}

async fn run_seed(seed: u64, args: &Args, sched: Arc<Sched>) -> anyhow::Result<SeedRun> {
    // Keeps tokio from moving the paused clock by itself while a task waits
    // on SQLite's threads (a running blocking task inhibits auto-advance):
    // only `Time::tick` moves it.
    let (keep, hold) = std::sync::mpsc::channel::<()>();
    let inhibitor = tokio::task::spawn_blocking(move || {
        let _ = hold.recv();
    });
    // On the paused clock, from a fixed instant: timestamps and ids repeat.
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::at(Timestamp::from_micros(EPOCH_MICROS)));
    let mut time = Time {
        sched,
        elapsed: Duration::ZERO,
    };
    let out = drive(seed, args, &mut time, clock).await;
    drop(keep);
    let _ = inhibitor.await;
    out
}

async fn drive(
    seed: u64,
    args: &Args,
    time: &mut Time,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<SeedRun> {
    let dir = tempfile::tempdir().context("cannot create the run's directory")?;
    let path = dir.path().join("chaos.db");
    let rng = SeededRng::new(seed);
    let sim = Arc::new(SimRuntime::new(
        SimConfig::new(vec![host()])
            .with_latency(SimLatency::uniform(Duration::from_millis(1)))
            .with_seed(seed)
            .with_clock(clock.clone()),
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
    let (mut proc, mut deps) = boot(&path, seed, generation, &template, clock.clone()).await?;
    let mut crashes = 0u64;
    let mut handled_before = 0u64;
    let mut next_crash = jittered(&rng, args.crash_every);
    let orgs = ["orga", "orgb", "orgc"];
    let mut moves = Moves::default();
    let mut known: Vec<(String, String)> = Vec::new();
    for n in 0..args.flows {
        let roll = rng.between(0, 99);
        let store = proc.store.clone();
        match roll {
            0..=52 => {
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
            53..=64 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::delete_instance(&store, &org, &id).await;
                }
            }
            65..=72 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::stop_instance(&store, &org, &id).await;
                }
            }
            73..=80 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::start_instance(&store, &org, &id).await;
                }
            }
            81..=86 => {
                if let Some((org, id)) = choose(&rng, &known).cloned() {
                    let _ = berth_flows::restart_instance(&store, &org, &id).await;
                }
            }
            87..=92 => {
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
            93..=94 => {
                // Removed behind Berth's back.
                // The removal takes the engine's time: a task of its own,
                // done while time runs on.
                let all = sim.containers(&host());
                if let Some(c) = choose(&rng, &all) {
                    let (sim, name) = (sim.clone(), c.name.clone());
                    tokio::spawn(sched::task(async move {
                        let _ = sim.remove_container(&host(), &name).await;
                    }));
                }
            }
            95..=97 => {
                // A duplicate delivery: an event handled already is
                // delivered again, as an at-least-once bus may.
                redeliver(&store, &rng).await?;
            }
            _ => {
                // An engine outage: every call fails for a stretch.
                faulty.set_fault_all(Some(Fault::new(1.0, FaultKind::Transient)));
                time.run_for(Duration::from_millis(rng.between(5, 50)))
                    .await;
                set_rates(true);
            }
        }
        // A little time between actions, so that flows overlap them.
        time.run_for(Duration::from_millis(rng.between(0, 2))).await;
        if args.plant_lost_event == Some(n) {
            let mut tx = store.begin().await?;
            tx.execute_for_test(
                "DELETE FROM inbox WHERE (worker, event_id) =
                   (SELECT worker, event_id FROM inbox ORDER BY event_id, worker LIMIT 1)",
                [],
            )
            .await?;
            tx.commit().await?;
        }
        if args.plant_revived == Some(n) {
            let mut tx = store.begin().await?;
            tx.execute_for_test(
                "UPDATE instances SET status = 'starting', updated_at = ? WHERE id =
                   (SELECT id FROM instances WHERE status = 'failed' ORDER BY id LIMIT 1)",
                [store.now().into()],
            )
            .await?;
            tx.commit().await?;
        }
        moves.look(&proc.store).await?;
        let handled = handled_before
            + proc
                .workers
                .bus()
                .stats()
                .handled
                .load(std::sync::atomic::Ordering::Relaxed);
        if args.crash_every > 0 && handled >= next_crash {
            proc.crash().await;
            crashes += 1;
            generation += 1;
            handled_before = handled;
            (proc, deps) = boot(&path, seed, generation, &template, clock.clone()).await?;
            next_crash = handled + jittered(&rng, args.crash_every);
        }
    }
    // Quiescence: faults off, the reconciler running, simulated time going
    // on until nothing moves.
    set_rates(false);
    faulty.set_fault_all(None);
    let limit = Duration::from_secs(120);
    let converged = quiesce(&proc.store, time, limit, &mut moves).await?;
    // Orphans go after the grace period: let it pass, passes included.
    let r = reconciler_config();
    time.run_for(r.grace + 2 * r.period + Duration::from_millis(50))
        .await;
    let converged = converged && quiesce(&proc.store, time, limit, &mut moves).await?;
    let mut violations = check(&proc.store, &sim, &deps, &proc.registry).await?;
    violations.append(&mut moves.found);
    let mut traces = HashMap::new();
    for v in &violations {
        if let Some(i) = &v.instance
            && !traces.contains_key(i)
        {
            traces.insert(i.clone(), trace(&proc.store, i).await?);
        }
    }
    let log = args
        .log
        .as_ref()
        .map(|p| p.with_extension(format!("{seed}")));
    let digest = digest(&proc.store, log.as_deref()).await?;
    let faults = faulty.injected();
    proc.crash().await;
    Ok(SeedRun {
        violations,
        traces,
        converged,
        faults,
        crashes,
        simulated: time.elapsed,
        digest,
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

/// Delivers an already handled event again to the worker that handled it:
/// the worker must recognise it (its inbox) and do nothing twice.
async fn redeliver(store: &Store, rng: &SeededRng) -> anyhow::Result<()> {
    let handled = store.inspect().count("inbox").await?;
    if handled == 0 {
        return Ok(());
    }
    let pick = rng.between(0, u64::try_from(handled - 1).unwrap_or(0));
    let rows = store
        .inspect()
        .rows(
            "SELECT event_id, worker FROM inbox ORDER BY worker, event_id LIMIT 1 OFFSET ?",
            [Arg::Int(i64::try_from(pick).unwrap_or(0))],
        )
        .await?;
    let row = rows.first().context("the picked inbox row is gone")?;
    let (event_id, worker) = (row.text(0)?, row.text(1)?);
    // Through the write gate, as every writer in the process.
    let mut tx = store.begin().await?;
    tx.execute_for_test(
        "INSERT INTO deliveries (event_id, worker, not_before) VALUES (?, ?, ?)
         ON CONFLICT DO NOTHING",
        [
            event_id.as_str().into(),
            worker.as_str().into(),
            store.now().into(),
        ],
    )
    .await?;
    tx.commit().await?;
    store.notify_committed([worker]);
    Ok(())
}

/// Runs simulated time on until no delivery is left and every instance is
/// in a terminal status, for at most `limit`; whether it got there.
async fn quiesce(
    store: &Store,
    time: &mut Time,
    limit: Duration,
    moves: &mut Moves,
) -> anyhow::Result<bool> {
    let end = time.elapsed + limit;
    loop {
        moves.look(store).await?;
        let pending = store.inspect().count("deliveries").await?;
        let all = store.instances(None).await?;
        if pending == 0 && all.iter().all(|i| i.status.is_terminal()) {
            return Ok(true);
        }
        if time.elapsed > end {
            return Ok(false);
        }
        time.run_for(Duration::from_millis(10)).await;
    }
}

/// Each instance's status and generation when last looked at (after every
/// action, and through quiescence), to check that every move between two
/// looks is one the state machine allows: in particular that nothing leaves
/// `failed` or `deleted` within a generation.
#[derive(Default)]
struct Moves {
    last: HashMap<String, (InstanceStatus, i64)>,
    /// The simulated time of the last look, in microseconds.
    since: i64,
    found: Vec<Violation>,
}

impl Moves {
    async fn look(&mut self, store: &Store) -> anyhow::Result<()> {
        // Only the rows written since the last look (at this simulated
        // instant or later: every write of the store sets `updated_at`),
        // and only the columns the check needs: a look after every action
        // must cost little next to the action.
        let now = store.now().as_micros();
        let changed = store
            .inspect()
            .rows(
                "SELECT id, name, status, generation FROM instances WHERE updated_at >= ? ORDER BY id",
                [Arg::Int(self.since)],
            )
            .await?;
        self.since = now;
        for row in changed {
            let (id, name, status, generation) =
                (row.text(0)?, row.text(1)?, row.text(2)?, row.int(3)?);
            let status: InstanceStatus = status
                .parse()
                .map_err(|e| anyhow::anyhow!("instance {id}: {e}"))?;
            let Some((was, before)) = self.last.insert(id.clone(), (status, generation)) else {
                continue;
            };
            // Looks are apart, so a move may pass through states between
            // them: the check is that the state machine can get there.
            if before == generation && !reachable(was, status) && self.found.len() < 100 {
                self.found.push(Violation {
                    instance: Some(id.clone()),
                    what: format!(
                        "instance {name} ({id}) moved {was} → {status} within generation {generation}, which the state machine does not allow"
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Whether `to` is `from` or can follow it through legal moves.
fn reachable(from: InstanceStatus, to: InstanceStatus) -> bool {
    let mut seen = vec![from];
    let mut next = vec![from];
    while let Some(s) = next.pop() {
        if s == to {
            return true;
        }
        for t in InstanceStatus::ALL {
            if s.can_become(t) && !seen.contains(&t) {
                seen.push(t);
                next.push(t);
            }
        }
    }
    false
}

/// The instance's events, in log order, each with its attempts.
async fn trace(store: &Store, instance: &str) -> anyhow::Result<Vec<String>> {
    type Row = (
        String,
        String,
        i64,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let rows = store
        .inspect()
        .rows(
            "SELECT e.id, e.type, e.created_at, a.worker, a.outcome, a.attempt,
                    json_extract(a.error, '$.code') || ': ' || json_extract(a.error, '$.message')
               FROM events e LEFT JOIN attempts a ON a.event_id = e.id
              WHERE e.subject = ?
              ORDER BY e.created_at, e.id, a.id",
            [instance.into()],
        )
        .await?;
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            Ok((
                r.text(0)?,
                r.text(1)?,
                r.int(2)?,
                r.opt_text(3)?,
                r.opt_text(4)?,
                r.opt_int(5)?,
                r.opt_text(6)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(rows
        .into_iter()
        .map(|(id, ty, at, worker, outcome, attempt, error)| {
            let t = (at - EPOCH_MICROS) as f64 / 1e6;
            let error = error.map(|e| format!(" ({e})")).unwrap_or_default();
            match (worker, outcome, attempt) {
                (Some(w), Some(o), Some(n)) => {
                    format!("t={t:.3}s {ty} ({id}) → {w} attempt {n}: {o}{error}")
                }
                _ => format!("t={t:.3}s {ty} ({id}) → no attempt"),
            }
        })
        .collect())
}

/// A hash of the event log and the instances' final records: two runs of a
/// seed that did the same things have the same digest.
async fn digest(store: &Store, log: Option<&Path>) -> anyhow::Result<u64> {
    let events: Vec<(String, String, Option<String>, i64)> = store
        .inspect()
        .rows(
            "SELECT id, type, subject, created_at FROM events ORDER BY created_at, id",
            [],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?, r.opt_text(2)?, r.int(3)?)))
        .collect::<anyhow::Result<_>>()?;
    let all = store.instances(None).await?;
    // SipHash with fixed keys: the same on every run and machine.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    events.hash(&mut h);
    for i in &all {
        (&i.id, i.status.as_str(), i.generation).hash(&mut h);
    }
    if let Some(path) = log {
        let mut text = String::new();
        for (id, ty, subject, at) in &events {
            text.push_str(&format!(
                "{at} {id} {ty} {}\n",
                subject.as_deref().unwrap_or("-")
            ));
        }
        for i in &all {
            text.push_str(&format!(
                "instance {} {} generation {}\n",
                i.id, i.status, i.generation
            ));
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(h.finish())
}

/// DESIGN §8's invariants, and that what the store says is true.
async fn check(
    store: &Store,
    sim: &SimRuntime,
    deps: &Deps,
    registry: &Registry,
) -> anyhow::Result<Vec<Violation>> {
    let mut out = Vec::new();
    let mut says = |instance: Option<&str>, what: String| {
        out.push(Violation {
            instance: instance.map(str::to_owned),
            what,
        })
    };
    let all: Vec<Instance> = store.instances(None).await?;
    let by_id: HashMap<&str, &Instance> = all.iter().map(|i| (i.id.as_str(), i)).collect();
    let live = |i: &Instance| !matches!(i.status, InstanceStatus::Failed | InstanceStatus::Deleted);
    for i in &all {
        if !i.status.is_terminal() {
            says(
                Some(&i.id),
                format!(
                    "flow did not end: instance {} ({}) is {}",
                    i.name, i.id, i.status
                ),
            );
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
            None => says(Some(id), format!("container {} has no record", c.name)),
            Some(i) if !live(i) => says(
                Some(id),
                format!(
                    "container {} outlives its {} instance {}",
                    c.name, i.status, i.name
                ),
            ),
            _ => {}
        }
    }
    let mut per_generation: Vec<_> = per_generation.into_iter().collect();
    per_generation.sort();
    for ((id, generation), n) in per_generation {
        if n > 1 {
            says(
                Some(&id),
                format!("{n} containers for instance {id} generation {generation}"),
            );
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
            says(
                None,
                format!("network {} outlives every instance of its org", n.name),
            );
        }
    }
    // What the API says is true.
    for i in all.iter().filter(|i| live(i)) {
        let name = names::container(i);
        let state = containers.iter().find(|c| c.name == name).map(|c| c.state);
        match (i.status, state) {
            (InstanceStatus::Running, Some(ContainerState::Running)) => {}
            (InstanceStatus::Running, s) => says(
                Some(&i.id),
                format!("instance {} is running but its container is {s:?}", i.name),
            ),
            (InstanceStatus::Exited | InstanceStatus::Stopped, Some(ContainerState::Running)) => {
                says(
                    Some(&i.id),
                    format!("instance {} is {} but its container runs", i.name, i.status),
                )
            }
            _ => {}
        }
    }
    // No event lost: every delivery left was handled or dead-lettered …
    /// worker, event type, attempt, due, lease owner, subject
    type Left = (String, String, i64, i64, Option<String>, Option<String>);
    let left: Vec<Left> = store
        .inspect()
        .rows(
            "SELECT d.worker, e.type, d.attempt, d.not_before, d.lease_owner, e.subject
               FROM deliveries d JOIN events e ON e.id = d.event_id
              ORDER BY e.id, d.worker",
            [],
        )
        .await?
        .iter()
        .map(|r| {
            Ok((
                r.text(0)?,
                r.text(1)?,
                r.int(2)?,
                r.int(3)?,
                r.opt_text(4)?,
                r.opt_text(5)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let now = store.now().as_micros();
    for (worker, event_type, attempt, not_before, lease, subject) in left {
        says(
            subject.as_deref(),
            format!(
                "a delivery never handled: {worker} of {event_type}, attempt {attempt}, due in {} ms, lease {lease:?}",
                (not_before - now) / 1000
            ),
        );
    }
    // … and, against the log, every worker subscribed to each event's type
    // handled it or dead-lettered it.
    let events: Vec<(String, String, Option<String>)> = store
        .inspect()
        .rows("SELECT id, type, subject FROM events ORDER BY id", [])
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?, r.opt_text(2)?)))
        .collect::<anyhow::Result<_>>()?;
    let done: HashSet<(String, String)> = store
        .inspect()
        .rows(
            "SELECT worker, event_id FROM inbox
         UNION SELECT worker, event_id FROM dead_letters",
            [],
        )
        .await?
        .iter()
        .map(|r| Ok((r.text(0)?, r.text(1)?)))
        .collect::<anyhow::Result<_>>()?;
    let subs = registry.subscriptions();
    for (id, event_type, subject) in events {
        for w in subs.workers_for(&event_type) {
            if !done.contains(&(w.to_string(), id.clone())) {
                says(
                    subject.as_deref(),
                    format!(
                        "event {event_type} ({id}) lost: {w} neither handled nor dead-lettered it"
                    ),
                );
            }
        }
    }
    Ok(out)
}
