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

/// Payloads of the instance flow (DESIGN §4). Each carries the instance id
/// and its generation; the rest lives on the instance row, which workers read
/// (events say *that* something happened, the row says what is true now).
pub mod instance {
    use serde::{Deserialize, Serialize};

    use crate::envelope::EventPayload;

    macro_rules! payload {
        ($(#[$doc:meta])* $name:ident, $ty:literal { $($(#[$fattr:meta])* $field:ident : $fty:ty),* $(,)? }) => {
            $(#[$doc])*
            #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
            pub struct $name {
                pub instance_id: String,
                pub generation: i64,
                $($(#[$fattr])* pub $field: $fty,)*
            }
            impl EventPayload for $name {
                const TYPE: &'static str = $ty;
            }
        };
    }

    payload!(
        /// A user asked for an instance (or for it to start again).
        Requested, "instance.requested" {}
    );
    payload!(
        /// The org has a host for it.
        HostReady, "host.ready" { host: String }
    );
    payload!(
        /// The org's network exists on that host.
        NetworkReady, "network.ready" { network: String }
    );
    payload!(
        /// The instance's image is built on the host.
        ImageBuilt, "image.built" { image: String }
    );
    payload!(
        /// The container was created and started.
        ContainerStarted, "container.started" { container: String }
    );
    payload!(
        /// The container is on the org's network, with this IP.
        ContainerAttached, "container.attached" { ip: String }
    );
    payload!(
        /// The creation flow ended well.
        Running, "instance.running" {}
    );
    payload!(
        /// The creation flow ended badly; the row has the error.
        Failed, "instance.failed" { code: String, step: String }
    );
    payload!(
        /// A user asked to delete the instance.
        DeleteRequested, "instance.delete.requested" {}
    );
    payload!(
        /// Everything of the instance is gone.
        Deleted, "instance.deleted" {}
    );
    payload!(
        /// A user asked to stop the instance.
        StopRequested, "instance.stop.requested" {}
    );
    payload!(
        /// The container is stopped.
        Stopped, "instance.stopped" {}
    );
    payload!(
        /// A user asked to start a stopped or exited instance, or to restart
        /// a running one (`restart`), or the restart policy did.
        StartRequested, "instance.start.requested" { restart: bool }
    );
    payload!(
        /// The container exited (engine event), or is gone.
        Exited, "instance.exited" {
            exit_code: i64,
            oom_killed: bool,
            /// The container no longer exists (removed outside Berth);
            /// `exit_code` is then -1. Counts as a failure.
            #[serde(default)]
            gone: bool
        }
    );
    payload!(
        /// The engine reported that a container of this instance died, at
        /// `at` (published by the engine-event listener of its host).
        ContainerDied, "engine.container.died" {
            exit_code: i64,
            oom_killed: bool,
            container: String,
            at: crate::clock::Timestamp,
            /// Not a death the engine reported: the reconciler found the
            /// container missing (`exit_code` -1).
            #[serde(default)]
            gone: bool,
        }
    );
    payload!(
        /// The creation flow overran its deadline and was failed by the
        /// reconciler.
        TimedOut, "instance.flow.timeout" {}
    );
}
