//! Retry policies declared in configuration: `[workers.default]` and
//! `[workers."<name>"]`, merged key by key over built-in defaults, validated
//! at start, and the back-off arithmetic the dispatcher uses.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use berth_core::SeededRng;
use serde::{Deserialize, Serialize};

/// How randomness spreads a back-off delay `d`:
/// `none` waits exactly `d`; `full` waits uniformly in `[0, d]`; `equal`
/// waits `d/2` plus uniformly `[0, d/2]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    None,
    Full,
    Equal,
}

impl fmt::Display for Jitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Jitter::None => "none",
            Jitter::Full => "full",
            Jitter::Equal => "equal",
        })
    }
}

/// Exponential back-off: the delay after attempt `n` (1-based) is
/// `min(max, initial × multiplier^(n-1))`, then jittered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Backoff {
    #[serde(with = "berth_core::duration::human")]
    pub initial: Duration,
    pub multiplier: f64,
    #[serde(with = "berth_core::duration::human")]
    pub max: Duration,
    pub jitter: Jitter,
}

impl Backoff {
    /// The un-jittered delay after attempt `attempt` (1-based): the upper
    /// bound of every jitter mode.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The lower bound of the delay after `attempt` for this jitter mode.
    pub fn floor(&self, attempt: u32) -> Duration {
        match self.jitter {
            Jitter::None => self.ceiling(attempt),
            Jitter::Full => Duration::ZERO,
            Jitter::Equal => self.ceiling(attempt) / 2,
        }
    }

    /// The delay to wait after attempt `attempt` failed.
    pub fn delay(&self, attempt: u32, rng: &SeededRng) -> Duration {
        let cap = u64::try_from(self.ceiling(attempt).as_micros()).unwrap_or(u64::MAX);
        let us = match self.jitter {
            Jitter::None => cap,
            Jitter::Full => rng.between(0, cap),
            Jitter::Equal => cap / 2 + rng.between(0, cap - cap / 2),
        };
        Duration::from_micros(us)
    }
}

/// The effective policy of one worker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Limit on one attempt; overrunning it is a retryable failure.
    #[serde(with = "berth_core::duration::human")]
    pub timeout: Duration,
    pub backoff: Backoff,
    /// Deliveries of this worker in flight at once, per process.
    pub concurrency: u32,
    /// Event emitted when a delivery is dead-lettered; `None` to emit nothing.
    pub on_exhausted: Option<String>,
}

impl Policy {
    /// Built-in defaults, used for every key no configuration sets.
    pub fn builtin(worker: &str) -> Policy {
        Policy {
            max_attempts: 5,
            timeout: Duration::from_secs(30),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                multiplier: 2.0,
                max: Duration::from_secs(30),
                jitter: Jitter::Full,
            },
            concurrency: 16,
            on_exhausted: Some(format!("{worker}.failed")),
        }
    }

    /// Upper bound of the total back-off between the first and last attempt.
    /// Saturates at `Duration::MAX`: configured durations go up to it.
    pub fn worst_case_delay(&self) -> Duration {
        let mut total = Duration::ZERO;
        for n in 1..self.max_attempts {
            let d = self.backoff.ceiling(n);
            if d >= self.backoff.max {
                // Every later delay is capped too (the multiplier is at
                // least 1): added at once, so that a `max_attempts` in the
                // billions costs no billions of steps.
                return total
                    .saturating_add(self.backoff.max.saturating_mul(self.max_attempts - n));
            }
            total = total.saturating_add(d);
        }
        total
    }

    /// Upper bound of the time from first attempt to dead letter: every
    /// attempt timing out plus every delay at its ceiling; saturating.
    pub fn worst_case_total(&self) -> Duration {
        self.timeout
            .saturating_mul(self.max_attempts)
            .saturating_add(self.worst_case_delay())
    }

    /// The delay a handler asked for with `retry_after`, kept within the
    /// policy's `backoff.max` so the worst-case figures stay true.
    pub fn clamp_retry_after(&self, d: Duration) -> Duration {
        d.min(self.backoff.max)
    }
}

/// `backoff = { … }` as written in configuration: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackoffConfig {
    /// Delay after the first failed attempt, e.g. "100ms".
    #[serde(
        default,
        with = "berth_core::duration::opt_human",
        skip_serializing_if = "Option::is_none"
    )]
    pub initial: Option<Duration>,
    /// Factor applied to the delay after each further failure (≥ 1.0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Cap on any one delay, e.g. "30s".
    #[serde(
        default,
        with = "berth_core::duration::opt_human",
        skip_serializing_if = "Option::is_none"
    )]
    pub max: Option<Duration>,
    /// `none`, `full` or `equal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Jitter>,
}

/// `[workers.<name>]` as written in configuration: every key optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Attempts in all, the first included (≥ 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i64>,
    /// Limit on one attempt, e.g. "30s".
    #[serde(
        default,
        with = "berth_core::duration::opt_human",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<BackoffConfig>,
    /// Deliveries in flight at once per process (≥ 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<i64>,
    /// Failure event to emit when a delivery is dead-lettered; "" for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_exhausted: Option<String>,
}

/// The `[workers]` table: `default` plus one entry per worker name.
pub type WorkersConfig = BTreeMap<String, PolicyConfig>;

/// One broken rule in the `[workers]` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// The key, as a TOML path: `workers."network.attach".backoff.max`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn key_of(worker: &str, field: &str) -> String {
    let table = if worker
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        worker.to_owned()
    } else {
        format!("\"{worker}\"")
    };
    format!("workers.{table}.{field}")
}

fn apply(base: &mut Policy, cfg: &PolicyConfig, section: &str, errors: &mut Vec<PolicyError>) {
    let mut err = |field: &str, message: String| {
        errors.push(PolicyError {
            key: key_of(section, field),
            message,
        })
    };
    if let Some(v) = cfg.max_attempts {
        match u32::try_from(v) {
            Ok(n) if n >= 1 => base.max_attempts = n,
            _ => err(
                "max_attempts",
                format!("must be a whole number from 1 to {}, got {v}", u32::MAX),
            ),
        }
    }
    if let Some(t) = cfg.timeout {
        if t.is_zero() {
            err("timeout", "must be greater than zero, got 0s".into());
        } else {
            base.timeout = t;
        }
    }
    if let Some(c) = cfg.concurrency {
        match u32::try_from(c) {
            Ok(n) if n >= 1 => base.concurrency = n,
            _ => err(
                "concurrency",
                format!("must be a whole number from 1 to {}, got {c}", u32::MAX),
            ),
        }
    }
    if let Some(e) = &cfg.on_exhausted {
        if e.is_empty() {
            base.on_exhausted = None;
        } else if is_event_type(e) {
            base.on_exhausted = Some(e.clone());
        } else {
            err(
                "on_exhausted",
                format!(
                    "must be a dotted event name of lowercase letters, digits, '_' and '-' \
                     (e.g. \"network.attach.failed\"), or \"\" for none; got \"{e}\""
                ),
            );
        }
    }
    if let Some(b) = &cfg.backoff {
        if let Some(i) = b.initial {
            if i.is_zero() {
                err(
                    "backoff.initial",
                    "must be greater than zero, got 0s".into(),
                );
            } else {
                base.backoff.initial = i;
            }
        }
        if let Some(m) = b.multiplier {
            if m.is_finite() && m >= 1.0 {
                base.backoff.multiplier = m;
            } else {
                err(
                    "backoff.multiplier",
                    format!("must be a number ≥ 1.0, got {m}"),
                );
            }
        }
        if let Some(m) = b.max {
            if m.is_zero() {
                err("backoff.max", "must be greater than zero, got 0s".into());
            } else {
                base.backoff.max = m;
            }
        }
        if let Some(j) = b.jitter {
            base.backoff.jitter = j;
        }
    }
}

/// Whether `s` is a valid event type: dot-separated segments of lowercase
/// letters, digits, '_' and '-'.
pub fn is_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.split('.').all(|seg| {
            !seg.is_empty()
                && seg
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        })
}

/// The resolved policy of every registered worker.
#[derive(Debug, Clone)]
pub struct Policies {
    by_worker: BTreeMap<String, Policy>,
}

impl Policies {
    /// Resolves built-in ← `[workers.default]` ← `[workers."<name>"]` for every
    /// worker in `workers`, and reports every broken rule at once: a section
    /// naming no known worker, a zero or negative value, `max < initial`.
    pub fn resolve<'a>(
        config: &WorkersConfig,
        workers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Policies, Vec<PolicyError>> {
        let workers: Vec<&str> = workers.into_iter().collect();
        let mut errors = Vec::new();
        for (name, section) in config {
            if name != "default" && !workers.contains(&name.as_str()) {
                // Still check its values, so one run reports every mistake.
                let mut p = Policy::builtin(name);
                apply(&mut p, section, name, &mut errors);
                check_bounds(&p, name, &mut errors);
                let mut known: Vec<&str> = workers.clone();
                known.sort_unstable();
                errors.push(PolicyError {
                    key: key_of(name, "").trim_end_matches('.').to_owned(),
                    message: format!(
                        "no worker is named \"{name}\" (known workers: {})",
                        if known.is_empty() {
                            "none".to_owned()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
        }
        let mut by_worker = BTreeMap::new();
        // Validate `default` once, even with no workers registered.
        let default_cfg = config.get("default");
        if let Some(d) = default_cfg {
            let mut p = Policy::builtin("default");
            apply(&mut p, d, "default", &mut errors);
            check_bounds(&p, "default", &mut errors);
        }
        for w in workers {
            let mut p = Policy::builtin(w);
            let mut scratch = Vec::new();
            if let Some(d) = default_cfg {
                // Errors in `default` were reported above, once.
                apply(&mut p, d, "default", &mut scratch);
            }
            if let Some(own) = config.get(w) {
                apply(&mut p, own, w, &mut errors);
                check_bounds(&p, w, &mut errors);
            }
            by_worker.insert(w.to_owned(), p);
        }
        if errors.is_empty() {
            Ok(Policies { by_worker })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, worker: &str) -> Option<&Policy> {
        self.by_worker.get(worker)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Policy)> {
        self.by_worker.iter().map(|(k, v)| (k.as_str(), v))
    }
}

fn check_bounds(p: &Policy, section: &str, errors: &mut Vec<PolicyError>) {
    if p.backoff.max < p.backoff.initial {
        errors.push(PolicyError {
            key: key_of(section, "backoff.max"),
            message: format!(
                "must be ≥ backoff.initial ({}), got {}",
                humantime::format_duration(p.backoff.initial),
                humantime::format_duration(p.backoff.max)
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> WorkersConfig {
        #[derive(Deserialize)]
        struct Root {
            workers: WorkersConfig,
        }
        toml::from_str::<Root>(toml_text).unwrap().workers
    }

    #[test]
    fn layers_merge_key_by_key() {
        let c = cfg(r#"
            [workers.default]
            max_attempts = 3
            backoff = { initial = "50ms", jitter = "equal" }
            [workers."network.attach"]
            max_attempts = 8
            timeout = "10s"
            on_exhausted = "network.attach.failed"
            backoff = { max = "5s" }
        "#);
        let p = Policies::resolve(&c, ["network.attach", "image.build"]).unwrap();
        let na = p.get("network.attach").unwrap();
        assert_eq!(na.max_attempts, 8);
        assert_eq!(na.timeout, Duration::from_secs(10));
        assert_eq!(
            na.backoff.initial,
            Duration::from_millis(50),
            "from default"
        );
        assert_eq!(na.backoff.max, Duration::from_secs(5));
        assert_eq!(na.backoff.jitter, Jitter::Equal);
        let ib = p.get("image.build").unwrap();
        assert_eq!(ib.max_attempts, 3);
        assert_eq!(ib.timeout, Duration::from_secs(30), "built-in");
        assert_eq!(ib.on_exhausted.as_deref(), Some("image.build.failed"));
    }

    #[test]
    fn every_broken_rule_is_reported_with_its_key() {
        let c = cfg(r#"
            [workers.default]
            max_attempts = 0
            [workers."netwrk.attach"]
            timeout = "1s"
            [workers."image.build"]
            concurrency = -2
            backoff = { initial = "2s", max = "1s", multiplier = 0.5 }
        "#);
        let errs = Policies::resolve(&c, ["network.attach", "image.build"]).unwrap_err();
        let keys: Vec<&str> = errs.iter().map(|e| e.key.as_str()).collect();
        assert!(keys.contains(&"workers.default.max_attempts"), "{errs:?}");
        assert!(keys.contains(&"workers.\"netwrk.attach\""), "{errs:?}");
        assert!(
            keys.contains(&"workers.\"image.build\".concurrency"),
            "{errs:?}"
        );
        assert!(
            keys.contains(&"workers.\"image.build\".backoff.max"),
            "{errs:?}"
        );
        assert!(
            keys.contains(&"workers.\"image.build\".backoff.multiplier"),
            "{errs:?}"
        );
        let unknown = errs.iter().find(|e| e.key.contains("netwrk")).unwrap();
        assert!(
            unknown
                .message
                .contains("known workers: image.build, network.attach")
        );
        let max = errs
            .iter()
            .find(|e| e.key.ends_with("backoff.max"))
            .unwrap();
        assert!(
            max.message.contains("≥ backoff.initial (2s)"),
            "{}",
            max.message
        );
    }

    #[test]
    fn zero_durations_and_bad_event_names_are_rejected() {
        let c = cfg(r#"
            [workers.w]
            timeout = "0s"
            on_exhausted = "Not An Event"
        "#);
        let errs = Policies::resolve(&c, ["w"]).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.key == "workers.w.timeout" && e.message.contains("greater than zero"))
        );
        assert!(errs.iter().any(|e| e.key == "workers.w.on_exhausted"));
    }

    #[test]
    fn empty_on_exhausted_means_none() {
        let c = cfg("[workers.w]\non_exhausted = \"\"\n");
        let p = Policies::resolve(&c, ["w"]).unwrap();
        assert_eq!(p.get("w").unwrap().on_exhausted, None);
    }

    #[test]
    fn ceiling_grows_then_caps() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            multiplier: 2.0,
            max: Duration::from_millis(500),
            jitter: Jitter::None,
        };
        let got: Vec<u128> = (1..=5).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 500, 500]);
        assert_eq!(b.ceiling(10_000), Duration::from_millis(500), "no overflow");
    }

    #[test]
    fn jittered_delays_stay_within_bounds() {
        let rng = SeededRng::new(11);
        for jitter in [Jitter::None, Jitter::Full, Jitter::Equal] {
            let b = Backoff {
                initial: Duration::from_millis(100),
                multiplier: 3.0,
                max: Duration::from_secs(2),
                jitter,
            };
            for attempt in 1..8 {
                for _ in 0..200 {
                    let d = b.delay(attempt, &rng);
                    assert!(
                        d >= b.floor(attempt) && d <= b.ceiling(attempt),
                        "{jitter} {attempt} {d:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn worst_case_sums_ceilings() {
        let mut p = Policy::builtin("w");
        p.max_attempts = 4;
        p.timeout = Duration::from_secs(1);
        // 100ms + 200ms + 400ms between four attempts.
        assert_eq!(p.worst_case_delay(), Duration::from_millis(700));
        assert_eq!(p.worst_case_total(), Duration::from_millis(4700));
        assert_eq!(p.clamp_retry_after(Duration::from_secs(999)), p.backoff.max);
    }

    /// Found with the `config` fuzz target (its checks, run on an input
    /// with the longest duration; now a seed): `timeout =
    /// "18446744073709551615s"` loads, and `berth policies` then panicked
    /// adding durations.
    #[test]
    fn fuzz_worst_case_of_the_largest_durations_saturates_instead_of_overflowing() {
        let mut p = Policy::builtin("w");
        p.timeout = Duration::MAX;
        assert_eq!(p.worst_case_total(), Duration::MAX);
        p.timeout = Duration::from_secs(1);
        p.backoff.initial = Duration::MAX;
        p.backoff.max = Duration::MAX;
        assert_eq!(p.worst_case_delay(), Duration::MAX);
        assert_eq!(p.worst_case_total(), Duration::MAX);
    }

    /// Seen while fixing the above (same input family, not yet a fuzzer
    /// crash): `max_attempts = 4294967295` made the worst case a loop of
    /// four billion steps; the capped delays are now one product.
    #[test]
    fn fuzz_worst_case_of_the_most_attempts_is_immediate_and_exact() {
        let mut p = Policy::builtin("w");
        p.max_attempts = u32::MAX;
        p.timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        // 100ms … 25.6s (attempts 1 to 9), then 30s after each later one.
        let rising: Duration = (1..10).map(|n| p.backoff.ceiling(n)).sum();
        let capped = p.backoff.max.saturating_mul(u32::MAX - 10);
        assert_eq!(p.worst_case_delay(), rising + capped);
        assert!(started.elapsed() < Duration::from_secs(1));
        let mut q = Policy::builtin("w");
        q.max_attempts = 12;
        let stepwise: Duration = (1..12).map(|n| q.backoff.ceiling(n)).sum();
        assert_eq!(q.worst_case_delay(), stepwise);
    }
}
