//! Flow traces (the causal tree of a flow's events with every attempt) and
//! dead letters with re-drive, scoped to the org.

use std::collections::HashMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use berth_core::Envelope;
use berth_store::{AttemptRecord, Redrive};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::ApiState;
use crate::auth::OrgAuth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiPath, ApiQuery};
use crate::instances::parse_flow;
use crate::views::{
    self, AttemptView, DeadLetterList, DeadLetterView, FlowEvent, FlowView, Redriven,
};

/// A flow's events as a tree by causation, each with its attempts.
#[utoipa::path(
    get, path = "/v1/flows/{flow_id}", operation_id = "get_flow", tag = "flows",
    params(("flow_id" = String, Path, description = "Flow id (from `Berth-Flow-Id` or an instance's `flow_id`)")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The flow", body = FlowView),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's flows too)", body = ErrorBody),
    )
)]
pub async fn flow(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(flow_id): ApiPath<String>,
) -> ApiResult<Json<FlowView>> {
    let flow = parse_flow(&flow_id)?;
    let events: Vec<Envelope> = state
        .store()
        .events_of_flow(flow)
        .await?
        .into_iter()
        .filter(|e| e.org_id.as_deref() == Some(auth.org_id.as_str()))
        .collect();
    let Some(first) = events.first() else {
        return Err(ApiError::not_found("flow", "flow_id", &flow_id));
    };
    let started_at = first.created_at;
    let attempts = state.store().attempts_of_flow(flow).await?;
    let mut last = events
        .iter()
        .map(|e| e.created_at)
        .max()
        .unwrap_or(started_at);
    for a in &attempts {
        let end = a.started_at.plus(a.duration.unwrap_or_default());
        last = last.max(end);
    }
    let mut by_event: HashMap<_, Vec<&AttemptRecord>> = HashMap::new();
    for a in &attempts {
        by_event.entry(a.event_id).or_default().push(a);
    }
    let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id).collect();
    let mut children: HashMap<_, Vec<&Envelope>> = HashMap::new();
    let mut roots = Vec::new();
    for e in &events {
        match e.causation_id.filter(|c| ids.contains(c)) {
            Some(c) => children.entry(c).or_default().push(e),
            None => roots.push(e),
        }
    }
    // Built bottom-up without recursion: events are in log order, and an
    // event is always logged after its cause.
    let mut built: HashMap<_, FlowEvent> = HashMap::new();
    for e in events.iter().rev() {
        let kids = children
            .get(&e.id)
            .map(|k| k.iter().filter_map(|c| built.remove(&c.id)).collect())
            .unwrap_or_default();
        built.insert(
            e.id,
            FlowEvent {
                id: e.id.to_string(),
                event_type: e.event_type.clone(),
                subject: e.subject.clone(),
                causation_id: e.causation_id.map(|c| c.to_string()),
                created_at: e.created_at.to_string(),
                payload: views::payload(e),
                attempts: by_event
                    .get(&e.id)
                    .map(|v| {
                        v.iter()
                            .map(|a| {
                                let mut view = AttemptView::from(*a);
                                view.max_attempts = state.max_attempts(&a.worker);
                                view
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                children: kids,
            },
        );
    }
    Ok(Json(FlowView {
        flow_id: flow.to_string(),
        started_at: started_at.to_string(),
        last_activity_at: last.to_string(),
        events: roots.iter().filter_map(|r| built.remove(&r.id)).collect(),
    }))
}

/// Query of the dead-letter list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLetterQuery {
    /// `true` includes those already re-driven.
    #[param(value_type = Option<bool>)]
    all: Option<String>,
    /// At most this many, newest first: 1 to 1000, 100 by default.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

/// The org's dead letters, newest first.
#[utoipa::path(
    get, path = "/v1/dead-letters", operation_id = "list_dead_letters", tag = "flows",
    params(DeadLetterQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Dead letters", body = DeadLetterList),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
    )
)]
pub async fn dead_letters(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> ApiResult<Json<DeadLetterList>> {
    let all = crate::instances::flag("all", q.all.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_param(
                    "limit",
                    format!(
                        "limit must be a number from 1 to 1000 (got {:?})",
                        l.chars().take(80).collect::<String>()
                    ),
                )
            })?,
    };
    let list = state
        .store()
        .dead_letters(Some(&auth.org_id), !all, limit)
        .await?;
    Ok(Json(DeadLetterList {
        dead_letters: list.iter().map(DeadLetterView::from).collect(),
    }))
}

/// Re-drives a dead letter: a new round of attempts for the same worker,
/// with the history of earlier rounds kept.
#[utoipa::path(
    post, path = "/v1/dead-letters/{id}/redrive", operation_id = "redrive_dead_letter", tag = "flows",
    params(("id" = String, Path, description = "Dead letter id")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Queued again", body = Redriven),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's too)", body = ErrorBody),
        (status = 409, description = "`already_redriven`", body = ErrorBody),
    )
)]
pub async fn redrive(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<Redriven>)> {
    let not_found = || ApiError::not_found("dead letter", "id", &id);
    match state.store().dead_letter(&id).await? {
        Some(dl) if dl.org_id.as_deref() == Some(auth.org_id.as_str()) => {}
        _ => return Err(not_found()),
    }
    match state.inner.bus.redrive(&id).await? {
        Redrive::Redriven(dl) => {
            state.inner.feed.kick();
            Ok((
                StatusCode::ACCEPTED,
                Json(Redriven {
                    id: dl.id,
                    event_id: dl.event_id.to_string(),
                    worker: dl.worker,
                    round: dl.round + 1,
                    flow_id: dl.flow_id.to_string(),
                }),
            ))
        }
        Redrive::AlreadyRedriven(_) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_redriven",
            format!("dead letter {id} was already re-driven"),
        )
        .field("id")),
        Redrive::NotFound => Err(not_found()),
    }
}
