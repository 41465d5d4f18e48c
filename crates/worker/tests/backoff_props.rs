//! Properties of the declared back-off, for any policy the configuration
//! accepts: every delay lies between its mode's floor and the ceiling, the
//! ceiling never exceeds `backoff.max` and never shrinks from one attempt to
//! the next, the same seed gives the same delays, and the worst-case figures
//! `berth policies` prints bound what can really happen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use berth_core::SeededRng;
use berth_worker::policy::{Backoff, Jitter, Policy};
use proptest::prelude::*;

fn jitter() -> impl Strategy<Value = Jitter> {
    prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal)]
}

/// Back-offs as validation admits them: initial > 0, max ≥ initial,
/// multiplier ≥ 1.
fn backoff() -> impl Strategy<Value = Backoff> {
    (1u64..5_000_000, 0u64..600_000_000, 1.0f64..10.0, jitter()).prop_map(
        |(initial, extra, multiplier, jitter)| Backoff {
            initial: Duration::from_micros(initial),
            multiplier,
            max: Duration::from_micros(initial + extra),
            jitter,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_delay_is_within_its_modes_bounds(b in backoff(), attempt in 1u32..200, seed: u64) {
        let rng = SeededRng::new(seed);
        let d = b.delay(attempt, &rng);
        let ceiling = b.ceiling(attempt);
        prop_assert!(ceiling <= b.max, "{ceiling:?} > max {:?}", b.max);
        prop_assert!(d <= ceiling, "{d:?} > ceiling {ceiling:?}");
        // Microsecond rounding: the floor may be half a microsecond above.
        prop_assert!(d + Duration::from_micros(1) >= b.floor(attempt), "{d:?} < floor {:?}", b.floor(attempt));
        if b.jitter == Jitter::None {
            prop_assert_eq!(d.as_micros(), ceiling.as_micros());
        }
    }

    #[test]
    fn the_ceiling_grows_to_the_max_and_stays(b in backoff(), attempt in 1u32..200) {
        prop_assert!(b.ceiling(attempt + 1) >= b.ceiling(attempt));
        prop_assert_eq!(b.ceiling(1), b.initial.min(b.max));
        prop_assert_eq!(b.ceiling(u32::MAX), b.max);
    }

    #[test]
    fn the_same_seed_gives_the_same_delays(b in backoff(), seed: u64) {
        let (x, y) = (SeededRng::new(seed), SeededRng::new(seed));
        for attempt in 1..20 {
            prop_assert_eq!(b.delay(attempt, &x), b.delay(attempt, &y));
        }
    }

    #[test]
    fn the_worst_case_bounds_every_run(b in backoff(), max_attempts in 1u32..30, seed: u64) {
        let mut p = Policy::builtin("w");
        p.backoff = b;
        p.max_attempts = max_attempts;
        let rng = SeededRng::new(seed);
        let total: Duration = (1..max_attempts).map(|n| b.delay(n, &rng)).sum();
        prop_assert!(total <= p.worst_case_delay(), "{total:?} > {:?}", p.worst_case_delay());
        prop_assert!(p.clamp_retry_after(Duration::from_secs(86_400)) <= b.max);
    }
}
