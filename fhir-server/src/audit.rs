//! The access log: IHE BALP-shaped `AuditEvent`s for every FHIR data request and every refused
//! attempt (auth on only), kept in the tenant's append-only audit area of the store, and
//! `GET /fhir/{t}/AuditEvent?patient=…&date=…` for auditors.
//!
//! # When records are written
//!
//! * **Writes** (create, update, patch, delete, their conditional forms, batch and transaction
//!   Bundles) are recorded *in the same store commit as the write*: the auth middleware puts an
//!   [`AuditTicket`] into the request, the handler writes through the store handle of
//!   [`AuditedStore`], and the store's writer thread calls [`AuditTicket::hook`] after the write
//!   succeeded and before the durable commit ([`fhir_store::Store::with_audit`]). A write is
//!   therefore never durable without its record (nor the reverse), costs no second fsync, and
//!   its AuditEvent names what was really written: the id the server assigned, the version, and
//!   the patients of the stored content (for a deletion: of the content it deleted). When the
//!   record is in the commit, the middleware writes nothing more; a write that failed (4xx/5xx,
//!   nothing written) is recorded by the middleware, before the response is sent.
//! * **Reads, searches and history** are recorded after the response, off the request path: the
//!   response bytes are shared (not copied), parsed on the blocking pool (JSON or XML), and the
//!   patient compartments of the returned resources — every `match` and `include` entry of a
//!   searchset or history page, including `_getpages` pages — are added to the patients the
//!   request named. Resources returned in part (`_summary`, `_elements`; tagged `SUBSETTED`)
//!   may lack the patient reference, so their patients are taken from the stored resource.
//!   The store's group commit batches concurrent records into one fsync.
//! * **The access log itself**: an auditor's `AuditEvent` search is recorded like any search,
//!   indexed by the patient it asked about (not by the patients in the events it returned). This
//!   log grows by one record per such request, so an auditor polling a patient's log grows that
//!   patient's log by one event per poll. That is accepted on purpose: reading a patient's
//!   access log is itself an access to information about the patient (who treated them, when),
//!   which § 18 lets them see; and the growth is linear in the auditor's requests, like any
//!   other polling client's reads, not self-amplifying (an event is never recorded for reading
//!   an event). Operators who poll should query with a `date=ge…` window.
//! * **Admin API calls** (`/admin/tenants…`): a structured `tracing` event with target `audit`
//!   (who, what, outcome) for every call, and an AuditEvent in the affected tenant's audit area
//!   where one exists (a created tenant's, or the one named in the path while it exists).
//!
//! # One AuditEvent per patient
//!
//! BALP (`IHE.BasicAudit.PatientQuery`) asks for one AuditEvent per patient when a query
//! returns several patients' data, and that is followed everywhere here: an event names at most
//! one patient, so that showing a patient their log never shows them another patient's id. A
//! request about no patient gets one event without a patient. A Bundle's writes get one event
//! per patient listing that patient's resources (and one for the resources in no patient's
//! compartment).
//!
//! Caps, so that one huge request cannot make unbounded work: at most [`MAX_PATIENT_EVENTS`]
//! patients get their own event; any further patients share one event that names none of them
//! but is indexed under each (so every patient still finds it); an event lists at most
//! [`MAX_ENTITIES`] resources (more make more events); and at most [`MAX_RESULT_ENTRIES`]
//! entries of a response Bundle are examined for patients (pages are bounded by `_count` ≤
//! 1,000 plus includes, so this cap is only reached by unusual `_include` fan-out; a warning is
//! logged then).
//!
//! # Searching the log
//!
//! `GET /fhir/{t}/AuditEvent` takes `patient` (or `entity`; `Patient/` prefix optional), `date`
//! (with `eq ge gt le lt`, repeatable), `_count` (default 100, at most 1,000), `_sort` (`-date`,
//! newest first, is the default — what a patient asks for; `date` for oldest first), `_total`
//! (`accurate` counts the whole range by scanning it; `none` and `estimate` give no total) and
//! the `_cursor` of a `next` link (an opaque position in the log's order: later records never
//! shift a page). Anything else is a 400.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use fhir_core::search_param::{SearchParamRegistry, date_bounds};
use fhir_core::{Issue, IssueType, Json, Map, ResourceId, ResourceType, TenantId};
use fhir_store::{
    AuditCursor, AuditHook, AuditQuery, AuditRecord, AuditedWrite, Store, WriteKind, WriteOutcome,
};

use crate::AppState;
use crate::auth::{Interaction, Principal, ScopeContext};
use crate::bundle::{BundleBuilder, BundleResponse, Entry};
use crate::error::ApiError;

/// Most patients of one request that get an AuditEvent each; further patients share one.
pub const MAX_PATIENT_EVENTS: usize = 1000;

/// Most resources one AuditEvent lists.
pub const MAX_ENTITIES: usize = 1000;

/// Most entries of a response Bundle examined for the patients they are about.
pub const MAX_RESULT_ENTRIES: usize = 10_000;

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
    /// The query string, kept as the query entity for searches and conditional writes.
    pub query: Option<String>,
}

impl Access {
    /// Adds `p` to the patients unless it is there.
    pub fn add_patient(&mut self, p: &str) {
        if !p.is_empty() && !self.patients.iter().any(|x| x == p) {
            self.patients.push(p.to_string());
        }
    }
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

/// A resource an AuditEvent is about.
struct Subject {
    /// `Type/id[/_history/v]` or `Type`.
    reference: String,
    /// DICOM object lifecycle code (`1` created, `3` amended, `14` logically deleted, `6`
    /// accessed), for resources a write touched.
    lifecycle: Option<(&'static str, &'static str)>,
}

/// Everything one AuditEvent says.
struct EventSpec<'a> {
    subtype: &'a str,
    /// BALP action: C, R, U, D or E.
    action: &'a str,
    /// 0 success, 4 minor failure, 8 serious failure.
    outcome: &'a str,
    outcome_desc: String,
    /// The one patient the event is about (BALP: one event per patient).
    patient: Option<&'a str>,
    subjects: Vec<Subject>,
    query: Option<&'a str>,
}

/// The BALP action of an HTTP request.
fn action_of(a: &Access) -> &'static str {
    match a.method.as_str() {
        // BALP: queries are "E"xecute, not "R"ead.
        _ if a.subtype.starts_with("search") => "E",
        "POST" if a.subtype == "create" => "C",
        "PUT" | "PATCH" => "U",
        "DELETE" => "D",
        "GET" | "HEAD" => "R",
        _ => "E",
    }
}

fn outcome_of(status: u16) -> &'static str {
    match status {
        200..=399 => "0",
        400..=499 => "4",
        _ => "8",
    }
}

/// The AuditEvent JSON (without `id`).
fn build(who: Option<&Principal>, spec: &EventSpec<'_>, recorded: &str) -> Json {
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
                spec.subtype,
            )]),
        ),
        ("action", Json::str(spec.action)),
        ("recorded", Json::str(recorded)),
        ("outcome", Json::str(spec.outcome)),
        ("outcomeDesc", Json::str(spec.outcome_desc.clone())),
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
    ev.push(("agent", Json::Array(agents(who))));
    ev.push((
        "source",
        obj(vec![(
            "observer",
            obj(vec![("display", Json::str("fhir-server"))]),
        )]),
    ));
    let mut entities = Vec::new();
    if let Some(p) = spec.patient {
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
    for s in &spec.subjects {
        let mut e = vec![
            (
                "what",
                obj(vec![("reference", Json::str(s.reference.clone()))]),
            ),
            (
                "type",
                coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "2",
                ),
            ),
            (
                "role",
                coding("http://terminology.hl7.org/CodeSystem/object-role", "4"),
            ),
        ];
        if let Some((code, display)) = s.lifecycle {
            e.push((
                "lifecycle",
                obj(vec![
                    (
                        "system",
                        Json::str("http://terminology.hl7.org/CodeSystem/dicom-audit-lifecycle"),
                    ),
                    ("code", Json::str(code)),
                    ("display", Json::str(display)),
                ]),
            ));
        }
        entities.push(obj(e));
    }
    if let Some(q) = spec.query {
        // BALP: the raw request base64 in `query`, a readable form in `description`.
        entities.push(obj(vec![
            (
                "type",
                coding(
                    "http://terminology.hl7.org/CodeSystem/audit-entity-type",
                    "2",
                ),
            ),
            (
                "role",
                coding("http://terminology.hl7.org/CodeSystem/object-role", "24"),
            ),
            ("description", Json::str(q)),
            (
                "query",
                Json::str(base64::engine::general_purpose::STANDARD.encode(q)),
            ),
        ]));
    }
    if !entities.is_empty() {
        ev.push(("entity", Json::Array(entities)));
    }
    obj(ev)
}

/// The user agent (BALP: the human, with national identity / HPR number when the token has
/// them, and the token's `jti`) and the client agent.
fn agents(who: Option<&Principal>) -> Vec<Json> {
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
    let mut out = vec![obj(user)];
    if let Some(client) = who.and_then(Principal::client_id) {
        out.push(obj(vec![
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
    out
}

/// The current time as an AuditEvent `recorded` instant and as microseconds.
fn now() -> (String, i64) {
    let now = chrono::Utc::now();
    (
        now.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
        now.timestamp_micros(),
    )
}

fn rand_nonce() -> u64 {
    let u = uuid::Uuid::new_v4();
    let b = u.as_bytes();
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// A stored record of `ev`, indexed under `patients`.
fn to_record(mut ev: Json, micros: i64, patients: Vec<String>) -> AuditRecord {
    if let Some(m) = ev.as_object_mut() {
        m.insert("id", Json::str(uuid::Uuid::new_v4().to_string()));
    }
    AuditRecord {
        micros,
        nonce: rand_nonce(),
        json: ev.to_bytes(),
        patients,
    }
}

/// The BALP AuditEvent of `a` by `who` (`None`: the caller could not be authenticated), about
/// its first patient if it has any. [`records`] makes one per patient.
pub fn audit_event(who: Option<&Principal>, a: &Access, recorded: &str) -> Json {
    build(
        who,
        &spec_of(a, a.patients.first().map(String::as_str)),
        recorded,
    )
}

fn spec_of<'a>(a: &'a Access, patient: Option<&'a str>) -> EventSpec<'a> {
    EventSpec {
        subtype: &a.subtype,
        action: action_of(a),
        outcome: outcome_of(a.status),
        outcome_desc: format!("HTTP {}", a.status),
        patient,
        subjects: a
            .resource
            .iter()
            .map(|r| Subject {
                reference: r.clone(),
                lifecycle: None,
            })
            .collect(),
        query: a.query.as_deref(),
    }
}

/// The records of `a`: one AuditEvent per patient (see the module docs for the cap), or one
/// without a patient.
pub fn records(who: Option<&Principal>, a: &Access) -> Vec<AuditRecord> {
    let (recorded, micros) = now();
    if a.patients.is_empty() {
        return vec![to_record(
            build(who, &spec_of(a, None), &recorded),
            micros,
            Vec::new(),
        )];
    }
    let mut out: Vec<AuditRecord> = a
        .patients
        .iter()
        .take(MAX_PATIENT_EVENTS)
        .map(|p| {
            to_record(
                build(who, &spec_of(a, Some(p)), &recorded),
                micros,
                vec![p.clone()],
            )
        })
        .collect();
    let rest = a.patients.get(MAX_PATIENT_EVENTS..).unwrap_or_default();
    if !rest.is_empty() {
        let mut spec = spec_of(a, None);
        spec.outcome_desc = format!(
            "HTTP {}; the request concerned {} more patients, who each find this event in \
             their own log",
            a.status,
            rest.len()
        );
        out.push(to_record(
            build(who, &spec, &recorded),
            micros,
            rest.to_vec(),
        ));
    }
    out
}

/// Stores the AuditEvents of `a`; waits for durability when `wait`, otherwise returns at once
/// and appends in the background.
pub async fn record(
    state: &AppState,
    tenant: &TenantId,
    who: Option<&Principal>,
    a: Access,
    wait: bool,
) {
    let recs = records(who, &a);
    let task = append(state.store.clone(), tenant.clone(), recs);
    if wait {
        let _ = task.await;
    }
}

/// Appends `recs` on the blocking pool.
fn append(store: Store, tenant: TenantId, recs: Vec<AuditRecord>) -> tokio::task::JoinHandle<()> {
    tokio::task::spawn_blocking(move || {
        if let Err(e) = store.append_audit(&tenant, recs) {
            // An unknown tenant has no audit area; anything else must be seen by operators.
            if !matches!(e, fhir_store::StoreError::TenantNotFound(_)) {
                tracing::error!(tenant = %tenant, error = %e, "cannot store an AuditEvent");
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Writes: records in the write's own commit

/// The access-log ticket of one request with auth on: who, what, and whether the request's
/// AuditEvents were committed with its write. The auth middleware puts it into the request's
/// extensions; [`AuditedStore`] turns it into a store handle.
#[derive(Clone)]
pub struct AuditTicket {
    /// The tenant of the request.
    pub tenant: TenantId,
    /// Who made it.
    pub principal: Principal,
    /// What the middleware knows about it (interaction, named patients, query).
    pub access: Access,
    recorded: Arc<AtomicBool>,
}

impl std::fmt::Debug for AuditTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTicket")
            .field("tenant", &self.tenant)
            .field("access", &self.access)
            .field("recorded", &self.recorded())
            .finish_non_exhaustive()
    }
}

impl AuditTicket {
    /// A ticket not yet recorded.
    pub fn new(tenant: TenantId, principal: Principal, access: Access) -> AuditTicket {
        AuditTicket {
            tenant,
            principal,
            access,
            recorded: Arc::default(),
        }
    }

    /// Whether a write of this request ran its [`hook`](AuditTicket::hook) and made records.
    /// With a 2xx response, those records were committed with the write.
    pub fn recorded(&self) -> bool {
        self.recorded.load(Ordering::SeqCst)
    }

    /// The store hook that turns the request's writes into AuditEvents (one per patient, see
    /// the module docs) and marks the ticket recorded. `subtype` overrides the interaction
    /// code (a Bundle's `batch` or `transaction`).
    pub fn hook(&self, subtype: Option<&str>) -> AuditHook {
        let ticket = self.clone();
        let subtype = subtype.map_or_else(|| self.access.subtype.clone(), str::to_string);
        Box::new(move |writes: &[AuditedWrite<'_>]| {
            let recs = write_records(&ticket, &subtype, writes);
            if !recs.is_empty() {
                ticket.recorded.store(true, Ordering::SeqCst);
            }
            recs
        })
    }
}

/// What happened to one written resource.
struct Described {
    /// `Type/id/_history/v` (or less, when nothing was deleted).
    reference: String,
    /// BALP action for an event about this write alone.
    action: &'static str,
    /// DICOM object lifecycle (code, display).
    lifecycle: (&'static str, &'static str),
    /// For `outcomeDesc`.
    words: &'static str,
}

fn describe(w: &AuditedWrite<'_>) -> Described {
    match w.outcome {
        WriteOutcome::Write(r) => {
            let s = &r.resource;
            let reference = format!("{}/{}/_history/{}", s.resource_type, s.id, s.version);
            let (action, lifecycle, words) = match r.kind {
                WriteKind::Created => ("C", ("1", "Origination / Creation"), "created"),
                WriteKind::Updated => ("U", ("3", "Amendment"), "updated"),
                // Nothing was written; the matching resource was returned: an access.
                WriteKind::Existing => (
                    "R",
                    ("6", "Access / Use"),
                    "matched an existing resource; nothing was written",
                ),
            };
            Described {
                reference,
                action,
                lifecycle,
                words,
            }
        }
        WriteOutcome::Delete(d) => {
            let reference = match (&d.id, d.version) {
                (Some(id), Some(v)) => format!("{}/{id}/_history/{v}", d.resource_type),
                (Some(id), None) => format!("{}/{id}", d.resource_type),
                (None, _) => d.resource_type.to_string(),
            };
            Described {
                reference,
                action: "D",
                lifecycle: ("14", "Logical deletion"),
                words: if d.version.is_some() {
                    "deleted"
                } else {
                    "nothing to delete"
                },
            }
        }
    }
}

/// The AuditEvents of a request's writes: per patient one event with that patient's resources
/// (and one for resources in no patient's compartment), at most [`MAX_ENTITIES`] each.
fn write_records(
    ticket: &AuditTicket,
    subtype: &str,
    writes: &[AuditedWrite<'_>],
) -> Vec<AuditRecord> {
    if writes.is_empty() {
        return Vec::new();
    }
    let bundle = matches!(subtype, "batch" | "transaction");
    let mut groups: BTreeMap<Option<&str>, Vec<&AuditedWrite<'_>>> = BTreeMap::new();
    for w in writes {
        if w.patients.is_empty() {
            groups.entry(None).or_default().push(w);
        }
        for p in w.patients {
            groups.entry(Some(p.as_str())).or_default().push(w);
        }
    }
    let (recorded, micros) = now();
    let who = Some(&ticket.principal);
    let mut out = Vec::new();
    let mut overflow: Vec<String> = Vec::new();
    let mut overflow_writes: Vec<&AuditedWrite<'_>> = Vec::new();
    let mut patient_events = 0usize;
    for (patient, ws) in groups {
        if patient.is_some() && patient_events >= MAX_PATIENT_EVENTS {
            overflow.extend(patient.map(str::to_string));
            overflow_writes.extend(ws);
            continue;
        }
        patient_events += usize::from(patient.is_some());
        for chunk in ws.chunks(MAX_ENTITIES) {
            let ev = write_event(
                who,
                subtype,
                bundle,
                patient,
                chunk,
                &ticket.access,
                &recorded,
            );
            out.push(to_record(
                ev,
                micros,
                patient.map(str::to_string).into_iter().collect(),
            ));
        }
    }
    if !overflow.is_empty() {
        // Shared by many patients, so it names neither them nor their resources.
        overflow_writes.sort_by_key(|w| std::ptr::from_ref(*w));
        overflow_writes.dedup_by_key(|w| std::ptr::from_ref(*w));
        let spec = EventSpec {
            subtype,
            action: if bundle { "E" } else { "U" },
            outcome: "0",
            outcome_desc: format!(
                "{} resources of {} further patients written; each finds this event in their \
                 own log",
                overflow_writes.len(),
                overflow.len()
            ),
            patient: None,
            subjects: Vec::new(),
            query: ticket.access.query.as_deref(),
        };
        out.push(to_record(build(who, &spec, &recorded), micros, overflow));
    }
    out
}

fn write_event(
    who: Option<&Principal>,
    subtype: &str,
    bundle: bool,
    patient: Option<&str>,
    writes: &[&AuditedWrite<'_>],
    access: &Access,
    recorded: &str,
) -> Json {
    let described: Vec<Described> = writes.iter().map(|w| describe(w)).collect();
    let (action, outcome_desc) = match described.as_slice() {
        [one] if !bundle => (one.action, one.words.to_string()),
        // A Bundle: executed; each resource says what happened to it in `lifecycle`.
        _ => ("E", format!("{} resources written", described.len())),
    };
    let spec = EventSpec {
        subtype,
        action,
        outcome: "0",
        outcome_desc,
        patient,
        subjects: described
            .into_iter()
            .map(|d| Subject {
                reference: d.reference,
                lifecycle: Some(d.lifecycle),
            })
            .collect(),
        query: access.query.as_deref(),
    };
    build(who, &spec, recorded)
}

/// Extractor for write handlers: the store to write through. With auth on, a handle whose next
/// write commits the request's AuditEvents with it; with auth off, the plain store.
pub struct AuditedStore {
    store: Store,
    ticket: Option<AuditTicket>,
}

impl AuditedStore {
    /// The handle for the request's write.
    pub fn store(&self) -> Store {
        self.store_as(None)
    }

    /// The handle for the request's write, recorded as interaction `subtype` (a Bundle's
    /// `batch` or `transaction`) instead of the one the middleware classified.
    pub fn store_as(&self, subtype: Option<&str>) -> Store {
        match &self.ticket {
            Some(t) => self.store.with_audit(t.hook(subtype)),
            None => self.store.clone(),
        }
    }
}

impl FromRequestParts<AppState> for AuditedStore {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(AuditedStore {
            store: state.store.clone(),
            ticket: parts.extensions.get::<AuditTicket>().cloned(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Reads and searches: patients from the response, off the request path

/// What a response holds, for the patients it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Returned {
    /// One resource (read, vread, or a write's representation).
    Resource,
    /// A searchset or history Bundle: every entry's resource.
    Entries,
    /// A batch- or transaction-response: the resources of entries that were reads.
    BundleResponse,
}

/// The patients in whose compartments the resources of a response are, as far as the
/// response shows them (see [`record_returned`] for subsetted resources). Caps the entries
/// examined at [`MAX_RESULT_ENTRIES`].
pub fn patients_in(body: &[u8], xml: bool, what: Returned) -> Vec<String> {
    examine(body, xml, what).patients
}

/// What a response says about the patients it concerns.
#[derive(Default)]
struct Examined {
    patients: Vec<String>,
    /// `Bundle.type`, for a Bundle.
    bundle_type: Option<String>,
    /// Resources returned in part (`_summary`, `_elements`: tagged `SUBSETTED`), whose
    /// patients must be looked up in the store: the part may leave out the patient reference.
    subsetted: Vec<(ResourceType, ResourceId)>,
}

fn is_subsetted(m: &Map) -> bool {
    m.get("meta")
        .and_then(|meta| meta.get("tag"))
        .and_then(Json::as_array)
        .is_some_and(|tags| {
            tags.iter()
                .any(|t| t.get("code").and_then(Json::as_str) == Some("SUBSETTED"))
        })
}

fn examine(body: &[u8], xml: bool, what: Returned) -> Examined {
    let tree = if xml {
        fhir_core::xml::from_xml(body).ok()
    } else {
        fhir_core::json::parse(body).ok()
    };
    let Some(tree) = tree else {
        return Examined::default();
    };
    let registry = SearchParamRegistry::r4();
    let mut out = Examined {
        bundle_type: tree.get("type").and_then(Json::as_str).map(str::to_string),
        ..Examined::default()
    };
    let mut add = |m: &Map| {
        if is_subsetted(m) {
            let ty = m
                .get("resourceType")
                .and_then(Json::as_str)
                .and_then(ResourceType::parse);
            let id = m
                .get("id")
                .and_then(Json::as_str)
                .and_then(|i| ResourceId::new(i).ok());
            if let (Some(ty), Some(id)) = (ty, id) {
                out.subsetted.push((ty, id));
            }
        }
        for p in registry.patient_compartment(m) {
            if !out.patients.contains(&p) {
                out.patients.push(p);
            }
        }
    };
    match what {
        Returned::Resource => {
            if let Some(m) = tree.as_object() {
                add(m);
            }
        }
        Returned::Entries | Returned::BundleResponse => {
            let empty = Vec::new();
            let entries = tree.get("entry").and_then(Json::as_array).unwrap_or(&empty);
            if entries.len() > MAX_RESULT_ENTRIES {
                tracing::warn!(
                    entries = entries.len(),
                    cap = MAX_RESULT_ENTRIES,
                    "audit: only the first entries of a large response are examined for patients"
                );
            }
            for e in entries.iter().take(MAX_RESULT_ENTRIES) {
                let mode = e
                    .get("search")
                    .and_then(|s| s.get("mode"))
                    .and_then(Json::as_str);
                if mode == Some("outcome") {
                    continue;
                }
                // In a batch-response, written resources carry a location and are recorded
                // with the write; the others were read.
                if what == Returned::BundleResponse
                    && e.get("response").and_then(|r| r.get("location")).is_some()
                {
                    continue;
                }
                let Some(m) = e.get("resource").and_then(Json::as_object) else {
                    continue;
                };
                let searchset = what == Returned::BundleResponse
                    && m.get("resourceType").and_then(Json::as_str) == Some("Bundle");
                if !searchset {
                    add(m);
                    continue;
                }
                // A `GET Type?…` entry answered with a searchset: its resources were read.
                let inner = m.get("entry").and_then(Json::as_array).unwrap_or(&empty);
                for ie in inner.iter().take(MAX_RESULT_ENTRIES) {
                    if let Some(r) = ie.get("resource").and_then(Json::as_object)
                        && r.get("resourceType").and_then(Json::as_str) != Some("OperationOutcome")
                    {
                        add(r);
                    }
                }
            }
        }
    }
    out
}

/// How many entries of a batch-response were refused by the auth layer.
fn refused_entries(body: &[u8]) -> usize {
    const NEEDLE: &[u8] = b"\"403 Forbidden\"";
    body.windows(NEEDLE.len()).filter(|w| *w == NEEDLE).count()
}

/// A successful response, for the patients of what it returned.
#[derive(Debug, Clone)]
pub struct ResponseBody {
    /// The body (shared with the response sent, not copied).
    pub bytes: axum::body::Bytes,
    /// Whether it is XML (else JSON).
    pub xml: bool,
    /// What it holds.
    pub what: Returned,
    /// For a Bundle: whether its writes were recorded in their commit already.
    pub writes_recorded: bool,
}

/// Records a successful read, search or Bundle after its response: the patients of the
/// returned resources (parsed on the blocking pool) are added to `a`'s. With `wait`, returns
/// when the records are durable.
pub async fn record_returned(
    state: &AppState,
    tenant: &TenantId,
    who: Option<&Principal>,
    mut a: Access,
    body: ResponseBody,
    wait: bool,
) {
    let ResponseBody {
        bytes: body,
        xml,
        what,
        writes_recorded: bundle_writes_recorded,
    } = body;
    let store = state.store.clone();
    let tenant = tenant.clone();
    let who = who.cloned();
    let task = tokio::task::spawn_blocking(move || {
        let seen = examine(&body, xml, what);
        for p in &seen.patients {
            a.add_patient(p);
        }
        for (ty, id) in &seen.subsetted {
            if let Ok(fhir_store::ReadResult::Found(r)) = store.read(&tenant, *ty, id) {
                for p in patients_in(&r.json, false, Returned::Resource) {
                    a.add_patient(&p);
                }
            }
        }
        let mut recs = Vec::new();
        if what == Returned::BundleResponse {
            match seen.bundle_type.as_deref() {
                Some("transaction-response") => a.subtype = "transaction".into(),
                Some("batch-response") => a.subtype = "batch".into(),
                _ => {}
            }
            let refused = refused_entries(&body);
            if refused > 0 {
                let mut r = a.clone();
                r.patients.clear();
                r.status = 403;
                recs.extend(records(who.as_ref(), &r));
            }
            // The writes are recorded already; what is left are the reads, if any.
            if !a.patients.is_empty() || !bundle_writes_recorded && recs.is_empty() {
                recs.extend(records(who.as_ref(), &a));
            }
        } else {
            recs = records(who.as_ref(), &a);
        }
        if let Err(e) = store.append_audit(&tenant, recs)
            && !matches!(e, fhir_store::StoreError::TenantNotFound(_))
        {
            tracing::error!(tenant = %tenant, error = %e, "cannot store an AuditEvent");
        }
    });
    if wait {
        let _ = task.await;
    }
}

// ---------------------------------------------------------------------------------------------
// Admin API

/// Logs an admin API call: always a `tracing` event with target `audit`; also an AuditEvent in
/// `tenant`'s audit area when it names one that exists.
pub async fn record_admin(
    state: &AppState,
    who: Option<&Principal>,
    method: &Method,
    path: &str,
    tenant: Option<TenantId>,
    status: u16,
) {
    let what = match (method.as_str(), tenant.is_some()) {
        ("POST", _) => "create-tenant",
        ("DELETE", _) => "remove-tenant",
        (_, true) => "read-tenant",
        _ => "list-tenants",
    };
    let (issuer, subject, client) = match who {
        Some(p) => (
            p.issuer().to_string(),
            p.subject().unwrap_or("-").to_string(),
            p.client_id().unwrap_or("-").to_string(),
        ),
        None => ("-".into(), "unauthenticated".into(), "-".into()),
    };
    let tenant_text = tenant.as_ref().map_or("-".to_string(), ToString::to_string);
    tracing::info!(
        target: "audit",
        issuer = %issuer,
        subject = %subject,
        client = %client,
        action = what,
        method = %method,
        path = %path,
        tenant = %tenant_text,
        status,
        outcome = outcome_of(status),
        "admin API call"
    );
    let Some(tenant) = tenant else { return };
    let a = Access {
        subtype: "operation".into(),
        method: method.clone(),
        resource: None,
        patients: Vec::new(),
        status,
        query: None,
    };
    let (recorded, micros) = now();
    let mut spec = spec_of(&a, None);
    spec.action = match what {
        "create-tenant" => "C",
        "remove-tenant" => "D",
        _ => "R",
    };
    spec.outcome_desc = format!("HTTP {status}: admin API {what} ({method} {path})");
    let ev = build(who, &spec, &recorded);
    let rec = to_record(ev, micros, Vec::new());
    // Admin calls are rare and a tenant's creation is a write: wait for durability.
    let _ = append(state.store.clone(), tenant, vec![rec]).await;
}

// ---------------------------------------------------------------------------------------------
// Searching the log

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

/// The patient an AuditEvent search asks about (`patient` or `entity`), if any.
pub fn asked_patient(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "patient" || k == "entity")
        .map(|(_, v)| v.strip_prefix("Patient/").unwrap_or(&v).to_string())
        .last()
}

/// `GET /fhir/{t}/AuditEvent?…` from the audit area: see the module docs for the parameters.
pub async fn search(state: &AppState, tenant: &TenantId, base: &str, query: &str) -> Response {
    let mut q = AuditQuery::default();
    let mut total = false;
    let mut kept: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "patient" | "entity" => {
                q.patient = Some(v.strip_prefix("Patient/").unwrap_or(&v).to_string());
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
                    "ge" => q.from_micros = q.from_micros.max(lo),
                    "gt" => q.from_micros = q.from_micros.max(hi.saturating_add(1)),
                    "le" => q.to_micros = q.to_micros.min(hi.saturating_add(1)),
                    "lt" => q.to_micros = q.to_micros.min(lo),
                    _ => {
                        q.from_micros = q.from_micros.max(lo);
                        q.to_micros = q.to_micros.min(hi.saturating_add(1));
                    }
                }
            }
            "_count" => match v.parse::<usize>() {
                Ok(n) => q.count = n.clamp(1, AuditQuery::MAX_COUNT),
                Err(_) => return bad("_count must be a whole number".into()),
            },
            "_sort" => match v.as_ref() {
                "-date" => q.newest_first = true,
                "date" => q.newest_first = false,
                other => {
                    return bad(format!(
                        "AuditEvent search sorts by date or -date, not '{}'",
                        other.chars().take(40).collect::<String>()
                    ));
                }
            },
            "_total" => match v.as_ref() {
                "accurate" => total = true,
                "none" | "estimate" => total = false,
                other => {
                    return bad(format!(
                        "_total must be none, estimate or accurate, not '{}'",
                        other.chars().take(40).collect::<String>()
                    ));
                }
            },
            "_cursor" => match v.parse::<AuditCursor>() {
                Ok(c) => q.after = Some(c),
                Err(e) => return bad(e.to_string()),
            },
            "_format" | "_pretty" => {}
            other => {
                return bad(format!(
                    "AuditEvent search supports patient, date, _count, _sort, _total and \
                     _cursor, not '{}'",
                    other.chars().take(40).collect::<String>()
                ));
            }
        }
        if k != "_cursor" {
            kept.push((k.into_owned(), v.into_owned()));
        }
    }
    let store = state.store.clone();
    let t = tenant.clone();
    let q2 = q.clone();
    let found = tokio::task::spawn_blocking(move || {
        let page = store.audit_page(&t, &q2)?;
        let total = if total {
            Some(store.audit_count(&t, &q2)?)
        } else {
            None
        };
        Ok::<_, fhir_store::StoreError>((page, total))
    })
    .await;
    let (page, total) = match found {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return ApiError::from(e).into_response(),
        Err(e) => return ApiError::Internal(format!("audit search failed: {e}")).into_response(),
    };
    let link = |cursor: Option<AuditCursor>| {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &kept {
            ser.append_pair(k, v);
        }
        if let Some(c) = cursor {
            ser.append_pair("_cursor", &c.to_string());
        }
        format!("{base}/AuditEvent?{}", ser.finish())
    };
    let mut b = BundleBuilder::new("searchset");
    b.total = total;
    b.links.push(("self", link(q.after)));
    if let Some(next) = page.next {
        b.links.push(("next", link(Some(next))));
    }
    for r in page.records {
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
