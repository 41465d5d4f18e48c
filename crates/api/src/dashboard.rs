//! The web dashboard: a page at `/` and its assets under `/ui/`, plain
//! HTML, CSS and JavaScript embedded in the binary (no build step, nothing
//! fetched from a CDN: the machines Berth runs on may reach neither). The
//! page is a client of the JSON API like any other: it holds an org token
//! in the tab's session storage and sends it as a bearer header.
//!
//! Caching: each asset is served under a name carrying a hash of its bytes
//! (`/ui/app.<hash>.js`), so it can be cached for a year as `immutable`;
//! `index.html`, which names them, is `no-cache`, so a new binary's page
//! (and with it its assets) is picked up at the next load.
//!
//! Every answer carries a strict Content-Security-Policy: scripts, styles
//! and connections from this origin only, no inline script or style, no
//! frames, no plugins. With the page building its DOM from text nodes only
//! (never `innerHTML` with API data), an instance name, env value or error
//! message cannot become markup, and if one ever did it could not run.

use std::sync::OnceLock;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// The policy of every dashboard answer. `connect-src 'self'` covers the
/// event stream's `ws:`/`wss:` on this host (CSP level 3).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                       form-action 'self'; frame-ancestors 'none'";

const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The page's template: `{{app.js}}` and `{{app.css}}` stand for the
/// assets' hashed names.
const INDEX: &str = include_str!("../assets/index.html");

/// The assets: the name the template knows, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../assets/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../assets/app.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_bytes!("../assets/favicon.svg"),
    ),
];

/// The assets under their hashed names, and the page naming them; built
/// once, at the first request.
struct Built {
    index: String,
    /// Name, hashed name (`app.1a2b3c4d5e6f.js`), content type, bytes.
    assets: Vec<(&'static str, String, &'static str, &'static [u8])>,
}

fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut index = INDEX.to_owned();
        let mut assets = Vec::new();
        for (name, content_type, bytes) in ASSETS {
            let digest = Sha256::digest(bytes);
            let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
            let hashed = match name.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}.{hex}.{ext}"),
                None => format!("{name}.{hex}"),
            };
            index = index.replace(&format!("{{{{{name}}}}}"), &format!("/ui/{hashed}"));
            assets.push((*name, hashed, *content_type, *bytes));
        }
        Built { index, assets }
    })
}

/// The hashed URL path of an asset (`/ui/app.<hash>.js`), for tests.
pub fn asset_path(name: &str) -> Option<String> {
    built()
        .assets
        .iter()
        .find(|(n, ..)| *n == name)
        .map(|(_, hashed, ..)| format!("/ui/{hashed}"))
}

/// The dashboard's routes, to be merged into the API's router (they take
/// no state and are not part of the OpenAPI document: they are no API).
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/ui/{file}", get(asset))
}

/// Headers every dashboard answer carries.
fn hardened(mut resp: Response, cache: &'static str) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    resp
}

async fn index() -> Response {
    let resp = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        built().index.clone(),
    )
        .into_response();
    // `no-cache`: kept, but revalidated on every load, so the page always
    // names the assets of the binary that serves it.
    hardened(resp, "no-cache")
}

async fn asset(Path(file): Path<String>) -> Response {
    match built()
        .assets
        .iter()
        .find(|(_, hashed, ..)| *hashed == file)
    {
        Some((_, _, content_type, bytes)) => {
            let resp = (
                [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
                *bytes,
            )
                .into_response();
            hardened(resp, IMMUTABLE)
        }
        // An old hash (a page from an earlier binary) or no asset at all:
        // the same answer as any unknown route.
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "route_not_found",
            format!("no route GET /ui/{} (see /v1/openapi.json)", trunc(&file)),
        )
        .into_response(),
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_every_asset_by_its_hash() {
        let b = built();
        assert!(!b.index.contains("{{"), "{}", b.index);
        for (_, hashed, ..) in &b.assets {
            assert!(b.index.contains(&format!("/ui/{hashed}")), "{hashed}");
        }
        let js = asset_path("app.js").unwrap_or_default();
        assert!(js.starts_with("/ui/app.") && js.ends_with(".js"), "{js}");
    }
}
