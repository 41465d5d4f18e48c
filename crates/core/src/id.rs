//! Time-ordered identifiers. Event and flow ids are ULIDs: 128 bits, sortable
//! by creation time as text, and short enough (26 characters) to read aloud.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

use crate::clock::Clock;
use crate::rng::SeededRng;

/// Error for an id that is not a valid ULID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} id '{value}': expected a 26-character ULID")]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! ulid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            pub const fn from_ulid(u: Ulid) -> Self {
                $name(u)
            }
            pub const fn as_ulid(self) -> Ulid {
                self.0
            }
            /// Milliseconds since the epoch encoded in the id.
            pub fn timestamp_ms(self) -> u64 {
                self.0.timestamp_ms()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Ulid::from_string(s).map($name).map_err(|_| InvalidId {
                    kind: $kind,
                    value: s.chars().take(64).collect(),
                })
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<str>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

ulid_id!(
    /// The id of one envelope; also its dedupe key on every bus.
    EventId,
    "event"
);
ulid_id!(
    /// Correlates every event caused by one user action.
    FlowId,
    "flow"
);

/// Generates ULIDs that are strictly increasing within this process, even
/// within one millisecond, from the injectable clock and seeded generator.
pub struct IdGen {
    clock: Arc<dyn Clock>,
    rng: Arc<SeededRng>,
    last: Mutex<Ulid>,
}

impl fmt::Debug for IdGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGen").finish_non_exhaustive()
    }
}

impl IdGen {
    pub fn new(clock: Arc<dyn Clock>, rng: Arc<SeededRng>) -> Self {
        IdGen {
            clock,
            rng,
            last: Mutex::new(Ulid::nil()),
        }
    }

    pub fn ulid(&self) -> Ulid {
        let ms = u64::try_from(self.clock.now().as_millis()).unwrap_or(0);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let next = if ms <= last.timestamp_ms() {
            // Same (or an earlier, if the clock stepped back) millisecond:
            // increment the previous id so order still follows creation.
            // Overflowing 80 random bits within one millisecond cannot happen
            // in practice; fall back to a fresh id rather than panic.
            last.increment().unwrap_or_else(|| self.fresh(ms))
        } else {
            self.fresh(ms)
        };
        *last = next;
        next
    }

    fn fresh(&self, ms: u64) -> Ulid {
        let hi = u128::from(self.rng.next_u64());
        let lo = u128::from(self.rng.next_u64());
        // Keep the top bit of the random part clear so that incrementing within
        // one millisecond has 2^79 steps of headroom.
        let random = ((hi << 64) | lo) & ((1u128 << 79) - 1);
        Ulid::from_parts(ms, random)
    }

    pub fn event_id(&self) -> EventId {
        EventId(self.ulid())
    }

    pub fn flow_id(&self) -> FlowId {
        FlowId(self.ulid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;

    struct Fixed(i64);
    impl Clock for Fixed {
        fn now(&self) -> Timestamp {
            Timestamp::from_micros(self.0)
        }
    }

    #[test]
    fn ids_increase_within_one_millisecond() {
        let g = IdGen::new(
            Arc::new(Fixed(1_700_000_000_000_000)),
            Arc::new(SeededRng::new(1)),
        );
        let ids: Vec<EventId> = (0..1000).map(|_| g.event_id()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
            assert!(w[0].to_string() < w[1].to_string(), "text order follows");
        }
        assert_eq!(ids[0].timestamp_ms(), 1_700_000_000_000);
    }

    #[test]
    fn parse_roundtrip_and_bad_input() {
        let g = IdGen::new(Arc::new(Fixed(5_000)), Arc::new(SeededRng::new(9)));
        let id = g.event_id();
        let parsed: EventId = id.to_string().parse().unwrap();
        assert_eq!(parsed, id);
        let err = "not-an-id".parse::<FlowId>().unwrap_err();
        assert_eq!(err.kind, "flow");
        assert!(err.to_string().contains("not-an-id"));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
    }
}
