//! The FHIR REST interactions on `/fhir/{tenant}`: create, read, vread, update, patch, delete
//! (plain and conditional), batch and transaction Bundles, history at three levels, and
//! capabilities.
//!
//! Every write goes through the [`AuditedStore`] extractor's handle, so that with auth on its
//! AuditEvents are committed in the same store commit as the write (see [`crate::audit`]).

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fhir_core::{
    Issue, IssueType, OperationOutcome, ResourceId, ResourceType, TenantId, VersionId,
};
use fhir_store::{
    DeleteResult, HistoryEntry, HistoryPage, HistoryQuery, HistoryScope, Method, ReadResult,
    StoreError, StoredResource, WriteKind, WriteResult,
};

use crate::AppState;
use crate::audit::AuditedStore;
use crate::bundle::{BundleBuilder, BundleResponse, Entry, EntryResponse};
use crate::error::ApiError;
use crate::format::{
    Format, Negotiated, body_format, negotiate, parse_resource, read_body, render_stored,
    render_tree,
};

/// The FHIR routes of every tenant.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/{tenant}", post(batch_or_transaction))
        .route("/fhir/{tenant}/metadata", get(capabilities))
        .route(
            "/fhir/{tenant}/.well-known/smart-configuration",
            get(smart_configuration),
        )
        .route("/fhir/{tenant}/_history", get(history))
        .route(
            "/fhir/{tenant}/{type}",
            get(crate::search::search_type)
                .post(create)
                .put(conditional_update)
                .delete(conditional_delete),
        )
        .route("/fhir/{tenant}/{type}/_history", get(history))
        .route(
            "/fhir/{tenant}/{type}/{id}",
            get(read).put(update).patch(patch).delete(delete),
        )
        .route("/fhir/{tenant}/{type}/{id}/_history", get(history))
        .route("/fhir/{tenant}/{type}/{id}/_history/{vid}", get(vread))
}

/// Everything a FHIR handler needs from the request line and headers.
pub struct Fhir {
    /// The tenant of the URL (syntactically valid; existence is checked by the store).
    pub tenant: TenantId,
    /// The resource type segment, if the route has one.
    pub resource_type: Option<String>,
    /// The id segment, if the route has one.
    pub id: Option<String>,
    /// The version segment, if the route has one.
    pub version: Option<String>,
    /// Decoded query parameters in order.
    pub params: Vec<(String, String)>,
    /// Chosen output format.
    pub neg: Negotiated,
    /// Request headers.
    pub headers: HeaderMap,
    /// This tenant's FHIR base URL, e.g. `http://localhost:8080/fhir/default`.
    pub base: String,
}

impl FromRequestParts<AppState> for Fhir {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let params: Vec<(String, String)> = parts
            .uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
            .unwrap_or_default();
        let neg = negotiate(&params, &parts.headers).map_err(IntoResponse::into_response)?;
        let raw = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| {
                ApiError::bad_request(IssueType::Value, "the URL path is not valid UTF-8")
                    .into_response_as(neg.format, neg.pretty)
            })?;
        let mut tenant = None;
        let mut resource_type = None;
        let mut id = None;
        let mut version = None;
        for (k, v) in raw.iter() {
            match k {
                "tenant" => tenant = Some(v.to_string()),
                "type" => resource_type = Some(v.to_string()),
                "id" => id = Some(v.to_string()),
                "vid" => version = Some(v.to_string()),
                _ => {}
            }
        }
        let tenant_text = tenant.unwrap_or_default();
        // A malformed tenant id cannot name a tenant: same answer as an unknown one.
        let tenant = TenantId::new(&tenant_text).map_err(|_| {
            ApiError::UnknownTenant(tenant_text.chars().take(64).collect())
                .into_response_as(neg.format, neg.pretty)
        })?;
        let origin = match &state.config.public_base {
            Some(b) => b.trim_end_matches('/').to_string(),
            None => {
                let host = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .filter(|h| {
                        h.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
                    })
                    .unwrap_or("localhost");
                format!("http://{host}")
            }
        };
        Ok(Fhir {
            base: format!("{origin}/fhir/{tenant}"),
            tenant,
            resource_type,
            id,
            version,
            params,
            neg,
            headers: parts.headers.clone(),
        })
    }
}

impl Fhir {
    fn fail(&self, e: ApiError) -> Response {
        e.into_response_as(self.neg.format, self.neg.pretty)
    }

    fn respond(&self, r: Result<Response, ApiError>) -> Response {
        r.unwrap_or_else(|e| self.fail(e))
    }

    fn resource_type(&self) -> Result<ResourceType, ApiError> {
        let t = self.resource_type.as_deref().unwrap_or_default();
        ResourceType::parse(t).ok_or_else(|| ApiError::UnknownResourceType(t.to_string()))
    }

    fn resource_id(&self) -> Result<ResourceId, ApiError> {
        Ok(ResourceId::new(self.id.as_deref().unwrap_or_default())?)
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn prefer_return(&self) -> PreferReturn {
        let Some(p) = self.headers.get("prefer").and_then(|v| v.to_str().ok()) else {
            return PreferReturn::Representation;
        };
        for part in p.split([',', ';']) {
            match part.trim().replace(' ', "").as_str() {
                "return=minimal" => return PreferReturn::Minimal,
                "return=OperationOutcome" => return PreferReturn::OperationOutcome,
                "return=representation" => return PreferReturn::Representation,
                _ => {}
            }
        }
        PreferReturn::Representation
    }

    fn if_match(&self) -> Result<Option<VersionId>, ApiError> {
        match self.header(header::IF_MATCH) {
            None => Ok(None),
            Some(v) => Ok(Some(VersionId::parse(v).map_err(|_| {
                ApiError::bad_request(
                    IssueType::Value,
                    format!("If-Match must be an ETag like W/\"3\", not '{v}'"),
                )
            })?)),
        }
    }

    /// The query without the parameters that only shape the response.
    fn criteria(&self) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.params {
            if !matches!(k.as_str(), "_format" | "_pretty") {
                ser.append_pair(k, v);
            }
        }
        ser.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreferReturn {
    Minimal,
    Representation,
    OperationOutcome,
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}

fn http_date(instant: &str) -> Option<HeaderValue> {
    let t = chrono::DateTime::parse_from_rfc3339(instant).ok()?;
    let st: std::time::SystemTime = t.with_timezone(&chrono::Utc).into();
    HeaderValue::from_str(&httpdate::fmt_http_date(st)).ok()
}

fn version_headers(resp: &mut Response, version: VersionId, last_updated: &str) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&version.etag()) {
        h.insert(header::ETAG, v);
    }
    if let Some(v) = http_date(last_updated) {
        h.insert(header::LAST_MODIFIED, v);
    }
}

fn location(base: &str, r: &StoredResource) -> String {
    format!("{base}/{}/{}/_history/{}", r.resource_type, r.id, r.version)
}

/// The response to a successful create or update.
fn write_response(ctx: &Fhir, result: &WriteResult) -> Response {
    let r = &result.resource;
    let status = match result.kind {
        WriteKind::Created => StatusCode::CREATED,
        WriteKind::Updated | WriteKind::Existing => StatusCode::OK,
    };
    let mut resp = match ctx.prefer_return() {
        PreferReturn::Representation => render_stored(&r.json, ctx.neg.format, ctx.neg.pretty),
        PreferReturn::Minimal => Response::new(Body::empty()),
        PreferReturn::OperationOutcome => {
            let msg = match result.kind {
                WriteKind::Created => format!("created {}/{}", r.resource_type, r.id),
                WriteKind::Updated => format!(
                    "updated {}/{} to version {}",
                    r.resource_type, r.id, r.version
                ),
                WriteKind::Existing => format!(
                    "a matching resource exists: {}/{}; nothing was created",
                    r.resource_type, r.id
                ),
            };
            render_tree(
                &OperationOutcome::new(vec![Issue::information(msg)]).to_json(),
                ctx.neg.format,
                ctx.neg.pretty,
            )
        }
    };
    *resp.status_mut() = status;
    version_headers(&mut resp, r.version, &r.last_updated);
    if let Ok(v) = HeaderValue::from_str(&location(&ctx.base, r)) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn delete_response(ctx: &Fhir, result: &DeleteResult) -> Response {
    match ctx.prefer_return() {
        PreferReturn::OperationOutcome => {
            let msg = match (&result.id, result.version) {
                (Some(id), Some(v)) => {
                    format!("deleted {}/{id} (version {v})", result.resource_type)
                }
                _ => "nothing to delete".to_string(),
            };
            render_tree(
                &OperationOutcome::new(vec![Issue::information(msg)]).to_json(),
                ctx.neg.format,
                ctx.neg.pretty,
            )
        }
        _ => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::NO_CONTENT;
            if let Some(v) = result.version
                && let Ok(h) = HeaderValue::from_str(&v.etag())
            {
                resp.headers_mut().insert(header::ETAG, h);
            }
            resp
        }
    }
}

async fn body_resource(
    ctx: &Fhir,
    state: &AppState,
    body: Body,
    expected: ResourceType,
) -> Result<fhir_core::Resource, ApiError> {
    let bytes = read_body(body, &ctx.headers, state.config.max_body_bytes).await?;
    let resource = parse_resource(&ctx.headers, &bytes)?;
    if resource.resource_type() != expected {
        return Err(ApiError::BadRequest(vec![Issue::at(
            IssueType::Invalid,
            "resourceType",
            format!(
                "the body is a {} but the URL is for {expected}",
                resource.resource_type()
            ),
        )]));
    }
    Ok(resource)
}

async fn create(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
    body: Body,
) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let resource = body_resource(&ctx, &state, body, rt).await?;
        let store = audited.store();
        let result = match ctx.header(header::HeaderName::from_static("if-none-exist")) {
            Some(q) => {
                let q = q.split_once('?').map_or(q, |(_, q)| q);
                crate::search::conditional_create(&state, store, &ctx.tenant, resource, q).await?
            }
            None => {
                let tenant = ctx.tenant.clone();
                blocking(move || store.create(&tenant, resource, None)).await?
            }
        };
        Ok(write_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

async fn read(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let id = ctx.resource_id()?;
        let store = state.store.clone();
        let tenant = ctx.tenant.clone();
        let rid = id.clone();
        let found = blocking(move || store.read(&tenant, rt, &rid)).await?;
        match found {
            ReadResult::Found(r) => {
                if not_modified(&ctx, &r) {
                    let mut resp = Response::new(Body::empty());
                    *resp.status_mut() = StatusCode::NOT_MODIFIED;
                    version_headers(&mut resp, r.version, &r.last_updated);
                    return Ok(resp);
                }
                let mut resp = render_stored(&r.json, ctx.neg.format, ctx.neg.pretty);
                version_headers(&mut resp, r.version, &r.last_updated);
                Ok(resp)
            }
            ReadResult::Deleted {
                version,
                last_updated,
            } => {
                let mut resp = ctx.fail(ApiError::Gone(format!("{rt}/{id}")));
                version_headers(&mut resp, version, &last_updated);
                Ok(resp)
            }
            ReadResult::NotFound => Err(ApiError::NotFound(format!("{rt}/{id}"))),
        }
    }
    .await;
    ctx.respond(r)
}

/// `If-None-Match` / `If-Modified-Since` on a read.
fn not_modified(ctx: &Fhir, r: &StoredResource) -> bool {
    if let Some(inm) = ctx.header(header::IF_NONE_MATCH) {
        // The ETag header wins over the date, as RFC 9110 says.
        return inm.split(',').any(|tag| {
            let tag = tag.trim();
            tag == "*" || VersionId::parse(tag).is_ok_and(|v| v == r.version)
        });
    }
    if let Some(ims) = ctx.header(header::IF_MODIFIED_SINCE)
        && let Ok(since) = httpdate::parse_http_date(ims)
        && let Ok(lu) = chrono::DateTime::parse_from_rfc3339(&r.last_updated)
    {
        let since: chrono::DateTime<chrono::Utc> = since.into();
        // HTTP dates have whole seconds: compare at that precision.
        return lu.timestamp() <= since.timestamp();
    }
    false
}

async fn vread(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let id = ctx.resource_id()?;
        let v = ctx.version.as_deref().unwrap_or_default();
        let version = VersionId::parse(v).map_err(|_| {
            ApiError::bad_request(
                IssueType::Value,
                format!("'{v}' is not a version id; versions are positive whole numbers"),
            )
        })?;
        let store = state.store.clone();
        let tenant = ctx.tenant.clone();
        let rid = id.clone();
        match blocking(move || store.vread(&tenant, rt, &rid, version)).await? {
            ReadResult::Found(r) => {
                let mut resp = render_stored(&r.json, ctx.neg.format, ctx.neg.pretty);
                version_headers(&mut resp, r.version, &r.last_updated);
                Ok(resp)
            }
            ReadResult::Deleted {
                version,
                last_updated,
            } => {
                let mut resp = ctx.fail(ApiError::Gone(format!("{rt}/{id}/_history/{version}")));
                version_headers(&mut resp, version, &last_updated);
                Ok(resp)
            }
            ReadResult::NotFound => Err(ApiError::NotFound(format!("{rt}/{id}/_history/{v}"))),
        }
    }
    .await;
    ctx.respond(r)
}

async fn update(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
    body: Body,
) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let id = ctx.resource_id()?;
        let resource = body_resource(&ctx, &state, body, rt).await?;
        match resource.id() {
            Some(body_id) if body_id == id.as_str() => {}
            Some(body_id) => {
                return Err(ApiError::BadRequest(vec![Issue::at(
                    IssueType::Invalid,
                    format!("{rt}.id"),
                    format!("the body's id '{body_id}' does not match the URL's id '{id}'"),
                )]));
            }
            None => {
                return Err(ApiError::BadRequest(vec![Issue::at(
                    IssueType::Required,
                    format!("{rt}.id"),
                    format!("an update must carry the id of the URL ('{id}') in the body"),
                )]));
            }
        }
        let if_match = ctx.if_match()?;
        let store = audited.store();
        let tenant = ctx.tenant.clone();
        let result = blocking(move || store.update(&tenant, &id, resource, if_match)).await?;
        Ok(write_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

/// `PATCH Type/id` with a JSON Patch (`application/json-patch+json`), honouring `If-Match`.
async fn patch(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
    body: Body,
) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let id = ctx.resource_id()?;
        let ct = ctx.header(header::CONTENT_TYPE).unwrap_or_default();
        let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if essence != "application/json-patch+json" {
            let hint = if Format::from_mime(ct).is_some() {
                " (FHIRPath Patch is not supported)"
            } else {
                ""
            };
            return Err(ApiError::UnsupportedMediaType(format!(
                "PATCH takes a JSON Patch with Content-Type application/json-patch+json, not '{ct}'{hint}"
            )));
        }
        let bytes = read_body(body, &ctx.headers, state.config.max_body_bytes).await?;
        let patch = fhir_core::json::parse(&bytes).map_err(fhir_core::FhirError::from)?;
        let if_match = ctx.if_match()?;
        let store = audited.store();
        let tenant = ctx.tenant.clone();
        let result = blocking(move || store.patch(&tenant, rt, &id, patch, if_match)).await?;
        Ok(write_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

/// `POST /fhir/{tenant}` with a `batch` or `transaction` Bundle (JSON or XML). The work — parse,
/// validate in parallel, resolve search criteria, one commit — is
/// [`fhir_store::bundle::process`], on the blocking pool, with the search index as its
/// [`fhir_search::BundleResolver`] (so conditional entries and `GET` entries take any search
/// criteria, serialised with the REST conditional operations on the same criteria).
async fn batch_or_transaction(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
    body: Body,
) -> Response {
    let r = async {
        let format = body_format(&ctx.headers)?;
        let bytes = read_body(body, &ctx.headers, state.config.max_bundle_bytes).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request(
                IssueType::Required,
                "the request body is empty; a batch or transaction Bundle is required",
            ));
        }
        // Full search criteria in conditional entries, conditional references and GET
        // entries; the resolver only searches, the writes go through the audited handle.
        let resolver = state
            .search
            .bundle_resolver(crate::search::handling(&ctx.headers));
        let opts = fhir_store::bundle::BundleOptions {
            max_entries: state.config.max_bundle_entries,
            base_url: ctx.base.clone(),
            return_representation: ctx.prefer_return() != PreferReturn::Minimal,
            resolver: Some(std::sync::Arc::new(resolver)),
        };
        let tenant = ctx.tenant.clone();
        let response = tokio::task::spawn_blocking(move || {
            // Parsing a large Bundle is CPU work too: keep it off the async workers.
            let tree = match format {
                Format::Json => {
                    fhir_core::json::parse(&bytes).map_err(fhir_core::FhirError::from)?
                }
                Format::Xml => fhir_core::xml::from_xml(&bytes)?,
            };
            // Its AuditEvents say which of the two it was.
            let kind = match tree.get("type").and_then(fhir_core::Json::as_str) {
                Some("transaction") => Some("transaction"),
                Some("batch") => Some("batch"),
                _ => None,
            };
            let store = audited.store_as(kind);
            fhir_store::bundle::process(&store, &tenant, tree, &opts).map_err(|e| match e.status {
                // The search index could not catch up in time (resolving search criteria):
                // worth retrying, as for a REST search, not an internal error.
                503 => ApiError::Outcome {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    issues: e.issues,
                },
                _ => ApiError::from(e),
            })
        })
        .await
        .map_err(|e| ApiError::Internal(format!("bundle task failed: {e}")))??;
        Ok(response.into_fhir_response(ctx.neg))
    }
    .await;
    ctx.respond(r)
}

/// The search criteria of a conditional update or delete (any search parameters; see
/// [`crate::search::conditional_update`]).
fn require_criteria(ctx: &Fhir, what: &str) -> Result<String, ApiError> {
    let q = ctx.criteria();
    if q.is_empty() {
        return Err(ApiError::bad_request(
            IssueType::Required,
            format!(
                "a conditional {what} needs search criteria in the URL, e.g. ?identifier=system|value"
            ),
        ));
    }
    Ok(q)
}

async fn conditional_update(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
    body: Body,
) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let criteria = require_criteria(&ctx, "update")?;
        let resource = body_resource(&ctx, &state, body, rt).await?;
        let if_match = ctx.if_match()?;
        let store = audited.store();
        let result = crate::search::conditional_update(
            &state,
            store,
            &ctx.tenant,
            &criteria,
            resource,
            if_match,
        )
        .await?;
        Ok(write_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

async fn delete(audited: AuditedStore, ctx: Fhir) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let id = ctx.resource_id()?;
        let if_match = ctx.if_match()?;
        let store = audited.store();
        let tenant = ctx.tenant.clone();
        let result = blocking(move || store.delete(&tenant, rt, &id, if_match)).await?;
        Ok(delete_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

async fn conditional_delete(
    State(state): State<AppState>,
    audited: AuditedStore,
    ctx: Fhir,
) -> Response {
    let r = async {
        let rt = ctx.resource_type()?;
        let criteria = require_criteria(&ctx, "delete")?;
        let store = audited.store();
        let result =
            crate::search::conditional_delete(&state, store, &ctx.tenant, rt, &criteria).await?;
        Ok(delete_response(&ctx, &result))
    }
    .await;
    ctx.respond(r)
}

fn history_entry(base: &str, e: HistoryEntry) -> Entry {
    let rel = format!("{}/{}", e.resource_type, e.id);
    let (method, url, status) = match e.method {
        Method::Create => ("POST", e.resource_type.to_string(), "201 Created"),
        Method::Update => ("PUT", rel.clone(), "200 OK"),
        Method::Delete => ("DELETE", rel.clone(), "204 No Content"),
    };
    Entry {
        full_url: Some(format!("{base}/{rel}")),
        resource: e.json,
        search_mode: None,
        request: Some((method.to_string(), url)),
        response: Some(EntryResponse {
            status: status.to_string(),
            etag: Some(e.version.etag()),
            last_modified: Some(e.last_updated),
            location: None,
            outcome: None,
        }),
    }
}

/// Instance, type and system history: which one follows from the route's segments.
async fn history(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let scope = match (&ctx.resource_type, &ctx.id) {
            (None, _) => HistoryScope::System,
            (Some(_), None) => HistoryScope::Type(ctx.resource_type()?),
            (Some(_), Some(_)) => HistoryScope::Instance(ctx.resource_type()?, ctx.resource_id()?),
        };
        let mut q = HistoryQuery {
            since: None,
            before: None,
            count: state.config.default_count,
        };
        for (k, v) in &ctx.params {
            match k.as_str() {
                "_count" => {
                    let n: usize = v.parse().map_err(|_| {
                        ApiError::bad_request(
                            IssueType::Value,
                            format!("_count must be a whole number, not '{v}'"),
                        )
                    })?;
                    q.count = n.min(state.config.max_count);
                }
                "_since" => {
                    let t = chrono::DateTime::parse_from_rfc3339(v).map_err(|_| {
                        ApiError::bad_request(
                            IssueType::Value,
                            format!("_since must be an instant like 2024-03-01T10:00:00+01:00, not '{v}'"),
                        )
                    })?;
                    q.since = Some(
                        t.with_timezone(&chrono::Utc)
                            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                            .to_string(),
                    );
                }
                "_cursor" => {
                    q.before = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(IssueType::Value, format!("invalid _cursor '{v}'"))
                    })?);
                }
                "_format" | "_pretty" => {}
                other => {
                    return Err(ApiError::bad_request(
                        IssueType::NotSupported,
                        format!("history does not support the parameter '{other}'; use _count, _since"),
                    ));
                }
            }
        }
        let path = match &scope {
            HistoryScope::System => format!("{}/_history", ctx.base),
            HistoryScope::Type(t) => format!("{}/{t}/_history", ctx.base),
            HistoryScope::Instance(t, id) => format!("{}/{t}/{id}/_history", ctx.base),
        };
        let store = state.store.clone();
        let tenant = ctx.tenant.clone();
        let q2 = q.clone();
        let scope2 = scope.clone();
        let page: HistoryPage = blocking(move || {
            if let HistoryScope::Instance(t, id) = &scope2 {
                // An instance that never existed is a 404, not an empty history.
                if let ReadResult::NotFound = store.read(&tenant, *t, id)? {
                    return Ok(None);
                }
            }
            store.history(&tenant, scope2, &q2).map(Some)
        })
        .await?
        .ok_or_else(|| match &scope {
            HistoryScope::Instance(t, id) => ApiError::NotFound(format!("{t}/{id}")),
            _ => ApiError::Internal("history scope".into()),
        })?;
        let mut b = BundleBuilder::new("history");
        let link = |before: Option<u64>| {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            ser.append_pair("_count", &q.count.to_string());
            if let Some(s) = &q.since {
                ser.append_pair("_since", s);
            }
            if let Some(b) = before {
                ser.append_pair("_cursor", &b.to_string());
            }
            for (k, v) in &ctx.params {
                if matches!(k.as_str(), "_format" | "_pretty") {
                    ser.append_pair(k, v);
                }
            }
            format!("{path}?{}", ser.finish())
        };
        b.links.push(("self", link(q.before)));
        if let Some(next) = page.next {
            b.links.push(("next", link(Some(next))));
        }
        b.entries = page
            .entries
            .into_iter()
            .map(|e| history_entry(&ctx.base, e))
            .collect();
        Ok(b.into_fhir_response(ctx.neg))
    }
    .await;
    ctx.respond(r)
}

async fn capabilities(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let store = state.store.clone();
        let tenant = ctx.tenant.clone();
        let known = blocking(move || store.tenant(&tenant)).await?;
        if known.is_none() {
            return Err(ApiError::UnknownTenant(ctx.tenant.to_string()));
        }
        let cs = crate::capability::capability_statement(&ctx.base, state.config.smart.as_ref());
        Ok(render_tree(&cs, ctx.neg.format, ctx.neg.pretty))
    }
    .await;
    ctx.respond(r)
}

/// `GET /fhir/{tenant}/.well-known/smart-configuration` (public, like `metadata`): 404 when
/// auth is off, since there is no authorization server to describe.
async fn smart_configuration(State(state): State<AppState>, ctx: Fhir) -> Response {
    let r = async {
        let store = state.store.clone();
        let tenant = ctx.tenant.clone();
        let known = blocking(move || store.tenant(&tenant)).await?;
        if known.is_none() {
            return Err(ApiError::UnknownTenant(ctx.tenant.to_string()));
        }
        let Some(smart) = &state.config.smart else {
            return Err(ApiError::NotFound(
                "a SMART configuration (authentication is off)".into(),
            ));
        };
        let mut resp = render_tree(&smart.to_json(), Format::Json, ctx.neg.pretty);
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(resp)
    }
    .await;
    ctx.respond(r)
}
