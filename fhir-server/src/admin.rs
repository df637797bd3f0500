//! The admin API for tenants: `POST/GET /admin/tenants`, `GET/DELETE /admin/tenants/{id}`.
//!
//! Tenants are hospital trusts; each one is a complete FHIR base at `/fhir/{id}`.

use axum::Json as AxumJson;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use fhir_core::{IssueType, TenantId};
use fhir_store::{StoreError, TenantInfo};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::error::ApiError;
use crate::format::read_body;

/// A tenant as the admin API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TenantDoc {
    /// Tenant id (used in `/fhir/{id}`).
    pub id: String,
    /// Display name, e.g. the trust's name.
    #[serde(default)]
    pub name: String,
    /// When it was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
}

impl From<TenantInfo> for TenantDoc {
    fn from(t: TenantInfo) -> Self {
        TenantDoc {
            id: t.id.to_string(),
            name: t.name,
            created: Some(t.created),
        }
    }
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

/// `GET /admin/tenants`
pub async fn list_tenants(State(state): State<AppState>) -> Response {
    let store = state.store.clone();
    match run(move || store.tenants()).await {
        Ok(ts) => AxumJson(ts.into_iter().map(TenantDoc::from).collect::<Vec<_>>()).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /admin/tenants/{id}`
pub async fn get_tenant(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let r = async {
        let id = TenantId::new(&id).map_err(|_| ApiError::UnknownTenant(id.clone()))?;
        let store = state.store.clone();
        let tid = id.clone();
        match run(move || store.tenant(&tid)).await? {
            Some(t) => Ok(AxumJson(TenantDoc::from(t)).into_response()),
            None => Err(ApiError::UnknownTenant(id.to_string())),
        }
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /admin/tenants` with `{"id": "...", "name": "..."}`
pub async fn create_tenant(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let bytes = read_body(body, &headers, state.config.max_body_bytes).await?;
        let doc: TenantDoc = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_request(
                IssueType::Structure,
                format!("expected {{\"id\": \"...\", \"name\": \"...\"}}: {e}"),
            )
        })?;
        let id = TenantId::new(&doc.id)?;
        let store = state.store.clone();
        let name = doc.name.clone();
        let info = run(move || store.create_tenant(&id, &name)).await?;
        tracing::info!(tenant = %info.id, "tenant created");
        let mut resp = AxumJson(TenantDoc::from(info)).into_response();
        *resp.status_mut() = StatusCode::CREATED;
        Ok::<_, ApiError>(resp)
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /admin/tenants/{id}`: removes the tenant and all its data.
pub async fn remove_tenant(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let r = async {
        let id = TenantId::new(&id).map_err(|_| ApiError::UnknownTenant(id.clone()))?;
        let store = state.store.clone();
        let tid = id.clone();
        if run(move || store.remove_tenant(&tid)).await? {
            // Its search index goes with it: a tenant created again under this id starts a
            // new change log at 1, which the old index must never be mistaken for.
            let search = state.search.clone();
            let tid = id.clone();
            tokio::task::spawn_blocking(move || search.remove_tenant(&tid))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            tracing::info!(tenant = %id, "tenant removed");
            Ok(StatusCode::NO_CONTENT.into_response())
        } else {
            Err(ApiError::UnknownTenant(id.to_string()))
        }
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}
