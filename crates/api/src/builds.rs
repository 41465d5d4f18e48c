//! Build contexts: `POST /v1/builds` takes a tar archive (a `Dockerfile` at
//! its root and the files it copies), checks it, and keeps it under a digest
//! of its bytes; `POST /v1/instances {"build": id}` then builds from it.
//! Checked at upload, so that a bad context fails here rather than in a
//! flow: the archive must be a tar with a root Dockerfile, every `FROM` must
//! name an image by reference (no variables, no ids), and `COPY --from` may
//! only name earlier stages. Whether the bases are on the host, and the
//! org's to use, is checked by the image step when an instance is built.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use berth_store::builds::{Inserted, NewBuild};
use sha2::{Digest, Sha256};

use crate::ApiState;
use crate::auth::OrgAuth;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::ApiPath;
use crate::views::{BuildList, BuildView};

/// The media type of a build context.
pub const TAR: &str = "application/x-tar";

/// Longest an upload may take once its head has arrived: longer than a JSON
/// body's (a context is up to tens of MiB), but bounded, since a connection
/// busy with a body is never closed to make room for others.
pub const UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Uploads a build context.
#[utoipa::path(
    post, path = "/v1/builds", operation_id = "create_build", tag = "builds",
    request_body(content = Vec<u8>, content_type = "application/x-tar",
        description = "A tar archive with a `Dockerfile` at its root (at most `limits.max_build_context`, 64MiB by default)"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored; `id` goes into `POST /v1/instances {\"build\": id}`", body = BuildView),
        (status = 200, description = "The org had uploaded these bytes before: that build", body = BuildView),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 408, description = "`body_timeout`: the upload took over 120 s", body = ErrorBody),
        (status = 409, description = "`quota_exceeded`: the org has `limits.max_builds_per_org` builds", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: over `limits.max_build_context`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/x-tar`", body = ErrorBody),
        (status = 422, description = "`invalid_build`: not a tar, no root Dockerfile, or a rule of its `FROM`s broken (the line is named)", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<ApiState>,
    auth: OrgAuth,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<BuildView>)> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim);
    if media != Some(TAR) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("a build context is sent as Content-Type: {TAR}"),
        )
        .field("content-type"));
    }
    let max = state.inner.quotas.max_build_context;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the build context is over the limit of {} (limits.max_build_context)",
                berth_core::size::ByteSize(max as u64)
            ),
        )
        .field("body")
    };
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > max)
    {
        return Err(too_large());
    }
    // Read up to the limit and no further: a client cannot make the server
    // hold more than `max` bytes for it.
    let Ok(read) = tokio::time::timeout(UPLOAD_TIMEOUT, axum::body::to_bytes(body, max)).await
    else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the build context did not arrive within {}s of the request head",
                UPLOAD_TIMEOUT.as_secs()
            ),
        )
        .field("body"));
    };
    let bytes = read.map_err(|_| too_large())?;
    let invalid = |e: berth_runtime::context::ContextError| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_build",
            e.to_string(),
        )
        .field("body")
    };
    let dockerfile = berth_runtime::context::dockerfile_of(&bytes).map_err(invalid)?;
    let bases = berth_runtime::context::base_images(&dockerfile).map_err(invalid)?;
    for b in &bases {
        if let Err(rule) = crate::validate::check_image(b) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_build",
                format!("Dockerfile: FROM {b:?} is not a valid image reference: {rule}"),
            )
            .field("body"));
        }
    }
    let digest = format!("sha256:{:x}", Sha256::digest(&bytes));
    // Random, not from the seeded generator: ids handed out must not be
    // guessable from one another.
    let id = format!("b{:032x}", rand::random::<u128>());
    let mut tx = state.store().begin().await?;
    let done = tx
        .insert_build(NewBuild {
            id: &id,
            org: &auth.org_id,
            digest: &digest,
            bases: &bases,
            context: &bytes,
            max: i64::from(state.inner.quotas.max_builds_per_org),
            at: state.store().now(),
        })
        .await?;
    tx.commit().await?;
    match done {
        Inserted::New(b) => Ok((StatusCode::CREATED, Json(BuildView::new(&b)))),
        Inserted::Existing(b) => Ok((StatusCode::OK, Json(BuildView::new(&b)))),
        Inserted::Quota { max } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "quota_exceeded",
            format!("the org has {max} builds, its quota (limits.max_builds_per_org)"),
        )),
    }
}

/// The org's build contexts, newest first.
#[utoipa::path(
    get, path = "/v1/builds", operation_id = "list_builds", tag = "builds",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The org's builds", body = BuildList),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
    )
)]
pub async fn list(State(state): State<ApiState>, auth: OrgAuth) -> ApiResult<Json<BuildList>> {
    let all = state.store().builds(&auth.org_id).await?;
    Ok(Json(BuildList {
        builds: all.iter().map(BuildView::new).collect(),
    }))
}

/// One build context.
#[utoipa::path(
    get, path = "/v1/builds/{id}", operation_id = "get_build", tag = "builds",
    params(("id" = String, Path, description = "Build id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The build", body = BuildView),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "`not_found` (also for another org's build)", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<BuildView>> {
    match state.store().build(&auth.org_id, &id).await? {
        Some(b) => Ok(Json(BuildView::new(&b))),
        None => Err(ApiError::not_found("build", "id", &id)),
    }
}
