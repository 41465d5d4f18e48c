//! Identifiers: ULIDs, 128 bits, sortable by creation time (to the
//! millisecond) as text, and short enough (26 characters) to read aloud.
//! Event ids are strictly ordered; the ids users are handed (flows, orgs,
//! instances, tokens) are unpredictable from one another.

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

/// Where the random bits of the ids handed to users come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Public {
    /// The seeded generator, like every other id: a simulation replays its
    /// seed exactly, ids included.
    Seeded,
    /// The operating system's random source, never derived from an earlier
    /// id: what a server hands to clients.
    Os,
}

/// Generates ids from the injectable clock.
///
/// Two kinds: [`IdGen::ulid`] (and [`IdGen::event_id`]) are strictly
/// increasing within this process, even within one millisecond, because the
/// dispatcher and the event log rely on their order; within a millisecond
/// each is the previous one plus one, so they are predictable from one
/// another. [`IdGen::unpredictable`] (and [`IdGen::flow_id`]) are what users
/// are handed — org, instance, token and flow ids: with
/// [`IdGen::with_os_entropy`] their 80 random bits come from the OS for
/// every id, so no id tells anything about another (their order is only the
/// millisecond's).
pub struct IdGen {
    clock: Arc<dyn Clock>,
    rng: Arc<SeededRng>,
    public: Public,
    last: Mutex<Ulid>,
}

impl fmt::Debug for IdGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdGen")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl IdGen {
    /// Every id from the seeded generator, replayable from its seed: for
    /// the simulator and tests. Ids for users are then as predictable as
    /// the time-ordered ones.
    pub fn new(clock: Arc<dyn Clock>, rng: Arc<SeededRng>) -> Self {
        IdGen {
            clock,
            rng,
            public: Public::Seeded,
            last: Mutex::new(Ulid::nil()),
        }
    }

    /// Time-ordered ids from the seeded generator, ids for users from the
    /// OS's random source: for a server.
    pub fn with_os_entropy(clock: Arc<dyn Clock>, rng: Arc<SeededRng>) -> Self {
        IdGen {
            public: Public::Os,
            ..IdGen::new(clock, rng)
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.now().as_millis()).unwrap_or(0)
    }

    /// A time-ordered id: strictly greater than every earlier one of this
    /// generator.
    pub fn ulid(&self) -> Ulid {
        let ms = self.now_ms();
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

    /// An id to hand to users: the millisecond, then 80 random bits drawn
    /// for this id alone (from the OS with [`IdGen::with_os_entropy`]).
    /// Never the increment of another id.
    pub fn unpredictable(&self) -> Ulid {
        match self.public {
            Public::Seeded => self.ulid(),
            Public::Os => {
                let mut bytes = [0u8; 16];
                match getrandom::fill(&mut bytes[6..]) {
                    Ok(()) => Ulid::from_parts(self.now_ms(), u128::from_be_bytes(bytes)),
                    // Only where the OS offers no random source at all (no
                    // getrandom(2), no /dev/urandom): fresh seeded bits,
                    // still never an increment of another id.
                    Err(_) => self.fresh(self.now_ms()),
                }
            }
        }
    }

    pub fn event_id(&self) -> EventId {
        EventId(self.ulid())
    }

    /// A flow id, handed to users (`Berth-Flow-Id`): unpredictable.
    pub fn flow_id(&self) -> FlowId {
        FlowId(self.unpredictable())
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

    fn random_bits(u: Ulid) -> u128 {
        u.random()
    }

    #[test]
    fn ids_for_users_share_no_derivable_relation() {
        // One millisecond for all of them: where time-ordered ids are each
        // the previous plus one.
        let g = IdGen::with_os_entropy(
            Arc::new(Fixed(1_700_000_000_000_000)),
            Arc::new(SeededRng::new(1)),
        );
        let ids: Vec<Ulid> = (0..1000).map(|_| g.unpredictable()).collect();
        let mut seen = std::collections::HashSet::new();
        for w in ids.windows(2) {
            let (a, b) = (random_bits(w[0]), random_bits(w[1]));
            assert_ne!(b, a.wrapping_add(1), "{} then {}: an increment", w[0], w[1]);
            assert_ne!(b, a.wrapping_sub(1), "{} then {}: a decrement", w[0], w[1]);
            // 80 independent random bits differ in 40 on average; fewer
            // than 12 happens with odds below 1e-10 per pair.
            let differ = (a ^ b).count_ones();
            assert!(
                differ >= 12,
                "{} then {}: only {differ} bits differ",
                w[0],
                w[1]
            );
        }
        for id in &ids {
            assert!(seen.insert(*id), "{id} repeated");
            assert_eq!(id.timestamp_ms(), 1_700_000_000_000);
        }
        // Flow ids too; time-ordered ids are unchanged.
        let (f1, f2) = (g.flow_id().as_ulid(), g.flow_id().as_ulid());
        assert!((random_bits(f1) ^ random_bits(f2)).count_ones() >= 12);
        let (e1, e2) = (g.event_id(), g.event_id());
        assert_eq!(e1.as_ulid().increment(), Some(e2.as_ulid()));
    }

    #[test]
    fn a_seeded_generator_replays_every_id() {
        let make = || IdGen::new(Arc::new(Fixed(5_000)), Arc::new(SeededRng::new(4)));
        let (a, b) = (make(), make());
        for _ in 0..10 {
            assert_eq!(a.unpredictable(), b.unpredictable());
            assert_eq!(a.flow_id(), b.flow_id());
        }
    }
}
