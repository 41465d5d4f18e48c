//! Instances: create (optionally waiting for the outcome), read, list,
//! delete, stop, start, restart, wait, logs. Every read and action is scoped
//! to the token's org; an id of another org is answered like one that does
//! not exist.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use berth_core::domain::{InstanceStatus, RestartPolicy};
use berth_core::{Envelope, FlowId};
use berth_flows::{FlowError, QuotaExceeded};
use berth_runtime::HostId;
use berth_store::instances::{self, BuildRef, Instance, NameTaken};
use futures::StreamExt;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::auth::OrgAuth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiPath, ApiQuery, JsonBody};
use crate::limits::{Hold, Slot};
use crate::validate::CreateInstance;
use crate::views::{Accepted, InstanceList, InstanceView};
use crate::{ApiState, FLOW_HEADER, check_running};

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(300);
const DEFAULT_TAIL: usize = 100;
const MAX_TAIL: usize = 10_000;
/// Instances per page of the list, unless `limit` says otherwise.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;

/// A boolean query parameter: `true` or `false`, as the document declares
/// it (an OpenAPI boolean), and nothing else: a generated client sends
/// exactly these, and a server that also took `1` or a bare `?wait` would
/// accept requests its own document calls invalid.
pub(crate) fn flag(field: &str, v: Option<&str>) -> Result<bool, ApiError> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::bad_param(
            field,
            format!("{field} must be true or false (got {:?})", trunc(other)),
        )),
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A wait timeout: a human duration (`30s`, `2m`) or seconds.
fn timeout(v: Option<&str>) -> Result<Duration, ApiError> {
    let Some(v) = v else {
        return Ok(DEFAULT_WAIT);
    };
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(v).map_err(|_| {
            ApiError::bad_param(
                "timeout",
                format!(
                    "timeout must be a duration such as 30s or 2m (got {:?})",
                    trunc(v)
                ),
            )
        })?,
    };
    if d > MAX_WAIT {
        return Err(ApiError::invalid(
            "timeout",
            format!("timeout {v} is over the most a request may wait, 5m"),
        ));
    }
    Ok(d)
}

/// Query of `POST /v1/instances` and of the actions.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitFlag {
    /// `true`: answer when the flow has ended (200 with the final state, 408
    /// with the current one after `timeout`, 409 with the error at once if
    /// it failed) instead of 202 at once.
    #[param(value_type = Option<bool>)]
    wait: Option<String>,
    /// How long `wait` waits: `30s` (default), at most `5m`; seconds
    /// (`30`), `30s`, `2m` or `500ms`. The pattern is stricter than the
    /// server, which also reads longer forms such as `1m 30s`, never looser.
    #[param(pattern = r"^(([0-9]|[1-9][0-9]|[12][0-9][0-9]|300)s?|[0-5]m|[0-9]{1,5}ms)$")]
    timeout: Option<String>,
}

/// Query of reads.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ReadQuery {
    /// `true` shows env values; otherwise each is `***`.
    #[param(value_type = Option<bool>)]
    reveal: Option<String>,
}

/// Query of the list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `true` shows env values; otherwise each is `***`.
    #[param(value_type = Option<bool>)]
    reveal: Option<String>,
    /// `true` includes deleted instances.
    #[param(value_type = Option<bool>)]
    all: Option<String>,
    /// Instances per page: 100 by default, at most 1000.
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// The `next` of the previous page: this page starts after it.
    after: Option<String>,
    /// Only instances in this status, or `retrying`: those whose current
    /// step failed and is backing off before its next attempt.
    #[param(value_type = Option<StatusFilter>)]
    status: Option<String>,
    /// Only the instance with this name (with `all=true`, deleted ones of
    /// that name too).
    #[param(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    name: Option<String>,
}

/// What `status` of the list accepts.
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // The document's enum; parsed from the string.
pub enum StatusFilter {
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
    Retrying,
}

/// The values `status` of the list accepts, as the error lists them.
fn status_values() -> String {
    let mut v: Vec<&str> = InstanceStatus::ALL.iter().map(|s| s.as_str()).collect();
    v.push("retrying");
    v.join(", ")
}

/// Query of `/wait`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// The state to wait for: `running` (default), `stopped`, `exited`,
    /// `failed` or `deleted`.
    #[param(value_type = Option<WaitState>)]
    state: Option<String>,
    /// How long to wait: `30s` (default), at most `5m` (forms as for
    /// `wait`'s `timeout`).
    #[param(pattern = r"^(([0-9]|[1-9][0-9]|[12][0-9][0-9]|300)s?|[0-5]m|[0-9]{1,5}ms)$")]
    timeout: Option<String>,
}

/// The states `/wait` waits for: those a flow ends in.
#[derive(Debug, Clone, Copy, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // The document's enum; parsed from the string.
pub enum WaitState {
    Running,
    Stopped,
    Exited,
    Failed,
    Deleted,
}

/// Query of `/logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// `true`: keep the response open and send new lines as they come.
    #[param(value_type = Option<bool>)]
    follow: Option<String>,
    /// How many of the last lines to send first: 100 by default, at most 10000.
    #[param(value_type = Option<u32>, minimum = 0, maximum = 10000)]
    tail: Option<String>,
}

/// The org's instance `id`, or 404.
async fn load(state: &ApiState, org: &str, id: &str) -> Result<Instance, ApiError> {
    match state.store().instance(id).await? {
        Some(i) if i.org_id == org => Ok(i),
        _ => Err(ApiError::not_found("instance", "id", id)),
    }
}

fn flow_headers(mut resp: Response, id: &str, flow: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(flow) {
        resp.headers_mut().insert(FLOW_HEADER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/instances/{id}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

/// Creates an instance; the flow builds and starts it.
#[utoipa::path(
    post, path = "/v1/instances", operation_id = "create_instance", tag = "instances",
    request_body = CreateInstance,
    params(WaitFlag),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Accepted; the flow id is also in the `Berth-Flow-Id` header", body = Accepted,
            headers(("berth-flow-id" = String, description = "The flow creating the instance"))),
        (status = 200, description = "With `wait=true`: the instance, running", body = InstanceView),
        (status = 400, description = "`malformed_json`, `invalid_type`, `missing_field`, `unknown_field`, `invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found`, field `build`: the org has no build of that id (another org's ids too)", body = ErrorBody),
        (status = 408, description = "With `wait=true`: `wait_timeout`, with the current state in `instance`", body = ErrorBody),
        (status = 409, description = "`name_taken`; `quota_exceeded` (the org has `limits.max_instances_per_org` live instances); with `wait=true`, the flow's error (e.g. `image_not_found`, with `step`) and `instance`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`", body = ErrorBody),
        (status = 422, description = "`invalid_value`: a field breaks its rule", body = ErrorBody),
        (status = 429, description = "With `wait=true`: `too_many_requests`, the org has `api.max_waits_per_org` requests waiting (nothing is created)", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiQuery(q): ApiQuery<WaitFlag>,
    JsonBody(body): JsonBody<CreateInstance>,
) -> ApiResult<Response> {
    let wait = flag("wait", q.wait.as_deref())?;
    // Before anything is created: a refused wait must write nothing.
    let _wait = wait_slot(&state, &auth.org_id, wait)?;
    let limit = timeout(q.timeout.as_deref())?;
    let quotas = &state.inner.quotas;
    let (name, mut spec, build) = body.validate(quotas)?;
    if let Some(id) = build {
        let found = state.store().build(&auth.org_id, &id).await?;
        // Another org's build answers exactly like one that does not exist:
        // an id this org has nothing under, 404 as for any other.
        let Some(b) = found else {
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                format!(
                    "no build {:?} in this org; upload the context with POST /v1/builds",
                    id.chars().take(80).collect::<String>()
                ),
            )
            .field("build"));
        };
        spec.build = Some(BuildRef {
            id: b.id,
            digest: b.digest,
        });
    }
    check_running(&state)?;
    let quota = Some(quotas.max_instances_per_org);
    let (inst, env) =
        // Through the bus: the row and its event go into the dispatcher's
        // next group commit instead of a transaction of their own.
        match berth_flows::create_instance_on(&state.inner.bus, &auth.org_id, name, spec, quota)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let Some(q) = e.downcast_ref::<QuotaExceeded>() {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "quota_exceeded",
                        format!(
                            "the org has {} live instances, its quota (limits.max_instances_per_org); delete one first",
                            q.max
                        ),
                    ));
                }
                if let Some(t) = e.downcast_ref::<NameTaken>() {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "name_taken",
                        format!("an instance named '{}' already exists in this org", t.0),
                    )
                    .field("name"));
                }
                return Err(e.into());
            }
        };
    state.inner.feed.kick();
    let flow = env.flow_id.to_string();
    let resp = if wait {
        match await_state(
            &state,
            &auth.org_id,
            &inst.id,
            InstanceStatus::Running,
            limit,
        )
        .await
        {
            Ok(i) => Json(InstanceView::new(&i, false)).into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        (
            StatusCode::ACCEPTED,
            Json(Accepted {
                id: inst.id.clone(),
                flow_id: flow.clone(),
                status: inst.status.into(),
            }),
        )
            .into_response()
    };
    Ok(flow_headers(resp, &inst.id, &flow))
}

/// A slot of the org's concurrent waits when the request waits.
fn wait_slot(state: &ApiState, org: &str, wait: bool) -> Result<Option<Slot>, ApiError> {
    wait.then(|| state.hold(org, Hold::Wait)).transpose()
}

/// The org's instances, oldest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/instances", operation_id = "list_instances", tag = "instances",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A page of the org's instances (deleted ones with `all=true`); `next` is the cursor of the next page, `null` on the last", body = InstanceList),
        (status = 400, description = "`invalid_parameter`: `limit` is not a number, or a flag is not `true` or `false`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found`, field `after`: the cursor names no instance of this org's list", body = ErrorBody),
        (status = 422, description = "`invalid_value`: `limit` is not from 1 to 1000, `status` is not a status nor `retrying`, or `name` is not an instance name", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<InstanceList>> {
    let reveal = flag("reveal", q.reveal.as_deref())?;
    let all = flag("all", q.all.as_deref())?;
    let limit = match q.limit.as_deref() {
        None => DEFAULT_PAGE,
        Some(l) => {
            let n = l.parse::<u64>().map_err(|_| {
                ApiError::bad_param(
                    "limit",
                    format!(
                        "limit must be a number from 1 to {MAX_PAGE} (got {:?})",
                        trunc(l)
                    ),
                )
            })?;
            u32::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "limit",
                        format!("limit {n} is not from 1 to {MAX_PAGE}, the most one page holds"),
                    )
                })?
        }
    };
    let mut filter = instances::ListFilter {
        deleted: all,
        name: q.name.as_deref(),
        ..Default::default()
    };
    match q.status.as_deref() {
        None => {}
        Some("retrying") => filter.retrying = true,
        Some(s) => {
            filter.status = Some(s.parse::<InstanceStatus>().map_err(|_| {
                ApiError::invalid(
                    "status",
                    format!("status {:?} is not one of {}", trunc(s), status_values()),
                )
            })?);
        }
    }
    if let Some(n) = &q.name
        && let Err(e) = berth_core::domain::InstanceName::parse(n)
    {
        return Err(ApiError::invalid("name", e.to_string()));
    }
    // One more than asked: whether it comes says if there is a next page.
    let mut page = match state
        .store()
        .instance_page(&auth.org_id, q.after.as_deref(), filter, limit + 1)
        .await
    {
        Ok(p) => p,
        Err(e) if e.downcast_ref::<instances::UnknownCursor>().is_some() => {
            // Another org's instance id answers exactly like one that
            // does not exist.
            return Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                "after names no instance of this list; pass the `next` of a previous page",
            )
            .field("after"));
        }
        Err(e) => return Err(e.into()),
    };
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    let mut views = Vec::with_capacity(page.len());
    for i in &page {
        let mut v = InstanceView::new(i, reveal);
        v.progress = state.progress(i).await?;
        views.push(v);
    }
    Ok(Json(InstanceList {
        next: more.then(|| page.last().map(|i| i.id.clone())).flatten(),
        instances: views,
    }))
}

/// One instance: status, conditions, error, IP, timestamps.
#[utoipa::path(
    get, path = "/v1/instances/{id}", operation_id = "get_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), ReadQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The instance", body = InstanceView),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ReadQuery>,
) -> ApiResult<Json<InstanceView>> {
    let reveal = flag("reveal", q.reveal.as_deref())?;
    let inst = load(&state, &auth.org_id, &id).await?;
    let mut v = InstanceView::new(&inst, reveal);
    v.progress = state.progress(&inst).await?;
    Ok(Json(v))
}

/// Answers an action: 202 with the new flow, or 200 when there was nothing
/// to do; with `wait`, the outcome.
async fn acted(
    state: &ApiState,
    org: &str,
    id: &str,
    result: Result<Option<Envelope>, FlowError>,
    q: &WaitFlag,
    target: InstanceStatus,
) -> ApiResult<Response> {
    let started = match result {
        Ok(env) => env,
        Err(FlowError::NotFound) => return Err(ApiError::not_found("instance", "id", id)),
        Err(FlowError::InvalidState { status, action }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "invalid_state",
                format!("cannot {action} an instance that is {status}"),
            )
            .field("id"));
        }
        Err(FlowError::Conflict) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "concurrent_update",
                "the instance changed while this request was applied; try again",
            )
            .field("id"));
        }
        Err(FlowError::Other(e)) => return Err(e.into()),
    };
    state.inner.feed.kick();
    let wait = flag("wait", q.wait.as_deref())?;
    let limit = timeout(q.timeout.as_deref())?;
    let inst = load(state, org, id).await?;
    let flow = inst.flow_id.to_string();
    let resp = if wait {
        match await_state(state, org, id, target, limit).await {
            Ok(i) => Json(InstanceView::new(&i, false)).into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        let code = if started.is_some() {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        (
            code,
            Json(Accepted {
                id: inst.id.clone(),
                flow_id: started.map_or(flow.clone(), |e| e.flow_id.to_string()),
                status: inst.status.into(),
            }),
        )
            .into_response()
    };
    Ok(flow_headers(resp, id, &flow))
}

/// Parses the action's query and takes the wait's slot before anything is
/// done, so a bad query or a refused wait changes nothing.
fn action_query(state: &ApiState, org: &str, q: &WaitFlag) -> Result<Option<Slot>, ApiError> {
    let wait = flag("wait", q.wait.as_deref())?;
    timeout(q.timeout.as_deref())?;
    wait_slot(state, org, wait)
}

/// Deletes an instance: its container, image, and (with its org's last
/// instance on the host) the network and host claim.
#[utoipa::path(
    delete, path = "/v1/instances/{id}", operation_id = "delete_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), WaitFlag),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The delete flow started", body = Accepted,
            headers(("berth-flow-id" = String, description = "The delete flow"))),
        (status = 200, description = "Already deleting or deleted (or, with `wait=true`, deleted)", body = Accepted),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 408, description = "With `wait=true`: `wait_timeout`", body = ErrorBody),
        (status = 429, description = "With `wait=true`: `too_many_requests`, the org has `api.max_waits_per_org` requests waiting (nothing is done)", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitFlag>,
) -> ApiResult<Response> {
    let _wait = action_query(&state, &auth.org_id, &q)?;
    check_running(&state)?;
    let r = berth_flows::delete_instance(state.store(), &auth.org_id, &id).await;
    acted(&state, &auth.org_id, &id, r, &q, InstanceStatus::Deleted).await
}

/// Stops the instance's container.
#[utoipa::path(
    post, path = "/v1/instances/{id}/stop", operation_id = "stop_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), WaitFlag),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The stop flow started", body = Accepted,
            headers(("berth-flow-id" = String, description = "The stop flow"))),
        (status = 200, description = "Already stopping or stopped (or, with `wait=true`, stopped)", body = Accepted),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 408, description = "With `wait=true`: `wait_timeout`", body = ErrorBody),
        (status = 409, description = "`invalid_state`: not running or exited", body = ErrorBody),
        (status = 429, description = "With `wait=true`: `too_many_requests`, the org has `api.max_waits_per_org` requests waiting (nothing is done)", body = ErrorBody),
    )
)]
pub async fn stop(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitFlag>,
) -> ApiResult<Response> {
    let _wait = action_query(&state, &auth.org_id, &q)?;
    check_running(&state)?;
    let r = berth_flows::stop_instance(state.store(), &auth.org_id, &id).await;
    acted(&state, &auth.org_id, &id, r, &q, InstanceStatus::Stopped).await
}

/// Starts a stopped or exited instance's container again.
#[utoipa::path(
    post, path = "/v1/instances/{id}/start", operation_id = "start_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), WaitFlag),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The start flow started", body = Accepted,
            headers(("berth-flow-id" = String, description = "The start flow"))),
        (status = 200, description = "Already starting or running (or, with `wait=true`, running)", body = Accepted),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 408, description = "With `wait=true`: `wait_timeout`", body = ErrorBody),
        (status = 409, description = "`invalid_state`, or with `wait=true` the flow's error", body = ErrorBody),
        (status = 429, description = "With `wait=true`: `too_many_requests`, the org has `api.max_waits_per_org` requests waiting (nothing is done)", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitFlag>,
) -> ApiResult<Response> {
    let _wait = action_query(&state, &auth.org_id, &q)?;
    check_running(&state)?;
    let r = berth_flows::start_instance(state.store(), &auth.org_id, &id).await;
    acted(&state, &auth.org_id, &id, r, &q, InstanceStatus::Running).await
}

/// Stops and starts the instance's container.
#[utoipa::path(
    post, path = "/v1/instances/{id}/restart", operation_id = "restart_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), WaitFlag),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "The restart flow started", body = Accepted,
            headers(("berth-flow-id" = String, description = "The restart flow"))),
        (status = 200, description = "With `wait=true`: running again", body = Accepted),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 408, description = "With `wait=true`: `wait_timeout`", body = ErrorBody),
        (status = 409, description = "`invalid_state`, or with `wait=true` the flow's error", body = ErrorBody),
        (status = 429, description = "With `wait=true`: `too_many_requests`, the org has `api.max_waits_per_org` requests waiting (nothing is done)", body = ErrorBody),
    )
)]
pub async fn restart(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitFlag>,
) -> ApiResult<Response> {
    let _wait = action_query(&state, &auth.org_id, &q)?;
    check_running(&state)?;
    let r = berth_flows::restart_instance(state.store(), &auth.org_id, &id).await;
    acted(&state, &auth.org_id, &id, r, &q, InstanceStatus::Running).await
}

/// The states `wait` accepts: those a flow ends in.
const WAITABLE: [InstanceStatus; 5] = [
    InstanceStatus::Running,
    InstanceStatus::Stopped,
    InstanceStatus::Exited,
    InstanceStatus::Failed,
    InstanceStatus::Deleted,
];

/// Waits until the instance is in a state.
#[utoipa::path(
    get, path = "/v1/instances/{id}/wait", operation_id = "wait_instance", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), WaitQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The instance, in the state waited for", body = InstanceView),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 408, description = "`wait_timeout`, with the current state in `instance`", body = ErrorBody),
        (status = 409, description = "The instance failed (the flow's error code, `step`, `attempts`, and `instance`), or `state_unreachable`", body = ErrorBody),
        (status = 422, description = "`invalid_value`: an unknown state or a timeout over 5m", body = ErrorBody),
        (status = 429, description = "`too_many_requests`: the org has `api.max_waits_per_org` requests waiting", body = ErrorBody),
    )
)]
pub async fn wait(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> ApiResult<Json<InstanceView>> {
    let target = match q.state.as_deref() {
        None => InstanceStatus::Running,
        Some(s) => s
            .parse::<InstanceStatus>()
            .ok()
            .filter(|st| WAITABLE.contains(st))
            .ok_or_else(|| {
                ApiError::invalid(
                    "state",
                    format!(
                        "state {:?} is not one a flow ends in: running, stopped, exited, failed or deleted",
                        trunc(s)
                    ),
                )
            })?,
    };
    let limit = timeout(q.timeout.as_deref())?;
    let _wait = state.hold(&auth.org_id, Hold::Wait)?;
    let inst = await_state(&state, &auth.org_id, &id, target, limit).await?;
    Ok(Json(InstanceView::new(&inst, false)))
}

/// Waits until instance `id` is `target`. A failure answers at once with the
/// instance's error; a state the instance cannot leave by itself answers
/// `state_unreachable`; the deadline answers 408 with the current state.
async fn await_state(
    state: &ApiState,
    org: &str,
    id: &str,
    target: InstanceStatus,
    limit: Duration,
) -> Result<Instance, ApiError> {
    let deadline = tokio::time::Instant::now() + limit;
    // Subscribed before the first read, so no change slips in between.
    let mut feed = state.inner.feed.subscribe();
    loop {
        let inst = load(state, org, id).await?;
        if inst.status == target {
            return Ok(inst);
        }
        if inst.status == InstanceStatus::Failed {
            return Err(failure(&inst));
        }
        let restarts_itself =
            inst.status == InstanceStatus::Exited && inst.spec.restart != RestartPolicy::No;
        if inst.status.is_terminal() && !restarts_itself {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "state_unreachable",
                format!(
                    "instance '{}' is {}; it will not become {target} without another action",
                    inst.name, inst.status
                ),
            )
            .with("instance", &InstanceView::new(&inst, false)));
        }
        tokio::select! {
            r = feed.changed() => {
                if r.is_err() {
                    return Err(ApiError::shutting_down());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let inst = load(state, org, id).await?;
                if inst.status == target {
                    return Ok(inst);
                }
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "wait_timeout",
                    format!(
                        "instance '{}' is {} after {}; still waiting for {target}",
                        inst.name,
                        inst.status,
                        humantime::format_duration(limit)
                    ),
                )
                .with("instance", &InstanceView::new(&inst, false)));
            }
            _ = state.inner.cancel.cancelled() => return Err(ApiError::shutting_down()),
        }
    }
}

/// A failed instance as an error answer: the flow's code, message, step and
/// attempts, with the instance.
fn failure(inst: &Instance) -> ApiError {
    let e = match &inst.error {
        Some(err) => {
            let mut e = ApiError::new(StatusCode::CONFLICT, &err.code, err.message.clone());
            e.detail.step = Some(err.step.clone());
            e.detail.attempts = Some(err.attempts);
            e.detail.cause = err.cause.clone();
            e
        }
        None => ApiError::new(
            StatusCode::CONFLICT,
            "instance_failed",
            format!("instance '{}' failed", inst.name),
        ),
    };
    e.with("instance", &InstanceView::new(inst, false))
}

/// The container's output.
#[utoipa::path(
    get, path = "/v1/instances/{id}/logs", operation_id = "instance_logs", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), LogsQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Lines of output, `text/plain`; with `follow=true` the response stays open", content_type = "text/plain", body = String),
        (status = 400, description = "`invalid_parameter`", body = ErrorBody),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (another org's ids too)", body = ErrorBody),
        (status = 409, description = "`no_container`: the instance has no container (yet); or the engine's refusal (`not_found`, …)", body = ErrorBody),
        (status = 422, description = "`invalid_value`: `tail` is over 10000", body = ErrorBody),
        (status = 429, description = "With `follow=true`: `too_many_requests`, the org has `api.max_streams_per_org` streams open", body = ErrorBody),
        (status = 503, description = "`engine_unavailable`, `engine_timeout`", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> ApiResult<Response> {
    let follow = flag("follow", q.follow.as_deref())?;
    let tail = match q.tail.as_deref() {
        None => DEFAULT_TAIL,
        Some(t) => {
            let n = t.parse::<u64>().map_err(|_| {
                ApiError::bad_param(
                    "tail",
                    format!(
                        "tail must be a number from 0 to {MAX_TAIL} (got {:?})",
                        trunc(t)
                    ),
                )
            })?;
            usize::try_from(n)
                .ok()
                .filter(|n| *n <= MAX_TAIL)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tail",
                        format!("tail {n} is over {MAX_TAIL}, the most lines one answer holds"),
                    )
                })?
        }
    };
    let inst = load(&state, &auth.org_id, &id).await?;
    let (Some(host), Some(container)) = (inst.host.clone(), inst.container.clone()) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_container",
            format!(
                "instance '{}' has no container ({})",
                inst.name, inst.status
            ),
        )
        .field("id"));
    };
    // A follower holds its stream until it leaves: it counts with the
    // org's event streams.
    let slot = if follow {
        Some(state.hold(&auth.org_id, Hold::Stream)?)
    } else {
        None
    };
    let mut stream = state
        .inner
        .runtime
        .logs(&HostId::new(host), &container, tail, follow);
    let text = |mut line: String| {
        if !line.ends_with('\n') {
            line.push('\n');
        }
        Bytes::from(line)
    };
    let plain = HeaderValue::from_static("text/plain; charset=utf-8");
    // Streamed, never gathered whole. The first line (or the end) is
    // awaited first so that an engine that refuses at once is answered as
    // an error; a failure after output has started can only cut the body
    // short (the client sees a truncated response). A follower's first
    // line may be far off: it gets its 200 at once.
    let first = if follow { None } else { stream.next().await };
    if let Some(Err(e)) = first {
        // An engine that is down or slow may answer later.
        let status = if e.is_retryable() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::CONFLICT
        };
        return Err(ApiError::new(
            status,
            e.code(),
            format!("cannot read the logs of instance '{}': {e}", inst.name),
        ));
    }
    let cancel = state.inner.cancel.clone();
    let name = inst.name.to_string();
    let body = futures::stream::iter(first)
        .chain(stream)
        // Ends at shutdown too, so a follower cannot hold the server open.
        .take_until(async move { cancel.cancelled_owned().await })
        .map(move |r| {
            // The follower's slot lives as long as its body.
            let _held = &slot;
            r.map(text).map_err(|e| {
                tracing::debug!(instance = %name, error = %e, "logs cut short by the engine");
                std::io::Error::other(e)
            })
        });
    Ok(([(header::CONTENT_TYPE, plain)], Body::from_stream(body)).into_response())
}

/// Parses a flow id; a malformed one names no flow.
pub(crate) fn parse_flow(id: &str) -> Result<FlowId, ApiError> {
    id.parse::<FlowId>()
        .map_err(|_| ApiError::not_found("flow", "flow_id", id))
}
