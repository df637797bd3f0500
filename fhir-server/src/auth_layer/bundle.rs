//! `batch`/`transaction` Bundles under auth: scopes per entry (module docs of
//! [`crate::auth_layer`], point 6).
//!
//! An entry allowed by an unrestricted scope goes through as it is. Entries that search — a
//! conditional entry (`ifNoneExist`, `PUT`/`DELETE Type?…`) or one whose resource holds a
//! conditional reference (`Patient?identifier=…`) — also need an unrestricted search scope on
//! each type they search, since the outcome (no match, one, several) tells what exists. Under a patient
//! restriction (a `patient/` scope, no filters) the write entries follow the rules of the single
//! interactions (see `restricted.rs`): a create must put its resource in the compartment; an
//! update, patch or delete needs the current resource in the compartment (else the entry is the
//! 404 of a missing resource), and an update or patch must keep it there (403). The checked
//! version is written into the entry's `request.ifMatch` (`ifNoneMatch: *` for an update that
//! creates), so the Bundle processor fails the entry if the resource changed after the check.
//! Read, search and history entries, conditional entries and entries under filter restrictions
//! are refused (403): their results could not be limited inside the Bundle.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use fhir_core::json::{self, Json};
use fhir_core::{Issue, IssueType, ResourceId, ResourceType, TenantId, VersionId};
use fhir_store::{ReadResult, Store, StoreError};

use super::restricted::tree_in_compartment;
use super::{Op, classify, forbidden};
use crate::AppState;
use crate::auth::{Access, Interaction, Principal};
use crate::error::ApiError;
use crate::format::read_body;

const DENIED: &str = "the token does not allow this entry's interaction";

/// What becomes of one entry.
enum Verdict {
    /// Sent on as it is.
    Allowed,
    /// Sent on with the precondition of the version that was checked.
    Pinned(Pin),
    /// Answered here.
    Refused(StatusCode, IssueType, String),
}

enum Pin {
    /// `request.ifMatch`: the version checked.
    Version(VersionId),
    /// `request.ifNoneMatch: *`: the resource did not exist.
    Absent,
}

/// A write entry under a patient restriction, to be checked against the store.
struct Pending {
    interaction: Interaction,
    resource_type: String,
    id: Option<String>,
    patient: String,
    entry: Json,
}

/// `POST /fhir/{t}` under auth: see the module docs.
pub(super) async fn bundle(
    state: AppState,
    principal: Principal,
    tenant: TenantId,
    req: Request,
    next: Next,
) -> Response {
    let (mut parts, body) = req.into_parts();
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
    let Some(mut tree) = tree else {
        return next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
    };
    let empty = Vec::new();
    let entries = tree.get("entry").and_then(Json::as_array).unwrap_or(&empty);
    let mut verdicts: Vec<Verdict> = Vec::with_capacity(entries.len());
    let mut pending: Vec<(usize, Pending)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        match first_pass(&principal, e) {
            Ok(v) => verdicts.push(v),
            Err(p) => {
                verdicts.push(Verdict::Allowed); // replaced below
                pending.push((i, p));
            }
        }
    }
    if !pending.is_empty() {
        let store = state.store.clone();
        let t = tenant.clone();
        let checked = tokio::task::spawn_blocking(move || {
            pending
                .into_iter()
                .map(|(i, p)| check_entry(&store, &t, &p).map(|v| (i, v)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await;
        match checked {
            Ok(Ok(list)) => {
                for (i, v) in list {
                    verdicts[i] = v;
                }
            }
            Ok(Err(e)) => return ApiError::from(e).into_response(),
            Err(e) => {
                return ApiError::Internal(format!("bundle check failed: {e}")).into_response();
            }
        }
    }
    let pinned = verdicts.iter().any(|v| matches!(v, Verdict::Pinned(_)));
    if pinned
        && let Some(Json::Array(entries)) = tree.as_object_mut().and_then(|m| m.get_mut("entry"))
    {
        for (e, v) in entries.iter_mut().zip(&verdicts) {
            if let (Verdict::Pinned(pin), Some(Json::Object(r))) =
                (v, e.as_object_mut().and_then(|m| m.get_mut("request")))
            {
                match pin {
                    Pin::Version(v) => {
                        r.remove("ifNoneMatch");
                        r.insert("ifMatch", Json::str(v.etag()));
                    }
                    Pin::Absent => r.insert("ifNoneMatch", Json::str("*")),
                }
            }
        }
    }
    let refused: Vec<(usize, StatusCode, IssueType, String)> = verdicts
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| match v {
            Verdict::Refused(s, c, m) => Some((i, s, c, m)),
            _ => None,
        })
        .collect();
    if refused.is_empty() {
        if !pinned {
            return next
                .run(Request::from_parts(parts, Body::from(bytes)))
                .await;
        }
        // The pins are in the tree: send it (as JSON) instead of the client's bytes.
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json"),
        );
        parts.headers.remove(header::CONTENT_LENGTH);
        return next
            .run(Request::from_parts(parts, Body::from(tree.to_bytes())))
            .await;
    }
    let is_batch = tree.get("type").and_then(Json::as_str) == Some("batch");
    if !is_batch {
        // A transaction is all or nothing: one refused entry refuses it all.
        if refused.iter().all(|r| r.1 == StatusCode::FORBIDDEN) {
            let list: Vec<String> = refused.iter().take(20).map(|r| r.0.to_string()).collect();
            return forbidden(format!(
                "the token does not allow Bundle entries {} (with a patient or filter \
                 restriction, only writes that stay in the compartment)",
                list.join(", ")
            ));
        }
        let (i, status, code, msg) = refused
            .into_iter()
            .find(|r| r.1 != StatusCode::FORBIDDEN)
            .unwrap_or((
                0,
                StatusCode::FORBIDDEN,
                IssueType::Forbidden,
                String::new(),
            ));
        return ApiError::Outcome {
            status,
            issues: vec![Issue::error(code, format!("entry {i}: {msg}"))],
        }
        .into_response();
    }
    batch_without(tree, refused, parts, next).await
}

/// The verdict an entry gets without looking at the store, or the check it needs.
fn first_pass(principal: &Principal, e: &Json) -> Result<Verdict, Pending> {
    let denied = || Verdict::Refused(StatusCode::FORBIDDEN, IssueType::Forbidden, DENIED.into());
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
        return Ok(Verdict::Allowed); // the bundle processor refuses it
    };
    let conditional = request.and_then(|r| r.get("ifNoneExist")).is_some();
    let Op::One {
        interaction,
        resource_type,
        id,
        conditional,
        ..
    } = classify(&m, &segs, conditional)
    else {
        return Ok(denied());
    };
    // The access log is written by the server only.
    if resource_type == "AuditEvent" && method != "GET" {
        return Ok(denied());
    }
    let a = principal.access(interaction, &resource_type);
    // Conditional entries search too (see `OneCtx::run`), and so does every conditional
    // reference in the entry's resource (`Patient?identifier=…`): the Bundle processor resolves
    // it by a search, whose outcome (none, one, several) a token without search rights on that
    // type must not learn.
    let mut search_types = conditional_reference_types(e.get("resource"));
    if conditional || !query.is_empty() && method != "GET" {
        search_types.push(resource_type.clone());
    }
    let searches = !search_types.is_empty();
    let search_ok = search_types
        .iter()
        .all(|t| principal.access(Interaction::SearchType, t) == Access::Unrestricted);
    if a == Access::Unrestricted {
        return Ok(if search_ok {
            Verdict::Allowed
        } else {
            denied()
        });
    }
    let writes = matches!(
        interaction,
        Interaction::Create | Interaction::Update | Interaction::Patch | Interaction::Delete
    );
    match a {
        Access::Restricted(list) if writes && !searches => match list.as_slice() {
            [r] if r.filters.is_empty() => match &r.patient {
                Some(p) => Err(Pending {
                    interaction,
                    resource_type,
                    id,
                    patient: p.clone(),
                    entry: e.clone(),
                }),
                None => Ok(denied()),
            },
            _ => Ok(denied()),
        },
        _ => Ok(denied()),
    }
}

/// The types that the conditional references (`Type?query`) in `resource` search, as the
/// Bundle processor recognises them.
fn conditional_reference_types(resource: Option<&Json>) -> Vec<String> {
    let Some(resource) = resource else {
        return Vec::new();
    };
    let mut tree = resource.clone();
    let mut types: Vec<String> = Vec::new();
    fhir_core::references::visit_references_mut(&mut tree, &mut |kind, s| {
        if kind != fhir_core::references::RefKind::Reference {
            return;
        }
        if let Some((ty, _)) = s.split_once('?')
            && ResourceType::parse(ty).is_some()
            && !types.iter().any(|t| t == ty)
        {
            types.push(ty.to_string());
        }
    });
    types
}

/// The rules of the single interaction, for one write entry under a patient restriction.
fn check_entry(store: &Store, tenant: &TenantId, p: &Pending) -> Result<Verdict, StoreError> {
    let outside = || {
        Verdict::Refused(
            StatusCode::FORBIDDEN,
            IssueType::Forbidden,
            format!(
                "the resource must stay in the compartment of Patient/{}",
                p.patient
            ),
        )
    };
    let resource = p.entry.get("resource");
    let Some(rt) = ResourceType::parse(&p.resource_type) else {
        return Ok(Verdict::Allowed); // the processor refuses an unknown type
    };
    if p.interaction == Interaction::Create {
        // The server gives a created resource a new id: the body's own id (a Patient's way
        // into its own compartment) must not count.
        let mut body = resource.cloned().unwrap_or(Json::Null);
        if let Some(m) = body.as_object_mut() {
            m.remove("id");
        }
        return Ok(if tree_in_compartment(&body, &p.patient) {
            Verdict::Allowed
        } else {
            outside()
        });
    }
    let id_text = p.id.as_deref().unwrap_or_default();
    let Ok(id) = ResourceId::new(id_text) else {
        return Ok(Verdict::Allowed); // the processor refuses a malformed id
    };
    let missing = || {
        Verdict::Refused(
            StatusCode::NOT_FOUND,
            IssueType::NotFound,
            format!("{rt}/{id_text} is not known"),
        )
    };
    let conflict =
        |msg: String| Verdict::Refused(StatusCode::PRECONDITION_FAILED, IssueType::Conflict, msg);
    let request = p.entry.get("request");
    let asked = |k: &str| request.and_then(|r| r.get(k)).and_then(Json::as_str);
    let current = match store.read(tenant, rt, &id)? {
        ReadResult::Found(r) if super::restricted::in_compartment(&r.json, &p.patient) => r,
        ReadResult::NotFound if p.interaction == Interaction::Update => {
            // An update that creates: the body decides, and the id must still be free.
            if let Some(m) = asked("ifMatch") {
                return Ok(conflict(format!(
                    "version conflict: ifMatch asked for {m} but the resource does not exist"
                )));
            }
            return Ok(match resource {
                Some(r) if tree_in_compartment(r, &p.patient) => Verdict::Pinned(Pin::Absent),
                _ => outside(),
            });
        }
        _ => return Ok(missing()),
    };
    if let Some(m) = asked("ifMatch")
        && VersionId::parse(m).ok() != Some(current.version)
    {
        return Ok(conflict(format!(
            "version conflict: ifMatch asked for {m} but the current version is {}",
            current.version
        )));
    }
    // The processor lets `ifNoneMatch` take the place of `ifMatch` on an update: decide it
    // here against the version checked, so that the pin replaces it.
    if p.interaction == Interaction::Update
        && let Some(m) = asked("ifNoneMatch")
        && (m == "*" || VersionId::parse(m).ok() == Some(current.version))
    {
        return Ok(conflict(format!(
            "ifNoneMatch {m}: the current version is {}",
            current.version
        )));
    }
    let stays = match p.interaction {
        Interaction::Update => resource.is_some_and(|r| tree_in_compartment(r, &p.patient)),
        Interaction::Patch => {
            let patched = resource.and_then(patch_document).and_then(|patch| {
                let doc = json::parse(&current.json).ok()?;
                // A patch that does not apply fails in the processor too, on this version.
                Some(fhir_core::patch::apply(&doc, &patch).ok())
            });
            match patched {
                Some(Some(t)) => tree_in_compartment(&t, &p.patient),
                Some(None) => true,
                // Not a JSON Patch this layer can read: not checked, so not sent on.
                None => false,
            }
        }
        _ => true,
    };
    Ok(if stays {
        Verdict::Pinned(Pin::Version(current.version))
    } else {
        outside()
    })
}

/// The JSON Patch of a PATCH entry (a `Binary` with contentType application/json-patch+json and
/// base64 `data`), as the Bundle processor reads it; `None` if it is not one.
fn patch_document(resource: &Json) -> Option<Json> {
    if resource.get("resourceType").and_then(Json::as_str) != Some("Binary") {
        return None;
    }
    let ct = resource.get("contentType").and_then(Json::as_str)?;
    if ct.split(';').next().map(str::trim) != Some("application/json-patch+json") {
        return None;
    }
    let data: String = resource
        .get("data")
        .and_then(Json::as_str)?
        .chars()
        .filter(|c| !c.is_ascii_whitespace() && *c != '=')
        .collect();
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(data)
        .ok()?;
    json::parse(&bytes).ok()
}

/// A batch with refused entries: the others run (entries of a batch are independent), and the
/// refused ones get their refusal (403, or the 404 of a resource outside the compartment, or
/// 412) at their place in the (JSON) batch-response.
async fn batch_without(
    mut tree: Json,
    refused: Vec<(usize, StatusCode, IssueType, String)>,
    mut parts: axum::http::request::Parts,
    next: Next,
) -> Response {
    let denied: Vec<usize> = refused.iter().map(|r| r.0).collect();
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
        if let Some((_, status, code, msg)) = refused.iter().find(|r| r.0 == i) {
            let oo =
                fhir_core::OperationOutcome::new(vec![Issue::error(*code, msg.clone())]).to_json();
            let mut response = fhir_core::Map::new();
            response.insert(
                "status",
                Json::str(format!(
                    "{} {}",
                    status.as_u16(),
                    status.canonical_reason().unwrap_or("")
                )),
            );
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
