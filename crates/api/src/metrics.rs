//! `/metrics` in the Prometheus text format. Attempt counters and step
//! latency histograms are folded in from the attempt history (each scrape
//! reads the records since the previous one), so they are exact and cost
//! nothing on the delivery path; they count from this server's start, as
//! Prometheus counters do. Queue depth and open dead letters are read live;
//! the dispatcher's own counters come from its `Stats`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;

use berth_store::Store;
use berth_worker::Stats;
use tokio::sync::Mutex;

/// Upper bounds (seconds) of the step latency histogram's buckets.
const BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Most attempt records folded in per scrape, so one scrape after a long
/// pause cannot take long; the rest is folded in by the next ones.
const MAX_PER_SCRAPE: u32 = 200_000;
const BATCH: u32 = 10_000;

#[derive(Debug, Default)]
struct WorkerAgg {
    outcomes: BTreeMap<String, u64>,
    /// Cumulative counts per bucket are computed when rendering.
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Debug)]
struct Agg {
    cursor: i64,
    workers: BTreeMap<String, WorkerAgg>,
}

#[derive(Debug)]
pub struct Metrics {
    agg: Mutex<Agg>,
}

impl Metrics {
    /// Counting starts after attempt record `cursor`.
    pub fn new(cursor: i64) -> Metrics {
        Metrics {
            agg: Mutex::new(Agg {
                cursor,
                workers: BTreeMap::new(),
            }),
        }
    }

    pub async fn render(&self, store: &Store, stats: &Stats) -> anyhow::Result<String> {
        let mut agg = self.agg.lock().await;
        let mut folded = 0;
        while folded < MAX_PER_SCRAPE {
            let batch = store.attempts_after(agg.cursor, BATCH).await?;
            let n = batch.len();
            for a in batch {
                agg.cursor = a.id;
                let w = agg.workers.entry(a.worker).or_default();
                *w.outcomes.entry(a.outcome).or_default() += 1;
                if let Some(d) = a.duration {
                    let s = d.as_secs_f64();
                    w.count += 1;
                    w.sum += s;
                    if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
                        w.buckets[i] += 1;
                    }
                }
            }
            folded += n as u32;
            if (n as u32) < BATCH {
                break;
            }
        }
        let (waiting, in_flight) = store.queue_depth().await?;
        let dead = store.open_dead_letters().await?;

        let mut out = String::new();
        let o = &mut out;
        head(
            o,
            "berth_attempts_total",
            "counter",
            "Attempts finished since start, by worker and outcome.",
        );
        for (worker, w) in &agg.workers {
            for (outcome, n) in &w.outcomes {
                let _ = writeln!(
                    o,
                    "berth_attempts_total{{worker=\"{}\",outcome=\"{}\"}} {n}",
                    esc(worker),
                    esc(outcome)
                );
            }
        }
        head(
            o,
            "berth_retries_total",
            "counter",
            "Attempts that failed and were retried (retry or timeout), by worker.",
        );
        for (worker, w) in &agg.workers {
            let n = w.outcomes.get("retry").copied().unwrap_or(0)
                + w.outcomes.get("timeout").copied().unwrap_or(0);
            let _ = writeln!(o, "berth_retries_total{{worker=\"{}\"}} {n}", esc(worker));
        }
        head(
            o,
            "berth_step_duration_seconds",
            "histogram",
            "Duration of attempts, by worker.",
        );
        for (worker, w) in &agg.workers {
            let mut cum = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cum += w.buckets[i];
                let _ = writeln!(
                    o,
                    "berth_step_duration_seconds_bucket{{worker=\"{}\",le=\"{le}\"}} {cum}",
                    esc(worker)
                );
            }
            let _ = writeln!(
                o,
                "berth_step_duration_seconds_bucket{{worker=\"{}\",le=\"+Inf\"}} {}",
                esc(worker),
                w.count
            );
            let _ = writeln!(
                o,
                "berth_step_duration_seconds_sum{{worker=\"{}\"}} {}",
                esc(worker),
                w.sum
            );
            let _ = writeln!(
                o,
                "berth_step_duration_seconds_count{{worker=\"{}\"}} {}",
                esc(worker),
                w.count
            );
        }
        head(
            o,
            "berth_deliveries_total",
            "counter",
            "Deliveries handled by the dispatcher since start.",
        );
        let _ = writeln!(
            o,
            "berth_deliveries_total {}",
            stats.handled.load(Ordering::Relaxed)
        );
        head(
            o,
            "berth_events_published_total",
            "counter",
            "Events appended to the log by the dispatcher since start.",
        );
        let _ = writeln!(
            o,
            "berth_events_published_total {}",
            stats.published.load(Ordering::Relaxed)
        );
        head(
            o,
            "berth_dead_letters_total",
            "counter",
            "Deliveries dead-lettered since start.",
        );
        let _ = writeln!(
            o,
            "berth_dead_letters_total {}",
            stats.dead_letters.load(Ordering::Relaxed)
        );
        head(
            o,
            "berth_dead_letters_open",
            "gauge",
            "Dead letters not re-driven, by worker.",
        );
        for (worker, n) in &dead {
            let _ = writeln!(
                o,
                "berth_dead_letters_open{{worker=\"{}\"}} {n}",
                esc(worker)
            );
        }
        head(
            o,
            "berth_queue_depth",
            "gauge",
            "Deliveries waiting to be claimed and in flight.",
        );
        let _ = writeln!(o, "berth_queue_depth{{state=\"waiting\"}} {waiting}");
        let _ = writeln!(o, "berth_queue_depth{{state=\"in_flight\"}} {in_flight}");
        Ok(out)
    }
}

/// The server's connection gauges and counters, appended to `out`.
pub(crate) fn render_connections(out: &mut String, conns: &crate::serve::Conns) {
    let o = out;
    head(
        o,
        "berth_api_connections_open",
        "gauge",
        "HTTP connections open (WebSocket streams included).",
    );
    let _ = writeln!(o, "berth_api_connections_open {}", conns.open());
    head(
        o,
        "berth_api_connections_max",
        "gauge",
        "The connection cap: api.max_connections, lowered to the descriptor limit less a reserve.",
    );
    let _ = writeln!(o, "berth_api_connections_max {}", conns.cap());
    head(
        o,
        "berth_api_connections_closed_total",
        "counter",
        "Connections closed by the cap: `evicted` (waiting for a request head, to make room), `shed` (new, every other one busy).",
    );
    let _ = writeln!(
        o,
        "berth_api_connections_closed_total{{reason=\"evicted\"}} {}",
        conns.evicted()
    );
    let _ = writeln!(
        o,
        "berth_api_connections_closed_total{{reason=\"shed\"}} {}",
        conns.shed()
    );
}

fn head(o: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
}

/// Escapes a label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
