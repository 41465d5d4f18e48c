//! Bearer tokens. An org token (`berth_` + 64 hex digits, 256 random bits)
//! scopes every request to its org; the admin token only creates orgs.
//! Tokens are stored as SHA-256 hashes: with 256 random bits a fast hash is
//! as safe as a slow one, and it makes the lookup a single indexed read.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::ApiState;
use crate::error::ApiError;

/// Prefix of org tokens, so a leaked one is recognisable in a scan.
pub const TOKEN_PREFIX: &str = "berth_";

/// A fresh random token.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let mut s = String::with_capacity(TOKEN_PREFIX.len() + 64);
    s.push_str(TOKEN_PREFIX);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Hex SHA-256 of a token: what the store keeps and compares.
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bearer token of a request: `Authorization: Bearer <token>`, or, for
/// the event stream only (browsers cannot set headers on a WebSocket), a
/// `berth.token.<token>` subprotocol or `?access_token=<token>`.
fn bearer(parts: &Parts) -> Result<String, ApiError> {
    let raw = match parts.headers.get(header::AUTHORIZATION) {
        Some(v) => v
            .to_str()
            .map_err(|_| malformed("the Authorization header is not ASCII"))?
            .to_owned(),
        None => {
            let from_query = (parts.uri.path() == "/v1/events")
                .then(|| {
                    protocol_token(parts).or_else(|| query_token(parts.uri.query().unwrap_or("")))
                })
                .flatten();
            match from_query {
                Some(t) => format!("Bearer {t}"),
                None => {
                    return Err(ApiError::unauthorized(
                        "missing_token",
                        "this endpoint needs a token: Authorization: Bearer <token>",
                    ));
                }
            }
        }
    };
    let Some((scheme, token)) = raw.trim().split_once(' ') else {
        return Err(malformed(
            "the Authorization header must be 'Bearer <token>'",
        ));
    };
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(malformed(
            "the Authorization header must use the Bearer scheme",
        ));
    }
    if token.is_empty() || token.len() > 512 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed("a token is 1 to 512 visible ASCII characters"));
    }
    Ok(token.to_owned())
}

/// The subprotocol that carries a token: a browser offers
/// `new WebSocket(url, ["berth.v1", "berth.token.<token>"])`, which keeps the
/// token out of the URL (and so out of proxies' and servers' access logs);
/// the server selects `berth.v1`, never echoing the token.
pub const WS_TOKEN_PROTOCOL: &str = "berth.token.";

/// The subprotocol the event stream selects.
pub const WS_PROTOCOL: &str = "berth.v1";

fn protocol_token(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_TOKEN_PROTOCOL))
        .map(str::to_owned)
}

fn query_token(q: &str) -> Option<String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "access_token")
        .map(|(_, v)| v.to_owned())
}

fn malformed(message: &str) -> ApiError {
    ApiError::unauthorized("malformed_token", message)
}

/// A request made with an org's token.
#[derive(Debug, Clone)]
pub struct OrgAuth {
    pub org_id: String,
    pub token_id: String,
}

impl FromRequestParts<ApiState> for OrgAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        let h = hash(&token);
        // Comparing digests, not tokens: equal-prefix timing tells an
        // attacker nothing about the token itself.
        if h == state.inner.admin_hash {
            return Err(ApiError::unauthorized(
                "org_token_required",
                "this is the admin token, which only creates orgs; use an org token",
            ));
        }
        match state.store().token_by_hash(&h).await? {
            Some((org_id, token_id)) => Ok(OrgAuth { org_id, token_id }),
            None => Err(ApiError::unauthorized(
                "invalid_token",
                "the token is unknown or revoked",
            )),
        }
    }
}

/// A request made with the admin token.
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth;

impl FromRequestParts<ApiState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        if hash(&token) == state.inner.admin_hash {
            Ok(AdminAuth)
        } else {
            Err(ApiError::unauthorized(
                "admin_token_required",
                "this endpoint needs the admin token",
            ))
        }
    }
}
