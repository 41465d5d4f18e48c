//! A clock that follows tokio's time, so that tests on a paused runtime
//! (`start_paused`) see `now()` jump with `tokio::time::advance` and with
//! auto-advance, exactly as the dispatcher's timers do.

use berth_core::{Clock, Timestamp};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Timestamp,
    start: Instant,
}

impl TokioClock {
    /// Anchored at the current wall-clock time. Must be created inside a
    /// tokio runtime when its time is paused, so `start` is on the paused clock.
    pub fn new() -> Self {
        TokioClock {
            origin: berth_core::SystemClock.now(),
            start: Instant::now(),
        }
    }

    /// Anchored at `origin`: a simulation that must repeat to the
    /// microsecond starts from the same instant on every run.
    pub fn at(origin: Timestamp) -> Self {
        TokioClock {
            origin,
            start: Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.origin.plus(self.start.elapsed())
    }
}
