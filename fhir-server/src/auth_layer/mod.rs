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
//!    an OperationOutcome when no granted scope allows it. What a search tests or returns beyond
//!    its own type needs scopes too: chains and `_has` need search rights on every type they
//!    test (403 otherwise), and `_include`/`_revinclude` results the token may not read are
//!    dropped from the page (`auth_layer/restricted.rs`).
//! 5. Restricted access (a `patient/` scope, or scope filters such as `?category=…`):
//!    everything returned, tested or written must be in the patient's compartment, and what is
//!    outside gets the 404 of a missing resource. Type searches (`GET`, and `POST _search` with
//!    its form merged into the query) run as Patient-compartment searches with the scope
//!    filters added, `_include`/`_revinclude` results outside are dropped, chains into
//!    `Patient` and `_has` on `Patient` are evaluated pinned to the patient; read and vread
//!    check the version they return; instance, type and system history drop the entries
//!    outside (pages may be short); create, update and patch must keep the resource in the
//!    compartment and are pinned (`If-Match`) to the version checked; XML output is converted
//!    from the filtered JSON. Refused with 403: system search, other chains and `_has`,
//!    conditional writes, several restricted scopes at once, filters on non-search
//!    interactions. The rules, and why they are safe, are in the docs of
//!    `auth_layer/restricted.rs`.
//! 6. Bundles: every entry needs a scope for its interaction; under a patient restriction
//!    write entries follow the rules of point 5 (`auth_layer/bundle.rs`), other entries are
//!    refused. A transaction with a refused entry is refused whole (403, or the 404/412 the
//!    single request would get; nothing is written), a batch runs its other entries and
//!    answers each refused one with its status (the batch-response is then JSON).
//!
//! Every FHIR data request and every refused attempt is then recorded in the access log
//! ([`crate::audit`]): the layer hands each authenticated request an
//! [`AuditTicket`] in its extensions, through which a write commits
//! its AuditEvents together with the write; everything else (failures, reads, searches, with the
//! patients of what they returned) the layer records itself once the response is known.
//! `GET …/AuditEvent?…` is answered from that log, for auditors only (and logged as well), and
//! REST writes of `AuditEvent` get 405. Admin API calls are logged too (target `audit`).
//!
//! With server DPoP nonces on (`dpop_nonce = true`), every response to a request with
//! `Authorization: DPoP`, success or failure, carries a `DPoP-Nonce` header with the current
//! nonce (RFC 9449 §8.2).
//!
//! With auth off (`--no-auth`) the layer lets everything through unchanged (and logs nothing).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::{Issue, IssueType, TenantId};

use crate::AppState;
use crate::audit::{AuditTicket, Returned};
use crate::auth::{Access, AuthError, AuthMode, DPOP_NONCE_HEADER, Interaction, Principal};
use crate::error::ApiError;

mod bundle;
mod pages;
mod restricted;

use bundle::bundle;
pub use pages::PageOwners;
use pages::{page, remember_pages};
use restricted::OneCtx;

/// What a request does, as far as authorisation is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Op {
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
pub(super) fn classify(method: &Method, rest: &[&str], conditional_create: bool) -> Op {
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

pub(super) fn forbidden(msg: impl Into<String>) -> Response {
    ApiError::Outcome {
        status: StatusCode::FORBIDDEN,
        issues: vec![Issue::error(IssueType::Forbidden, msg)],
    }
    .into_response()
}

/// The response for a failed authentication or a refused scope.
pub(super) fn auth_failure(state: &AppState, err: &AuthError) -> Response {
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
    // RFC 9449 §8.2: every response to a DPoP request, refusals included, tells the client the
    // nonce to use next. Taken before the request is handed on (the headers go with it); a
    // nonce stays valid for at least one more window, however long the request takes.
    let nonce = state.auth.dpop_nonce_for(req.headers());
    let mut resp = authorize_on(state, req, next).await;
    if let Some(v) = nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut()
            .insert(HeaderName::from_static(DPOP_NONCE_HEADER), v);
    }
    resp
}

/// [`authorize`] with auth on, without the `DPoP-Nonce` header.
async fn authorize_on(state: AppState, req: Request, next: Next) -> Response {
    let mut log = AuditCtx::default();
    let resp = check(&state, req, next, &mut log).await;
    if let Some(call) = log.admin.take() {
        return admin_logged(&state, log.principal.as_ref(), call, resp).await;
    }
    let (Some(tenant), Some(mut access)) = (log.tenant, log.access) else {
        return resp;
    };
    let status = resp.status();
    access.status = status.as_u16();
    let recorded = log.ticket.as_ref().is_some_and(AuditTicket::recorded);
    // Writes are logged before the response goes out (durable like the write); reads after.
    let wait = !matches!(access.method, Method::GET | Method::HEAD);
    let principal = log.principal.as_ref();
    match log.returned {
        // The write's AuditEvents were committed with it.
        _ if status.is_success() && recorded && log.returned != Some(Returned::BundleResponse) => {
            resp
        }
        Some(what) if status.is_success() => {
            let (resp, body) = share_body(resp).await;
            let xml = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("xml"));
            let body = crate::audit::ResponseBody {
                bytes: body,
                xml,
                what,
                writes_recorded: recorded,
            };
            crate::audit::record_returned(&state, &tenant, principal, access, body, wait).await;
            resp
        }
        _ => {
            crate::audit::record(&state, &tenant, principal, access, wait).await;
            resp
        }
    }
}

/// The response with its body in memory, and the body's bytes (shared, not copied).
async fn share_body(resp: Response) -> (Response, axum::body::Bytes) {
    let (parts, body) = resp.into_parts();
    match axum::body::to_bytes(body, usize::MAX).await {
        Ok(bytes) => (
            Response::from_parts(parts, Body::from(bytes.clone())),
            bytes,
        ),
        Err(_) => (
            ApiError::Internal("cannot read the response".into()).into_response(),
            axum::body::Bytes::new(),
        ),
    }
}

/// An admin API call, for its log entry.
struct AdminCall {
    method: Method,
    path: String,
    /// The tenant the path names (`/admin/tenants/{id}`).
    tenant: Option<TenantId>,
}

/// Logs an admin call (see [`crate::audit::record_admin`]) once its response is known.
async fn admin_logged(
    state: &AppState,
    principal: Option<&Principal>,
    call: AdminCall,
    resp: Response,
) -> Response {
    let status = resp.status();
    let mut tenant = call.tenant;
    let resp = if call.method == Method::POST && status == StatusCode::CREATED {
        // The created tenant is named in the response.
        let (resp, body) = share_body(resp).await;
        tenant = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
            .and_then(|id| TenantId::new(&id).ok());
        resp
    } else {
        resp
    };
    if call.method == Method::DELETE && status.is_success() {
        // Its audit area went with it.
        tenant = None;
    }
    crate::audit::record_admin(
        state,
        principal,
        &call.method,
        &call.path,
        tenant,
        status.as_u16(),
    )
    .await;
    resp
}

/// What [`check`] learnt about a request, for its AuditEvents.
#[derive(Default)]
struct AuditCtx {
    tenant: Option<TenantId>,
    principal: Option<Principal>,
    access: Option<crate::audit::Access>,
    /// What a successful response returns, to read the patients from (off the request path).
    returned: Option<Returned>,
    /// The ticket handed to the handlers, to learn whether a write recorded itself.
    ticket: Option<AuditTicket>,
    /// Set for admin API calls, which are logged on their own.
    admin: Option<AdminCall>,
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

async fn check(state: &AppState, mut req: Request, next: Next, log: &mut AuditCtx) -> Response {
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
        ["admin", rest @ ..] => {
            log.admin = Some(AdminCall {
                method: req.method().clone(),
                path: req.uri().path().chars().take(200).collect(),
                tenant: match rest {
                    ["tenants", id, ..] => TenantId::new(id).ok(),
                    _ => None,
                },
            });
            (None, Op::Admin)
        }
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
        let (subtype, resource, returned) = match &op {
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
                match interaction {
                    Interaction::Read
                    | Interaction::Vread
                    | Interaction::Create
                    | Interaction::Update
                    | Interaction::Patch => Some(Returned::Resource),
                    Interaction::SearchType
                    | Interaction::SearchSystem
                    | Interaction::HistoryInstance
                    | Interaction::HistoryType
                    | Interaction::HistorySystem => Some(Returned::Entries),
                    _ => None,
                },
            ),
            _ => (
                "batch-or-transaction".to_string(),
                None,
                Some(Returned::BundleResponse),
            ),
        };
        log.returned = returned;
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
    if let (Some(a), Some(p)) = (log.access.as_mut(), principal.patient()) {
        a.add_patient(p);
    }
    log.principal = Some(principal.clone());
    if let (Some(t), Some(a)) = (&log.tenant, &log.access) {
        // For the handlers: a write commits its AuditEvents with itself (see crate::audit).
        let ticket = AuditTicket::new(t.clone(), principal.clone(), a.clone());
        req.extensions_mut().insert(ticket.clone());
        log.ticket = Some(ticket);
    }
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
                // Reading the log is logged too, under the patient asked about only (not the
                // patients of the events returned): see crate::audit on its growth.
                log.returned = None;
                if let Some(a) = log.access.as_mut() {
                    a.patients.clear();
                    if let Some(p) = crate::audit::asked_patient(req.uri().query().unwrap_or("")) {
                        a.add_patient(&p);
                    }
                }
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

/// Percent-decodes one path segment; `None` when the result is not UTF-8.
fn percent_decode(seg: &str) -> Option<String> {
    percent_encoding::percent_decode_str(seg)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}
