//! The access log: one IHE BALP-shaped `AuditEvent` per FHIR data request (and per refused
//! attempt), stored in the tenant's append-only audit area of the store
//! ([`fhir_store::Store::append_audit`]), and `GET /fhir/{t}/AuditEvent?patient=…&date=…` for
//! auditors.
//!
//! Writes are audited before their response is sent (a separate commit right after the write's,
//! so a crash in between can lose the record of a write that happened — never the reverse);
//! reads are appended in the background, where the store's group commit batches concurrent
//! records into one fsync.

use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir_core::search_param::date_bounds;
use fhir_core::{Issue, IssueType, Json, Map, TenantId};
use fhir_store::AuditRecord;

use crate::AppState;
use crate::auth::{Interaction, Principal, ScopeContext};
use crate::bundle::{BundleBuilder, BundleResponse, Entry};
use crate::error::ApiError;

/// What one request did, for its AuditEvent.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// FHIR interaction code (`read`, `search-type`, `transaction`, …).
    pub subtype: String,
    /// HTTP method (decides the BALP action C/R/U/D/E).
    pub method: Method,
    /// The resource (`Type/id`) or type (`Type`) the request was about, if any.
    pub resource: Option<String>,
    /// Patients whose data was (or would have been) accessed.
    pub patients: Vec<String>,
    /// The response status.
    pub status: u16,
    /// The query string, kept as `entity.query`-like detail for searches.
    pub query: Option<String>,
}

fn obj(members: Vec<(&str, Json)>) -> Json {
    let mut m = Map::new();
    for (k, v) in members {
        m.insert(k, v);
    }
    Json::Object(m)
}

fn coding(system: &str, code: &str) -> Json {
    obj(vec![
        ("system", Json::str(system)),
        ("code", Json::str(code)),
    ])
}

/// The BALP AuditEvent for `a` by `who` (`None`: the caller could not be authenticated).
pub fn audit_event(who: Option<&Principal>, a: &Access, recorded: &str) -> Json {
    // BALP: queries are "E"xecute, not "R"ead.
    let action = match a.method.as_str() {
        _ if a.subtype.starts_with("search") => "E",
        "POST" if a.subtype == "create" => "C",
        "PUT" | "PATCH" => "U",
        "DELETE" => "D",
        "GET" | "HEAD" => "R",
        _ => "E",
    };
    let outcome = match a.status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    };
    let mut ev = vec![
        ("resourceType", Json::str("AuditEvent")),
        (
            "type",
            obj(vec![
                (
                    "system",
                    Json::str("http://terminology.hl7.org/CodeSystem/audit-event-type"),
                ),
                ("code", Json::str("rest")),
                ("display", Json::str("Restful Operation")),
            ]),
        ),
        (
            "subtype",
            Json::Array(vec![coding(
                "http://hl7.org/fhir/restful-interaction",
                &a.subtype,
            )]),
        ),
        ("action", Json::str(action)),
        ("recorded", Json::str(recorded)),
        ("outcome", Json::str(outcome)),
        ("outcomeDesc", Json::str(format!("HTTP {}", a.status))),
    ];
    if let Some(p) = who {
        let pou: Vec<Json> = p
            .purpose_of_use()
            .iter()
            .map(|u| {
                obj(vec![(
                    "coding",
                    Json::Array(vec![coding(
                        u.system
                            .as_deref()
                            .unwrap_or("http://terminology.hl7.org/CodeSystem/v3-ActReason"),
                        &u.code,
                    )]),
                )])
            })
            .collect();
        if !pou.is_empty() {
            ev.push(("purposeOfEvent", Json::Array(pou)));
        }
    }
    let mut agents = Vec::new();
    // The user (BALP: the human, with national identity / HPR number when the token has them).
    let mut user = vec![
        (
            "type",
            obj(vec![(
                "coding",
                Json::Array(vec![coding(
                    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "IRCP",
                )]),
            )]),
        ),
        ("requestor", Json::Bool(true)),
    ];
    let mut who_members = Vec::new();
    match who {
        Some(p) => {
            if let Some(pid) = p.pid() {
                who_members.push((
                    "identifier",
                    obj(vec![
                        ("system", Json::str("urn:oid:2.16.578.1.12.4.1.4.1")),
                        ("value", Json::str(pid)),
                    ]),
                ));
            } else if let Some(hpr) = p.hpr_number() {
                who_members.push((
                    "identifier",
                    obj(vec![
                        ("system", Json::str("urn:oid:2.16.578.1.12.4.1.4.4")),
                        ("value", Json::str(hpr)),
                    ]),
                ));
            } else if let Some(sub) = p.subject() {
                who_members.push((
                    "identifier",
                    obj(vec![
                        ("system", Json::str(p.issuer())),
                        ("value", Json::str(sub)),
                    ]),
                ));
            }
            let display = match (p.name(), p.hpr_number()) {
                (Some(n), Some(h)) => Some(format!("{n} (HPR {h})")),
                (Some(n), None) => Some(n.to_string()),
                (None, Some(h)) => Some(format!("HPR {h}")),
                (None, None) => None,
            };
            if let Some(d) = display {
                who_members.push(("display", Json::str(d)));
            }
            if let Some(jti) = p.jti() {
                // BALP OAUTHaccessTokenUse: the token id, as a URI.
                user.push((
                    "policy",
                    Json::Array(vec![Json::str(format!("urn:ietf:params:oauth:jti:{jti}"))]),
                ));
            }
        }
        None => who_members.push(("display", Json::str("unauthenticated caller"))),
    }
    if who_members.is_empty() {
        who_members.push(("display", Json::str("unknown user")));
    }
    user.push(("who", obj(who_members)));
    agents.push(obj(user));
    if let Some(client) = who.and_then(Principal::client_id) {
        agents.push(obj(vec![
            (
                "type",
                obj(vec![(
                    "coding",
                    Json::Array(vec![coding(
                        "http://dicom.nema.org/resources/ontology/DCM",
                        "110150",
                    )]),
                )]),
            ),
            (
                "who",
                obj(vec![(
                    "identifier",
                    obj(vec![("value", Json::str(client))]),
                )]),
            ),
            ("requestor", Json::Bool(false)),
        ]));
    }
    ev.push(("agent", Json::Array(agents)));
    ev.push((
        "source",
        obj(vec![(
            "observer",
            obj(vec![("display", Json::str("fhir-server"))]),
        )]),
    ));
    let mut entities = Vec::new();
    for p in &a.patients {
        entities.push(obj(vec![
            (
                "what",
                obj(vec![("reference", Json::str(format!("Patient/{p}")))]),
            ),
            (
                "type",
                coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "1",
                ),
            ),
            (
                "role",
                coding("http://terminology.hl7.org/CodeSystem/object-role", "1"),
            ),
        ]));
    }
    if let Some(r) = &a.resource {
        let mut e = vec![
            ("what", obj(vec![("reference", Json::str(r.clone()))])),
            (
                "type",
                coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "2",
                ),
            ),
        ];
        if let Some(q) = &a.query {
            e.push(("description", Json::str(q.clone())));
        }
        entities.push(obj(e));
    }
    if !entities.is_empty() {
        ev.push(("entity", Json::Array(entities)));
    }
    obj(ev)
}

/// Stores the AuditEvent of `a`; waits for durability when `wait` (writes), otherwise returns
/// at once and appends in the background.
pub async fn record(
    state: &AppState,
    tenant: &TenantId,
    who: Option<&Principal>,
    a: Access,
    wait: bool,
) {
    let now = chrono::Utc::now();
    let recorded = now.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    let mut ev = audit_event(who, &a, &recorded);
    if let Some(m) = ev.as_object_mut() {
        m.insert("id", Json::str(uuid::Uuid::new_v4().to_string()));
    }
    let rec = AuditRecord {
        micros: now.timestamp_micros(),
        nonce: rand_nonce(),
        json: ev.to_bytes(),
        patients: a.patients,
    };
    let store = state.store.clone();
    let tenant = tenant.clone();
    let task = tokio::task::spawn_blocking(move || {
        if let Err(e) = store.append_audit(&tenant, vec![rec]) {
            // An unknown tenant has no audit area; anything else must be seen by operators.
            if !matches!(e, fhir_store::StoreError::TenantNotFound(_)) {
                tracing::error!(tenant = %tenant, error = %e, "cannot store an AuditEvent");
            }
        }
    });
    if wait {
        let _ = task.await;
    }
}

fn rand_nonce() -> u64 {
    let u = uuid::Uuid::new_v4();
    let b = u.as_bytes();
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Whether `p` holds an explicit auditor scope: `user/` or `system/` `AuditEvent` with `s`.
pub fn is_auditor(p: &Principal) -> bool {
    p.is_unrestricted()
        || p.scopes().iter().any(|s| {
            s.context != ScopeContext::Patient
                && s.resource_type.as_deref() == Some("AuditEvent")
                && s.permissions.contains(Interaction::SearchType.needs())
                && s.filters.is_empty()
        })
}

/// `GET /fhir/{t}/AuditEvent?patient=…&date=…&_count=…` from the audit area.
pub async fn search(state: &AppState, tenant: &TenantId, base: &str, query: &str) -> Response {
    let mut patient = None;
    let mut from = 0i64;
    let mut to = i64::MAX;
    let mut count = 100usize;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "patient" | "entity" => {
                let id = v.strip_prefix("Patient/").unwrap_or(&v).to_string();
                patient = Some(id);
            }
            "date" => {
                let (prefix, text) = match v.get(..2) {
                    Some(p @ ("ge" | "le" | "gt" | "lt" | "eq")) => (p, &v[2..]),
                    _ => ("eq", v.as_ref()),
                };
                let Some((lo, hi)) = date_bounds(text) else {
                    return bad(format!(
                        "date: '{}' is not a date",
                        text.chars().take(40).collect::<String>()
                    ));
                };
                match prefix {
                    "ge" => from = from.max(lo),
                    "gt" => from = from.max(hi.saturating_add(1)),
                    "le" => to = to.min(hi.saturating_add(1)),
                    "lt" => to = to.min(lo),
                    _ => {
                        from = from.max(lo);
                        to = to.min(hi.saturating_add(1));
                    }
                }
            }
            "_count" => match v.parse::<usize>() {
                Ok(n) => count = n.clamp(1, 1000),
                Err(_) => return bad("_count must be a whole number".into()),
            },
            "_format" | "_pretty" => {}
            other => {
                return bad(format!(
                    "AuditEvent search supports patient, date and _count, not '{}'",
                    other.chars().take(40).collect::<String>()
                ));
            }
        }
    }
    let store = state.store.clone();
    let t = tenant.clone();
    let found = tokio::task::spawn_blocking(move || {
        store.audit_records(&t, patient.as_deref(), from, to, count)
    })
    .await;
    let records = match found {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return ApiError::from(e).into_response(),
        Err(e) => return ApiError::Internal(format!("audit search failed: {e}")).into_response(),
    };
    let mut b = BundleBuilder::new("searchset");
    // No `total`: the scan stops at `_count`, so the number of all matches is not known.
    b.links.push(("self", format!("{base}/AuditEvent?{query}")));
    for r in records {
        b.entries.push(Entry {
            resource: Some(r),
            search_mode: Some("match"),
            ..Entry::default()
        });
    }
    let mut resp = b.into_fhir_response(crate::format::Negotiated {
        format: crate::format::Format::Json,
        pretty: false,
    });
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn bad(msg: String) -> Response {
    ApiError::Outcome {
        status: StatusCode::BAD_REQUEST,
        issues: vec![Issue::error(IssueType::Invalid, msg)],
    }
    .into_response()
}
