//! `GET /v1/events`: the org's status changes and errors over a WebSocket,
//! read from the event log (so nothing is lost and a client resumes exactly
//! where it left off with `?after=<event id>`). Only events whose `org_id`
//! is the token's org are ever read. An org holds at most
//! `api.max_streams_per_org` streams at once; a client's messages (it only
//! sends control frames) are capped at 64 KiB.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::response::Response;
use berth_core::events::WorkerFailed;
use berth_core::{Envelope, EventId};
use berth_worker::Retried;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use crate::ApiState;
use crate::auth::OrgAuth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiQuery;
use crate::limits::{Hold, Slot};
use crate::views::{InstanceErrorView, Status};

/// Events read from the log per query.
const BATCH: u32 = 256;

/// Largest message (and frame) read from a client: the stream reads only
/// control frames, so anything bigger is a client filling our memory.
pub const MAX_CLIENT_MESSAGE: usize = 64 * 1024;

/// How long one message may take to be sent: a client that stops reading
/// must not hold its stream (and its connection) forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Query of the event stream. (No `Debug`: it may hold a token.)
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Resume after this event id (the `id` of the last message received);
    /// without it (and without `from`) the stream starts with what happens
    /// from now on.
    after: Option<String>,
    /// `start`: begin with the org's first event instead of now (not with
    /// `after`).
    #[param(pattern = "^start$")]
    from: Option<String>,
    /// The org token, for clients that cannot set the Authorization header
    /// on a WebSocket (browsers).
    #[allow(dead_code)] // Read by the auth extractor; declared for the document.
    access_token: Option<String>,
}

/// One message of the stream (a text frame of JSON).
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamMessage {
    /// The event's id: the cursor to resume after.
    pub id: String,
    /// `status` (the instance changed status), `error` (a step failed for
    /// good; the instance's own `status` message with `failed` follows) or
    /// `retry` (a step's attempt failed and will be retried). For `retry`,
    /// `id` is that of the event whose handling is retried: retries are
    /// sent live and are not replayed on a resume with `after`.
    #[schema(pattern = "^(status|error|retry)$")]
    pub kind: String,
    /// The event type, e.g. `image.built`, `instance.failed`,
    /// `image.build.failed`; `attempt.retry` for `retry` messages.
    #[serde(rename = "type")]
    pub event_type: String,
    pub instance_id: Option<String>,
    pub flow_id: String,
    /// The new status, for `status` messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What failed: code, message, step and attempts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<InstanceErrorView>,
    /// For `retry`: the step whose attempt failed, e.g. `network.attach`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// For `retry`: the attempt that failed (from 1); the next is one more.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// For `retry`: the most attempts the step's retry policy allows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// For `retry`: RFC 3339, when the next attempt is due.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    /// RFC 3339.
    pub at: String,
}

/// The org's status changes and errors, live, as a WebSocket.
#[utoipa::path(
    get, path = "/v1/events", operation_id = "event_stream", tag = "events",
    params(EventsQuery),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "Switching to a WebSocket; each text frame is one message", body = StreamMessage),
        (status = 400, description = "`websocket_required` (not an upgrade request), `invalid_parameter` (e.g. both `after` and `from`)", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found`: `after` names no event of this org", body = ErrorBody),
        (status = 422, description = "`invalid_value`: `from` is not `start`", body = ErrorBody),
        (status = 429, description = "`too_many_requests`: the org has `api.max_streams_per_org` streams open; `Retry-After` says when to try again", body = ErrorBody,
            headers(("retry-after" = u32, description = "Seconds to wait"))),
    )
)]
pub async fn events(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiQuery(q): ApiQuery<EventsQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let cursor = {
        match (q.after.as_deref(), q.from.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_param(
                    "from",
                    "from and after cannot be given together: after already says where to start",
                ));
            }
            (None, Some("start")) => 0,
            (None, Some(other)) => {
                return Err(ApiError::invalid(
                    "from",
                    format!(
                        "from must be start (got {:?})",
                        other.chars().take(80).collect::<String>()
                    ),
                ));
            }
            (None, None) => state.store().last_seq().await?,
            (Some(after), None) => {
                let not_found = || ApiError::not_found("event", "after", after);
                let id: EventId = after.parse().map_err(|_| not_found())?;
                state
                    .store()
                    .event_seq_in_org(&auth.org_id, id)
                    .await?
                    .ok_or_else(not_found)?
            }
        }
    };
    let ws = ws.map_err(|r| {
        ApiError::new(
            r.status(),
            "websocket_required",
            format!("/v1/events is a WebSocket; {}", r.body_text()),
        )
    })?;
    crate::check_running(&state)?;
    // Taken before the upgrade and moved into the session: given back when
    // the session ends, or with the callback if the upgrade never happens.
    let slot = state.hold(&auth.org_id, Hold::Stream)?;
    // Subscribed before the upgrade is answered: a client that opens the
    // stream and then creates an instance sees its very first retry.
    let retried = state.inner.bus.retried();
    let tracker = state.inner.tracker.clone();
    let hard = state.inner.hard.clone();
    let org = auth.org_id;
    Ok(ws
        // Selected when offered (the dashboard offers it with its token).
        .protocols([crate::auth::WS_PROTOCOL])
        .max_message_size(MAX_CLIENT_MESSAGE)
        .max_frame_size(MAX_CLIENT_MESSAGE)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                tokio::select! {
                    () = session(state, org, cursor, socket, slot, retried) => {}
                    // Past the shutdown grace (a client not reading its
                    // close frame).
                    () = hard.cancelled() => {}
                }
            })
        }))
}

/// Sends the org's messages after `cursor`, then live ones, until the
/// client leaves or the server shuts down.
async fn session(
    state: ApiState,
    org: String,
    mut cursor: i64,
    socket: WebSocket,
    _slot: Slot,
    retried: broadcast::Receiver<Arc<Retried>>,
) {
    let mut retried = Some(retried);
    let (mut tx, mut rx) = socket.split();
    let mut feed = state.inner.feed.subscribe();
    let cancel = state.inner.cancel.clone();
    loop {
        // Drain what is in the log after the cursor.
        loop {
            let batch = {
                match state.store().org_events_after(&org, cursor, BATCH).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "event stream cannot read the log");
                        let _ = tx
                            .send(Message::Close(Some(CloseFrame {
                                code: close_code::ERROR,
                                reason: "cannot read the event log".into(),
                            })))
                            .await;
                        return;
                    }
                }
            };
            let n = batch.len();
            for (seq, env) in batch {
                cursor = seq;
                let Some(msg) = message(&state, &env).await else {
                    continue;
                };
                let Ok(text) = serde_json::to_string(&msg) else {
                    continue;
                };
                match tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::Text(text.into()))).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return,
                    Err(_) => {
                        tracing::debug!(%org, "event stream client stopped reading; closed");
                        return;
                    }
                }
            }
            if n < BATCH as usize {
                break;
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = tx
                    .send(Message::Close(Some(CloseFrame {
                        code: close_code::AWAY,
                        reason: "the server is shutting down".into(),
                    })))
                    .await;
                return;
            }
            r = feed.changed() => {
                if r.is_err() {
                    return;
                }
            }
            r = next_retry(&mut retried) => match r {
                // Only the org's own: the one check that keeps another
                // org's retries (and their error messages) out.
                Ok(r) if r.org_id.as_deref() == Some(org.as_str()) => {
                    let msg = retry_message(&r, state.store().now());
                    let Ok(text) = serde_json::to_string(&msg) else {
                        continue;
                    };
                    match tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        _ => return,
                    }
                }
                Ok(_) => {}
                // Retries are advice, not state: a lagging client misses
                // some; the instance's `progress` still tells where it is.
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(%org, missed = n, "event stream fell behind the retries");
                }
                // The workers stopped: no more retries; the log goes on.
                Err(broadcast::error::RecvError::Closed) => retried = None,
            },
            m = rx.next() => match m {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Err(e)) => {
                    if too_big(e) {
                        let _ = tokio::time::timeout(SEND_TIMEOUT, tx.send(Message::Close(Some(CloseFrame {
                            code: close_code::SIZE,
                            reason: "messages to the server are at most 64 KiB".into(),
                        }))))
                        .await;
                    }
                    return;
                }
                // Pings are answered by the socket itself; text from the
                // client means nothing here.
                Some(Ok(_)) => {}
            },
        }
    }
}

/// The next retry of the bus, or never once the bus is gone.
async fn next_retry(
    rx: &mut Option<broadcast::Receiver<Arc<Retried>>>,
) -> Result<Arc<Retried>, broadcast::error::RecvError> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The message for a failed attempt that will be retried.
fn retry_message(r: &Retried, at: berth_core::Timestamp) -> StreamMessage {
    StreamMessage {
        id: r.event_id.to_string(),
        kind: "retry".to_owned(),
        event_type: "attempt.retry".to_owned(),
        instance_id: r.subject.clone(),
        flow_id: r.flow_id.to_string(),
        status: None,
        error: Some(InstanceErrorView {
            code: r.error.code.clone(),
            message: r.error.message.clone(),
            step: r.worker.clone(),
            attempts: r.attempt,
            cause: (!r.error.chain.is_empty()).then(|| r.error.chain.join(": ")),
        }),
        step: Some(r.worker.clone()),
        attempt: Some(r.attempt),
        max_attempts: Some(r.max_attempts),
        next_attempt_at: Some(r.next_attempt_at.to_string()),
        at: at.to_string(),
    }
}

/// Whether a read failed on a message over [`MAX_CLIENT_MESSAGE`].
fn too_big(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    matches!(
        e.into_inner().downcast_ref::<Error>(),
        Some(Error::Capacity(_))
    )
}

/// The status an event of the instance flow records.
fn status_of(env: &Envelope) -> Option<Status> {
    Some(match env.event_type.as_str() {
        "instance.requested" => Status::Requested,
        "host.ready" => Status::Provisioning,
        "image.built" => Status::Building,
        "container.started" => Status::Starting,
        "instance.running" => Status::Running,
        "instance.failed" => Status::Failed,
        "instance.stop.requested" => Status::Stopping,
        "instance.stopped" => Status::Stopped,
        "instance.exited" => Status::Exited,
        "instance.delete.requested" => Status::Deleting,
        "instance.deleted" => Status::Deleted,
        "instance.start.requested" => {
            #[derive(Deserialize)]
            struct P {
                #[serde(default)]
                restart: bool,
            }
            // A restart first stops the container.
            match env.payload_as::<P>() {
                Ok(P { restart: true }) => Status::Stopping,
                _ => Status::Starting,
            }
        }
        _ => return None,
    })
}

/// The message for an event, if it is a status change or an error.
async fn message(state: &ApiState, env: &Envelope) -> Option<StreamMessage> {
    let base = |kind: &str| StreamMessage {
        id: env.id.to_string(),
        kind: kind.to_owned(),
        event_type: env.event_type.clone(),
        instance_id: env.subject.clone(),
        flow_id: env.flow_id.to_string(),
        status: None,
        error: None,
        step: None,
        attempt: None,
        max_attempts: None,
        next_attempt_at: None,
        at: env.created_at.to_string(),
    };
    if let Some(status) = status_of(env) {
        let mut m = base("status");
        m.status = Some(status);
        if env.event_type == "instance.failed" {
            m.error = failed_error(state, env).await;
        }
        return Some(m);
    }
    if env.event_type.ends_with(".failed")
        && let Ok(f) = env.payload_as::<WorkerFailed>()
    {
        let mut m = base("error");
        m.error = Some(InstanceErrorView {
            code: f.error.code.clone(),
            message: f.error.message.clone(),
            step: f.worker,
            attempts: f.attempts,
            cause: (!f.error.chain.is_empty()).then(|| f.error.chain.join(": ")),
        });
        return Some(m);
    }
    None
}

/// The error of an `instance.failed` event: code and step from the event,
/// words and attempts from the instance (which the compensation wrote in
/// the same transaction).
async fn failed_error(state: &ApiState, env: &Envelope) -> Option<InstanceErrorView> {
    #[derive(Deserialize)]
    struct P {
        code: String,
        step: String,
    }
    let p: P = env.payload_as().ok()?;
    let stored = match &env.subject {
        Some(id) => state
            .store()
            .instance(id)
            .await
            .ok()
            .flatten()
            .and_then(|i| i.error),
        None => None,
    };
    Some(match stored {
        Some(e) if e.code == p.code && e.step == p.step => InstanceErrorView::from(&e),
        _ => InstanceErrorView {
            message: format!("step {} failed: {}", p.step, p.code),
            code: p.code,
            step: p.step,
            attempts: 0,
            cause: None,
        },
    })
}
