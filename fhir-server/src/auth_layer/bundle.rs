//! `batch`/`transaction` Bundles under auth: scopes per entry (module docs of
//! [`crate::auth_layer`], point 6).

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::json::{self, Json};
use fhir_core::{Issue, IssueType, TenantId};

use super::{Op, classify, forbidden};
use crate::AppState;
use crate::auth::{Access, Interaction, Principal};
use crate::error::ApiError;
use crate::format::read_body;

/// `POST /fhir/{t}` under auth: every entry's interaction must be allowed without restriction.
pub(super) async fn bundle(
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
