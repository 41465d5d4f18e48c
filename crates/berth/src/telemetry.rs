//! Logging: `tracing` to stderr, filtered by `BERTH_LOG` (or `RUST_LOG`),
//! as text or, with `BERTH_LOG_FORMAT=json`, one JSON object per line. Fields
//! come first and the message last, and every line inside a delivery carries
//! the delivery span's worker, event, flow, org and attempt.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_env("BERTH_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("BERTH_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
