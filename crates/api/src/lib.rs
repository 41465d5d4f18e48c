//! Berth's HTTP API (axum): instances and their actions, flow traces, dead
//! letters, the org's event stream over a WebSocket, orgs and tokens, the
//! OpenAPI document (generated from the handlers' annotations, so no route
//! can be missing from it), health and Prometheus metrics.
//!
//! Every request but `/healthz`, `/metrics` and `/v1/openapi.json` carries a
//! bearer token; an org token scopes everything to its org, and another
//! org's ids answer 404 exactly like ids that do not exist.
//!
//! The server bounds what a client can hold (`serve`: header-read timeout,
//! a connection cap below the descriptor limit; `limits`: streams and waits
//! per org, URI and header sizes; bodies and WebSocket messages are capped
//! where they are read).

pub mod auth;
mod builds;
pub mod dashboard;
pub mod error;
mod events;
mod extract;
mod feed;
mod instances;
mod limits;
mod metrics;
mod orgs;
mod serve;
mod system;
mod trace;
pub mod validate;
pub mod views;

pub use serve::{FD_RESERVE, MIN_CONNECTIONS, ServerOptions, connection_cap, fd_limit};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::DefaultBodyLimit;
use berth_runtime::ContainerRuntime;
use berth_store::Store;
use berth_worker::Bus;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::ApiError;

pub use error::{ApiError as Error, ErrorBody, ErrorDetail};
pub use validate::Quotas;

/// The response header carrying the id of the flow a request started.
pub const FLOW_HEADER: &str = "berth-flow-id";

/// What the API works with.
pub struct ApiDeps {
    pub store: Store,
    pub bus: Bus,
    /// For container logs.
    pub runtime: Arc<dyn ContainerRuntime>,
    /// Container limits and org quotas (`[limits]`).
    pub quotas: validate::Quotas,
    /// Each worker's most attempts (its retry policy's), for the progress
    /// of flows.
    pub max_attempts: std::collections::HashMap<String, u32>,
}

impl std::fmt::Debug for ApiDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiDeps").finish_non_exhaustive()
    }
}

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    bus: Bus,
    runtime: Arc<dyn ContainerRuntime>,
    quotas: validate::Quotas,
    max_attempts: std::collections::HashMap<String, u32>,
    /// SHA-256 of the admin token.
    admin_hash: String,
    feed: Arc<feed::Feed>,
    metrics: metrics::Metrics,
    /// Cancelled at shutdown: streams close and waits answer at once.
    cancel: CancellationToken,
    /// Cancelled when the shutdown grace is over: whatever is left stops.
    hard: CancellationToken,
    /// Every task of the server: the accept loop's connections, WebSocket
    /// sessions (spawned by the upgrade, outside their connection), the
    /// event feed; shutdown waits for them.
    tracker: TaskTracker,
    /// Streams and waits each org holds.
    caps: Arc<limits::OrgCaps>,
    /// The open connections.
    conns: Arc<serve::Conns>,
    openapi_json: String,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState").finish_non_exhaustive()
    }
}

impl ApiState {
    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A stream or wait slot of `org` (429 when it holds its cap).
    pub(crate) fn hold(&self, org: &str, hold: limits::Hold) -> Result<limits::Slot, ApiError> {
        self.inner.caps.take(org, hold)
    }

    /// The most attempts `worker`'s policy allows, if this server runs it.
    pub(crate) fn max_attempts(&self, worker: &str) -> Option<u32> {
        self.inner.max_attempts.get(worker).copied()
    }

    /// Where the instance's flow is, while it is in progress.
    pub(crate) async fn progress(
        &self,
        inst: &berth_store::instances::Instance,
    ) -> Result<Option<views::ProgressView>, ApiError> {
        // A settled instance may still have deliveries of its flow pending
        // (notifications): those are not the flow's progress.
        if inst.status.is_terminal() {
            return Ok(None);
        }
        let p = self.store().flow_progress(inst.flow_id).await?;
        Ok(p.map(|p| {
            let max = self.max_attempts(&p.worker).unwrap_or(0);
            views::ProgressView::new(&p, max)
        }))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Berth API",
        description = "Instances, flows, dead letters and the org's event stream. Every error \
                       answers `{\"error\": {\"code\", \"message\", \"field\"?}}`.",
    ),
    modifiers(&Security),
    // Listed because the flow tree is recursive, which stops utoipa from
    // collecting the schemas under it by itself.
    components(schemas(
        views::FlowEvent,
        views::AttemptView,
        views::ErrorInfoView,
        // Named by the list's `status` and `/wait`'s `state` parameters only.
        instances::StatusFilter,
        instances::WaitState,
    )),
    tags(
        (name = "orgs", description = "Orgs and tokens"),
        (name = "instances", description = "Instances and their actions"),
        (name = "builds", description = "Build contexts instances are built from"),
        (name = "flows", description = "Flow traces and dead letters"),
        (name = "events", description = "The org's live event stream"),
        (name = "system", description = "Health, metrics, this document"),
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An org token (`berth_…`), or the admin token for POST /v1/orgs.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every route, each registered with its OpenAPI description.
fn api_router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(orgs::create_org))
        .routes(routes!(orgs::create_token, orgs::list_tokens))
        .routes(routes!(orgs::revoke_token))
        .routes(routes!(builds::create, builds::list))
        .routes(routes!(builds::get))
        .routes(routes!(instances::create, instances::list))
        .routes(routes!(instances::get, instances::delete))
        .routes(routes!(instances::stop))
        .routes(routes!(instances::start))
        .routes(routes!(instances::restart))
        .routes(routes!(instances::wait))
        .routes(routes!(instances::logs))
        .routes(routes!(trace::flow))
        .routes(routes!(trace::dead_letters))
        .routes(routes!(trace::redrive))
        .routes(routes!(events::events))
        .routes(routes!(system::openapi_json))
        .routes(routes!(system::healthz))
        .routes(routes!(system::metrics))
}

/// The OpenAPI document (OpenAPI 3.1), as served at `/v1/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_router().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    limits_of_every_route(&mut doc);
    doc
}

/// The answers every route may give before its handler runs (the server's
/// bounds, §9): declared on each operation, so that a generated client
/// knows them.
fn limits_of_every_route(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, ResponseBuilder, content::ContentBuilder};
    let error = || {
        RefOr::T(
            ResponseBuilder::new()
                .description("`uri_too_long`: the request's URI is over 8 KiB")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    exactly_one_of_image_and_build(doc);
    for item in doc.paths.paths.values_mut() {
        for op in [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
        {
            op.responses
                .responses
                .entry("414".to_owned())
                .or_insert_with(error);
        }
    }
}

/// `POST /v1/instances` takes exactly one of `image` and `build`, which
/// the derived schema cannot say: its object is combined with a `oneOf` of
/// the two `required`s (both given match both branches, which `oneOf`
/// refuses; neither matches none).
fn exactly_one_of_image_and_build(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{
        AllOfBuilder, ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type,
    };
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let Some(RefOr::T(body)) = components.schemas.remove("CreateInstance") else {
        return;
    };
    // Given means given as a string: `null` is as good as absent.
    let given = |field: &str| {
        ObjectBuilder::new()
            .property(
                field,
                ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)),
            )
            .required(field)
    };
    let one_of = OneOfBuilder::new()
        .item(given("image"))
        .item(given("build"));
    let both = AllOfBuilder::new().item(body).item(one_of).build();
    components
        .schemas
        .insert("CreateInstance".to_owned(), RefOr::T(Schema::AllOf(both)));
}

/// The admin token to check requests against.
#[derive(Debug)]
pub struct AdminToken {
    pub hash: String,
    /// A token generated now because none was configured or stored: to be
    /// shown once (only its hash is kept).
    pub generated: Option<String>,
}

/// The configured admin token if any; else the one generated at an earlier
/// start (by its stored hash); else a new one, stored hashed and returned
/// to be printed once.
pub async fn admin_token(store: &Store, configured: Option<&str>) -> anyhow::Result<AdminToken> {
    if let Some(t) = configured {
        return Ok(AdminToken {
            hash: auth::hash(t),
            generated: None,
        });
    }
    if let Some(hash) = store.admin_token_hash().await? {
        return Ok(AdminToken {
            hash,
            generated: None,
        });
    }
    let token = auth::new_token();
    let hash = auth::hash(&token);
    if store.init_admin_token(&hash, store.now()).await? {
        Ok(AdminToken {
            hash,
            generated: Some(token),
        })
    } else {
        // Another process stored one first; it printed its token.
        let hash = store
            .admin_token_hash()
            .await?
            .context("the admin token vanished while being created")?;
        Ok(AdminToken {
            hash,
            generated: None,
        })
    }
}

/// The running API server: a background task with graceful shutdown.
pub struct Server {
    addr: SocketAddr,
    cancel: CancellationToken,
    hard: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Serves the API on `listener` until [`Server::shutdown`], within
    /// `options`' limits. Refuses to start when the descriptor limit leaves
    /// too little room for connections.
    pub async fn start(
        listener: tokio::net::TcpListener,
        deps: ApiDeps,
        admin_hash: String,
        options: ServerOptions,
    ) -> anyhow::Result<Server> {
        let addr = listener
            .local_addr()
            .context("cannot read the listening address")?;
        let fds = serve::fd_limit();
        let cap = serve::connection_cap(options.max_connections, fds)?;
        let cursor = deps.store.last_attempt_id().await?;
        let cancel = CancellationToken::new();
        let hard = CancellationToken::new();
        let tracker = TaskTracker::new();
        let conns = serve::Conns::new(cap);
        let (router, doc) = api_router().split_for_parts();
        let mut doc = doc;
        doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
        limits_of_every_route(&mut doc);
        validate::document_limits(&mut doc, &deps.quotas);
        let feed = feed::Feed::new();
        let state = ApiState {
            inner: Arc::new(Inner {
                store: deps.store.clone(),
                bus: deps.bus,
                runtime: deps.runtime,
                quotas: deps.quotas,
                max_attempts: deps.max_attempts,
                admin_hash,
                feed: feed.clone(),
                metrics: metrics::Metrics::new(cursor),
                cancel: cancel.clone(),
                hard: hard.clone(),
                tracker: tracker.clone(),
                caps: limits::OrgCaps::new(options.max_streams_per_org, options.max_waits_per_org),
                conns: conns.clone(),
                openapi_json: doc
                    .to_json()
                    .context("cannot render the OpenAPI document")?,
            }),
        };
        tracker.spawn(
            feed.run(deps.store, state.inner.bus.clone(), cancel.clone())
                .instrument(info_span!("event_feed")),
        );
        let app = router
            // The dashboard at `/` and `/ui/…`: no state, not in the document.
            .merge(dashboard::router())
            .fallback(system::no_route)
            .method_not_allowed_fallback(system::bad_method)
            .layer(axum::middleware::from_fn(system::log_request))
            .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
            // Outermost: an over-long URI is refused before it is routed
            // or logged.
            .layer(axum::middleware::from_fn(limits::check_head))
            .with_state(state);
        let task = tokio::spawn(
            serve::accept_loop(serve::Serving {
                listener,
                router: app,
                conns,
                header_read_timeout: options.header_read_timeout,
                tracker: tracker.clone(),
                shutdown: cancel.clone(),
                hard: hard.clone(),
            })
            .instrument(info_span!("api")),
        );
        info!(
            %addr,
            max_connections = cap,
            fd_limit = fds,
            header_read_timeout = ?options.header_read_timeout,
            "API listening"
        );
        Ok(Server {
            addr,
            cancel,
            hard,
            task,
            tracker,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, ends streams and waits, lets requests in flight
    /// finish within `grace`, then closes what is left.
    pub async fn shutdown(self, grace: Duration) {
        self.cancel.cancel();
        self.tracker.close();
        let mut task = self.task;
        let done = async {
            let accepted = (&mut task).await;
            self.tracker.wait().await;
            accepted
        };
        match tokio::time::timeout(grace, done).await {
            Ok(Ok(())) => info!("API stopped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "API accept loop failed"),
            Err(_) => {
                tracing::warn!("API requests still running after the grace period; closed");
                task.abort();
                // Every connection and session ends on `hard` at its next
                // poll; the bound only guards against a bug.
                self.hard.cancel();
                if tokio::time::timeout(Duration::from_secs(1), self.tracker.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!("API tasks still running after being closed");
                }
            }
        }
    }
}

/// 503 once shutdown began (for handlers that would otherwise wait).
pub(crate) fn check_running(state: &ApiState) -> Result<(), ApiError> {
    if state.inner.cancel.is_cancelled() {
        Err(ApiError::shutting_down())
    } else {
        Ok(())
    }
}
