//! FHIR search over HTTP: type-level (`GET /fhir/{t}/{type}?…`, `POST …/{type}/_search`),
//! system-level (`GET /fhir/{t}?_type=…`, `POST /fhir/{t}/_search`), Patient compartment
//! (`GET /fhir/{t}/Patient/{id}/{type}?…`), paging links (`GET /fhir/{t}?_getpages=…`), and
//! `$reindex`. Everything is a call into [`fhir_search::SearchIndex`]; this module only reads
//! the request and renders the Bundle.

use axum::Router;
use axum::body::Body;
use axum::extract::{RawPathParams, State};
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::{get, post};
use fhir_core::{
    IssueType, OperationOutcome, Resource, ResourceId, ResourceType, TenantId, VersionId,
};
use fhir_search::{Handling, Scope, SearchError, SearchResult};
use fhir_store::{DeleteResult, Store, WriteResult};

use crate::AppState;
use crate::bundle::BundleResponse;
use crate::error::ApiError;
use crate::fhir::Fhir;
use crate::format::{read_body, render_tree};

/// The search routes (merged into [`crate::app`] next to [`crate::fhir::routes`]; the
/// type-level `GET` is registered there, on the route it shares with create).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/{tenant}", get(search_system))
        .route("/fhir/{tenant}/_search", post(search_system_post))
        .route("/fhir/{tenant}/$reindex", post(reindex))
        .route("/fhir/{tenant}/{type}/_search", post(search_type_post))
        .route("/fhir/{tenant}/{type}/$reindex", post(reindex))
        .route(
            "/fhir/{tenant}/{type}/{id}/{compartment_type}",
            get(search_compartment),
        )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SearchError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("search task failed: {e}")))?
        .map_err(ApiError::from)
}

/// `Prefer: handling=strict|lenient`.
pub(crate) fn handling(headers: &HeaderMap) -> Handling {
    for v in headers.get_all("prefer") {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split([',', ';']) {
            match part.trim().replace(' ', "").as_str() {
                "handling=strict" => return Handling::Strict,
                "handling=lenient" => return Handling::Lenient,
                _ => {}
            }
        }
    }
    Handling::Lenient
}

/// The parameters that are criteria or result controls (not paging or output format).
fn search_params(params: &[(String, String)]) -> Vec<(String, String)> {
    params
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "_getpages" | "_getpagesoffset"))
        .cloned()
        .collect()
}

/// `_format`/`_pretty` as given, to carry them into paging links.
fn output_params(params: &[(String, String)]) -> Vec<(String, String)> {
    params
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "_format" | "_pretty"))
        .cloned()
        .collect()
}

fn query_string(params: &[(String, String)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// The searchset Bundle of one page ([`fhir_search::searchset`], as `GET` entries of Bundles
/// get it too). `self_url` is the search as asked (first page) or the page's own link.
fn bundle(ctx: &Fhir, result: SearchResult, self_url: String) -> Response {
    fhir_search::searchset(result, &ctx.base, self_url, &output_params(&ctx.params))
        .into_fhir_response(ctx.neg)
}

/// Runs a search in `scope` with `params` and renders its first page.
async fn run(
    state: &AppState,
    ctx: &Fhir,
    scope: Scope,
    params: Vec<(String, String)>,
    path: String,
) -> Result<Response, ApiError> {
    let index = state.search.clone();
    let tenant = ctx.tenant.clone();
    let handling = handling(&ctx.headers);
    let criteria = search_params(&params);
    let result = blocking(move || {
        let req = index.parse(&tenant, &scope, &criteria, handling)?;
        index.search(&tenant, &req)
    })
    .await?;
    let q = query_string(&params);
    let self_url = if q.is_empty() {
        path
    } else {
        format!("{path}?{q}")
    };
    Ok(bundle(ctx, result, self_url))
}

fn resource_type(ctx: &Fhir) -> Result<ResourceType, ApiError> {
    let t = ctx.resource_type.as_deref().unwrap_or_default();
    ResourceType::parse(t).ok_or_else(|| ApiError::UnknownResourceType(t.to_string()))
}

/// The `application/x-www-form-urlencoded` body of a `POST _search`, after the URL's
/// parameters.
async fn form_params(
    state: &AppState,
    ctx: &Fhir,
    body: Body,
) -> Result<Vec<(String, String)>, ApiError> {
    let mut params = ctx.params.clone();
    let bytes = read_body(body, &ctx.headers, state.config.max_body_bytes).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(params);
    }
    let ct = ctx
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence != "application/x-www-form-urlencoded" {
        return Err(ApiError::UnsupportedMediaType(format!(
            "POST _search takes its parameters as application/x-www-form-urlencoded, not '{ct}'"
        )));
    }
    params.extend(form_urlencoded::parse(&bytes).into_owned());
    Ok(params)
}

/// `GET /fhir/{tenant}/{type}?…`
pub async fn search_type(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let rt = resource_type(&ctx)?;
        let path = format!("{}/{rt}", ctx.base);
        run(&state, &ctx, Scope::Type(rt), ctx.params.clone(), path).await
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

/// `POST /fhir/{tenant}/{type}/_search` with a form body.
async fn search_type_post(State(state): State<AppState>, ctx: Fhir, body: Body) -> Response {
    let r = async {
        let rt = resource_type(&ctx)?;
        let params = form_params(&state, &ctx, body).await?;
        let path = format!("{}/{rt}", ctx.base);
        run(&state, &ctx, Scope::Type(rt), params, path).await
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

/// `GET /fhir/{tenant}?_type=…` (system search), or a page of a kept search
/// (`?_getpages=token&_getpagesoffset=n`).
async fn search_system(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let token = ctx
            .params
            .iter()
            .find(|(k, _)| k == "_getpages")
            .map(|(_, v)| v.clone());
        if let Some(token) = token {
            let offset = match ctx.params.iter().find(|(k, _)| k == "_getpagesoffset") {
                Some((_, v)) => v.parse::<usize>().map_err(|_| {
                    ApiError::bad_request(
                        IssueType::Value,
                        format!("_getpagesoffset must be a whole number, not '{v}'"),
                    )
                })?,
                None => 0,
            };
            let index = state.search.clone();
            let tenant = ctx.tenant.clone();
            let result = blocking(move || index.page(&tenant, &token, offset)).await?;
            let self_url = format!("{}?{}", ctx.base, query_string(&ctx.params));
            return Ok(bundle(&ctx, result, self_url));
        }
        let path = ctx.base.clone();
        run(&state, &ctx, Scope::System, ctx.params.clone(), path).await
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

/// `POST /fhir/{tenant}/_search` with a form body.
async fn search_system_post(State(state): State<AppState>, ctx: Fhir, body: Body) -> Response {
    let r = async {
        let params = form_params(&state, &ctx, body).await?;
        let path = ctx.base.clone();
        run(&state, &ctx, Scope::System, params, path).await
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

/// `GET /fhir/{tenant}/Patient/{id}/{type}?…`
async fn search_compartment(
    State(state): State<AppState>,
    ctx: Fhir,
    raw: RawPathParams,
) -> Response {
    let r = async {
        let compartment = ctx.resource_type.as_deref().unwrap_or_default();
        if compartment != "Patient" {
            return Err(ApiError::bad_request(
                IssueType::NotSupported,
                format!(
                    "compartment search is supported for the Patient compartment only, not '{}'",
                    compartment.chars().take(64).collect::<String>()
                ),
            ));
        }
        let patient = ResourceId::new(ctx.id.as_deref().unwrap_or_default())?;
        let target = raw
            .iter()
            .find(|(k, _)| *k == "compartment_type")
            .map(|(_, v)| v.to_string())
            .unwrap_or_default();
        let rt = ResourceType::parse(&target)
            .ok_or_else(|| ApiError::UnknownResourceType(target.clone()))?;
        let path = format!("{}/Patient/{patient}/{rt}", ctx.base);
        let scope = Scope::Compartment {
            patient,
            resource_type: rt,
        };
        run(&state, &ctx, scope, ctx.params.clone(), path).await
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

/// `POST /fhir/{tenant}/$reindex` and `POST /fhir/{tenant}/{type}/$reindex`: reindexes the
/// current resources (of the type) with the tenant's current search parameters, e.g. after a
/// custom SearchParameter was created. Answers when done, with an OperationOutcome.
async fn reindex(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let types = match &ctx.resource_type {
            Some(_) => Some(vec![resource_type(&ctx)?]),
            None => None,
        };
        let index = state.search.clone();
        let tenant = ctx.tenant.clone();
        let scope = types
            .as_ref()
            .and_then(|t| t.first())
            .map_or("resources".to_string(), |t| format!("{t} resources"));
        let n = blocking(move || index.reindex(&tenant, types.as_deref(), &mut |_, _| {})).await?;
        let outcome = OperationOutcome::new(vec![fhir_core::Issue::information(format!(
            "reindexed {n} {scope}"
        ))]);
        Ok(render_tree(
            &outcome.to_json(),
            ctx.neg.format,
            ctx.neg.pretty,
        ))
    }
    .await;
    r.unwrap_or_else(|e| fail(&ctx, e))
}

fn fail(ctx: &Fhir, e: ApiError) -> Response {
    e.into_response_as(ctx.neg.format, ctx.neg.pretty)
}

// The conditional operations write through `store` (from `crate::audit::AuditedStore`), so
// that the write carries the request's audit hook.

/// Conditional create on full search criteria (`If-None-Exist`), writing as `store`; see
/// [`fhir_search::SearchIndex::conditional_create`].
pub async fn conditional_create(
    state: &AppState,
    store: Store,
    tenant: &TenantId,
    resource: Resource,
    criteria: &str,
) -> Result<WriteResult, ApiError> {
    let index = state.search.clone();
    let tenant = tenant.clone();
    let criteria = criteria.to_string();
    blocking(move || index.conditional_create(&store, &tenant, resource, &criteria)).await
}

/// Conditional update on full search criteria, writing as `store`; see
/// [`fhir_search::SearchIndex::conditional_update`].
pub async fn conditional_update(
    state: &AppState,
    store: Store,
    tenant: &TenantId,
    criteria: &str,
    resource: Resource,
    if_match: Option<VersionId>,
) -> Result<WriteResult, ApiError> {
    let index = state.search.clone();
    let tenant = tenant.clone();
    let criteria = criteria.to_string();
    blocking(move || index.conditional_update(&store, &tenant, &criteria, resource, if_match)).await
}

/// Conditional delete on full search criteria, writing as `store`; see
/// [`fhir_search::SearchIndex::conditional_delete`].
pub async fn conditional_delete(
    state: &AppState,
    store: Store,
    tenant: &TenantId,
    ty: ResourceType,
    criteria: &str,
) -> Result<DeleteResult, ApiError> {
    let index = state.search.clone();
    let tenant = tenant.clone();
    let criteria = criteria.to_string();
    blocking(move || index.conditional_delete(&store, &tenant, ty, &criteria)).await
}
