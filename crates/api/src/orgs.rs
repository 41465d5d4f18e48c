//! Orgs (created with the admin token) and their tokens.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use berth_store::tenancy::{self, Org, OrgNameTaken};
use serde::Deserialize;
use utoipa::ToSchema;

use crate::ApiState;
use crate::auth::{self, AdminAuth, OrgAuth};
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::extract::{ApiPath, JsonBody};
use crate::views::{OrgCreated, TokenCreated, TokenList, TokenView};

/// `POST /v1/orgs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrg {
    /// `^[a-z0-9][a-z0-9-]{0,62}$`, unique.
    #[schema(pattern = r"^[a-z0-9][a-z0-9-]{0,62}$")]
    pub name: String,
}

/// An org or token id: unpredictable, so that one id tells nothing about
/// another org's.
fn new_id(state: &ApiState) -> String {
    state
        .store()
        .ids()
        .unpredictable()
        .to_string()
        .to_ascii_lowercase()
}

/// Creates an org and its first token.
#[utoipa::path(
    post, path = "/v1/orgs", operation_id = "create_org", tag = "orgs",
    request_body = CreateOrg,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The org and its first token (shown this once)", body = OrgCreated),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "No admin token", body = ErrorBody),
        (status = 408, description = "`body_timeout`: the body took over 30 s", body = ErrorBody),
        (status = 409, description = "`name_taken`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`: the body is over 1 MiB", body = ErrorBody),
        (status = 422, description = "`invalid_value`", body = ErrorBody),
    )
)]
pub async fn create_org(
    State(state): State<ApiState>,
    _admin: AdminAuth,
    JsonBody(body): JsonBody<CreateOrg>,
) -> ApiResult<(StatusCode, Json<OrgCreated>)> {
    // Org ids name engine resources, but org names follow the same DNS-label
    // rule as instance names so that they can be shown anywhere.
    berth_core::domain::InstanceName::parse(&body.name)
        .map_err(|e| ApiError::invalid("name", format!("name {:?} {}", e.value, e.rule)))?;
    let org = Org {
        id: new_id(&state),
        name: body.name,
        created_at: state.store().now(),
    };
    let token = auth::new_token();
    let mut tx = state.store().begin().await?;
    match tx
        .create_org(&org, &new_id(&state), &auth::hash(&token))
        .await
    {
        Ok(()) => {}
        Err(e) if e.downcast_ref::<OrgNameTaken>().is_some() => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "name_taken",
                format!("an org named '{}' already exists", org.name),
            )
            .field("name"));
        }
        Err(e) => return Err(e.into()),
    }
    tx.commit().await?;
    Ok((
        StatusCode::CREATED,
        Json(OrgCreated {
            id: org.id,
            name: org.name,
            token,
        }),
    ))
}

/// Mints another token for the caller's org.
#[utoipa::path(
    post, path = "/v1/tokens", operation_id = "create_token", tag = "orgs",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The new token (shown this once)", body = TokenCreated),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
    )
)]
pub async fn create_token(
    State(state): State<ApiState>,
    auth: OrgAuth,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    let token = auth::new_token();
    let id = new_id(&state);
    state
        .store()
        .insert_token(&id, &auth.org_id, &auth::hash(&token), state.store().now())
        .await?;
    Ok((StatusCode::CREATED, Json(TokenCreated { id, token })))
}

/// The org's tokens (without their secrets).
#[utoipa::path(
    get, path = "/v1/tokens", operation_id = "list_tokens", tag = "orgs",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every token of the org, revoked ones too", body = TokenList),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
    )
)]
pub async fn list_tokens(
    State(state): State<ApiState>,
    auth: OrgAuth,
) -> ApiResult<Json<TokenList>> {
    let tokens = state.store().tokens(&auth.org_id).await?;
    Ok(Json(TokenList {
        tokens: tokens.iter().map(token_view).collect(),
    }))
}

fn token_view(t: &tenancy::TokenInfo) -> TokenView {
    TokenView {
        id: t.id.clone(),
        created_at: t.created_at.to_string(),
        revoked_at: t.revoked_at.map(|r| r.to_string()),
    }
}

/// Revokes a token of the org (the one making the request included).
#[utoipa::path(
    delete, path = "/v1/tokens/{id}", operation_id = "revoke_token", tag = "orgs",
    params(("id" = String, Path, description = "Token id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The token, now revoked", body = TokenView),
        (status = 401, description = "Missing, malformed, unknown or revoked token", body = ErrorBody),
        (status = 404, description = "No such token in this org", body = ErrorBody),
    )
)]
pub async fn revoke_token(
    State(state): State<ApiState>,
    auth: OrgAuth,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<TokenView>> {
    let now = state.store().now();
    match state.store().revoke_token(&auth.org_id, &id, now).await? {
        Some(t) => Ok(Json(token_view(&t))),
        None => Err(ApiError::not_found("token", "id", &id)),
    }
}
