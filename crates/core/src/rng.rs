//! One seeded random generator for everything random in Berth (back-off
//! jitter, id entropy, fault injection), so a test or a simulation run can be
//! replayed from its seed.

use std::sync::Mutex;

/// SplitMix64 behind a mutex. Not cryptographic: tokens and secrets must not
/// come from here. SplitMix64 is chosen for being tiny, fast and statistically
/// good enough for jitter and simulation, with a 64-bit seed that fits in a log
/// line.
#[derive(Debug)]
pub struct SeededRng {
    seed: u64,
    state: Mutex<u64>,
}

impl SeededRng {
    pub fn new(seed: u64) -> Self {
        SeededRng {
            seed,
            state: Mutex::new(seed),
        }
    }

    /// A generator seeded from the OS clock and process id, for production.
    /// The seed is still recorded so an incident can be replayed.
    pub fn from_entropy() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::new(nanos ^ (u64::from(std::process::id()) << 32))
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn next_u64(&self) -> u64 {
        // A poisoned lock only means another thread panicked mid-update of a
        // plain integer; the state is still a valid u64, so keep going.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi]` (inclusive); `lo` when `hi <= lo`.
    pub fn between(&self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        let span = hi - lo;
        if span == u64::MAX {
            return self.next_u64();
        }
        lo + self.next_u64() % (span + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence() {
        let a = SeededRng::new(42);
        let b = SeededRng::new(42);
        let xs: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], xs[1]);
    }

    #[test]
    fn between_stays_in_bounds_and_covers_them() {
        let r = SeededRng::new(7);
        let mut seen_lo = false;
        let mut seen_hi = false;
        for _ in 0..10_000 {
            let v = r.between(3, 6);
            assert!((3..=6).contains(&v));
            seen_lo |= v == 3;
            seen_hi |= v == 6;
        }
        assert!(seen_lo && seen_hi);
        assert_eq!(r.between(5, 5), 5);
        assert_eq!(r.between(9, 2), 9);
    }

    #[test]
    fn f64_in_unit_interval() {
        let r = SeededRng::new(1);
        for _ in 0..10_000 {
            let v = r.next_f64();
            assert!((0.0..1.0).contains(&v));
        }
    }
}
