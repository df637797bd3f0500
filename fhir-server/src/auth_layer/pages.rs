//! Search page tokens bound to the principal that ran the search.

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::TenantId;

use super::forbidden;
use crate::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

use super::restricted::{
    Output, drop_foreign_includes, drop_unreadable_includes, json_request, ok_tree, query_params,
    reads_every_type,
};

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
pub(super) async fn remember_pages(
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
    remember(state, p, tenant, patient, &bytes);
    Response::from_parts(parts, Body::from(bytes))
}

/// Records the page token found in a search result's `bytes` (JSON or XML), if any.
pub(super) fn remember(
    state: &AppState,
    p: &Principal,
    tenant: &TenantId,
    patient: Option<String>,
    bytes: &[u8],
) {
    const KEY: &[u8] = b"_getpages=";
    let Some(at) = bytes.windows(KEY.len()).position(|w| w == KEY) else {
        return;
    };
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

/// `GET /fhir/{t}?_getpages=…`: only for the principal that ran the search, and with its
/// patient restriction: unless the token reads every type, the page is read as JSON, its
/// includes outside the compartment or of types the token may not read are dropped, and it is
/// answered in the format the client asks for (see [`Output`]).
pub(super) async fn page(
    state: &AppState,
    p: &Principal,
    tenant: &TenantId,
    req: Request,
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
        Some((key, patient)) if key == principal_key(p, tenant) => {
            if patient.is_none() && reads_every_type(p) {
                return next.run(req).await;
            }
            let (mut parts, body) = req.into_parts();
            let mut params = query_params(parts.uri.query());
            let out = match Output::take(&mut params, &parts.headers) {
                Ok(o) => o,
                Err(e) => return e.into_response(),
            };
            let path = parts.uri.path().to_string();
            if !json_request(&mut parts, &path, &params) {
                return forbidden("cannot restrict this page");
            }
            let resp = next.run(Request::from_parts(parts, body)).await;
            match ok_tree(resp).await {
                Ok((rparts, mut tree)) => {
                    if let Some(patient) = &patient {
                        drop_foreign_includes(&mut tree, patient);
                    }
                    drop_unreadable_includes(&mut tree, p);
                    out.bundle(rparts, tree)
                }
                Err(resp) => out.other(resp).await,
            }
        }
        _ => forbidden("this page belongs to a search made with another token, or has expired"),
    }
}
