//! The one error shape of the API, `{"error": {"code", "message", "field"?}}`,
//! and its stable codes. Clients branch on `code` (documented in the README);
//! `message` is for people and may change; `field` names the input at fault.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
    /// For `wait` (and `?wait=true`) answers other than 200: the instance as
    /// it is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<crate::views::InstanceView>,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_value`, `not_found`, `image_not_found`, …
    pub code: String,
    /// For people: what was wrong and, for bad input, the rule broken.
    pub message: String,
    /// The input at fault: a body path (`env.PATH`, `ports[1]`), a query or
    /// path parameter, `body` or `authorization`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// For a failed instance: the step that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// For a failed instance: attempts the failed step made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// For a failed instance: the underlying cause, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

/// An error answer: status, detail, and optionally more top-level members
/// (the instance's current state for `wait`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    // Boxed: errors travel through every handler's `Result`, which should
    // stay small on the success path.
    pub detail: Box<ErrorDetail>,
    pub extra: Option<Box<(&'static str, Box<serde_json::value::RawValue>)>>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: Box::new(ErrorDetail {
                code: code.to_owned(),
                message: message.into(),
                field: None,
                step: None,
                attempts: None,
                cause: None,
            }),
            extra: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.detail.field = Some(field.into());
        self
    }

    /// Adds a top-level member next to `error` (kept in field order).
    pub fn with(mut self, key: &'static str, value: &impl Serialize) -> Self {
        if let Ok(raw) = serde_json::value::to_raw_value(value) {
            self.extra = Some(Box::new((key, raw)));
        }
        self
    }

    /// A value that breaks a rule: 422 `invalid_value`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_value", message).field(field)
    }

    /// A malformed query or path parameter: 400 `invalid_parameter`.
    pub fn bad_param(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", message).field(field)
    }

    /// An id this org has nothing under (another org's ids included: the
    /// answer must not tell them apart).
    pub fn not_found(what: &str, field: &str, id: &str) -> Self {
        let shown: String = id.chars().take(80).collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} with id '{shown}'"),
        )
        .field(field)
    }

    pub fn unauthorized(code: &str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message).field("authorization")
    }

    /// A failure of ours. The cause goes to the log (never to the client,
    /// which gets no internals); nothing secret reaches either, since no
    /// error chain built here carries request bodies.
    pub fn internal(e: anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "request failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the server log has the details",
        )
    }

    pub fn shutting_down() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down; try again",
        )
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        if berth_store::is_unavailable(&e) {
            tracing::warn!(error = %format!("{e:#}"), "the database is unavailable");
            return ApiError::store_unavailable();
        }
        ApiError::internal(e)
    }
}

impl ApiError {
    /// 503 `store_unavailable`: the database cannot be reached now; nothing
    /// was done, and the request may be sent again.
    pub(crate) fn store_unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the database cannot be reached right now; nothing was done, retry shortly",
        )
    }
}

/// The answer's body: `error` first, then the extra member, in that order.
struct Wire<'a>(&'a ApiError);

impl Serialize for Wire<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("error", &*self.0.detail)?;
        if let Some(extra) = &self.0.extra {
            m.serialize_entry(extra.0, &extra.1)?;
        }
        m.end()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(Wire(&self))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.detail.code == "store_unavailable" {
            // A slot is given back when a stream or wait ends, which the
            // server cannot foresee: one second is a polite first retry.
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
