//! What the dashboard needs of the server, without a browser: the page and
//! its hashed assets with their caching headers and CSP, the API's 404s
//! left as they were, and the event stream's token carried as a WebSocket
//! subprotocol (so a browser keeps it out of the URL).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod api_support;

use api_support::{next_message, spawn};
use reqwest::Method;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn the_page_and_its_assets_are_cached_by_hash_under_a_strict_policy() {
    let t = spawn().await;
    let page = t.http.get(t.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert_eq!(h["cache-control"], "no-cache");
    assert_eq!(h["content-security-policy"], berth_api::dashboard::CSP);
    assert_eq!(h["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    for name in ["app.js", "app.css", "favicon.svg"] {
        let path = berth_api::dashboard::asset_path(name).unwrap();
        assert!(html.contains(&path), "{path} not in the page");
        let a = t.http.get(t.url(&path)).send().await.unwrap();
        assert_eq!(a.status(), 200, "{path}");
        assert_eq!(
            a.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert_eq!(
            a.headers()["content-security-policy"],
            berth_api::dashboard::CSP
        );
    }
    // No inline script or style: the policy would block it.
    assert!(!html.contains("<script>") && !html.contains("style="));
    // A stale or unknown asset, and unknown API routes, answer as before.
    let a = t
        .call(Method::GET, "/ui/app.0123456789ab.js", None, None)
        .await;
    a.error(404, "route_not_found");
    let a = t.call(Method::GET, "/v1/nothing-here", None, None).await;
    a.error(404, "route_not_found");
    let a = t.call(Method::GET, "/nothing-here", None, None).await;
    a.error(404, "route_not_found");
    t.shutdown().await;
}

#[tokio::test]
async fn the_stream_takes_its_token_as_a_subprotocol() {
    let t = spawn().await;
    let (_, tok) = t.org("acme").await;
    let inst = t.running(&tok, "web").await;
    let id = inst["id"].as_str().unwrap();

    let mut req = format!("{}/v1/events", t.ws_base)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("berth.v1, berth.token.{tok}").parse().unwrap(),
    );
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    // The server selects the protocol, and never echoes the token.
    assert_eq!(resp.headers()["sec-websocket-protocol"], "berth.v1");
    t.call(
        Method::POST,
        &format!("/v1/instances/{id}/stop"),
        Some(&tok),
        None,
    )
    .await
    .ok(202);
    let m = next_message(&mut ws).await;
    assert_eq!(m["instance_id"], id, "{m}");
    assert_eq!(m["status"], "stopping", "{m}");

    // A wrong token there is refused like anywhere else.
    let mut req = format!("{}/v1/events", t.ws_base)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        "berth.v1, berth.token.berth_nope".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401);
        }
        other => panic!("expected 401, got {other:?}"),
    }
    t.shutdown().await;
}
