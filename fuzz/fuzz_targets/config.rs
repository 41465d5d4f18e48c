//! Fuzz target: the configuration as `berth` loads it — TOML text, then
//! `BERTH_…` variables — and what start-up and `berth config dump` /
//! `berth config policies` do with a configuration that loaded. Errors are fine;
//! a panic is not, nor a printed configuration that does not load back.
//!
//! Input: the TOML text, then optionally a NUL byte and `NAME=value`
//! lines (a name without the `BERTH_` prefix gets it).
#![no_main]

use std::sync::OnceLock;

use berth::Config;
use berth_core::SeededRng;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (text, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let k = if k.starts_with("BERTH_") {
                k.to_owned()
            } else {
                format!("BERTH_{k}")
            };
            (k, v.to_owned())
        })
        .collect();
    let Ok(config) = Config::from_toml_str(text, "fuzz.toml", env) else {
        return;
    };
    // What start-up derives from it.
    let _ = config.api.options();
    let _ = config.database_path();
    if let Ok(q) = config.limits.quotas() {
        assert!(q.default.memory_bytes <= q.max.memory_bytes);
    }
    let mut names: Vec<String> = workers().to_vec();
    names.extend(config.webhooks.iter().map(|w| format!("notify.{}", w.name)));
    if let Ok(policies) = config.policies(names.iter().map(String::as_str), "fuzz.toml") {
        // `berth config policies` prints these; the dispatcher computes delays.
        let rng = SeededRng::new(7);
        for (_, p) in policies.iter() {
            let _ = p.worst_case_delay();
            let _ = p.worst_case_total();
            for attempt in 1..=p.max_attempts.min(40) {
                let d = p.backoff.delay(attempt, &rng);
                assert!(d <= p.backoff.ceiling(attempt));
                assert!(p.backoff.floor(attempt) <= p.backoff.ceiling(attempt));
            }
            let _ = p.clamp_retry_after(std::time::Duration::MAX);
        }
    }
    // `berth config dump` prints the effective configuration: it must load back
    // as the same (but the admin token, which is never printed).
    let printed = config.to_toml();
    let back = match Config::from_toml_str(&printed, "printed", Vec::new()) {
        Ok(c) => c,
        Err(e) => panic!("the printed configuration does not load: {e}\n{printed}"),
    };
    let mut expected = config;
    expected.admin_token = None;
    assert_eq!(
        back, expected,
        "the printed configuration loads as another\n{printed}"
    );
});

/// The names of the workers Berth registers, as start-up resolves their
/// policies (the notifiers of `[[webhooks]]` are added per input).
fn workers() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let mut config = Config::default();
        config.runtime.kind = berth::config::RuntimeKind::Sim;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (deps, _) = rt
            .block_on(berth::deps(&config))
            .expect("the simulated runtime's dependencies");
        let reg = berth::registry(&config, deps).expect("the registry");
        reg.names().map(str::to_owned).collect()
    })
}
