//! Health, metrics, the OpenAPI document, the answers for unknown routes and
//! methods, and the request log.

use std::time::Instant;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::ApiState;
use crate::error::{ApiError, ApiResult};
use crate::views::Health;

/// Liveness: the server answers and the database reads.
#[utoipa::path(
    get, path = "/healthz", tag = "system",
    responses(
        (status = 200, description = "Up: `{\"status\": \"ok\"}`", body = Health),
        (status = 503, description = "`store_unavailable` with `\"status\": \"degraded\"`: the server runs but cannot reach the database (requests needing it answer 503 too, until it is back); `unhealthy`: the database answers with an error", body = crate::ErrorBody),
    )
)]
pub async fn healthz(State(state): State<ApiState>) -> ApiResult<Json<Health>> {
    match state.store().last_seq().await {
        Ok(_) => Ok(Json(Health {
            status: "ok".into(),
        })),
        Err(e) if berth_store::is_unavailable(&e) => {
            tracing::warn!(error = %format!("{e:#}"), "health check: the database is unavailable");
            Err(ApiError::store_unavailable().with("status", &"degraded"))
        }
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "health check failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unhealthy",
                "the database cannot be read",
            ))
        }
    }
}

/// Prometheus metrics (text format 0.0.4). Aggregates only: no org's data.
#[utoipa::path(
    get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn metrics(State(state): State<ApiState>) -> ApiResult<Response> {
    let mut text = state
        .inner
        .metrics
        .render(state.store(), state.inner.bus.stats())
        .await?;
    crate::metrics::render_connections(&mut text, &state.inner.conns);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get, path = "/v1/openapi.json", tag = "system",
    responses((status = 200, description = "OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub async fn openapi_json(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.inner.openapi_json.clone(),
    )
        .into_response()
}

pub async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!(
            "no route {} {} (see /v1/openapi.json)",
            req.method(),
            req.uri().path()
        ),
    )
}

pub async fn bad_method(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// One log line per request: method, path (never the query, which may
/// carry a token), status and duration. Bodies are never logged: they may
/// hold env values.
pub async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let t0 = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if resp.status().is_server_error() {
        tracing::warn!(%method, %path, status, ms, "request");
    } else {
        tracing::debug!(%method, %path, status, ms, "request");
    }
    resp
}
