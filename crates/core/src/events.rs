//! Events the framework itself emits, as opposed to the domain's.

use serde::{Deserialize, Serialize};

use crate::error::ErrorInfo;
use crate::id::EventId;

/// Payload of a worker's `on_exhausted` event (e.g. `network.attach.failed`):
/// emitted once, in the same transaction that dead-letters the delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerFailed {
    /// The worker that gave up.
    pub worker: String,
    /// The event it was handling, and that event's type.
    pub event_id: EventId,
    pub event_type: String,
    /// Attempts made in the round that failed.
    pub attempts: u32,
    /// `fatal`, `panic`, `exhausted` or `malformed`.
    pub reason: String,
    pub error: ErrorInfo,
}

/// Payload version of [`WorkerFailed`].
pub const WORKER_FAILED_VERSION: u32 = 1;
