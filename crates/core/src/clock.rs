//! Time as Berth sees it: microseconds since the Unix epoch, read through an
//! injectable [`Clock`] so tests and the simulator can run on simulated time.

use std::fmt;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch. Microseconds (not milliseconds) because
/// attempt durations and dispatch latency are reported at that precision.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const ZERO: Timestamp = Timestamp(0);

    pub const fn from_micros(us: i64) -> Self {
        Timestamp(us)
    }

    pub const fn as_micros(self) -> i64 {
        self.0
    }

    pub fn as_millis(self) -> i64 {
        self.0 / 1000
    }

    /// `self + d`, saturating instead of overflowing on absurd durations.
    pub fn plus(self, d: Duration) -> Self {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.0.saturating_add(us))
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_micros(u64::try_from(self.0.saturating_sub(earlier.0)).unwrap_or(0))
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    pub fn from_system_time(t: SystemTime) -> Self {
        match t.duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            humantime::format_rfc3339_micros(self.to_system_time())
        )
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// On the wire a timestamp is an RFC 3339 string with microseconds, the form
/// people and other languages read without a conversion table.
impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp::from_system_time)
            .map_err(|e| serde::de::Error::custom(format!("invalid timestamp '{s}': {e}")))
    }
}

/// The one source of "now" in Berth. Everything that schedules (back-off,
/// leases, `not_before`) reads it, so a test can substitute simulated time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// Wall-clock time from the operating system.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_system_time(SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_and_since_are_inverse() {
        let t = Timestamp::from_micros(1_000_000);
        let later = t.plus(Duration::from_millis(250));
        assert_eq!(later.as_micros(), 1_250_000);
        assert_eq!(later.since(t), Duration::from_millis(250));
        assert_eq!(
            t.since(later),
            Duration::ZERO,
            "negative spans clamp to zero"
        );
    }

    #[test]
    fn displays_as_rfc3339() {
        let t = Timestamp::from_micros(1_700_000_000_123_456);
        assert_eq!(t.to_string(), "2023-11-14T22:13:20.123456Z");
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }
}
