//! `berth-bench bus`: the embedded bus end to end on a real SQLite file in
//! WAL mode, or (`--store postgres://…`) on a fresh database on a
//! PostgreSQL server.
//!
//! 1. `raw_commits_per_s`: single-row autocommit INSERTs on the same kind
//!    of database (SQLite: a file with the same settings, WAL and the same
//!    `synchronous`; PostgreSQL: a table in the run's database on the same
//!    server, in the same run): the rate a bus committing once per event
//!    could reach at best.
//! 2. Throughput: `--events` events published by concurrent publishers (in
//!    batches, as handlers' emissions are), each dispatched to a no-op
//!    handler and acknowledged (inbox, attempt history, delivery removed).
//!    `events_per_s` = events / time from first publish to last acknowledged.
//! 3. Latency at half that rate: events published one per call, paced; the
//!    handler records the time from the publish call to its own start
//!    (`dispatch_p50_us`, `dispatch_p99_us`). This includes waiting for the
//!    group commit that makes the event durable.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use berth_core::{Clock, IdGen, NewEvent, SeededRng, SystemClock};
use berth_store::{Cause, Location, Store, StoreOptions, Synchronous};
use berth_worker::{Ctx, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::report::{peak_rss_mb, per_second, quantile, start_workers, table};
use crate::scratch::{Scratch, StoreArg};

#[derive(clap::Args)]
pub struct Args {
    /// Events in the throughput phase.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// In-flight deliveries of the no-op worker. A delivery published while
    /// its worker has room is inserted already claimed (one write); beyond
    /// that it waits in the queue and is claimed later (a second write).
    #[arg(long, default_value_t = 8192)]
    concurrency: u32,
    /// Concurrent publishers in the throughput phase.
    #[arg(long, default_value_t = 8)]
    publishers: u64,
    /// Events per publish call in the throughput phase.
    #[arg(long, default_value_t = 500)]
    batch: u64,
    /// Seconds of the paced latency phase.
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Publish rate of the latency phase (default: half the measured maximum).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// SQLite `synchronous`: full or normal (SQLite only: PostgreSQL
    /// commits as its server's `synchronous_commit` says).
    #[arg(long, default_value = "full")]
    synchronous: String,
    /// The database: sqlite (a fresh file) or a postgres:// server URL, on
    /// which a fresh database is made for the run and dropped after it.
    #[arg(long, value_name = "sqlite|URL", default_value = "sqlite")]
    store: String,
    /// Directory for the SQLite files (default: a fresh temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct Tick {
    sent_us: u64,
}

struct Probe {
    base: Instant,
    handled: AtomicU64,
    target: AtomicU64,
    done: Notify,
    latencies: std::sync::Mutex<Vec<u64>>,
}

pub async fn run(args: Args) -> anyhow::Result<String> {
    let synchronous = match args.synchronous.as_str() {
        "full" => Synchronous::Full,
        "normal" => Synchronous::Normal,
        other => anyhow::bail!("--synchronous must be full or normal, got '{other}'"),
    };
    let store_arg = StoreArg::parse(&args.store)?;
    // Refused rather than ignored: a run labelled `normal` would not be.
    if matches!(store_arg, StoreArg::Postgres(_)) && synchronous != Synchronous::Full {
        anyhow::bail!(
            "--synchronous is SQLite's setting; on PostgreSQL the server's synchronous_commit applies"
        );
    }
    let tmp = tempfile::tempdir_in(args.dir.clone().unwrap_or_else(std::env::temp_dir))
        .context("cannot create the benchmark directory")?;
    let scratch = Scratch::make(&store_arg, &tmp.path().join("bench.db")).await?;
    let location = scratch.location().clone();
    let raw_url = scratch.postgres_url().map(str::to_owned);
    let result = scratch
        .run(measure(
            args,
            store_arg,
            synchronous,
            tmp.path(),
            location,
            raw_url,
        ))
        .await;
    // The SQLite files go only once the run is over.
    drop(tmp);
    result
}

/// The three phases on the database at `location`; `raw_url` is that
/// database's URL on PostgreSQL (its raw commits are measured there).
async fn measure(
    args: Args,
    store_arg: StoreArg,
    synchronous: Synchronous,
    dir: &std::path::Path,
    location: Location,
    raw_url: Option<String>,
) -> anyhow::Result<String> {
    let raw_run = Duration::from_secs(2);
    let raw = match &raw_url {
        Some(url) => berth_store::postgres::raw_commits_per_s(url, raw_run)
            .await
            .context("cannot measure PostgreSQL's raw commit rate")?,
        None => {
            berth_store::baseline::raw_commits_per_s(&dir.join("raw.db"), synchronous, raw_run)
                .await?
        }
    };

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let rng = Arc::new(SeededRng::new(1));
    let ids = Arc::new(IdGen::new(clock.clone(), rng.clone()));
    let store = Store::open_at(
        &location,
        StoreOptions {
            synchronous,
            ..StoreOptions::default()
        },
        clock,
        ids,
    )
    .await?;

    let probe = Arc::new(Probe {
        base: Instant::now(),
        handled: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
        done: Notify::new(),
        latencies: std::sync::Mutex::new(Vec::new()),
    });
    let mut reg = Registry::new();
    let p = probe.clone();
    reg.register("bench.noop", &["bench.tick"], move |ctx: Ctx| {
        let started = p.base.elapsed().as_micros() as u64;
        if let Ok(t) = ctx.envelope().payload_as::<Tick>()
            && t.sent_us > 0
        {
            let mut l = p.latencies.lock().unwrap_or_else(|e| e.into_inner());
            l.push(started.saturating_sub(t.sent_us));
        }
        let n = p.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if n == p.target.load(Ordering::Relaxed) {
            p.done.notify_one();
        }
        async move { Ok(ctx.done()) }
    })?;
    // bench.noop is the only worker: the default policy is its policy.
    let workers = start_workers(&store, &reg, i64::from(args.concurrency), rng).await?;
    let bus = workers.bus();

    // Throughput.
    let n = args.events;
    probe.target.store(n, Ordering::Relaxed);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    let publishers = args.publishers.max(1);
    for i in 0..publishers {
        let bus = bus.clone();
        let share = n / publishers + u64::from(i < n % publishers);
        let batch = args.batch.max(1);
        tasks.push(tokio::spawn(async move {
            let mut left = share;
            while left > 0 {
                let k = left.min(batch);
                let envs = (0..k)
                    .map(|_| {
                        let flow = bus.store().ids().flow_id();
                        let ev = NewEvent::with_type("bench.tick", 1, &Tick { sent_us: 0 })?;
                        Ok(bus.store().stamp(ev, Cause::Root { flow_id: flow }))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                bus.publish_all(envs).await?;
                left -= k;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let published_at = t0.elapsed();
    if probe.handled.load(Ordering::Relaxed) < n {
        probe.done.notified().await;
    }
    let elapsed = t0.elapsed();
    let commits_throughput = bus.stats().commits.load(Ordering::Relaxed);
    let turn_ms = bus.stats().turn_micros.load(Ordering::Relaxed) / 1000;
    let commit_ms = bus.stats().commit_micros.load(Ordering::Relaxed) / 1000;
    let events_per_s = per_second(n, elapsed);

    // Latency at half the measured rate.
    let rate = args.latency_rate.unwrap_or(events_per_s / 2.0).max(1.0);
    let total = ((rate * args.latency_secs as f64) as u64).max(1);
    probe
        .latencies
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    probe.handled.store(0, Ordering::Relaxed);
    probe.target.store(total, Ordering::Relaxed);
    let tick = Duration::from_millis(1);
    let per_tick = rate / 1000.0;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut owed = 0.0f64;
    let l0 = Instant::now();
    let mut pending = tokio::task::JoinSet::new();
    while sent < total {
        interval.tick().await;
        owed += per_tick;
        while owed >= 1.0 && sent < total {
            owed -= 1.0;
            sent += 1;
            let bus = bus.clone();
            let base = probe.base;
            pending.spawn(async move {
                let flow = bus.store().ids().flow_id();
                let sent_us = (base.elapsed().as_micros() as u64).max(1);
                let ev = NewEvent::with_type("bench.tick", 1, &Tick { sent_us })?;
                bus.publish(ev, Cause::Root { flow_id: flow }).await?;
                anyhow::Ok(())
            });
        }
        while let Some(r) = pending.try_join_next() {
            r??;
        }
    }
    while let Some(r) = pending.join_next().await {
        r??;
    }
    if probe.handled.load(Ordering::Relaxed) < total {
        probe.done.notified().await;
    }
    let latency_elapsed = l0.elapsed();
    let lat_turns = bus.stats().commits.load(Ordering::Relaxed) - commits_throughput;
    let lat_busy_ms = bus.stats().turn_micros.load(Ordering::Relaxed) / 1000 - turn_ms;
    let mut lat = std::mem::take(&mut *probe.latencies.lock().unwrap_or_else(|e| e.into_inner()));
    lat.sort_unstable();
    let p50 = quantile(&lat, 0.50);
    let p99 = quantile(&lat, 0.99);
    let p999 = quantile(&lat, 0.999);
    let stats = bus.stats();
    let commits = stats.commits.load(Ordering::Relaxed);
    workers.shutdown().await?;
    store.close().await;

    let rss = peak_rss_mb().unwrap_or(0.0);
    table(
        "berth-bench bus",
        &[
            ("store", location.to_string()),
            (
                "synchronous",
                match store_arg {
                    StoreArg::Sqlite => args.synchronous.clone(),
                    StoreArg::Postgres(_) => "(the server's synchronous_commit)".to_owned(),
                },
            ),
            ("events", n.to_string()),
            ("worker concurrency", args.concurrency.to_string()),
            (
                "publishers × batch",
                format!("{} × {}", publishers, args.batch),
            ),
            ("raw commits/s (1 row each)", format!("{raw:.0}")),
            ("events/s (publish→ack)", format!("{events_per_s:.0}")),
            (
                "  all published after",
                format!("{:.3}s", published_at.as_secs_f64()),
            ),
            (
                "  all acknowledged after",
                format!("{:.3}s", elapsed.as_secs_f64()),
            ),
            ("  group commits", commits_throughput.to_string()),
            (
                "  events per commit",
                format!("{:.1}", n as f64 * 2.0 / commits_throughput.max(1) as f64),
            ),
            (
                "  dispatcher busy in turns",
                format!("{turn_ms} ms (of which running SQL {commit_ms} ms)"),
            ),
            (
                "latency phase rate",
                format!("{rate:.0}/s for {:.1}s", latency_elapsed.as_secs_f64()),
            ),
            (
                "  dispatcher",
                format!(
                    "{lat_turns} turns, busy {:.0}%, {:.2} ms per turn",
                    lat_busy_ms as f64 / latency_elapsed.as_millis().max(1) as f64 * 100.0,
                    lat_busy_ms as f64 / lat_turns.max(1) as f64
                ),
            ),
            ("  dispatch p50", format!("{p50} µs")),
            ("  dispatch p99", format!("{p99} µs")),
            ("  dispatch p99.9", format!("{p999} µs")),
            ("  samples", lat.len().to_string()),
            ("commits in all", commits.to_string()),
            ("peak RSS", format!("{rss:.1} MiB")),
        ],
    );
    let json = serde_json::json!({
        "bench": "bus",
        "store": store_arg.name(),
        "synchronous": args.synchronous,
        "events": n,
        "concurrency": args.concurrency,
        "events_per_s": events_per_s.round(),
        "raw_commits_per_s": raw.round(),
        "speedup_vs_raw": (events_per_s / raw.max(1.0) * 100.0).round() / 100.0,
        "dispatch_rate_per_s": rate.round(),
        "dispatch_p50_us": p50,
        "dispatch_p99_us": p99,
        "dispatch_p999_us": p999,
        "dispatch_samples": lat.len(),
        "group_commits": commits,
        "peak_rss_mb": (rss * 10.0).round() / 10.0,
    });
    Ok(json.to_string())
}
