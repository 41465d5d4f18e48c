//! Small helpers of the benchmarks: percentiles, peak memory, the stderr
//! table, and starting the workers under test.

use std::time::Duration;

/// The `q`-quantile (0..=1) of `sorted`, nearest-rank; 0 when empty.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Peak resident set size of this process in MiB (VmHWM), if readable.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn per_second(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// Prints `rows` as an aligned two-column table on stderr.
pub fn table(title: &str, rows: &[(&str, String)]) {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    eprintln!("{title}");
    for (k, v) in rows {
        eprintln!("  {k:<w$}  {v}");
    }
}

/// Starts `reg`'s workers on `store`, every one with `concurrency`
/// deliveries at most and otherwise the default policy.
pub async fn start_workers(
    store: &berth_store::Store,
    reg: &berth_worker::Registry,
    concurrency: i64,
    rng: std::sync::Arc<berth_core::SeededRng>,
) -> anyhow::Result<berth_worker::Workers> {
    use berth_worker::{BusOptions, Policies, PolicyConfig, Workers, WorkersConfig};
    let mut cfg = WorkersConfig::new();
    cfg.insert(
        "default".into(),
        PolicyConfig {
            concurrency: Some(concurrency),
            ..PolicyConfig::default()
        },
    );
    let policies = Policies::resolve(&cfg, reg.names())
        .map_err(|e| anyhow::anyhow!("bad bench policy: {e:?}"))?;
    Workers::start(
        store.clone(),
        reg,
        &policies,
        BusOptions {
            rng,
            ..BusOptions::default()
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(super::quantile(&v, 0.5), 50);
        assert_eq!(super::quantile(&v, 0.99), 99);
        assert_eq!(super::quantile(&v, 1.0), 100);
        assert_eq!(super::quantile(&[], 0.5), 0);
        assert_eq!(super::quantile(&[7], 0.01), 7);
    }
}
