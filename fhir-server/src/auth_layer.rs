//! Authorisation of every HTTP request, in one middleware in front of the router.
//!
//! Order of checks, each failing closed:
//!
//! 1. `GET /health`, `/ready`, `/fhir/{t}/metadata` and `/fhir/{t}/.well-known/smart-configuration`
//!    are public; everything else needs a valid token ([`crate::auth::Authenticator::authenticate`]); a
//!    failure is a 401 with `WWW-Authenticate`.
//! 2. `/admin/…` needs a token with an unrestricted all-types, all-letters scope
//!    (`system/*.cruds`, `user/*.cruds`, or v1 `system/*.*`): see [`is_admin`].
//! 3. Tenant binding: a token not valid for the URL's tenant gets exactly the 404 an unknown
//!    tenant gets, before anything else is looked at, so it learns nothing about that tenant.
//! 4. The SMART scope of the interaction (per Bundle entry for `batch`/`transaction`): 403 with
//!    an OperationOutcome when no granted scope allows it.
//! 5. Restricted access (a `patient/` scope, or scope filters such as `?category=…`):
//!    * type searches run as a Patient-compartment search (a `Patient` search gets
//!      `_id=<patient>`), scope filters are added as criteria, and `_include`/`_revinclude`
//!      results outside the compartment are dropped from the page;
//!    * read, vread, instance history, update, delete are allowed only when the current
//!      resource is in the compartment (otherwise the same 404 as a missing resource);
//!    * create and update must keep the new content in the compartment (JSON bodies);
//!    * anything else (system/type history, system search, patch, conditional writes,
//!      Bundles, XML output, several restricted scopes at once, filters on non-search
//!      interactions) is refused with 403, because it cannot be limited soundly here.
//! 6. Bundles: every entry needs an unrestricted scope for its interaction; a transaction with
//!    a refused entry is refused whole (403), a batch runs its other entries and answers the
//!    refused ones with a `403` entry (the batch-response is then JSON).
//!
//! Every FHIR data request and every refused attempt is then recorded in the access log
//! ([`crate::audit`]); `GET …/AuditEvent?…` is answered from that log, for auditors only, and
//! REST writes of `AuditEvent` get 405.
//!
//! With auth off (`--no-auth`) the layer lets everything through unchanged (and logs nothing).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::json::{self, Json};
use fhir_core::search_param::SearchParamRegistry;
use fhir_core::{Issue, IssueType, ResourceId, ResourceType, TenantId};
use fhir_store::ReadResult;

use crate::AppState;
use crate::auth::{Access, AuthError, AuthMode, Interaction, Principal, Restriction};
use crate::error::ApiError;
use crate::format::read_body;

/// What a request does, as far as authorisation is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    /// No token needed.
    Public,
    /// Tenant administration.
    Admin,
    /// `POST /fhir/{t}` (batch or transaction).
    Bundle,
    /// One interaction on a type (`""` for system level), possibly on one instance.
    One {
        interaction: Interaction,
        resource_type: String,
        id: Option<String>,
        /// Conditional create/update/delete: also runs a search.
        conditional: bool,
        /// `GET /fhir/{t}/Patient/{id}/{type}`: the patient of the compartment.
        compartment: Option<String>,
    },
    /// A path no route serves: the router answers 404/405 without touching data.
    Unrouted,
}

fn one(interaction: Interaction, ty: &str, id: Option<&str>) -> Op {
    Op::One {
        interaction,
        resource_type: ty.to_string(),
        id: id.map(str::to_string),
        conditional: false,
        compartment: None,
    }
}

/// Classifies a request by method and path segments after `/fhir/{tenant}`.
fn classify(method: &Method, rest: &[&str], conditional_create: bool) -> Op {
    use Interaction as I;
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    match rest {
        [] if post => Op::Bundle,
        [] if get => one(I::SearchSystem, "", None),
        ["metadata"] | [".well-known", "smart-configuration"] => Op::Public,
        ["_search"] if post => one(I::SearchSystem, "", None),
        ["_history"] if get => one(I::HistorySystem, "", None),
        ["$reindex"] if post => one(I::Operation, "*", None),
        [t] if get => one(I::SearchType, t, None),
        [t] if post => Op::One {
            interaction: I::Create,
            resource_type: t.to_string(),
            id: None,
            conditional: conditional_create,
            compartment: None,
        },
        [t] if method == Method::PUT || method == Method::DELETE => Op::One {
            interaction: if method == Method::PUT {
                I::Update
            } else {
                I::Delete
            },
            resource_type: t.to_string(),
            id: None,
            conditional: true,
            compartment: None,
        },
        [t, "_search"] if post => one(I::SearchType, t, None),
        [t, "_history"] if get => one(I::HistoryType, t, None),
        [t, "$reindex"] if post => one(I::Operation, t, None),
        [t, id] if get => one(I::Read, t, Some(id)),
        [t, id] if method == Method::PUT => one(I::Update, t, Some(id)),
        [t, id] if method == Method::PATCH => one(I::Patch, t, Some(id)),
        [t, id] if method == Method::DELETE => one(I::Delete, t, Some(id)),
        [t, id, "_history"] if get => one(I::HistoryInstance, t, Some(id)),
        [t, id, "_history", _] if get => one(I::Vread, t, Some(id)),
        [c, id, t] if get => Op::One {
            interaction: I::SearchType,
            resource_type: t.to_string(),
            id: None,
            conditional: false,
            compartment: (*c == "Patient").then(|| id.to_string()),
        },
        _ => Op::Unrouted,
    }
}

/// Whether `p` may use the admin API: an unrestricted scope granting every interaction on
/// every type (`system/*.cruds` or `user/*.cruds`).
pub fn is_admin(p: &Principal) -> bool {
    p.access(Interaction::Operation, "*") == Access::Unrestricted
}

fn forbidden(msg: impl Into<String>) -> Response {
    ApiError::Outcome {
        status: StatusCode::FORBIDDEN,
        issues: vec![Issue::error(IssueType::Forbidden, msg)],
    }
    .into_response()
}

/// The response for a failed authentication or a refused scope.
fn auth_failure(state: &AppState, err: &AuthError) -> Response {
    let status = err.status();
    let code = if status == StatusCode::FORBIDDEN {
        IssueType::Forbidden
    } else if status == StatusCode::UNAUTHORIZED {
        IssueType::Login
    } else {
        IssueType::Exception
    };
    let mut resp = ApiError::Outcome {
        status,
        issues: vec![Issue::error(code, err.to_string())],
    }
    .into_response();
    for v in state.auth.www_authenticate(err) {
        if let Ok(v) = HeaderValue::from_str(&v) {
            resp.headers_mut().append(header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

/// The absolute URL the client used (for DPoP `htu`), from the public base or `Host`.
fn request_url(state: &AppState, req: &Request) -> String {
    let origin = match &state.config.public_base {
        Some(b) => b.trim_end_matches('/').to_string(),
        None => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost");
            format!("http://{host}")
        }
    };
    format!("{origin}{}", req.uri().path())
}

/// The middleware: see the module docs.
pub async fn authorize(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.auth.mode() == AuthMode::Off {
        return next.run(req).await;
    }
    let mut log = AuditCtx::default();
    let resp = check(&state, req, next, &mut log).await;
    if let (Some(tenant), Some(mut access)) = (log.tenant, log.access) {
        access.status = resp.status().as_u16();
        let (resp, patients) = if log.inspect && resp.status().is_success() {
            patients_of_response(resp).await
        } else {
            (resp, Vec::new())
        };
        for p in patients {
            if !access.patients.contains(&p) {
                access.patients.push(p);
            }
        }
        let wait = !matches!(access.method, Method::GET | Method::HEAD);
        crate::audit::record(&state, &tenant, log.principal.as_ref(), access, wait).await;
        return resp;
    }
    resp
}

/// What [`check`] learnt about a request, for its AuditEvent.
#[derive(Default)]
struct AuditCtx {
    tenant: Option<TenantId>,
    principal: Option<Principal>,
    access: Option<crate::audit::Access>,
    /// Read the patients from the (single-resource) response.
    inspect: bool,
}

/// Patients whose compartment holds the JSON resource of a response.
async fn patients_of_response(resp: Response) -> (Response, Vec<String>) {
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("json"));
    if !json {
        return (resp, Vec::new());
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (
            ApiError::Internal("cannot read the response".into()).into_response(),
            Vec::new(),
        );
    };
    let patients = json::parse(&bytes)
        .ok()
        .and_then(|t| {
            t.as_object()
                .map(|m| SearchParamRegistry::r4().patient_compartment(m))
        })
        .unwrap_or_default();
    (Response::from_parts(parts, Body::from(bytes)), patients)
}

/// Patients a request names: a `Patient/{id}` path, a compartment, `patient`/`subject` criteria.
fn named_patients(rest: &[&str], query: &str, principal: Option<&Principal>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut add = |p: &str| {
        let p = p.strip_prefix("Patient/").unwrap_or(p);
        if !p.is_empty() && !p.contains('/') && !out.iter().any(|x| x == p) {
            out.push(p.to_string());
        }
    };
    if let Some(p) = principal.and_then(Principal::patient) {
        add(p);
    }
    if let ["Patient", id, ..] = rest {
        add(id);
    }
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if matches!(k.as_ref(), "patient" | "subject" | "subject:Patient") {
            for one in v.split(',') {
                add(one);
            }
        }
    }
    out
}

async fn check(state: &AppState, req: Request, next: Next, log: &mut AuditCtx) -> Response {
    let state = state.clone();
    // Decoded like the router decodes path parameters, so that `/fhir/trust%2Db/…` is
    // authorised as the `trust-b` it will be served as.
    let Some(decoded) = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Option<Vec<String>>>()
    else {
        return ApiError::bad_request(IssueType::Value, "the URL path is not valid UTF-8")
            .into_response();
    };
    let segs: Vec<&str> = decoded.iter().map(String::as_str).collect();
    let conditional_create = req.headers().contains_key("if-none-exist");
    let (tenant_text, op) = match segs.as_slice() {
        ["health"] | ["ready"] => return next.run(req).await,
        ["admin", ..] => (None, Op::Admin),
        ["fhir", t, rest @ ..] => (
            Some(t.to_string()),
            classify(req.method(), rest, conditional_create),
        ),
        _ => return next.run(req).await,
    };
    if matches!(op, Op::Public | Op::Unrouted) {
        return next.run(req).await;
    }
    let url = request_url(&state, &req);
    if let (Some(t), Op::One { .. } | Op::Bundle) = (&tenant_text, &op) {
        log.tenant = TenantId::new(t).ok();
        let query = req.uri().query().unwrap_or("").to_string();
        let rest = segs.get(2..).unwrap_or(&[]);
        let (subtype, resource, inspect) = match &op {
            Op::One {
                interaction,
                resource_type,
                id,
                ..
            } => (
                interaction.as_str().to_string(),
                match id {
                    Some(id) => Some(format!("{resource_type}/{id}")),
                    None if resource_type.is_empty() || resource_type == "*" => None,
                    None => Some(resource_type.clone()),
                },
                matches!(
                    interaction,
                    Interaction::Read
                        | Interaction::Vread
                        | Interaction::Create
                        | Interaction::Update
                        | Interaction::Patch
                ),
            ),
            _ => ("batch-or-transaction".to_string(), None, false),
        };
        log.inspect = inspect;
        log.access = Some(crate::audit::Access {
            subtype,
            method: req.method().clone(),
            resource,
            patients: named_patients(rest, &query, None),
            status: 0,
            query: (!query.is_empty()).then_some(query),
        });
    }
    let principal = match state
        .auth
        .authenticate(req.method(), &url, req.headers())
        .await
    {
        Ok(p) => p,
        Err(e) => return auth_failure(&state, &e),
    };
    if let (Some(a), Some(p)) = (log.access.as_mut(), principal.patient())
        && !a.patients.iter().any(|x| x == p)
    {
        a.patients.push(p.to_string());
    }
    log.principal = Some(principal.clone());
    if op == Op::Admin {
        if is_admin(&principal) {
            return next.run(req).await;
        }
        return forbidden(
            "the admin API needs an unrestricted system/*.cruds or user/*.cruds scope",
        );
    }
    let tenant_text = tenant_text.unwrap_or_default();
    let Ok(tenant) = TenantId::new(&tenant_text) else {
        return ApiError::UnknownTenant(tenant_text.chars().take(64).collect()).into_response();
    };
    if !principal.allows_tenant(&tenant) {
        // Identical to an unknown tenant: the token learns nothing about this one.
        return ApiError::UnknownTenant(tenant_text.chars().take(64).collect()).into_response();
    }
    let paging = req
        .uri()
        .query()
        .is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "_getpages"));
    if paging
        && matches!(
            &op,
            Op::One {
                interaction: Interaction::SearchSystem,
                ..
            }
        )
    {
        return page(&state, &principal, &tenant, req, next).await;
    }
    if let Op::One {
        interaction,
        resource_type,
        ..
    } = &op
        && resource_type == "AuditEvent"
    {
        match interaction {
            Interaction::SearchType if req.method() == Method::GET => {
                // The access log itself is not audited per query, so that polling it does
                // not grow it.
                log.access = None;
                if !crate::audit::is_auditor(&principal) {
                    return forbidden(
                        "the access log needs an auditor scope (user/AuditEvent.rs or system/AuditEvent.rs)",
                    );
                }
                let base = {
                    let url = request_url(&state, &req);
                    url.split("/AuditEvent").next().unwrap_or("").to_string()
                };
                let q = req.uri().query().unwrap_or("").to_string();
                return crate::audit::search(&state, &tenant, &base, &q).await;
            }
            Interaction::Create
            | Interaction::Update
            | Interaction::Patch
            | Interaction::Delete
            | Interaction::SearchType => {
                return ApiError::MethodNotAllowed(
                    "AuditEvents are append-only and written by the server only".into(),
                )
                .into_response();
            }
            _ => {}
        }
    }
    match op {
        Op::Bundle => bundle(state, principal, tenant, req, next).await,
        Op::One {
            interaction,
            resource_type,
            id,
            conditional,
            compartment,
        } => {
            let ctx = OneCtx {
                state,
                principal,
                tenant,
                interaction,
                resource_type,
                id,
                conditional,
                compartment,
            };
            ctx.run(req, next).await
        }
        _ => next.run(req).await,
    }
}

struct OneCtx {
    state: AppState,
    principal: Principal,
    tenant: TenantId,
    interaction: Interaction,
    resource_type: String,
    id: Option<String>,
    conditional: bool,
    compartment: Option<String>,
}

impl OneCtx {
    async fn run(self, req: Request, next: Next) -> Response {
        use Interaction as I;
        let access = match self.principal.check(self.interaction, &self.resource_type) {
            Ok(a) => a,
            Err(e) => return auth_failure(&self.state, &e),
        };
        // A conditional write searches too: without search rights it would reveal matches.
        if self.conditional
            && let Err(e) = self
                .principal
                .check(Interaction::SearchType, &self.resource_type)
        {
            return auth_failure(&self.state, &e);
        }
        let searching = matches!(self.interaction, I::SearchType | I::SearchSystem);
        let restriction = match access {
            Access::Unrestricted if searching => {
                let resp = next.run(req).await;
                return remember_pages(&self.state, &self.principal, &self.tenant, None, resp)
                    .await;
            }
            Access::Unrestricted => return next.run(req).await,
            Access::Denied => return forbidden("not allowed"),
            Access::Restricted(list) => match list.as_slice() {
                [r] => r.clone(),
                _ => {
                    return forbidden(
                        "the token grants several restricted scopes for this interaction; \
                         ask for one patient context or one filter set",
                    );
                }
            },
        };
        if self.conditional {
            return forbidden(
                "conditional writes are not available to patient- or filter-restricted tokens",
            );
        }
        match self.interaction {
            I::SearchType => self.search(restriction, req, next).await,
            I::Read | I::Vread | I::HistoryInstance | I::Delete | I::Update | I::Create => {
                if !restriction.filters.is_empty() {
                    return forbidden(
                        "scopes with search filters grant searches only on this server",
                    );
                }
                let Some(patient) = restriction.patient else {
                    return forbidden("restricted scope without a patient context");
                };
                self.instance(patient, req, next).await
            }
            _ => forbidden(format!(
                "{} is not available to patient- or filter-restricted tokens",
                self.interaction.as_str()
            )),
        }
    }

    /// Type search under a restriction: rewritten to a compartment search with the filters.
    async fn search(self, r: Restriction, mut req: Request, next: Next) -> Response {
        if ResourceType::parse(&self.resource_type).is_none()
            || self
                .compartment
                .as_deref()
                .is_some_and(|c| ResourceId::new(c).is_err())
        {
            return ApiError::UnknownResourceType(self.resource_type.chars().take(64).collect())
                .into_response();
        }
        if req.method() == Method::POST {
            return forbidden("restricted tokens must search with GET");
        }
        let query = req.uri().query().unwrap_or("").to_string();
        let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .into_owned()
            .collect();
        if params.iter().any(|(k, v)| {
            k == "_format" && !v.contains("json") || k.starts_with("_has") || k.contains('.')
        }) {
            // Chains and _has test resources outside the compartment; XML output cannot be
            // filtered here.
            return forbidden(
                "restricted tokens may not use chained parameters, _has or non-JSON output",
            );
        }
        params.extend(r.filters.iter().cloned());
        let path = match (&r.patient, &self.compartment) {
            (None, _) => format!("/fhir/{}/{}", self.tenant, self.resource_type),
            (Some(p), Some(c)) if p != c => {
                // Another patient's compartment: as empty as a patient with no data.
                params.push(("_id".into(), "-".into()));
                format!("/fhir/{}/{}", self.tenant, self.resource_type)
            }
            (Some(p), _) if self.resource_type == "Patient" => {
                params.push(("_id".into(), p.clone()));
                format!("/fhir/{}/Patient", self.tenant)
            }
            (Some(p), _) => format!("/fhir/{}/Patient/{p}/{}", self.tenant, self.resource_type),
        };
        let q = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter())
            .finish();
        let Ok(uri) = format!("{path}?{q}").parse() else {
            return forbidden("cannot restrict this search");
        };
        *req.uri_mut() = uri;
        // Only JSON can be filtered below.
        req.headers_mut().insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
        let resp = next.run(req).await;
        let resp = match &r.patient {
            Some(p) => filter_includes(resp, p).await,
            None => resp,
        };
        remember_pages(&self.state, &self.principal, &self.tenant, r.patient, resp).await
    }

    /// An instance interaction or a create under a patient restriction.
    async fn instance(self, patient: String, req: Request, next: Next) -> Response {
        let Some(rt) = ResourceType::parse(&self.resource_type) else {
            return next.run(req).await; // the handler's 404 for an unknown type
        };
        if let Some(id) = &self.id {
            let Ok(id) = ResourceId::new(id) else {
                return next.run(req).await; // the handler's 400
            };
            let store = self.state.store.clone();
            let tenant = self.tenant.clone();
            let found = tokio::task::spawn_blocking(move || store.read(&tenant, rt, &id).ok())
                .await
                .ok()
                .flatten();
            let (inside, exists) = match &found {
                Some(ReadResult::Found(r)) => (in_compartment(&r.json, &patient), true),
                Some(ReadResult::NotFound) => (false, false),
                _ => (false, true),
            };
            // An update may create a resource at a new id (its body is checked below);
            // everything else needs an existing resource in the compartment.
            let creating = self.interaction == Interaction::Update && !exists;
            if !inside && !creating {
                return ApiError::NotFound(format!("{}/{}", rt, self.id.as_deref().unwrap_or("")))
                    .into_response();
            }
        }
        if matches!(self.interaction, Interaction::Create | Interaction::Update) {
            let (parts, body) = req.into_parts();
            let bytes =
                match read_body(body, &parts.headers, self.state.config.max_body_bytes).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
            if !in_compartment(&bytes, &patient) {
                return forbidden(format!(
                    "the resource must stay in the compartment of Patient/{patient} (JSON bodies only)"
                ));
            }
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        next.run(req).await
    }
}

/// Whether the JSON resource in `bytes` is in `patient`'s compartment.
fn in_compartment(bytes: &[u8], patient: &str) -> bool {
    let Ok(tree) = json::parse(bytes) else {
        return false;
    };
    let Some(map) = tree.as_object() else {
        return false;
    };
    SearchParamRegistry::r4()
        .patient_compartment(map)
        .iter()
        .any(|p| p == patient)
}

/// Drops `include` entries outside the compartment from a searchset page.
async fn filter_includes(resp: Response, patient: &str) -> Response {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::Internal("cannot read the search result".into()).into_response();
    };
    let Ok(mut tree) = json::parse(&bytes) else {
        return forbidden("restricted tokens get JSON search results only");
    };
    if let Some(Json::Array(entries)) = tree.as_object_mut().and_then(|m| m.get_mut("entry")) {
        entries.retain(|e| {
            let include = e
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Json::as_str)
                == Some("include");
            if !include {
                return true;
            }
            match e.get("resource") {
                Some(r) => in_compartment(&r.to_bytes(), patient),
                None => false,
            }
        });
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(tree.to_bytes()))
}

/// `POST /fhir/{t}` under auth: every entry's interaction must be allowed without restriction.
async fn bundle(
    state: AppState,
    principal: Principal,
    _tenant: TenantId,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, &parts.headers, state.config.max_bundle_bytes).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let is_xml = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("xml"));
    let tree = if is_xml {
        fhir_core::xml::from_xml(&bytes).ok()
    } else {
        json::parse(&bytes).ok()
    };
    // Unparseable: let the handler give its usual 400 (nothing is written).
    let Some(tree) = tree else {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let empty = Vec::new();
    let entries = tree.get("entry").and_then(Json::as_array).unwrap_or(&empty);
    let mut denied = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let request = e.get("request");
        let method = request
            .and_then(|r| r.get("method"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let url = request
            .and_then(|r| r.get("url"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let Ok(m) = Method::from_bytes(method.as_bytes()) else {
            continue; // the bundle processor refuses it
        };
        let conditional = request.and_then(|r| r.get("ifNoneExist")).is_some();
        let op = classify(&m, &segs, conditional);
        let ok = match op {
            Op::One {
                interaction,
                resource_type,
                conditional,
                ..
            } => {
                let a = principal.access(interaction, &resource_type);
                // Conditional entries search too (see `OneCtx::run`).
                let search_ok = !(conditional || !query.is_empty() && method != "GET")
                    || principal.access(Interaction::SearchType, &resource_type)
                        == Access::Unrestricted;
                // The access log is written by the server only.
                let audit_write = resource_type == "AuditEvent" && method != "GET";
                a == Access::Unrestricted && search_ok && !audit_write
            }
            Op::Public => true,
            _ => false,
        };
        if !ok {
            denied.push(i);
        }
    }
    if denied.is_empty() {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    }
    let is_batch = tree.get("type").and_then(Json::as_str) == Some("batch");
    if !is_batch {
        // A transaction is all or nothing: one refused entry refuses it all.
        let list: Vec<String> = denied.iter().take(20).map(|i| i.to_string()).collect();
        return forbidden(format!(
            "the token does not allow (without patient or filter restriction) Bundle entries {}",
            list.join(", ")
        ));
    }
    batch_without(tree, &denied, parts, next).await
}

/// A batch with refused entries: the others run (entries of a batch are independent), and the
/// refused ones get a `403` entry at their place in the (JSON) batch-response.
async fn batch_without(
    mut tree: Json,
    denied: &[usize],
    mut parts: axum::http::request::Parts,
    next: Next,
) -> Response {
    let total = tree
        .get("entry")
        .and_then(Json::as_array)
        .map_or(0, Vec::len);
    if let Some(Json::Array(entries)) = tree.as_object_mut().and_then(|m| m.get_mut("entry")) {
        let mut i = 0;
        entries.retain(|_| {
            let keep = !denied.contains(&i);
            i += 1;
            keep
        });
    }
    let allowed: Vec<Json> = if total > denied.len() {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        parts.headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+json"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        let resp = next
            .run(Request::from_parts(parts, Body::from(tree.to_bytes())))
            .await;
        if resp.status() != StatusCode::OK {
            return resp;
        }
        let Ok(bytes) = axum::body::to_bytes(resp.into_body(), usize::MAX).await else {
            return ApiError::Internal("cannot read the batch response".into()).into_response();
        };
        match json::parse(&bytes) {
            Ok(t) => t
                .get("entry")
                .and_then(Json::as_array)
                .cloned()
                .unwrap_or_default(),
            Err(_) => {
                return ApiError::Internal("unreadable batch response".into()).into_response();
            }
        }
    } else {
        Vec::new()
    };
    let mut allowed = allowed.into_iter();
    let mut out = Vec::with_capacity(total);
    for i in 0..total {
        if denied.contains(&i) {
            let oo = fhir_core::OperationOutcome::new(vec![Issue::error(
                IssueType::Forbidden,
                "the token does not allow this entry's interaction",
            )])
            .to_json();
            let mut response = fhir_core::Map::new();
            response.insert("status", Json::str("403 Forbidden"));
            response.insert("outcome", oo);
            let mut e = fhir_core::Map::new();
            e.insert("response", Json::Object(response));
            out.push(Json::Object(e));
        } else if let Some(e) = allowed.next() {
            out.push(e);
        }
    }
    let mut root = fhir_core::Map::new();
    root.insert("resourceType", Json::str("Bundle"));
    root.insert("id", Json::str(uuid::Uuid::new_v4().to_string()));
    root.insert("type", Json::str("batch-response"));
    root.insert("entry", Json::Array(out));
    let mut resp = Response::new(Body::from(Json::Object(root).to_bytes()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+json"),
    );
    resp
}

/// Percent-decodes one path segment; `None` when the result is not UTF-8.
fn percent_decode(seg: &str) -> Option<String> {
    percent_encoding::percent_decode_str(seg)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// Who may follow a search's paging links: `_getpages` tokens name a stored search, so they
/// are bound to the principal (and tenant) that ran it, and keep its patient restriction.
#[derive(Debug, Default)]
pub struct PageOwners {
    map: std::sync::Mutex<std::collections::HashMap<String, (String, Option<String>)>>,
}

/// Most remembered page tokens; beyond it the memory is cleared (old links then get 403).
const MAX_PAGE_OWNERS: usize = 100_000;

fn principal_key(p: &Principal, tenant: &TenantId) -> String {
    format!(
        "{}\u{0}{}\u{0}{}\u{0}{}",
        p.issuer(),
        p.subject().unwrap_or(""),
        p.client_id().unwrap_or(""),
        tenant
    )
}

/// Records the page token of a search result, if it has one.
async fn remember_pages(
    state: &AppState,
    p: &Principal,
    tenant: &TenantId,
    patient: Option<String>,
    resp: Response,
) -> Response {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return ApiError::Internal("cannot read the search result".into()).into_response();
    };
    const KEY: &[u8] = b"_getpages=";
    if let Some(at) = bytes.windows(KEY.len()).position(|w| w == KEY) {
        let token: String = bytes[at + KEY.len()..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            .map(|b| *b as char)
            .collect();
        if !token.is_empty()
            && let Ok(mut m) = state.page_owners.map.lock()
        {
            if m.len() >= MAX_PAGE_OWNERS {
                m.clear();
            }
            m.insert(token, (principal_key(p, tenant), patient));
        }
    }
    Response::from_parts(parts, Body::from(bytes))
}

/// `GET /fhir/{t}?_getpages=…`: only for the principal that ran the search.
async fn page(
    state: &AppState,
    p: &Principal,
    tenant: &TenantId,
    mut req: Request,
    next: Next,
) -> Response {
    let token = req
        .uri()
        .query()
        .and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "_getpages")
                .map(|(_, v)| v.into_owned())
        })
        .unwrap_or_default();
    let owner = state
        .page_owners
        .map
        .lock()
        .ok()
        .and_then(|m| m.get(&token).cloned());
    match owner {
        Some((key, patient)) if key == principal_key(p, tenant) => match patient {
            Some(patient) => {
                req.headers_mut().insert(
                    header::ACCEPT,
                    HeaderValue::from_static("application/fhir+json"),
                );
                let resp = next.run(req).await;
                filter_includes(resp, &patient).await
            }
            None => next.run(req).await,
        },
        _ => forbidden("this page belongs to a search made with another token, or has expired"),
    }
}
