//! Extractors that answer bad input in the API's error shape, naming the
//! field: a JSON body (content type, 1 MiB limit, 30 s to arrive, syntax,
//! types, missing and unknown fields), query strings and path parameters.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Longest a body may take to arrive once its request head has: a client
/// sending a body a byte at a time must not hold its connection (which is
/// busy, so never closed to make room) for ever.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A JSON request body, read as `T`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // A missing content type is accepted (curl users forget it); a
        // different one is refused rather than guessed at.
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if essence != "application/json" && !essence.ends_with("+json") {
                return Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!(
                        "the body must be JSON (Content-Type: application/json), not '{essence}'"
                    ),
                )
                .field("content-type"));
            }
        }
        let read = tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, state));
        let Ok(read) = read.await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!(
                    "the body did not arrive within {}s of the request head",
                    BODY_READ_TIMEOUT.as_secs()
                ),
            )
            .field("body"));
        };
        let bytes = read.map_err(|e| match e {
            BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the body is over the limit of {BODY_LIMIT} bytes (1 MiB)"),
                )
                .field("body")
            }
            other => ApiError::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                format!("the body could not be read: {}", other.body_text()),
            )
            .field("body"),
        })?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses a JSON document as `T`, mapping each kind of serde error to a
/// stable code and the path of the field at fault. Messages about `env`
/// never quote the value: env values are secrets.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body is empty; expected a JSON object",
        )
        .field("body"));
    }
    // Every body is an object; serde would also read a struct from an
    // array, which would name fields `[0]`.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{')
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_type",
            "the body must be a JSON object",
        )
        .field("body"));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => return Err(serde_error(e)),
    };
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
        .field("body")
    })?;
    Ok(value)
}

fn serde_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let msg = inner.to_string();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                format!("the body is not valid JSON: {msg}"),
            )
            .field("body");
        }
        serde_json::error::Category::Io => {
            return ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", msg).field("body");
        }
        serde_json::error::Category::Data => {}
    }
    let join = |name: &str| {
        if path == "." || path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    if let Some(name) = quoted(&msg, "missing field `") {
        let field = join(&name);
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_field",
            format!("{field} is required"),
        )
        .field(field);
    }
    if let Some(name) = quoted(&msg, "unknown field `") {
        // The path may already end at the unknown key.
        let field = if path.ends_with(&name) {
            path.clone()
        } else {
            join(&name)
        };
        let expected = msg
            .split_once(", expected ")
            .map(|(_, rest)| format!("; expected {}", strip_position(rest)))
            .unwrap_or_default();
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "unknown_field",
            format!("unknown field '{field}'{expected}"),
        )
        .field(field);
    }
    let field = if path == "." || path.is_empty() {
        "body".to_owned()
    } else {
        path
    };
    let secret = field == "env" || field.starts_with("env.") || field.starts_with("env[");
    if msg.starts_with("invalid type") {
        let message = if secret {
            format!("{field}: wrong type; env must be an object of string values")
        } else {
            format!("{field}: {}", strip_position(&msg))
        };
        return ApiError::new(StatusCode::BAD_REQUEST, "invalid_type", message).field(field);
    }
    let message = if secret {
        format!("{field}: invalid value")
    } else {
        format!("{field}: {}", strip_position(&msg))
    };
    ApiError::invalid(field, message)
}

/// The text between `prefix` and the next backtick.
fn quoted(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.split_once(prefix)?.1;
    Some(rest.split_once('`')?.0.to_owned())
}

/// serde_json appends " at line L column C"; the field path says more.
fn strip_position(msg: &str) -> &str {
    msg.rsplit_once(" at line ").map_or(msg, |(m, _)| m)
}

/// A query string of string-valued parameters; unknown ones are refused
/// (a typo such as `?wiat=true` must not be silently ignored).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e| {
                let text = e.body_text();
                let msg = text
                    .strip_prefix("Failed to deserialize query string: ")
                    .unwrap_or(&text);
                let field = quoted(msg, "unknown field `")
                    .or_else(|| quoted(msg, "missing field `"))
                    .unwrap_or_else(|| "query".to_owned());
                ApiError::bad_param(field, format!("bad query string: {msg}"))
            })
    }
}

/// A path parameter. Any string is accepted here; an id that names nothing
/// of the org is answered 404 by the handler.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| ApiPath(v))
            .map_err(|e| ApiError::bad_param("path", e.body_text()))
    }
}
