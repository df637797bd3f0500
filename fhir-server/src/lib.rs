//! # fhir-server
//!
//! The REST face of the store: a complete FHIR R4 base per tenant at `/fhir/{tenant}`, an admin
//! API for tenants, health endpoints, and the `fhir-server` binary.
//!
//! Handlers are thin: they parse the request (extractors and [`mod@format`]), call
//! [`fhir_store::Store`] (or, for searches and conditional operations,
//! [`fhir_search::SearchIndex`]) on the blocking pool, and render the result. Every failure is an
//! [`error::ApiError`], turned into a status and an OperationOutcome in one place.
#![warn(missing_docs)]

pub mod admin;
pub mod audit;
pub mod auth;
pub mod auth_layer;
pub mod bundle;
pub mod capability;
pub mod discovery;
pub mod error;
pub mod fhir;
pub mod format;
pub mod search;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use fhir_store::Store;
use tower_http::trace::TraceLayer;

use crate::error::ApiError;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest accepted request body in bytes (default 8 MiB).
    pub max_body_bytes: usize,
    /// Public base URL (`scheme://host[:port]`) used in `Location` and links; when unset, it is
    /// taken from the request's `Host` header.
    pub public_base: Option<String>,
    /// Largest `_count` a client may ask for.
    pub max_count: usize,
    /// `_count` when the client gives none.
    pub default_count: usize,
    /// Most entries accepted in one batch or transaction Bundle (default 10,000).
    pub max_bundle_entries: usize,
    /// Largest accepted batch or transaction Bundle in bytes (default 32 MiB); other bodies
    /// are limited by `max_body_bytes`.
    pub max_bundle_bytes: usize,
    /// The authorization server advertised by `.well-known/smart-configuration` and the
    /// CapabilityStatement's `rest.security`; `None` (auth off): neither is advertised.
    pub smart: Option<discovery::SmartDiscovery>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 8 * 1024 * 1024,
            public_base: None,
            max_count: 1000,
            default_count: 50,
            max_bundle_entries: 10_000,
            max_bundle_bytes: 32 * 1024 * 1024,
            smart: None,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The store: the single source of truth.
    pub store: Store,
    /// The search index derived from the store.
    pub search: fhir_search::SearchIndex,
    /// Settings.
    pub config: Arc<ServerConfig>,
    /// Token validation; [`auth::AuthConfig::off`] unless [`AppState::with_auth`] set one.
    pub auth: auth::Authenticator,
    /// Owners of search page tokens (see [`auth_layer::PageOwners`]).
    pub page_owners: Arc<auth_layer::PageOwners>,
}

impl AppState {
    /// The state for `store`, with its search index in `index_dir` (`DATA/index`), opened with
    /// the page sizes of `config`.
    pub fn open(
        store: Store,
        config: ServerConfig,
        index_dir: &std::path::Path,
    ) -> Result<AppState, fhir_search::SearchError> {
        let opts = fhir_search::IndexOptions {
            default_count: config.default_count,
            max_count: config.max_count,
            ..fhir_search::IndexOptions::default()
        };
        let search = fhir_search::SearchIndex::open_with(index_dir, store.clone(), opts)?;
        let auth = auth::Authenticator::new(auth::AuthConfig::off())
            .map_err(|e| fhir_search::SearchError::Index(e.to_string()))?;
        Ok(AppState {
            store,
            search,
            config: Arc::new(config),
            auth,
            page_owners: Arc::default(),
        })
    }

    /// The same state with `auth` checking every request (see [`auth_layer`]).
    pub fn with_auth(mut self, auth: auth::Authenticator) -> AppState {
        self.auth = auth;
        self
    }
}

/// The current time as a FHIR instant (UTC, microseconds).
pub fn now_instant() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let fhir = fhir::routes();
    let routes = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route(
            "/admin/tenants",
            get(admin::list_tenants).post(admin::create_tenant),
        )
        .route(
            "/admin/tenants/{id}",
            delete(admin::remove_tenant).get(admin::get_tenant),
        )
        .merge(fhir)
        .merge(search::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone());
    // Authorisation wraps the whole router (not each route) because it may rewrite the URI of
    // a restricted search to a compartment search, which must then be routed anew.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn_with_state(
            state,
            auth_layer::authorize,
        ))
        // Bodies are read by our own extractor with the configured limit and a FHIR 413.
        .layer(DefaultBodyLimit::disable())
        .layer(TraceLayer::new_for_http())
}

async fn health() -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

async fn ready(axum::extract::State(state): axum::extract::State<AppState>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.tenants()).await {
        Ok(Ok(_)) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"status":"ready"}"#,
        )
            .into_response(),
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            [("content-type", "application/json")],
            r#"{"status":"not ready"}"#,
        )
            .into_response(),
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::NotFound(format!("the URL path '{}'", req.uri().path())).into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::MethodNotAllowed(format!(
        "method {} is not allowed on '{}'",
        req.method(),
        req.uri().path()
    ))
    .into_response()
}

/// Serves `app` on `listener` until ctrl-c / SIGTERM.
pub async fn serve(listener: tokio::net::TcpListener, state: AppState) -> std::io::Result<()> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}
