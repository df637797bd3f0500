//! Requests under a restricted scope: a `patient/` scope (limited to the compartment of the
//! token's patient context) or a scope with search filters (`?category=…`).
//!
//! The rule for a patient restriction is that **everything returned, tested or written is in the
//! patient's compartment** (R4 CompartmentDefinition `patient`, via
//! [`SearchParamRegistry::patient_compartment`]). Whatever is outside looks like it does not
//! exist: the same 404, in the same format, as a missing resource.
//!
//! * **read** checks the current version; a deleted resource is `410 Gone` when the version
//!   before its deletion was in the compartment, else 404.
//! * **vread** checks the version it returns (not the current one): a resource that moved from
//!   another patient to this one keeps the other patient's old versions hidden, and one that
//!   moved away keeps this patient's old versions readable. A deletion version follows the rule
//!   of a deleted read.
//! * **history** (instance, type and system) drops every entry whose version is outside the
//!   compartment. A deletion entry carries no resource: it is kept when the version it deleted
//!   (the one before it) was in the compartment, because then the deletion is a change to this
//!   patient's data that a client syncing through `_history` must see, and it tells nothing
//!   about anyone else; a deletion of a resource that had already left the compartment is a
//!   change to another patient's data and is dropped. Instance history of a resource none of
//!   whose versions was ever in the compartment is a 404. Pages are filtered after they are
//!   cut, so a page may hold fewer entries than `_count` (even none) while a `next` link still
//!   leads on; the cursor links of history need no state, so they keep working.
//! * **search** (`GET`, and `POST …/_search` whose form body is merged with the query string
//!   and then handled exactly like `GET`) runs as a Patient-compartment search (a `Patient`
//!   search gets `_id=<patient>`), with the scope's filters added as criteria, and
//!   `_include`/`_revinclude` results outside the compartment dropped from the page. Page links
//!   stay bound to the token and keep the restriction ([`super::pages`]).
//! * **create, update, patch**: the stored result must be in the compartment (JSON or XML
//!   bodies; a JSON Patch is applied here to the current version to check its result). update,
//!   patch and delete need the current version in the compartment and are sent on with
//!   `If-Match` on the version that was checked, so a concurrent change in between makes them
//!   fail (412) instead of writing to a resource that was not checked.
//! * **XML output**: search and history results are filtered as JSON; when the client asked for
//!   XML (`_format` or `Accept`) the filtered Bundle is converted, and `_format` is carried into
//!   its links again.
//!
//! # Chains and `_has`
//!
//! The search engine answers a chain or `_has` by running an inner search over the whole tenant,
//! which would let the token test resources outside the compartment (and see, through the inner
//! search's size limit, how many exist). So restricted searches never pass a chain or `_has` to
//! the engine. The forms below are instead evaluated *over the resources the token may see*,
//! by searches this layer runs itself, each pinned to the patient:
//!
//! * A chain hop into `Patient` (`subject:Patient.identifier=…`, `patient.gender=…`,
//!   `subject.gender=…` when `Patient` is the only target type with that parameter, and deeper
//!   hops that are again into `Patient`, such as `subject:Patient.link:Patient.gender=…`). The
//!   only Patient a patient-restricted token may see is its own, so
//!   `P.x=v` means "`P` refers to `Patient/<patient>` and that patient matches `x=v`": the hop
//!   is replaced by `P=Patient/<patient>`, and the layer checks `Patient?_id=<patient>&x=v`
//!   itself (empty result if it fails). Requiring `P` to be a Patient-compartment parameter
//!   would not be enough: an Observation is in the compartment through `performer` while its
//!   `subject` may be another patient, and `subject.gender=…` would then test that other
//!   patient. Pinning the hop to the token's own patient is what makes it safe, for any
//!   reference parameter.
//! * `_has:X:P:x=v` on a `Patient` search, where `P` is a reference parameter of `X` that can
//!   point to a Patient: the layer counts `X` resources *in the patient's compartment* with
//!   `P=Patient/<patient>` and `x=v` (`x` may be such a chain again), plus the filters of the
//!   token's scope for `X`. Every `X` tested is in the compartment, so the answer is about the
//!   patient's own data.
//!
//! The token must be allowed to search the types tested (`Patient` for chains, `X` for `_has`),
//! with one restriction at most (its filters are added to the test). Everything else is refused
//! with 403: chains into other types (a Practitioner or an Encounter is not the patient's own
//! data, or cannot be limited to the compartment inside the engine), `_has` on other types or
//! nested in a chain or `_has`, and chains or `_has` under a filter-only restriction.
//!
//! Also refused with 403: system search, conditional writes, several restricted scopes for one
//! interaction, and scope filters on anything but type searches.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::json::{self, Json};
use fhir_core::search_param::{SearchParamRegistry, SearchParamType};
use fhir_core::{ResourceId, ResourceType, TenantId, VersionId};
use fhir_search::{Handling, Scope, SearchIndex};
use fhir_store::{ReadResult, Store, StoreError};

use super::{auth_failure, forbidden, pages, remember_pages};
use crate::AppState;
use crate::auth::{Access, Interaction, Principal, Restriction};
use crate::error::ApiError;
use crate::format::{Format, Negotiated, negotiate, read_body};

pub(super) struct OneCtx {
    pub(super) state: AppState,
    pub(super) principal: Principal,
    pub(super) tenant: TenantId,
    pub(super) interaction: Interaction,
    pub(super) resource_type: String,
    pub(super) id: Option<String>,
    pub(super) conditional: bool,
    pub(super) compartment: Option<String>,
}

/// Two different `_id`s at once: criteria no resource can meet, for a search that must come
/// back empty (an id alone could be a real resource's).
const NOTHING: [(&str, &str); 2] = [("_id", "nothing-a"), ("_id", "nothing-b")];

impl OneCtx {
    pub(super) async fn run(self, req: Request, next: Next) -> Response {
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
                if let Err(msg) = chains_allowed(&self.principal, &self.resource_type, &req) {
                    return forbidden(msg);
                }
                if may_include_unreadable(&self.principal, &req) {
                    return self.search_dropping_unreadable_includes(req, next).await;
                }
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
        if self.interaction == I::SearchType {
            return self.search(restriction, req, next).await;
        }
        let limited = matches!(
            self.interaction,
            I::Read
                | I::Vread
                | I::HistoryInstance
                | I::HistoryType
                | I::HistorySystem
                | I::Create
                | I::Update
                | I::Patch
                | I::Delete
        );
        if !limited {
            return forbidden(format!(
                "{} is not available to patient- or filter-restricted tokens",
                self.interaction.as_str()
            ));
        }
        if !restriction.filters.is_empty() {
            return forbidden("scopes with search filters grant searches only on this server");
        }
        let Some(patient) = restriction.patient else {
            return forbidden("restricted scope without a patient context");
        };
        match self.interaction {
            I::HistoryInstance | I::HistoryType | I::HistorySystem => {
                self.history(patient, req, next).await
            }
            _ => self.instance(patient, req, next).await,
        }
    }

    /// An unrestricted search that may `_include`/`_revinclude` resources of types the token
    /// may not read: answered as JSON, those entries dropped, then rendered as asked.
    async fn search_dropping_unreadable_includes(self, req: Request, next: Next) -> Response {
        let (mut parts, body) = req.into_parts();
        let mut params = query_params(parts.uri.query());
        let mut path = parts.uri.path().to_string();
        if parts.method == Method::POST {
            // As in `search`: the form body is more query string, then it is a GET.
            match form_body(&self.state, &parts.headers, body).await {
                Ok(form) => params.extend(form),
                Err(e) => return e.into_response(),
            }
            parts.method = Method::GET;
            parts.headers.remove(header::CONTENT_TYPE);
            parts.headers.remove(header::CONTENT_LENGTH);
            if let Some(p) = path.strip_suffix("/_search") {
                path = p.to_string();
            }
            if let Err(msg) = chains_allowed_in(&self.principal, &self.resource_type, &params) {
                return forbidden(msg);
            }
        }
        let out = match Output::take(&mut params, &parts.headers) {
            Ok(o) => o,
            Err(e) => return e.into_response(),
        };
        if !json_request(&mut parts, &path, &params) {
            return forbidden("cannot restrict this search");
        }
        let resp = next.run(Request::from_parts(parts, Body::empty())).await;
        let (rparts, mut tree) = match ok_tree(resp).await {
            Ok(x) => x,
            Err(resp) => return out.other(resp).await,
        };
        drop_unreadable_includes(&mut tree, &self.principal);
        pages::remember(
            &self.state,
            &self.principal,
            &self.tenant,
            None,
            &tree.to_bytes(),
        );
        out.bundle(rparts, tree)
    }

    /// Type search under a restriction: rewritten to a compartment search with the filters.
    async fn search(self, r: Restriction, req: Request, next: Next) -> Response {
        let Some(rt) = ResourceType::parse(&self.resource_type).filter(|_| {
            self.compartment
                .as_deref()
                .is_none_or(|c| ResourceId::new(c).is_ok())
        }) else {
            return ApiError::UnknownResourceType(self.resource_type.chars().take(64).collect())
                .into_response();
        };
        let (mut parts, body) = req.into_parts();
        let mut params = query_params(parts.uri.query());
        if parts.method == Method::POST {
            // The form body is more query string: after merging, the search is a GET.
            match form_body(&self.state, &parts.headers, body).await {
                Ok(form) => params.extend(form),
                Err(e) => return e.into_response(),
            }
            parts.method = Method::GET;
            parts.headers.remove(header::CONTENT_TYPE);
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let out = match Output::take(&mut params, &parts.headers) {
            Ok(o) => o,
            Err(e) => return e.into_response(),
        };
        let probing = params
            .iter()
            .any(|(k, _)| k.starts_with("_has") || k.contains('.'));
        let mut found_nothing = false;
        if probing {
            let Some(patient) = r.patient.clone() else {
                return out
                    .other(forbidden(
                        "filter-restricted tokens may not use chained parameters or _has",
                    ))
                    .await;
            };
            let state = self.state.clone();
            let tenant = self.tenant.clone();
            let principal = self.principal.clone();
            let planned = tokio::task::spawn_blocking(move || {
                plan_and_check(&state.search, &tenant, &principal, &patient, rt, params)
            })
            .await
            .unwrap_or_else(|e| Err(Refused::Api(ApiError::Internal(format!("{e}")))));
            match planned {
                Ok((p, ok)) => {
                    params = p;
                    found_nothing = !ok;
                }
                Err(Refused::Forbidden(msg)) => return out.other(forbidden(msg)).await,
                Err(Refused::Api(e)) => return out.other(e.into_response()).await,
            }
        }
        params.extend(r.filters.iter().cloned());
        let path = match (&r.patient, &self.compartment) {
            (None, None) => format!("/fhir/{}/{rt}", self.tenant),
            (None, Some(c)) => format!("/fhir/{}/Patient/{c}/{rt}", self.tenant),
            (Some(p), c) => {
                if c.as_ref().is_some_and(|c| c != p) {
                    // Another patient's compartment: as empty as a patient with no data.
                    found_nothing = true;
                }
                if rt.as_str() == "Patient" {
                    params.push(("_id".into(), p.clone()));
                    format!("/fhir/{}/Patient", self.tenant)
                } else {
                    format!("/fhir/{}/Patient/{p}/{rt}", self.tenant)
                }
            }
        };
        if found_nothing {
            params.extend(NOTHING.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        }
        if !json_request(&mut parts, &path, &params) {
            return forbidden("cannot restrict this search");
        }
        let resp = next.run(Request::from_parts(parts, Body::empty())).await;
        let (rparts, mut tree) = match ok_tree(resp).await {
            Ok(x) => x,
            Err(resp) => return out.other(resp).await,
        };
        if let Some(p) = &r.patient {
            drop_foreign_includes(&mut tree, p);
        }
        drop_unreadable_includes(&mut tree, &self.principal);
        pages::remember(
            &self.state,
            &self.principal,
            &self.tenant,
            r.patient,
            &tree.to_bytes(),
        );
        out.bundle(rparts, tree)
    }

    /// Instance, type or system history under a patient restriction: entries outside the
    /// compartment are dropped (module docs).
    async fn history(self, patient: String, req: Request, next: Next) -> Response {
        let (mut parts, body) = req.into_parts();
        let mut params = query_params(parts.uri.query());
        let out = match Output::take(&mut params, &parts.headers) {
            Ok(o) => o,
            Err(e) => return e.into_response(),
        };
        if self.interaction == Interaction::HistoryInstance {
            let (Some(rt), Some(Ok(id))) = (
                ResourceType::parse(&self.resource_type),
                self.id.as_deref().map(ResourceId::new),
            ) else {
                // The handler's 404 or 400: nothing is read.
                return next.run(Request::from_parts(parts, body)).await;
            };
            let store = self.state.store.clone();
            let tenant = self.tenant.clone();
            let (p, i) = (patient.clone(), id.clone());
            let ever = blocking(move || ever_inside(&store, &tenant, rt, &i, &p)).await;
            match ever {
                Ok(true) => {}
                Ok(false) => return out.fail(ApiError::NotFound(format!("{rt}/{id}"))),
                Err(e) => return out.fail(e),
            }
        }
        let path = parts.uri.path().to_string();
        if !json_request(&mut parts, &path, &params) {
            return forbidden("cannot restrict this history");
        }
        let resp = next.run(Request::from_parts(parts, body)).await;
        let (rparts, mut tree) = match ok_tree(resp).await {
            Ok(x) => x,
            Err(resp) => return out.other(resp).await,
        };
        let entries = tree
            .get("entry")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        let store = self.state.store.clone();
        let tenant = self.tenant.clone();
        let keep = blocking(move || {
            entries
                .iter()
                .map(|e| history_entry_inside(&store, &tenant, e, &patient))
                .collect::<Result<Vec<bool>, StoreError>>()
        })
        .await;
        let keep = match keep {
            Ok(k) => k,
            Err(e) => return out.fail(e),
        };
        if let Some(Json::Array(entries)) = tree.as_object_mut().and_then(|m| m.get_mut("entry")) {
            let mut k = keep.into_iter();
            entries.retain(|_| k.next().unwrap_or(false));
        }
        out.bundle(rparts, tree)
    }

    /// An instance interaction or a create under a patient restriction.
    async fn instance(self, patient: String, req: Request, next: Next) -> Response {
        use Interaction as I;
        let Some(rt) = ResourceType::parse(&self.resource_type) else {
            return next.run(req).await; // the handler's 404 for an unknown type
        };
        let mut req = req;
        // The resource as checked, for update, patch and delete: the write must apply to it.
        let mut checked: Option<(VersionId, Vec<u8>)> = None;
        if let Some(id_text) = &self.id {
            let Ok(id) = ResourceId::new(id_text) else {
                return next.run(req).await; // the handler's 400
            };
            // A refusal must look exactly like the handler's 404, format included.
            let params = query_params(req.uri().query());
            let neg = match negotiate(&params, req.headers()) {
                Ok(n) => n,
                Err(e) => return e.into_response(),
            };
            let mut missing = format!("{rt}/{id}");
            let version = if self.interaction == I::Vread {
                let raw = req
                    .uri()
                    .path()
                    .rsplit('/')
                    .next()
                    .and_then(|s| percent_encoding::percent_decode_str(s).decode_utf8().ok())
                    .map(|s| s.into_owned())
                    .unwrap_or_default();
                let Ok(v) = VersionId::parse(&raw) else {
                    return next.run(req).await; // the handler's 400
                };
                missing = format!("{rt}/{id}/_history/{raw}");
                Some(v)
            } else {
                None
            };
            let store = self.state.store.clone();
            let tenant = self.tenant.clone();
            let p = patient.clone();
            let found = blocking(move || {
                let r = match version {
                    Some(v) => store.vread(&tenant, rt, &id, v)?,
                    None => store.read(&tenant, rt, &id)?,
                };
                Ok(match r {
                    ReadResult::Found(r) => {
                        let inside = in_compartment(&r.json, &p);
                        Target::Found(inside, r.version, r.json)
                    }
                    ReadResult::Deleted { version, .. } => {
                        Target::Deleted(before_inside(&store, &tenant, rt, &id, version, &p)?)
                    }
                    ReadResult::NotFound => Target::Missing,
                })
            })
            .await;
            let found = match found {
                Ok(f) => f,
                Err(e) => return e.into_response_as(neg.format, neg.pretty),
            };
            let allowed = match (&found, self.interaction) {
                (Target::Found(inside, ..), _) => *inside,
                // The deletion of this patient's resource is theirs to see (410).
                (Target::Deleted(inside), I::Read | I::Vread) => *inside,
                // An update may create a resource at a new id (its body is checked below).
                (Target::Missing, I::Update) => true,
                _ => false,
            };
            if !allowed {
                return ApiError::NotFound(missing).into_response_as(neg.format, neg.pretty);
            }
            if let Target::Found(_, v, json) = found
                && matches!(self.interaction, I::Update | I::Patch | I::Delete)
            {
                if let Err(e) = pin_version(&mut req, v) {
                    return e.into_response_as(neg.format, neg.pretty);
                }
                checked = Some((v, json));
            }
        }
        match self.interaction {
            I::Create | I::Update => self.body_stays(patient, req, next).await,
            I::Patch => {
                let Some((_, current)) = checked else {
                    return forbidden("cannot check this patch");
                };
                self.patch_stays(patient, &current, req, next).await
            }
            _ => next.run(req).await,
        }
    }

    /// Create and update: the new content must be in the compartment.
    async fn body_stays(&self, patient: String, req: Request, next: Next) -> Response {
        let (parts, body) = req.into_parts();
        let bytes = match read_body(body, &parts.headers, self.state.config.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let xml = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(Format::from_mime)
            == Some(Format::Xml);
        let tree = if xml {
            fhir_core::xml::from_xml(&bytes).ok()
        } else {
            json::parse(&bytes).ok()
        };
        let tree = tree.map(|mut t| {
            // A create gets a new id from the server: the body's own (a Patient's way into
            // its own compartment) must not count.
            if self.interaction == Interaction::Create
                && let Some(m) = t.as_object_mut()
            {
                m.remove("id");
            }
            t
        });
        if !tree.is_some_and(|t| tree_in_compartment(&t, &patient)) {
            return forbidden(format!(
                "the resource must stay in the compartment of Patient/{patient}"
            ));
        }
        next.run(Request::from_parts(parts, Body::from(bytes)))
            .await
    }

    /// PATCH: the patch is applied here to the version that was checked (the store applies it
    /// to the same version, pinned by `If-Match`), and the result must stay in the compartment.
    async fn patch_stays(
        &self,
        patient: String,
        current: &[u8],
        req: Request,
        next: Next,
    ) -> Response {
        let (parts, body) = req.into_parts();
        let ct = parts
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
        if essence != "application/json-patch+json" {
            // Only a JSON Patch can be checked here; say what the handler would say.
            return ApiError::UnsupportedMediaType(format!(
                "PATCH takes a JSON Patch with Content-Type application/json-patch+json, not '{}'",
                ct.chars().take(100).collect::<String>()
            ))
            .into_response();
        }
        let bytes = match read_body(body, &parts.headers, self.state.config.max_body_bytes).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let result = json::parse(&bytes)
            .ok()
            .zip(json::parse(current).ok())
            .map(|(patch, doc)| fhir_core::patch::apply(&doc, &patch));
        match result {
            Some(Ok(patched)) if !tree_in_compartment(&patched, &patient) => {
                return forbidden(format!(
                    "the patched resource must stay in the compartment of Patient/{patient}"
                ));
            }
            // A patch that does not parse or apply fails the same way in the store, on the same
            // version: its error is the handler's to report, and nothing is written.
            _ => {}
        }
        next.run(Request::from_parts(parts, Body::from(bytes)))
            .await
    }
}

/// What the store holds at an instance interaction's address.
enum Target {
    /// A version: whether it is in the compartment, its version and JSON.
    Found(bool, VersionId, Vec<u8>),
    /// A deletion: whether the version it deleted was in the compartment.
    Deleted(bool),
    Missing,
}

/// Sends the write on with `If-Match` on the checked version. A client's own `If-Match` must
/// name that version (else it fails now, as the store would have failed it).
fn pin_version(req: &mut Request, v: VersionId) -> Result<(), ApiError> {
    if let Some(asked) = req.headers().get(header::IF_MATCH) {
        let asked = asked.to_str().ok().map(VersionId::parse);
        match asked {
            Some(Ok(a)) if a == v => return Ok(()),
            Some(Ok(a)) => {
                return Err(ApiError::from(StoreError::VersionConflict {
                    expected: a,
                    actual: Some(v),
                }));
            }
            // Malformed: the handler's 400.
            _ => return Ok(()),
        }
    }
    match HeaderValue::from_str(&v.etag()) {
        Ok(h) => {
            req.headers_mut().insert(header::IF_MATCH, h);
            Ok(())
        }
        Err(_) => Err(ApiError::Internal("cannot pin the checked version".into())),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}

/// Whether version `deleted - 1` (the one a deletion removed) is in the compartment.
fn before_inside(
    store: &Store,
    tenant: &TenantId,
    rt: ResourceType,
    id: &ResourceId,
    deleted: VersionId,
    patient: &str,
) -> Result<bool, StoreError> {
    if deleted.0 <= 1 {
        return Ok(false);
    }
    version_inside(store, tenant, rt, id, VersionId(deleted.0 - 1), patient)
}

fn version_inside(
    store: &Store,
    tenant: &TenantId,
    rt: ResourceType,
    id: &ResourceId,
    v: VersionId,
    patient: &str,
) -> Result<bool, StoreError> {
    Ok(match store.vread(tenant, rt, id, v)? {
        ReadResult::Found(r) => in_compartment(&r.json, patient),
        _ => false,
    })
}

/// Whether any version of the resource was in the compartment (newest first: usually the
/// current one is, and the walk stops there).
fn ever_inside(
    store: &Store,
    tenant: &TenantId,
    rt: ResourceType,
    id: &ResourceId,
    patient: &str,
) -> Result<bool, StoreError> {
    let older = match store.read(tenant, rt, id)? {
        ReadResult::Found(r) if in_compartment(&r.json, patient) => return Ok(true),
        ReadResult::Found(r) => r.version.0,
        ReadResult::Deleted { version, .. } => version.0,
        ReadResult::NotFound => return Ok(false),
    };
    for v in (1..older).rev() {
        if version_inside(store, tenant, rt, id, VersionId(v), patient)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a history Bundle entry stays (module docs: deletions follow the version they
/// deleted).
fn history_entry_inside(
    store: &Store,
    tenant: &TenantId,
    entry: &Json,
    patient: &str,
) -> Result<bool, StoreError> {
    if let Some(r) = entry.get("resource") {
        return Ok(tree_in_compartment(r, patient));
    }
    let request = entry.get("request");
    if request.and_then(|r| r.get("method")).and_then(Json::as_str) != Some("DELETE") {
        return Ok(false);
    }
    let url = request
        .and_then(|r| r.get("url"))
        .and_then(Json::as_str)
        .unwrap_or_default();
    let version = entry
        .get("response")
        .and_then(|r| r.get("etag"))
        .and_then(Json::as_str)
        .and_then(|e| VersionId::parse(e).ok());
    let (Some((t, id)), Some(v)) = (url.split_once('/'), version) else {
        return Ok(false);
    };
    let (Some(rt), Ok(id)) = (ResourceType::parse(t), ResourceId::new(id)) else {
        return Ok(false);
    };
    before_inside(store, tenant, rt, &id, v, patient)
}

/// Whether the JSON resource in `bytes` is in `patient`'s compartment.
pub(super) fn in_compartment(bytes: &[u8], patient: &str) -> bool {
    json::parse(bytes).is_ok_and(|t| tree_in_compartment(&t, patient))
}

/// Whether the resource `tree` is in `patient`'s compartment.
pub(super) fn tree_in_compartment(tree: &Json, patient: &str) -> bool {
    tree.as_object().is_some_and(|m| {
        SearchParamRegistry::r4()
            .patient_compartment(m)
            .iter()
            .any(|p| p == patient)
    })
}

/// Chained parameters and `_has` test resources of other types than the one searched (a
/// `user/Observation.rs` token could probe Patient names with `subject:Patient.name=…`), so an
/// unrestricted search needs an unrestricted search scope on every type they test: explicit
/// chain types, else every target type of the reference parameter, hop by hop, and the type of
/// each `_has`. A parameter this check cannot follow needs a `*` search scope. (Parameters of a
/// `POST _search` form body are checked after the body is merged, in
/// `search_dropping_unreadable_includes`.)
fn chains_allowed(principal: &Principal, resource_type: &str, req: &Request) -> Result<(), String> {
    chains_allowed_in(principal, resource_type, &query_params(req.uri().query()))
}

/// Whether the token searches every type without restriction (`*` scopes with `s`).
fn searches_every_type(principal: &Principal) -> bool {
    principal.access(Interaction::SearchType, "*") == Access::Unrestricted
}

/// [`chains_allowed`] for decoded parameters (a query string merged with a form body).
fn chains_allowed_in(
    principal: &Principal,
    resource_type: &str,
    params: &[(String, String)],
) -> Result<(), String> {
    if searches_every_type(principal) {
        return Ok(());
    }
    let Some(base) = ResourceType::parse(resource_type) else {
        return Ok(()); // the handler's 404
    };
    for (k, _) in params {
        let mut types = Vec::new();
        if !tested_types(base, k, &mut types, 0) {
            return Err(format!(
                "the chain or _has '{}' cannot be checked against the token's scopes; it needs \
                 a search scope for all types",
                clip(k)
            ));
        }
        if let Some(t) = types
            .iter()
            .find(|t| principal.access(Interaction::SearchType, t.as_str()) != Access::Unrestricted)
        {
            return Err(format!(
                "'{}' searches {t} resources, which the token may not search",
                clip(k)
            ));
        }
    }
    Ok(())
}

/// Adds to `out` the types that parameter `key` of a search of `base` tests besides `base`;
/// `false` when it cannot tell.
fn tested_types(base: ResourceType, key: &str, out: &mut Vec<String>, depth: usize) -> bool {
    if depth > 8 {
        return false;
    }
    if let Some(rest) = key.strip_prefix("_has:") {
        // _has:X:ref:param — X resources are tested, and `param` may chain on from X.
        let mut parts = rest.splitn(3, ':');
        let (Some(x), Some(_), Some(param)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let Some(x) = ResourceType::parse(x) else {
            return false;
        };
        out.push(x.as_str().to_string());
        return tested_types(x, param, out, depth + 1);
    }
    let Some((first, rest)) = key.split_once('.') else {
        return true; // not a chain
    };
    let (code, explicit) = match first.split_once(':') {
        Some((c, t)) => (c, Some(t)),
        None => (first, None),
    };
    let targets: Vec<String> = match explicit {
        Some(t) => vec![t.to_string()],
        None => match SearchParamRegistry::r4().get(base, code) {
            Some(p) if p.kind == SearchParamType::Reference && !p.targets.is_empty() => {
                p.targets.clone()
            }
            _ => return false,
        },
    };
    for t in targets {
        let Some(tt) = ResourceType::parse(&t) else {
            return false;
        };
        if !out.contains(&t) {
            out.push(t);
        }
        if !tested_types(tt, rest, out, depth + 1) {
            return false;
        }
    }
    true
}

/// Whether the token reads every type without restriction (`*` scopes with `r`), so that no
/// `_include`/`_revinclude` result needs to be looked at.
pub(super) fn reads_every_type(principal: &Principal) -> bool {
    principal.access(Interaction::Read, "*") == Access::Unrestricted
}

/// Whether an unrestricted search could return included resources the token may not read: it
/// asks for `_include`/`_revinclude` (or is a POST, whose form body is not read here) and the
/// token does not read every type.
fn may_include_unreadable(principal: &Principal, req: &Request) -> bool {
    if req.method() == Method::POST {
        // The form body may hold includes, chains or `_has`: read it there.
        return !(reads_every_type(principal) && searches_every_type(principal));
    }
    if reads_every_type(principal) {
        return false;
    }
    query_params(req.uri().query())
        .iter()
        .any(|(k, _)| k.starts_with("_include") || k.starts_with("_revinclude"))
}

/// Drops `include` entries of a searchset page that the token may not read: included resources
/// are returned by the search of another type, so the search scope does not cover them (as in
/// HAPI FHIR's SMART authorisation, every returned resource needs read rights). A type read
/// under a patient restriction keeps only that patient's resources.
pub(super) fn drop_unreadable_includes(tree: &mut Json, principal: &Principal) {
    if reads_every_type(principal) {
        return;
    }
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
            let Some(r) = e.get("resource") else {
                return false;
            };
            let ty = r.get("resourceType").and_then(Json::as_str).unwrap_or("");
            match principal.access(Interaction::Read, ty) {
                Access::Unrestricted => true,
                Access::Denied => false,
                Access::Restricted(list) => list.iter().any(|x| {
                    x.filters.is_empty()
                        && x.patient
                            .as_deref()
                            .is_some_and(|p| tree_in_compartment(r, p))
                }),
            }
        });
    }
}

/// Drops `include` entries outside the compartment from a searchset page.
pub(super) fn drop_foreign_includes(tree: &mut Json, patient: &str) {
    if let Some(Json::Array(entries)) = tree.as_object_mut().and_then(|m| m.get_mut("entry")) {
        entries.retain(|e| {
            let include = e
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Json::as_str)
                == Some("include");
            !include
                || e.get("resource")
                    .is_some_and(|r| tree_in_compartment(r, patient))
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Requests and responses the layer reads as JSON

/// Decoded query parameters, in order.
pub(super) fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

/// Points the request at `path?params` and asks for JSON. `false` if that is not a valid URI.
pub(super) fn json_request(
    parts: &mut axum::http::request::Parts,
    path: &str,
    params: &[(String, String)],
) -> bool {
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params.iter())
        .finish();
    let uri = if q.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{q}")
    };
    let Ok(uri) = uri.parse() else {
        return false;
    };
    parts.uri = uri;
    parts.headers.insert(
        header::ACCEPT,
        HeaderValue::from_static("application/fhir+json"),
    );
    true
}

/// The parameters of a `POST _search` form body (read like the search handler reads it).
async fn form_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Vec<(String, String)>, ApiError> {
    let bytes = read_body(body, headers, state.config.max_body_bytes).await?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let ct = headers
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
            "POST _search takes its parameters as application/x-www-form-urlencoded, not '{}'",
            ct.chars().take(100).collect::<String>()
        )));
    }
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

/// A 200 JSON response as a tree; any other response is handed back as it is.
pub(super) async fn ok_tree(
    resp: Response,
) -> Result<(axum::http::response::Parts, Json), Response> {
    if resp.status() != StatusCode::OK {
        return Err(resp);
    }
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Err(ApiError::Internal("cannot read the result".into()).into_response());
    };
    match json::parse(&bytes) {
        Ok(tree) => Ok((parts, tree)),
        // Never hand on what could not be filtered.
        Err(_) => Err(forbidden(
            "restricted tokens get filtered JSON results only",
        )),
    }
}

/// What the client asked to get back, for a request the layer has answered in JSON so that it
/// can filter the result.
pub(super) struct Output {
    neg: Negotiated,
    /// `_format` as the client gave it, for the Bundle's links.
    format: Option<String>,
}

impl Output {
    /// Negotiates as the handlers do (`_format`, then `Accept`), then takes `_format` out of
    /// `params` so that the handler answers JSON. `_pretty` stays: it is valid JSON too.
    pub(super) fn take(
        params: &mut Vec<(String, String)>,
        headers: &HeaderMap,
    ) -> Result<Output, ApiError> {
        let neg = negotiate(params, headers)?;
        let format = params
            .iter()
            .find(|(k, _)| k == "_format")
            .map(|(_, v)| v.clone());
        params.retain(|(k, _)| k != "_format");
        Ok(Output { neg, format })
    }

    /// An error in the client's format.
    fn fail(&self, e: ApiError) -> Response {
        e.into_response_as(self.neg.format, self.neg.pretty)
    }

    /// A filtered Bundle in the client's format, with `_format` in its links again.
    pub(super) fn bundle(
        &self,
        mut parts: axum::http::response::Parts,
        mut tree: Json,
    ) -> Response {
        if let Some(f) = &self.format
            && let Some(Json::Array(links)) = tree.as_object_mut().and_then(|m| m.get_mut("link"))
        {
            let extra = form_urlencoded::Serializer::new(String::new())
                .append_pair("_format", f)
                .finish();
            for l in links.iter_mut() {
                if let Some(Json::String(url)) = l.as_object_mut().and_then(|m| m.get_mut("url")) {
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str(&extra);
                }
            }
        }
        let bytes = match (self.neg.format, self.neg.pretty) {
            (Format::Json, false) => tree.to_bytes(),
            (Format::Json, true) => tree.to_pretty_bytes(),
            (Format::Xml, pretty) => match fhir_core::xml::to_xml(&tree, pretty) {
                Ok(b) => b,
                Err(e) => return ApiError::Internal(e.to_string()).into_response(),
            },
        };
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.neg.format.content_type()),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        Response::from_parts(parts, Body::from(bytes))
    }

    /// Any other (JSON) response, e.g. an OperationOutcome, in the client's format.
    pub(super) async fn other(&self, resp: Response) -> Response {
        let json = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        if self.neg.format != Format::Xml || !json {
            return resp;
        }
        let (mut parts, body) = resp.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
            return ApiError::Internal("cannot read the response".into()).into_response();
        };
        match fhir_core::xml::json_bytes_to_xml(&bytes, self.neg.pretty) {
            Ok(xml) => {
                parts.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(Format::Xml.content_type()),
                );
                parts.headers.remove(header::CONTENT_LENGTH);
                Response::from_parts(parts, Body::from(xml))
            }
            Err(_) => Response::from_parts(parts, Body::from(bytes)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chains and `_has` (module docs)

/// Why a restricted search with chains or `_has` is not run.
enum Refused {
    /// 403 with this message.
    Forbidden(String),
    /// The error of one of the layer's own searches (e.g. a 400 for a bad value).
    Api(ApiError),
}

/// A search the layer runs itself: it must match something.
struct Check {
    scope: Scope,
    params: Vec<(String, String)>,
}

/// Rewrites the chains and `_has` of a patient-restricted search of `ty` (module docs) and
/// runs the searches they stand for. Returns the parameters for the engine (no chain, no
/// `_has`) and whether every check found something.
fn plan_and_check(
    index: &SearchIndex,
    tenant: &TenantId,
    principal: &Principal,
    patient: &str,
    ty: ResourceType,
    params: Vec<(String, String)>,
) -> Result<(Vec<(String, String)>, bool), Refused> {
    let reg = index
        .registry(tenant)
        .map_err(|e| Refused::Api(ApiError::from(e)))?;
    let patient_id = ResourceId::new(patient)
        .map_err(|_| Refused::Forbidden("the patient context is not a Patient id".into()))?;
    let mut planner = Planner {
        reg: &reg,
        principal,
        patient,
        patient_id,
        on_patient: Vec::new(),
        checks: Vec::new(),
    };
    let mut out = Vec::with_capacity(params.len());
    for (k, v) in params {
        if let Some(p) = planner.top(ty, &k, &v).map_err(Refused::Forbidden)? {
            out.push(p);
        }
    }
    let mut checks = std::mem::take(&mut planner.checks);
    if !planner.on_patient.is_empty() {
        let mut params = vec![("_id".to_string(), patient.to_string())];
        params.append(&mut planner.on_patient);
        params.extend(planner.filters_for("Patient").map_err(Refused::Forbidden)?);
        checks.push(Check {
            scope: Scope::Type(
                ResourceType::parse("Patient")
                    .ok_or_else(|| Refused::Forbidden("no Patient type".into()))?,
            ),
            params,
        });
    }
    for c in checks {
        let mut params = c.params;
        params.push(("_summary".into(), "count".into()));
        let found = index
            .parse(tenant, &c.scope, &params, Handling::Strict)
            .and_then(|req| index.search(tenant, &req))
            .map_err(|e| Refused::Api(ApiError::from(e)))?;
        if found.total.unwrap_or(0) == 0 {
            return Ok((out, false));
        }
    }
    Ok((out, true))
}

struct Planner<'a> {
    reg: &'a SearchParamRegistry,
    principal: &'a Principal,
    patient: &'a str,
    patient_id: ResourceId,
    /// Criteria the patient in context must meet (from chain hops into `Patient`).
    on_patient: Vec<(String, String)>,
    /// `_has` tests.
    checks: Vec<Check>,
}

impl Planner<'_> {
    /// One parameter of the restricted search: kept, rewritten, or (a `_has`) turned into a
    /// check.
    fn top(
        &mut self,
        ty: ResourceType,
        name: &str,
        value: &str,
    ) -> Result<Option<(String, String)>, String> {
        if let Some(rest) = name.strip_prefix("_has:") {
            if ty.as_str() != "Patient" {
                return Err(format!(
                    "restricted tokens may use _has on Patient searches only, not on {ty}"
                ));
            }
            self.has(rest, value)?;
            return Ok(None);
        }
        if name.starts_with("_has") {
            return Err("malformed _has parameter".into());
        }
        if name.contains('.') {
            return self.chain(ty, name, value).map(Some);
        }
        Ok(Some((name.to_string(), value.to_string())))
    }

    /// `_has:X:P:x=v` on the patient: some `X` in the compartment with `P` = the patient and
    /// `x=v`.
    fn has(&mut self, rest: &str, value: &str) -> Result<(), String> {
        let mut parts = rest.splitn(3, ':');
        let (Some(src), Some(code), Some(inner)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err("expected _has:Type:referenceParameter:parameter".into());
        };
        let Some(x) = ResourceType::parse(src) else {
            return Err(format!("'{}' is not a resource type", clip(src)));
        };
        self.to_patient(x, code)?;
        let inner = self.plain_or_chain(x, inner, value)?;
        let mut params = vec![
            (code.to_string(), format!("Patient/{}", self.patient)),
            inner,
        ];
        params.extend(self.filters_for(x.as_str())?);
        self.checks.push(Check {
            scope: Scope::Compartment {
                patient: self.patient_id.clone(),
                resource_type: x,
            },
            params,
        });
        Ok(())
    }

    /// `P[:Patient].rest=v` on `ty`: becomes `P=Patient/<patient>`, and the patient must meet
    /// `rest=v`.
    fn chain(
        &mut self,
        ty: ResourceType,
        name: &str,
        value: &str,
    ) -> Result<(String, String), String> {
        let Some((left, rest)) = name.split_once('.') else {
            return Err("not a chain".into());
        };
        let (code, modifier) = match left.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (left, None),
        };
        let targets = self.to_patient(ty, code)?;
        let inner_code = base_code(rest);
        let into_patient_only = match modifier {
            Some(m) => m == "Patient",
            // The engine follows every target type that has the parameter: all must be Patient.
            None => {
                inner_code != "_has"
                    && targets
                        .iter()
                        .filter_map(|t| ResourceType::parse(t))
                        .filter(|t| self.reg.get(*t, inner_code).is_some())
                        .all(|t| t.as_str() == "Patient")
            }
        };
        if !into_patient_only {
            return Err(format!(
                "restricted tokens may chain into Patient only ('{}'); name the type as {code}:Patient.",
                clip(name)
            ));
        }
        let cond = self.plain_or_chain(self.patient_type()?, rest, value)?;
        self.on_patient.push(cond);
        Ok((code.to_string(), format!("Patient/{}", self.patient)))
    }

    /// A parameter tested on the patient (after a chain hop) or on `X` (inside `_has`).
    fn plain_or_chain(
        &mut self,
        ty: ResourceType,
        name: &str,
        value: &str,
    ) -> Result<(String, String), String> {
        if name.starts_with("_has") {
            return Err("restricted tokens may not nest _has in a chain or _has".into());
        }
        if name.contains('.') {
            return self.chain(ty, name, value);
        }
        let code = name.split(':').next().unwrap_or_default();
        if self.reg.get(ty, code).is_none() {
            return Err(format!("{ty} has no search parameter '{}'", clip(code)));
        }
        Ok((name.to_string(), value.to_string()))
    }

    /// The targets of `ty`'s reference parameter `code`, which must include Patient.
    fn to_patient(&self, ty: ResourceType, code: &str) -> Result<Vec<String>, String> {
        match self.reg.get(ty, code) {
            Some(p) if p.kind == SearchParamType::Reference => {
                if p.targets.iter().any(|t| t == "Patient") {
                    Ok(p.targets.clone())
                } else {
                    Err(format!(
                        "{ty}.{} does not refer to a Patient; restricted tokens may follow references to their patient only",
                        clip(code)
                    ))
                }
            }
            _ => Err(format!("{ty} has no reference parameter '{}'", clip(code))),
        }
    }

    fn patient_type(&self) -> Result<ResourceType, String> {
        ResourceType::parse("Patient").ok_or_else(|| "no Patient type".to_string())
    }

    /// The filters the token's scope puts on searches of `ty` (which it must be allowed).
    fn filters_for(&self, ty: &str) -> Result<Vec<(String, String)>, String> {
        match self.principal.access(Interaction::SearchType, ty) {
            Access::Unrestricted => Ok(Vec::new()),
            Access::Restricted(list) => match list.as_slice() {
                [r] if r.patient.as_deref().is_none_or(|p| p == self.patient) => {
                    Ok(r.filters.clone())
                }
                _ => Err(format!(
                    "the token grants several restricted scopes for searching {ty}"
                )),
            },
            Access::Denied => Err(format!(
                "the token may not search {ty}, which the chain or _has tests"
            )),
        }
    }
}

/// The base code of a parameter name, as the engine reads it (before a modifier or chain).
fn base_code(name: &str) -> &str {
    if name.starts_with("_has:") {
        return "_has";
    }
    let end = name.find([':', '.']).unwrap_or(name.len());
    &name[..end]
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
