//! Requests under a restricted scope (a `patient/` scope or scope filters): see the module docs
//! of [`crate::auth_layer`], point 5.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhir_core::json::{self, Json};
use fhir_core::search_param::SearchParamRegistry;
use fhir_core::{ResourceId, ResourceType, TenantId};
use fhir_store::ReadResult;

use super::{auth_failure, forbidden, remember_pages};
use crate::AppState;
use crate::auth::{Access, Interaction, Principal, Restriction};
use crate::error::ApiError;
use crate::format::read_body;

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
pub(super) fn in_compartment(bytes: &[u8], patient: &str) -> bool {
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
pub(super) async fn filter_includes(resp: Response, patient: &str) -> Response {
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
