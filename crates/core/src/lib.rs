//! Berth's core vocabulary: event envelopes, ids, time, seeded randomness and
//! error descriptions. This crate does no IO and knows nothing of the store,
//! the bus or the container runtime.

pub mod clock;
pub mod domain;
pub mod duration;
pub mod envelope;
pub mod error;
pub mod events;
pub mod id;
pub mod rng;
pub mod sched;
pub mod size;

pub use clock::{Clock, SystemClock, Timestamp};
pub use envelope::{Envelope, EventPayload, NewEvent};
pub use error::ErrorInfo;
pub use id::{EventId, FlowId, IdGen};
pub use rng::SeededRng;
