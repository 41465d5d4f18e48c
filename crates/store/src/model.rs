//! Records the store reads and writes, independent of the SQL dialect.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use berth_core::{ErrorInfo, EventId, FlowId, Timestamp};
use serde::Serialize;

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Handled; its writes and emitted events are committed.
    Ok,
    /// Already in the worker's inbox: acknowledged without running the handler.
    Duplicate,
    /// The handler returned a retryable error.
    Retry,
    /// The handler overran the policy's timeout (retryable).
    Timeout,
    /// The handler returned a fatal error.
    Fatal,
    /// The handler panicked (fatal).
    Panic,
    /// The payload could not be read (fatal).
    Malformed,
    /// The process holding the lease died mid-attempt.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Duplicate => "duplicate",
            Outcome::Retry => "retry",
            Outcome::Timeout => "timeout",
            Outcome::Fatal => "fatal",
            Outcome::Panic => "panic",
            Outcome::Malformed => "malformed",
            Outcome::Abandoned => "abandoned",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "ok" => Outcome::Ok,
            "duplicate" => Outcome::Duplicate,
            "retry" => Outcome::Retry,
            "timeout" => Outcome::Timeout,
            "fatal" => Outcome::Fatal,
            "panic" => Outcome::Panic,
            "malformed" => Outcome::Malformed,
            "abandoned" => Outcome::Abandoned,
            other => anyhow::bail!("unknown attempt outcome '{other}' in the store"),
        })
    }
}

/// A delivery row to insert: one (event, worker) pair. With `lease` set, the
/// row is born claimed (attempt already counted) so that the dispatcher can
/// hand a fresh event to an idle worker without a second write.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub event_id: EventId,
    pub worker: Arc<str>,
    pub round: u32,
    pub attempt: u32,
    pub not_before: Timestamp,
    pub lease: Option<Lease>,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: Arc<str>,
    pub leased_at: Timestamp,
    pub until: Timestamp,
}

/// A delivery handed to this process: its attempt count is already durable.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub event_id: EventId,
    pub worker: Arc<str>,
    pub round: u32,
    pub attempt: u32,
}

/// One row of attempt history.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord {
    pub event_id: EventId,
    pub worker: String,
    pub round: u32,
    pub attempt: u32,
    pub started_at: Timestamp,
    /// `None` when the process died during the attempt.
    #[serde(serialize_with = "ser_opt_duration_us")]
    pub duration: Option<Duration>,
    pub outcome: Outcome,
    pub error: Option<ErrorInfo>,
    /// The back-off chosen after this attempt, when another one follows.
    #[serde(serialize_with = "ser_opt_duration_us")]
    pub next_delay: Option<Duration>,
}

fn ser_opt_duration_us<S: serde::Serializer>(
    d: &Option<Duration>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_micros() as u64)),
        None => s.serialize_none(),
    }
}

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    Fatal,
    Panic,
    Malformed,
    Exhausted,
}

impl DeadReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Fatal => "fatal",
            DeadReason::Panic => "panic",
            DeadReason::Malformed => "malformed",
            DeadReason::Exhausted => "exhausted",
        }
    }
}

impl FromStr for DeadReason {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "fatal" => DeadReason::Fatal,
            "panic" => DeadReason::Panic,
            "malformed" => DeadReason::Malformed,
            "exhausted" => DeadReason::Exhausted,
            other => anyhow::bail!("unknown dead-letter reason '{other}' in the store"),
        })
    }
}

/// A delivery that will not be retried until someone re-drives it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub event_id: EventId,
    pub event_type: String,
    pub worker: String,
    pub round: u32,
    pub attempts: u32,
    pub reason: DeadReason,
    pub error: ErrorInfo,
    pub org_id: Option<String>,
    pub flow_id: FlowId,
    pub dead_at: Timestamp,
    pub redriven_at: Option<Timestamp>,
}

/// Which workers receive which event types: the fan-out table. Each worker
/// subscribed to a type gets its own delivery of every event of that type.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    by_type: HashMap<String, Vec<Arc<str>>>,
}

impl Subscriptions {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn subscribe(&mut self, event_type: &str, worker: Arc<str>) {
        let list = self.by_type.entry(event_type.to_owned()).or_default();
        if !list.contains(&worker) {
            list.push(worker);
        }
    }

    /// The worker's name as registered, if any type routes to it.
    pub fn workers_for_any(&self, worker: &str) -> Option<&Arc<str>> {
        self.by_type.values().flatten().find(|w| &***w == worker)
    }

    /// Every subscribed worker (a worker of several types more than once).
    pub fn all_workers(&self) -> impl Iterator<Item = &Arc<str>> {
        self.by_type.values().flatten()
    }

    pub fn workers_for(&self, event_type: &str) -> &[Arc<str>] {
        self.by_type
            .get(event_type)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}
