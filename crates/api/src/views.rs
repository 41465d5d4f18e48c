//! What the API answers: wire types with their OpenAPI schemas, built from
//! the store's records. Env values are masked unless asked for.

use std::collections::BTreeMap;

use berth_core::domain::{InstanceError, InstanceStatus};
use berth_core::{Envelope, ErrorInfo};
use berth_store::instances::Instance;
use berth_store::{AttemptRecord, DeadLetter};
use serde::Serialize;
use utoipa::ToSchema;

/// What an env value is shown as after creation.
pub const MASK: &str = "***";

/// An instance's status.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Requested,
    Provisioning,
    Building,
    Starting,
    Running,
    Failed,
    Stopping,
    Stopped,
    Exited,
    Deleting,
    Deleted,
}

impl From<InstanceStatus> for Status {
    fn from(s: InstanceStatus) -> Self {
        match s {
            InstanceStatus::Requested => Status::Requested,
            InstanceStatus::Provisioning => Status::Provisioning,
            InstanceStatus::Building => Status::Building,
            InstanceStatus::Starting => Status::Starting,
            InstanceStatus::Running => Status::Running,
            InstanceStatus::Failed => Status::Failed,
            InstanceStatus::Stopping => Status::Stopping,
            InstanceStatus::Stopped => Status::Stopped,
            InstanceStatus::Exited => Status::Exited,
            InstanceStatus::Deleting => Status::Deleting,
            InstanceStatus::Deleted => Status::Deleted,
        }
    }
}

/// The answer to an action that started a flow (or found nothing to do).
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// The instance.
    pub id: String,
    /// The flow that carries the action out (the current one when there was
    /// nothing to do); `GET /v1/flows/{flow_id}` traces it.
    pub flow_id: String,
    pub status: Status,
}

/// Why an instance failed, in words a user can act on.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InstanceErrorView {
    /// Stable code, e.g. `image_not_found`.
    pub code: String,
    pub message: String,
    /// The step that failed, e.g. `image.build`.
    pub step: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl From<&InstanceError> for InstanceErrorView {
    fn from(e: &InstanceError) -> Self {
        InstanceErrorView {
            code: e.code.clone(),
            message: e.message.clone(),
            step: e.step.clone(),
            attempts: e.attempts,
            cause: e.cause.clone(),
        }
    }
}

/// A step of creation that holds (or not), as in Kubernetes.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConditionView {
    /// `host_ready`, `network_ready`, `image_built`, `container_started`,
    /// `network_attached`.
    #[serde(rename = "type")]
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
    /// RFC 3339.
    pub last_transition: String,
}

/// An instance.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceView {
    pub id: String,
    pub name: String,
    /// The base image as requested (empty for an instance made from a build).
    pub image: String,
    /// The build context it is made from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The id of the image its container runs, once the image step pinned
    /// it: a later retag of the name changes no instance.
    pub image_id: Option<String>,
    /// The container's resource limits.
    pub limits: Option<LimitsView>,
    /// Values are `***` unless asked for with `?reveal=true`.
    pub env: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub ports: Vec<u16>,
    /// `no`, `always`, `on-failure` or `on-failure:N`.
    pub restart: String,
    pub status: Status,
    pub conditions: Vec<ConditionView>,
    pub error: Option<InstanceErrorView>,
    pub ip: Option<String>,
    pub host: Option<String>,
    pub exit_code: Option<i64>,
    pub oom_killed: bool,
    pub restarts: i64,
    pub generation: i64,
    /// The flow of the latest action on the instance.
    pub flow_id: String,
    /// Where that flow is, while it is in progress (`null` once it ended, and
    /// in the answers of actions and of `wait`).
    pub progress: Option<ProgressView>,
    /// RFC 3339.
    pub created_at: String,
    pub updated_at: String,
}

/// The step a flow in progress is at.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressView {
    /// The step (worker), e.g. `network.attach`.
    pub step: String,
    /// The attempt running now or, while backing off, the next one (from 1).
    pub attempt: u32,
    /// The most attempts the step's retry policy allows.
    pub max_attempts: u32,
    /// The error of the step's latest failed attempt, if one failed.
    pub last_error: Option<ErrorInfoView>,
    /// RFC 3339: when the next attempt is due, while the step backs off
    /// after a failure (`null` while an attempt runs or before the first).
    pub next_attempt_at: Option<String>,
}

impl ProgressView {
    /// The view of `p`; `max_attempts` is the step's policy's.
    pub fn new(p: &berth_store::instances::FlowProgress, max_attempts: u32) -> Self {
        let backing_off = !p.running && p.attempts_started > 0;
        ProgressView {
            step: p.worker.clone(),
            attempt: if p.running {
                p.attempts_started.max(1)
            } else {
                p.attempts_started + 1
            },
            max_attempts,
            last_error: p.last_error.as_ref().map(ErrorInfoView::from),
            next_attempt_at: backing_off.then(|| p.not_before.to_string()),
        }
    }
}

impl InstanceView {
    pub fn new(i: &Instance, reveal: bool) -> Self {
        InstanceView {
            id: i.id.clone(),
            name: i.name.to_string(),
            image: i.spec.image.clone(),
            build: i.spec.build.as_ref().map(|b| b.id.clone()),
            image_id: i.image_tag.clone().filter(|t| t.starts_with("sha256:")),
            limits: i.spec.limits.map(|l| LimitsView {
                memory: berth_core::size::ByteSize(u64::try_from(l.memory_bytes).unwrap_or(0))
                    .to_string(),
                cpus: l.nano_cpus as f64 / 1e9,
                pids: l.pids,
            }),
            env: i
                .spec
                .env
                .iter()
                .map(|(k, v)| {
                    let v = if reveal { v.clone() } else { MASK.to_owned() };
                    (k.clone(), v)
                })
                .collect(),
            cmd: i.spec.cmd.clone(),
            ports: i.spec.ports.clone(),
            restart: String::from(i.spec.restart),
            status: i.status.into(),
            conditions: i
                .conditions
                .0
                .iter()
                .map(|c| ConditionView {
                    kind: serde_json::to_value(c.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    status: c.status,
                    reason: c.reason.clone(),
                    message: c.message.clone(),
                    last_transition: c.last_transition.to_string(),
                })
                .collect(),
            error: i.error.as_ref().map(InstanceErrorView::from),
            ip: i.ip.clone(),
            host: i.host.clone(),
            exit_code: i.exit_code,
            oom_killed: i.oom_killed,
            restarts: i.restarts,
            generation: i.generation,
            flow_id: i.flow_id.to_string(),
            progress: None,
            created_at: i.created_at.to_string(),
            updated_at: i.updated_at.to_string(),
        }
    }
}

/// A container's resource limits.
#[derive(Debug, Serialize, ToSchema)]
pub struct LimitsView {
    /// E.g. `512MiB`.
    pub memory: String,
    pub cpus: f64,
    pub pids: i64,
}

/// The org's instances.
/// One page of them, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
    /// The cursor of the next page (pass it as `after`); `null` on the last
    /// page. Opaque: only ever pass back what the API gave.
    pub next: Option<String>,
}

/// A failure as recorded in attempts and dead letters.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorInfoView {
    pub code: String,
    pub message: String,
    /// Underlying causes, outermost first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
}

impl From<&ErrorInfo> for ErrorInfoView {
    fn from(e: &ErrorInfo) -> Self {
        ErrorInfoView {
            code: e.code.clone(),
            message: e.message.clone(),
            chain: e.chain.clone(),
        }
    }
}

/// One attempt of one worker at one event.
#[derive(Debug, Serialize, ToSchema)]
pub struct AttemptView {
    pub worker: String,
    /// 0 for the first round; each re-drive starts a new one.
    pub round: u32,
    pub attempt: u32,
    /// RFC 3339.
    pub started_at: String,
    /// Microseconds; absent when the process died during the attempt.
    pub duration_us: Option<u64>,
    /// `ok`, `duplicate`, `retry`, `timeout`, `fatal`, `panic`,
    /// `malformed` or `abandoned`.
    pub outcome: String,
    pub error: Option<ErrorInfoView>,
    /// The back-off chosen before the next attempt, in microseconds.
    pub next_delay_us: Option<u64>,
    /// The most attempts the worker's retry policy allows (as configured
    /// now); `null` for a worker this server does not run.
    pub max_attempts: Option<u32>,
}

impl From<&AttemptRecord> for AttemptView {
    fn from(a: &AttemptRecord) -> Self {
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        AttemptView {
            worker: a.worker.clone(),
            round: a.round,
            attempt: a.attempt,
            started_at: a.started_at.to_string(),
            duration_us: a.duration.map(us),
            outcome: a.outcome.as_str().to_owned(),
            error: a.error.as_ref().map(ErrorInfoView::from),
            next_delay_us: a.next_delay.map(us),
            max_attempts: None,
        }
    }
}

/// An event of a flow, with the attempts at it and the events it caused.
#[derive(Debug, Serialize, ToSchema)]
#[schema(no_recursion)]
pub struct FlowEvent {
    pub id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// The entity it is about (an instance id).
    pub subject: Option<String>,
    pub causation_id: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// The event's typed payload.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
    pub attempts: Vec<AttemptView>,
    /// Events emitted while handling this one.
    pub children: Vec<FlowEvent>,
}

/// A flow: the causal tree of the events one user action caused.
#[derive(Debug, Serialize, ToSchema)]
pub struct FlowView {
    pub flow_id: String,
    /// RFC 3339: the first event, and the latest event or attempt end.
    pub started_at: String,
    pub last_activity_at: String,
    /// The root events (usually one), each with its descendants.
    pub events: Vec<FlowEvent>,
}

/// Payload of an envelope as JSON (an unreadable one as a string).
pub fn payload(e: &Envelope) -> serde_json::Value {
    serde_json::from_str(e.payload.get())
        .unwrap_or_else(|_| serde_json::Value::String(e.payload.get().to_owned()))
}

/// A delivery that will not be retried until re-driven.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterView {
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    pub worker: String,
    pub round: u32,
    pub attempts: u32,
    /// `fatal`, `panic`, `malformed` or `exhausted`.
    pub reason: String,
    pub error: ErrorInfoView,
    pub flow_id: String,
    /// RFC 3339.
    pub dead_at: String,
    pub redriven_at: Option<String>,
}

impl From<&DeadLetter> for DeadLetterView {
    fn from(d: &DeadLetter) -> Self {
        DeadLetterView {
            id: d.id.clone(),
            event_id: d.event_id.to_string(),
            event_type: d.event_type.clone(),
            worker: d.worker.clone(),
            round: d.round,
            attempts: d.attempts,
            reason: d.reason.as_str().to_owned(),
            error: ErrorInfoView::from(&d.error),
            flow_id: d.flow_id.to_string(),
            dead_at: d.dead_at.to_string(),
            redriven_at: d.redriven_at.map(|t| t.to_string()),
        }
    }
}

/// The org's dead letters, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
}

/// A re-driven dead letter: a new round of attempts is queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct Redriven {
    pub id: String,
    pub event_id: String,
    pub worker: String,
    /// The round the new attempts belong to.
    pub round: u32,
    pub flow_id: String,
}

/// A new org and its first token (shown this once).
#[derive(Debug, Serialize, ToSchema)]
pub struct OrgCreated {
    pub id: String,
    pub name: String,
    /// The org's first token; only its hash is kept.
    pub token: String,
}

/// A new token (shown this once).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenCreated {
    pub id: String,
    pub token: String,
}

/// A token, without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    /// RFC 3339.
    pub created_at: String,
    pub revoked_at: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TokenList {
    pub tokens: Vec<TokenView>,
}

/// `GET /healthz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
}

/// An uploaded build context.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildView {
    /// What `POST /v1/instances {"build": …}` names.
    pub id: String,
    /// `sha256:<hex>` of the archive: the same bytes are the same build.
    pub digest: String,
    /// Bytes of the archive.
    pub size: i64,
    /// The images its Dockerfile's stages start from.
    pub bases: Vec<String>,
    pub created_at: String,
}

impl BuildView {
    pub fn new(b: &berth_store::builds::Build) -> Self {
        BuildView {
            id: b.id.clone(),
            digest: b.digest.clone(),
            size: b.size,
            bases: b.bases.clone(),
            created_at: b.created_at.to_string(),
        }
    }
}

/// The org's build contexts.
#[derive(Debug, Serialize, ToSchema)]
pub struct BuildList {
    pub builds: Vec<BuildView>,
}
