//! FHIR `batch` and `transaction` Bundles without HTTP, and response Bundles built around stored
//! resource bytes.
//!
//! [`process`] takes a Bundle as a JSON tree and returns the `batch-response` or
//! `transaction-response` as a [`BundleBuilder`], which renders compact JSON with the stored
//! bytes of each resource spliced in unchanged (design invariant 7) or a tree for other formats.
//!
//! How a Bundle is processed:
//! 1. The envelope is checked: a `Bundle` of type `batch` or `transaction`, at most
//!    [`BundleOptions::max_entries`] entries, each with a `request` whose `method` is one of
//!    GET, HEAD, POST, PUT, PATCH, DELETE and whose `url` is `Type`, `Type/id`, `Type?query` or
//!    `Type/id/_history/vid`, relative or under this tenant's [`BundleOptions::base_url`].
//! 2. Every entry is parsed and its resource validated **in parallel** (rayon): that is most of
//!    the CPU work of ingesting measurements, and it needs no lock.
//! 3. Search criteria the store cannot evaluate itself (anything but `_id` and `identifier`,
//!    in `ifNoneExist`, `PUT`/`DELETE Type?…` and conditional references) are resolved by the
//!    [`BundleOptions::resolver`], if there is one, under its locks on those criteria (see
//!    [`CriteriaResolver`]); without one they are a `400` for the entry.
//! 4. The writes go to the store's single writer in **one** request:
//!    [`Store::transaction_entries_resolved`] (all or nothing, spec order, references
//!    rewritten) or [`Store::batch_entries_resolved`] (each entry on its own) — either way one
//!    durable commit. The writer re-checks the searches' results atomically with the writes.
//! 5. GET/HEAD entries are answered after the commit, so a transaction's reads see its writes.
//!    `GET Type?…` is a full search with the resolver (a `searchset` Bundle as the entry's
//!    resource, `_count`, `_sort`, `_include`… and an `outcome` entry for ignored
//!    parameters, as in a REST search); without one it takes `_id`/`identifier` only.
//!
//! ## Search-resolved criteria in a transaction
//!
//! They are resolved against the store as it is *before* the transaction (as HAPI FHIR does),
//! and the writer re-checks the result after the transaction's deletes: a match the transaction
//! deletes no longer matches. Resources the transaction creates are not seen by the search,
//! with two exceptions that make retries and linked creates work: two entries with the same
//! `ifNoneExist` criteria are one resource (the second answers `200` with the first's), and a
//! conditional reference with the same criteria as an entry's `ifNoneExist` or conditional
//! update resolves to that entry's resource. Otherwise the usual rules hold: an `ifNoneExist`
//! with one match creates nothing, with several is a `412`; a conditional reference must match
//! exactly one resource (none: `400`, several: `412`, naming the entry). In a batch, a
//! resource created for such criteria by one entry counts as a match of the same criteria in
//! the later entries.
//!
//! Response entries are in the order of the request. For a transaction, a failing entry fails
//! the whole Bundle with a [`BundleError`] naming the entry (`Bundle.entry[3]`) and nothing is
//! written; reads come after the commit, so a failing read of a transaction is reported in its
//! entry only. For a batch, each entry has its own status and, on failure, its own
//! OperationOutcome.
//!
//! ```
//! use fhir_core::{json, TenantId};
//! use fhir_store::Store;
//! use fhir_store::bundle::{process, BundleOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let t = TenantId::new("ous")?;
//! store.create_tenant(&t, "OUS")?;
//! let bundle = json::parse(br#"{"resourceType":"Bundle","type":"transaction","entry":[
//!   {"fullUrl":"urn:uuid:0b4e7a9e-1c61-4d0a-9f3e-2b8c6c1d7e11",
//!    "resource":{"resourceType":"Patient","identifier":[{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"13031353453"}]},
//!    "request":{"method":"POST","url":"Patient"}},
//!   {"resource":{"resourceType":"Observation","status":"final","code":{"text":"pulse"},
//!      "subject":{"reference":"urn:uuid:0b4e7a9e-1c61-4d0a-9f3e-2b8c6c1d7e11"},"valueQuantity":{"value":72.50}},
//!    "request":{"method":"POST","url":"Observation"}}]}"#)?;
//! let opts = BundleOptions { base_url: "http://localhost/fhir/ous".into(), ..BundleOptions::default() };
//! let response = process(&store, &t, bundle, &opts)?;
//! assert_eq!(response.bundle_type, "transaction-response");
//! assert_eq!(response.entries[1].response.as_ref().unwrap().status, "201 Created");
//! let text = String::from_utf8(response.to_compact_json())?;
//! assert!(text.contains(r#""reference":"Patient/"#) && text.contains("72.50"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use fhir_core::references::RefKind;
use fhir_core::{
    Issue, IssueType, Json, Map, OperationOutcome, Resource, ResourceId, ResourceType, TenantId,
    VersionId,
};
use rayon::prelude::*;

use crate::Store;
use crate::condition::{Condition, ResolvedReferences};
use crate::error::StoreError;
use crate::time::{format_micros, now_micros};
use crate::types::{IfNoneMatch, ReadResult, TxEntry, WriteKind, WriteOp, WriteOutcome};

// ---------------------------------------------------------------------------------- responses

/// `Bundle.entry.response`
#[derive(Debug, Clone, Default)]
pub struct EntryResponse {
    /// e.g. `201 Created`
    pub status: String,
    /// `W/"n"`
    pub etag: Option<String>,
    /// instant
    pub last_modified: Option<String>,
    /// Location of a created or updated resource, e.g. `Observation/1/_history/1`.
    pub location: Option<String>,
    /// An OperationOutcome explaining a failed entry.
    pub outcome: Option<Json>,
}

/// One entry of a response Bundle.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// `Bundle.entry.fullUrl`
    pub full_url: Option<String>,
    /// Stored JSON bytes of the resource, if any (spliced into compact output as they are).
    pub resource: Option<Vec<u8>>,
    /// `Bundle.entry.search.mode`
    pub search_mode: Option<&'static str>,
    /// `Bundle.entry.request` (method, url)
    pub request: Option<(String, String)>,
    /// `Bundle.entry.response`
    pub response: Option<EntryResponse>,
}

/// A Bundle to send back (history, searchset, batch-response, transaction-response).
///
/// For compact JSON the stored bytes of each resource are spliced in as they are, so a page of
/// results costs no parse or re-serialisation per resource. Pretty JSON and XML go through the
/// tree ([`BundleBuilder::to_tree`]).
#[derive(Debug, Clone)]
pub struct BundleBuilder {
    /// `Bundle.type`
    pub bundle_type: &'static str,
    /// `Bundle.total`
    pub total: Option<u64>,
    /// `Bundle.link` (relation, url)
    pub links: Vec<(&'static str, String)>,
    /// The entries.
    pub entries: Vec<Entry>,
}

impl BundleBuilder {
    /// An empty Bundle of the given type.
    pub fn new(bundle_type: &'static str) -> BundleBuilder {
        BundleBuilder {
            bundle_type,
            total: None,
            links: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn head(&self) -> Map {
        let mut root = Map::new();
        root.insert("resourceType", Json::str("Bundle"));
        root.insert("id", Json::str(uuid::Uuid::new_v4().to_string()));
        let mut meta = Map::new();
        meta.insert("lastUpdated", Json::str(format_micros(now_micros())));
        root.insert("meta", Json::Object(meta));
        root.insert("type", Json::str(self.bundle_type));
        if let Some(t) = self.total {
            root.insert("total", Json::Number(t.to_string()));
        }
        if !self.links.is_empty() {
            let links = self
                .links
                .iter()
                .map(|(rel, url)| {
                    let mut m = Map::new();
                    m.insert("relation", Json::str(*rel));
                    m.insert("url", Json::str(url.clone()));
                    Json::Object(m)
                })
                .collect();
            root.insert("link", Json::Array(links));
        }
        root
    }

    /// The entry's members other than `fullUrl` and `resource`, in FHIR order.
    fn entry_tail(e: &Entry) -> Map {
        let mut m = Map::new();
        if let Some(mode) = e.search_mode {
            let mut s = Map::new();
            s.insert("mode", Json::str(mode));
            m.insert("search", Json::Object(s));
        }
        if let Some((method, url)) = &e.request {
            let mut r = Map::new();
            r.insert("method", Json::str(method.clone()));
            r.insert("url", Json::str(url.clone()));
            m.insert("request", Json::Object(r));
        }
        if let Some(resp) = &e.response {
            let mut r = Map::new();
            r.insert("status", Json::str(resp.status.clone()));
            if let Some(l) = &resp.location {
                r.insert("location", Json::str(l.clone()));
            }
            if let Some(t) = &resp.etag {
                r.insert("etag", Json::str(t.clone()));
            }
            if let Some(t) = &resp.last_modified {
                r.insert("lastModified", Json::str(t.clone()));
            }
            if let Some(o) = &resp.outcome {
                r.insert("outcome", o.clone());
            }
            m.insert("response", Json::Object(r));
        }
        m
    }

    /// The Bundle as a tree (parses each resource).
    pub fn to_tree(&self) -> Result<Json, fhir_core::json::ParseError> {
        let mut root = self.head();
        if !self.entries.is_empty() {
            let mut entries = Vec::with_capacity(self.entries.len());
            for e in &self.entries {
                let mut m = Map::new();
                if let Some(u) = &e.full_url {
                    m.insert("fullUrl", Json::str(u.clone()));
                }
                if let Some(raw) = &e.resource {
                    m.insert("resource", fhir_core::json::parse(raw)?);
                }
                for (k, v) in Self::entry_tail(e).iter() {
                    m.insert(k, v.clone());
                }
                entries.push(Json::Object(m));
            }
            root.insert("entry", Json::Array(entries));
        }
        Ok(Json::Object(root))
    }

    /// Compact JSON with the stored resource bytes spliced in.
    pub fn to_compact_json(&self) -> Vec<u8> {
        let head = Json::Object(self.head()).to_bytes();
        if self.entries.is_empty() {
            return head;
        }
        let mut out = Vec::with_capacity(
            head.len()
                + self
                    .entries
                    .iter()
                    .map(|e| e.resource.as_ref().map_or(0, Vec::len) + 200)
                    .sum::<usize>(),
        );
        // `head` is an object serialisation and so ends with '}'.
        out.extend_from_slice(&head[..head.len() - 1]);
        out.extend_from_slice(b",\"entry\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            let mut first = true;
            if let Some(u) = &e.full_url {
                let mut s = String::new();
                fhir_core::json::write_string(&mut s, u);
                out.extend_from_slice(b"\"fullUrl\":");
                out.extend_from_slice(s.as_bytes());
                first = false;
            }
            if let Some(raw) = &e.resource {
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(b"\"resource\":");
                out.extend_from_slice(raw);
                first = false;
            }
            let tail = Json::Object(Self::entry_tail(e)).to_bytes();
            // `tail` is `{...}`: splice its members in after ours.
            if tail.len() > 2 {
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(&tail[1..tail.len() - 1]);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }
}

// ---------------------------------------------------------------------------------- options

/// How [`process`] treats a Bundle.
#[derive(Clone)]
pub struct BundleOptions {
    /// Most entries accepted in one Bundle (default 10,000); more is a 413.
    pub max_entries: usize,
    /// This tenant's FHIR base, e.g. `http://localhost:8080/fhir/ous`: request URLs may be
    /// absolute under it, and response `fullUrl`s are built on it (none when empty).
    pub base_url: String,
    /// Whether write entries of the response carry the stored resource (`Prefer:
    /// return=representation`, the default) or only status, location and ETag
    /// (`return=minimal`).
    pub return_representation: bool,
    /// Resolves search criteria the store cannot evaluate itself (anything but `_id` and
    /// `identifier`) in conditional entries, conditional references and `GET Type?…` entries.
    /// Without one (the default) such criteria are a `400` naming the entry.
    pub resolver: Option<Arc<dyn CriteriaResolver>>,
}

impl Default for BundleOptions {
    fn default() -> BundleOptions {
        BundleOptions {
            max_entries: 10_000,
            base_url: String::new(),
            return_representation: true,
            resolver: None,
        }
    }
}

impl std::fmt::Debug for BundleOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleOptions")
            .field("max_entries", &self.max_entries)
            .field("base_url", &self.base_url)
            .field("return_representation", &self.return_representation)
            .field("resolver", &self.resolver.as_ref().map(|_| "…"))
            .finish()
    }
}

// ---------------------------------------------------------------------------------- criteria

/// Why a [`CriteriaResolver`] could not resolve criteria or run a search: an HTTP status (400
/// malformed or unknown parameters, 503 index behind, 500 the server's fault) and the issues
/// for an OperationOutcome. [`process`] puts the entry's name in front of each issue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {}", .issues.first().map(|i| i.diagnostics.as_str()).unwrap_or("criteria refused"))]
pub struct CriteriaError {
    /// The HTTP status.
    pub status: u16,
    /// What is wrong.
    pub issues: Vec<Issue>,
}

/// Holds the locks of [`CriteriaResolver::lock`] until it is dropped.
pub struct CriteriaLock<'a> {
    _held: Box<dyn Held + 'a>,
}

/// Anything: what a [`CriteriaLock`] keeps alive (and drops with it).
trait Held {}
impl<T> Held for T {}

impl<'a> CriteriaLock<'a> {
    /// Keeps `held` (e.g. mutex guards) until the lock is dropped.
    pub fn new<T: 'a>(held: T) -> CriteriaLock<'a> {
        CriteriaLock {
            _held: Box::new(held),
        }
    }
}

impl std::fmt::Debug for CriteriaLock<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CriteriaLock")
    }
}

/// Search for [`process`]: what the store cannot answer itself, a search index can.
///
/// [`process`] uses it for search criteria other than `_id`/`identifier` — `ifNoneExist`,
/// `PUT Type?…`, `DELETE Type?…`, conditional references (`Patient?name=…&birthdate=…`) — and
/// for `GET Type?…` entries. For the criteria of one Bundle it
///
/// 1. takes [`lock`](CriteriaResolver::lock) on all of them at once (given sorted, so that
///    concurrent Bundles and single conditional operations cannot deadlock);
/// 2. [`find`](CriteriaResolver::find)s each, which must see every write acknowledged before;
/// 3. hands the matches to the store's writer as [`Condition::resolved`] conditions, which it
///    re-checks atomically with the write (a match changed since the search fails the entry
///    with a 412, one deleted since no longer matches);
/// 4. drops the lock after the commit.
///
/// So conditional operations on the same criteria — in Bundles or single requests that take
/// the same locks — never decide on a search that misses another's write: N clients sending
/// the same batch create each resource once. `fhir_search::BundleResolver` is one, over a
/// search index.
///
/// The resolver only reads; every write goes through the store handle given to [`process`]
/// (which may carry an audit hook, see [`Store::with_audit`]).
pub trait CriteriaResolver: Send + Sync {
    /// Serialises conditional operations on the same criteria: holds until the returned lock
    /// is dropped, and blocks while another holder has any of them. `criteria` are
    /// `(type, normalised query)` pairs ([`crate::normalize_criteria`]), sorted and without
    /// duplicates.
    fn lock<'a>(
        &'a self,
        t: &TenantId,
        criteria: &[(ResourceType, String)],
    ) -> Result<CriteriaLock<'a>, CriteriaError>;

    /// The current resources of type `ty` matching `criteria` (a URL query; every parameter
    /// must be understood), each with the version the search saw, after every write
    /// acknowledged before the call.
    fn find(
        &self,
        t: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<(ResourceId, VersionId)>, CriteriaError>;

    /// Whether `query` is a search that [`search`](CriteriaResolver::search) can run (a
    /// transaction checks its `GET` entries before it writes anything, so that malformed
    /// criteria refuse the whole transaction). The default accepts everything.
    fn check_search(
        &self,
        _t: &TenantId,
        _ty: ResourceType,
        _query: &str,
    ) -> Result<(), CriteriaError> {
        Ok(())
    }

    /// A `GET base_url/ty?query` entry: the first page of the search as a `searchset`
    /// Bundle, seeing every write acknowledged before the call (for a transaction, its own).
    fn search(
        &self,
        t: &TenantId,
        ty: ResourceType,
        query: &str,
        base_url: &str,
    ) -> Result<BundleBuilder, CriteriaError>;
}

/// Why a Bundle as a whole was refused: an HTTP status and the issues for an OperationOutcome.
/// Issues about one entry name it in `diagnostics` and in `expression` (`Bundle.entry[3]…`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {}", .issues.first().map(|i| i.diagnostics.as_str()).unwrap_or("bundle refused"))]
pub struct BundleError {
    /// The HTTP status: 400 bad input, 404 unknown tenant, 412 precondition, 413 too many
    /// entries, 422 patch failure, 500 the server's fault.
    pub status: u16,
    /// What is wrong.
    pub issues: Vec<Issue>,
}

impl BundleError {
    fn bad(msg: impl Into<String>) -> BundleError {
        BundleError {
            status: 400,
            issues: vec![Issue::error(IssueType::Invalid, msg)],
        }
    }

    fn from_store(e: StoreError) -> BundleError {
        BundleError {
            status: e.http_status(),
            issues: store_issues(&e, None),
        }
    }
}

/// At most this many issues are reported for a refused Bundle.
const MAX_ISSUES: usize = 100;

// ---------------------------------------------------------------------------------- parsing

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            _ => return None,
        })
    }
}

/// A GET/HEAD entry.
#[derive(Debug)]
enum ReadKind {
    Instance {
        ty: ResourceType,
        id: ResourceId,
        if_none_match: Option<VersionId>,
    },
    Version {
        ty: ResourceType,
        id: ResourceId,
        version: VersionId,
    },
    /// `Type?query`: with a [`CriteriaResolver`] a full search (`cond` is `None`), else the
    /// criteria the store evaluates itself.
    Search {
        ty: ResourceType,
        cond: Option<Condition>,
        query: String,
    },
}

#[derive(Debug)]
enum Action {
    Write(TxEntry),
    Read { read: ReadKind, head: bool },
}

/// One entry as understood: what to do, and how to name it in messages.
#[derive(Debug)]
struct Parsed {
    index: usize,
    /// `PUT Patient/1`, for messages.
    label: String,
    action: Action,
    /// The criteria of the entry that only a search can resolve.
    needs: Vec<Need>,
}

/// Search criteria a write entry needs resolved before it is written.
#[derive(Debug, Clone)]
struct Need {
    ty: ResourceType,
    /// Normalised ([`crate::normalize_criteria`]).
    criteria: String,
    /// A conditional reference, as written (else the entry's own condition).
    reference: Option<String>,
}

impl Need {
    fn key(&self) -> (ResourceType, String) {
        (self.ty, self.criteria.clone())
    }
}

/// The entry's own condition (`ifNoneExist`, `PUT`/`DELETE Type?…`), and the member that
/// holds it.
fn condition_mut(op: &mut WriteOp) -> Option<(&mut Condition, &'static str)> {
    match op {
        WriteOp::Create {
            if_none_exist: Some(c),
            ..
        } => Some((c, "request.ifNoneExist")),
        WriteOp::ConditionalUpdate { cond, .. } | WriteOp::ConditionalDelete { cond, .. } => {
            Some((cond, "request.url"))
        }
        _ => None,
    }
}

/// What only a search can resolve in a write entry: its own condition, if the store cannot
/// evaluate it, and conditional references (`Type?query`) on criteria the store cannot
/// evaluate.
fn needs_of(e: &mut TxEntry) -> Vec<Need> {
    let mut needs = Vec::new();
    let ty = match &e.op {
        WriteOp::Create { resource, .. }
        | WriteOp::Update { resource, .. }
        | WriteOp::UpdateIfNoneMatch { resource, .. } => resource.resource_type(),
        WriteOp::ConditionalUpdate { ty, .. }
        | WriteOp::ConditionalDelete { ty, .. }
        | WriteOp::Patch { ty, .. }
        | WriteOp::Delete { ty, .. } => *ty,
    };
    if let Some((c, _)) = condition_mut(&mut e.op)
        && let Some(criteria) = c.unresolved_criteria()
    {
        needs.push(Need {
            ty,
            criteria: criteria.to_string(),
            reference: None,
        });
    }
    let resource = match &mut e.op {
        WriteOp::Create { resource, .. }
        | WriteOp::Update { resource, .. }
        | WriteOp::ConditionalUpdate { resource, .. }
        | WriteOp::UpdateIfNoneMatch { resource, .. } => resource,
        _ => return needs,
    };
    resource.visit_references_mut(&mut |kind, s| {
        if kind != RefKind::Reference {
            return;
        }
        // The same test as the writer's: a relative `Type?query`.
        let Some((ty, query)) = s.split_once('?') else {
            return;
        };
        let Some(ty) = ResourceType::parse(ty) else {
            return;
        };
        if Condition::parse(query).is_err()
            && !needs
                .iter()
                .any(|n| n.reference.as_deref() == Some(s.as_str()))
        {
            needs.push(Need {
                ty,
                criteria: crate::normalize_criteria(query),
                reference: Some(s.clone()),
            });
        }
    });
    needs
}

/// A failed entry: its HTTP status and issues.
#[derive(Debug)]
struct EntryError {
    index: usize,
    status: u16,
    issues: Vec<Issue>,
}

fn entry_path(index: usize) -> String {
    format!("Bundle.entry[{index}]")
}

fn entry_error(
    index: usize,
    status: u16,
    code: IssueType,
    member: &str,
    msg: String,
) -> EntryError {
    let path = if member.is_empty() {
        entry_path(index)
    } else {
        format!("{}.{member}", entry_path(index))
    };
    EntryError {
        index,
        status,
        issues: vec![Issue::at(
            code,
            path,
            format!("Bundle.entry[{index}]: {msg}"),
        )],
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The URL of a request, relative to the tenant's base: `(path segments, query)`.
fn split_url<'a>(url: &'a str, base: &str) -> Result<(Vec<&'a str>, Option<&'a str>), String> {
    let rel = match url.strip_prefix(base).and_then(|r| r.strip_prefix('/')) {
        Some(r) if !base.is_empty() => r,
        _ => {
            // Only the path says whether the URL is absolute: criteria often hold URLs
            // (`code=http://loinc.org|8867-4`).
            let path = url.split_once('?').map_or(url, |(p, _)| p);
            if path.contains("://") || url.starts_with('/') {
                let base_hint = if base.is_empty() {
                    String::new()
                } else {
                    format!(" ({base})")
                };
                return Err(format!(
                    "the URL '{}' is outside this tenant's base{base_hint}; use a URL relative \
                     to it, e.g. 'Patient/123'",
                    shorten(url)
                ));
            }
            url
        }
    };
    let (path, query) = match rel.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rel, None),
    };
    if path.is_empty() {
        return Err("the URL has no resource type".into());
    }
    Ok((path.split('/').collect(), query))
}

fn resource_type(name: &str) -> Result<ResourceType, String> {
    ResourceType::parse(name).ok_or_else(|| format!("unknown resource type '{}'", shorten(name)))
}

fn resource_id(id: &str) -> Result<ResourceId, String> {
    ResourceId::new(id).map_err(|e| e.to_string())
}

/// Standard base64 (with or without padding), as FHIR `base64Binary` uses.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let clean: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let data = clean
        .strip_suffix(b"==")
        .or_else(|| clean.strip_suffix(b"="))
        .unwrap_or(&clean);
    if data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c)? << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    Some(out)
}

/// The JSON Patch of a PATCH entry: a `Binary` with `contentType: application/json-patch+json`
/// and the patch as base64 `data` (how FHIR R4 carries a JSON Patch in a Bundle).
fn patch_document(resource: &Json) -> Result<Json, String> {
    let rt = resource.get("resourceType").and_then(Json::as_str);
    if rt == Some("Parameters") {
        return Err(
            "FHIRPath Patch (a Parameters resource) is not supported; send a JSON Patch \
                    as a Binary with contentType application/json-patch+json"
                .into(),
        );
    }
    if rt != Some("Binary") {
        return Err(
            "a PATCH entry's resource must be a Binary with contentType \
                    application/json-patch+json and the patch as base64 data"
                .into(),
        );
    }
    let ct = resource
        .get("contentType")
        .and_then(Json::as_str)
        .unwrap_or_default();
    if ct.split(';').next().map(str::trim) != Some("application/json-patch+json") {
        return Err(format!(
            "the Binary's contentType must be application/json-patch+json, not '{}'",
            shorten(ct)
        ));
    }
    let data = resource
        .get("data")
        .and_then(Json::as_str)
        .ok_or("the Binary has no data")?;
    let bytes = base64_decode(data).ok_or("the Binary's data is not valid base64")?;
    fhir_core::json::parse(&bytes).map_err(|e| format!("the JSON Patch is not JSON: {e}"))
}

/// Validates an entry's resource; issue paths are moved under the entry.
fn validate(index: usize, json: Json) -> Result<Resource, EntryError> {
    Resource::from_json(json).map_err(|e| {
        let prefix = format!("{}.resource", entry_path(index));
        let issues = e
            .issues()
            .into_iter()
            .map(|mut i| {
                i.expression = Some(match i.expression.take() {
                    // `Observation.status` → `Bundle.entry[3].resource.status`
                    Some(x) => match x.split_once('.') {
                        Some((_, rest)) => format!("{prefix}.{rest}"),
                        None => prefix.clone(),
                    },
                    None => prefix.clone(),
                });
                i.diagnostics = format!("Bundle.entry[{index}]: {}", i.diagnostics);
                i
            })
            .collect();
        EntryError {
            index,
            status: 400,
            issues,
        }
    })
}

fn parse_entry(index: usize, entry: Json, opts: &BundleOptions) -> Result<Parsed, EntryError> {
    let bad = |member: &str, msg: String| entry_error(index, 400, IssueType::Invalid, member, msg);
    let Json::Object(mut entry) = entry else {
        return Err(bad("", "an entry must be a JSON object".into()));
    };
    let Some(Json::Object(request)) = entry.remove("request") else {
        return Err(entry_error(
            index,
            400,
            IssueType::Required,
            "request",
            "the entry has no request (method and url are required in a batch or transaction)"
                .into(),
        ));
    };
    let text = |k: &str| request.get(k).and_then(Json::as_str);
    let method_text = text("method").unwrap_or_default();
    let method = Method::parse(method_text).ok_or_else(|| {
        bad(
            "request.method",
            format!(
                "request.method must be GET, HEAD, POST, PUT, PATCH or DELETE, not '{}'",
                shorten(method_text)
            ),
        )
    })?;
    let url = text("url")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| bad("request.url", "request.url is required".into()))?;
    let label = format!("{method_text} {}", shorten(url));
    let bad_url = |msg: String| bad("request.url", format!("{label}: {msg}"));
    let (path, query) = split_url(url, &opts.base_url).map_err(&bad_url)?;
    let ty = resource_type(path[0]).map_err(&bad_url)?;
    let full_url = entry
        .get("fullUrl")
        .and_then(Json::as_str)
        .map(str::to_string);
    let resource = entry.remove("resource");
    let if_match = match text("ifMatch") {
        Some(v) => Some(VersionId::parse(v).map_err(|_| {
            bad(
                "request.ifMatch",
                format!("ifMatch must be an ETag like W/\"3\", not '{}'", shorten(v)),
            )
        })?),
        None => None,
    };
    let if_none_match = match text("ifNoneMatch") {
        Some("*") => Some(IfNoneMatch::Any),
        Some(v) => Some(IfNoneMatch::Version(VersionId::parse(v).map_err(|_| {
            bad(
                "request.ifNoneMatch",
                format!(
                    "ifNoneMatch must be * or an ETag like W/\"3\", not '{}'",
                    shorten(v)
                ),
            )
        })?)),
        None => None,
    };
    let condition = |q: &str, member: &str| -> Result<Condition, EntryError> {
        // `ifNoneExist` may be given with or without the `Type?` in front.
        let q = q.split_once('?').map_or(q, |(_, q)| q);
        match Condition::parse(q) {
            Ok(c) => Ok(c),
            // Resolved by a search before the write (see `resolve`).
            Err(_) if opts.resolver.is_some() => Ok(Condition::unresolved(q)),
            Err(e) => Err(entry_error(
                index,
                400,
                IssueType::NotSupported,
                member,
                format!("{label}: {e}"),
            )),
        }
    };
    let body = |resource: Option<Json>| -> Result<Resource, EntryError> {
        let json = resource.ok_or_else(|| {
            entry_error(
                index,
                400,
                IssueType::Required,
                "resource",
                format!("{label}: the entry needs a resource"),
            )
        })?;
        if json.get("resourceType").and_then(Json::as_str) == Some("Bundle") {
            let bt = json.get("type").and_then(Json::as_str).unwrap_or_default();
            if !matches!(bt, "document" | "collection") {
                return Err(bad(
                    "resource",
                    format!(
                        "a Bundle inside a Bundle must be a document or collection, not '{}'",
                        shorten(bt)
                    ),
                ));
            }
        }
        let r = validate(index, json)?;
        if r.resource_type() != ty {
            return Err(bad(
                "resource",
                format!(
                    "{label}: the resource is a {} but the URL is for {ty}",
                    r.resource_type()
                ),
            ));
        }
        Ok(r)
    };
    let write = |op: WriteOp| {
        Action::Write(TxEntry {
            full_url: full_url.clone(),
            op,
        })
    };
    let action = match (method, path.as_slice(), query) {
        (Method::Post, [_], None) => {
            let resource = body(resource)?;
            let if_none_exist = match text("ifNoneExist") {
                Some(q) => Some(condition(q, "request.ifNoneExist")?),
                None => None,
            };
            write(WriteOp::Create {
                resource,
                if_none_exist,
            })
        }
        (Method::Put, [_, id], None) => {
            let id = resource_id(id).map_err(&bad_url)?;
            let mut resource = body(resource)?;
            match resource.id() {
                Some(body_id) if body_id != id.as_str() => {
                    return Err(bad(
                        "resource.id",
                        format!(
                            "{label}: the resource's id '{}' does not match the URL's id",
                            shorten(body_id)
                        ),
                    ));
                }
                Some(_) => {}
                // The URL names the resource; an id-less body is taken to mean that one.
                None => resource.set_id(&id),
            }
            match if_none_match {
                Some(inm) => write(WriteOp::UpdateIfNoneMatch {
                    id,
                    resource,
                    if_none_match: inm,
                }),
                None => write(WriteOp::Update {
                    id,
                    resource,
                    if_match,
                }),
            }
        }
        (Method::Put, [_], Some(q)) => write(WriteOp::ConditionalUpdate {
            ty,
            cond: condition(q, "request.url")?,
            resource: body(resource)?,
            if_match,
        }),
        (Method::Patch, [_, id], None) => {
            let id = resource_id(id).map_err(&bad_url)?;
            let json = resource.ok_or_else(|| {
                entry_error(
                    index,
                    400,
                    IssueType::Required,
                    "resource",
                    format!("{label}: a PATCH entry needs the patch as a Binary resource"),
                )
            })?;
            let patch =
                patch_document(&json).map_err(|m| bad("resource", format!("{label}: {m}")))?;
            write(WriteOp::Patch {
                ty,
                id,
                patch,
                if_match,
            })
        }
        (Method::Delete, [_, id], None) => write(WriteOp::Delete {
            ty,
            id: resource_id(id).map_err(&bad_url)?,
            if_match,
        }),
        (Method::Delete, [_], Some(q)) => write(WriteOp::ConditionalDelete {
            ty,
            cond: condition(q, "request.url")?,
        }),
        (Method::Get | Method::Head, [_, id], None) => Action::Read {
            read: ReadKind::Instance {
                ty,
                id: resource_id(id).map_err(&bad_url)?,
                if_none_match: match if_none_match {
                    Some(IfNoneMatch::Version(v)) => Some(v),
                    _ => None,
                },
            },
            head: method == Method::Head,
        },
        (Method::Get | Method::Head, [_, id, "_history", v], None) => Action::Read {
            read: ReadKind::Version {
                ty,
                id: resource_id(id).map_err(&bad_url)?,
                version: VersionId::parse(v).map_err(|e| bad_url(e.to_string()))?,
            },
            head: method == Method::Head,
        },
        (Method::Get | Method::Head, [_], Some(q)) => Action::Read {
            read: ReadKind::Search {
                ty,
                cond: match opts.resolver {
                    Some(_) => None,
                    None => Some(condition(q, "request.url")?),
                },
                query: q.to_string(),
            },
            head: method == Method::Head,
        },
        (Method::Patch, [_], Some(_)) => {
            return Err(bad_url("conditional patch is not supported".into()));
        }
        _ => {
            return Err(bad_url(format!(
                "this URL form is not supported with {method_text}; use Type (POST), \
                 Type/id (PUT, PATCH, DELETE, GET), Type?criteria (PUT, DELETE, GET) or \
                 Type/id/_history/vid (GET)"
            )));
        }
    };
    let mut action = action;
    let needs = match (&mut action, &opts.resolver) {
        (Action::Write(e), Some(_)) => needs_of(e),
        _ => Vec::new(),
    };
    Ok(Parsed {
        index,
        label,
        action,
        needs,
    })
}

// ---------------------------------------------------------------------------------- processing

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        410 => "Gone",
        412 => "Precondition Failed",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        403 => "Forbidden",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

fn status_line(code: u16) -> String {
    format!("{code} {}", reason(code))
}

/// The issues for a store error, naming the entry if there is one.
fn store_issues(e: &StoreError, entry: Option<(usize, &str)>) -> Vec<Issue> {
    let (text, expression) = match entry {
        Some((i, label)) => (
            format!("Bundle.entry[{i}] ({label}): "),
            Some(entry_path(i)),
        ),
        None => (String::new(), None),
    };
    if e.is_internal() {
        tracing::error!(error = %e, "bundle entry failed");
        return vec![Issue {
            expression,
            ..Issue::error(IssueType::Exception, format!("{text}internal server error"))
        }];
    }
    let mut issues = vec![Issue {
        expression: expression.clone(),
        ..Issue::error(e.issue_type(), format!("{text}{e}"))
    }];
    if let StoreError::InvalidPatch(fhir_core::patch::PatchError::InvalidResult(details)) = e {
        issues.extend(details.iter().cloned().map(|mut i| {
            i.diagnostics = format!("{text}{}", i.diagnostics);
            i
        }));
    }
    issues
}

/// A resolver's issues about entry `index`: each names the entry in its diagnostics and,
/// unless it has a more precise one, in its expression (`Bundle.entry[3].member`).
fn named(issues: Vec<Issue>, index: usize, label: &str, member: &str) -> Vec<Issue> {
    let path = if member.is_empty() {
        entry_path(index)
    } else {
        format!("{}.{member}", entry_path(index))
    };
    issues
        .into_iter()
        .map(|mut i| {
            i.diagnostics = format!("Bundle.entry[{index}] ({label}): {}", i.diagnostics);
            if i.expression.is_none() {
                i.expression = Some(path.clone());
            }
            i
        })
        .collect()
}

/// The issues of a failed write entry; `searched`: whether the entry had search-resolved
/// criteria, whose re-check in the writer is the likely cause of a version conflict.
fn write_issues(e: &StoreError, index: usize, label: &str, searched: bool) -> Vec<Issue> {
    let mut issues = store_issues(e, Some((index, label)));
    if searched && matches!(e, StoreError::VersionConflict { .. }) {
        issues.push(Issue {
            expression: Some(entry_path(index)),
            ..Issue::information(format!(
                "Bundle.entry[{index}] ({label}): a resource matched by the entry's search \
                 criteria changed between the search and the write (unless the conflict is \
                 the entry's ifMatch), so the entry was not applied; send it again"
            ))
        });
    }
    issues
}

fn failed_entry(status: u16, issues: Vec<Issue>) -> Entry {
    Entry {
        response: Some(EntryResponse {
            status: status_line(status),
            outcome: Some(OperationOutcome::new(issues).to_json()),
            ..EntryResponse::default()
        }),
        ..Entry::default()
    }
}

fn full_url(opts: &BundleOptions, ty: ResourceType, id: &ResourceId) -> Option<String> {
    (!opts.base_url.is_empty()).then(|| format!("{}/{ty}/{id}", opts.base_url))
}

fn write_entry(out: WriteOutcome, opts: &BundleOptions) -> Entry {
    match out {
        WriteOutcome::Write(w) => {
            let r = w.resource;
            let status = match w.kind {
                WriteKind::Created => 201,
                WriteKind::Updated | WriteKind::Existing => 200,
            };
            Entry {
                full_url: full_url(opts, r.resource_type, &r.id),
                response: Some(EntryResponse {
                    status: status_line(status),
                    location: Some(format!(
                        "{}/{}/_history/{}",
                        r.resource_type, r.id, r.version
                    )),
                    etag: Some(r.version.etag()),
                    last_modified: Some(r.last_updated),
                    outcome: None,
                }),
                resource: opts.return_representation.then_some(r.json),
                ..Entry::default()
            }
        }
        WriteOutcome::Delete(d) => Entry {
            response: Some(EntryResponse {
                status: status_line(204),
                etag: d.version.map(|v| v.etag()),
                ..EntryResponse::default()
            }),
            ..Entry::default()
        },
    }
}

fn read_entry(
    store: &Store,
    t: &TenantId,
    index: usize,
    label: &str,
    read: ReadKind,
    head: bool,
    opts: &BundleOptions,
) -> Entry {
    let not_there = |status: u16, code: IssueType, what: String| {
        failed_entry(
            status,
            vec![Issue::at(
                code,
                entry_path(index),
                format!("Bundle.entry[{index}] ({label}): {what}"),
            )],
        )
    };
    let found = |r: crate::StoredResource| Entry {
        full_url: full_url(opts, r.resource_type, &r.id),
        response: Some(EntryResponse {
            status: status_line(200),
            etag: Some(r.version.etag()),
            last_modified: Some(r.last_updated),
            ..EntryResponse::default()
        }),
        resource: (!head).then_some(r.json),
        ..Entry::default()
    };
    let result = match read {
        ReadKind::Instance {
            ty,
            id,
            if_none_match,
        } => store.read(t, ty, &id).map(|r| match r {
            ReadResult::Found(r) if if_none_match == Some(r.version) => Entry {
                response: Some(EntryResponse {
                    status: status_line(304),
                    etag: Some(r.version.etag()),
                    last_modified: Some(r.last_updated),
                    ..EntryResponse::default()
                }),
                ..Entry::default()
            },
            ReadResult::Found(r) => found(r),
            ReadResult::Deleted { .. } => not_there(
                410,
                IssueType::Deleted,
                format!("{ty}/{id} has been deleted"),
            ),
            ReadResult::NotFound => {
                not_there(404, IssueType::NotFound, format!("{ty}/{id} is not known"))
            }
        }),
        ReadKind::Version { ty, id, version } => {
            store.vread(t, ty, &id, version).map(|r| match r {
                ReadResult::Found(r) => found(r),
                ReadResult::Deleted { .. } => not_there(
                    410,
                    IssueType::Deleted,
                    format!("{ty}/{id}/_history/{version} is a deletion"),
                ),
                ReadResult::NotFound => not_there(
                    404,
                    IssueType::NotFound,
                    format!("{ty}/{id}/_history/{version} is not known"),
                ),
            })
        }
        ReadKind::Search { ty, cond, query } => {
            let searched = match (cond, &opts.resolver) {
                (Some(cond), _) => search(store, t, ty, &cond, &query, opts),
                (None, Some(resolver)) => match resolver.search(t, ty, &query, &opts.base_url) {
                    Ok(b) => Ok(b),
                    Err(e) => {
                        return failed_entry(e.status, named(e.issues, index, label, ""));
                    }
                },
                (None, None) => Err(crate::unexpected()),
            };
            searched.map(|b| Entry {
                response: Some(EntryResponse {
                    status: status_line(200),
                    ..EntryResponse::default()
                }),
                resource: (!head).then(|| b.to_compact_json()),
                ..Entry::default()
            })
        }
    };
    result.unwrap_or_else(|e| failed_entry(e.http_status(), store_issues(&e, Some((index, label)))))
}

fn search(
    store: &Store,
    t: &TenantId,
    ty: ResourceType,
    cond: &Condition,
    query: &str,
    opts: &BundleOptions,
) -> Result<BundleBuilder, StoreError> {
    let mut b = BundleBuilder::new("searchset");
    for id in store.find(t, ty, cond)? {
        if let ReadResult::Found(r) = store.read(t, ty, &id)? {
            b.entries.push(Entry {
                full_url: full_url(opts, ty, &r.id),
                resource: Some(r.json),
                search_mode: Some("match"),
                ..Entry::default()
            });
        }
    }
    b.total = Some(b.entries.len() as u64);
    if !opts.base_url.is_empty() {
        b.links
            .push(("self", format!("{}/{ty}?{query}", opts.base_url)));
    }
    Ok(b)
}

/// The issues of a transaction's failing entries; the status of the first.
#[derive(Default)]
struct Refused {
    status: u16,
    issues: Vec<Issue>,
}

impl Refused {
    fn add(&mut self, status: u16, issues: Vec<Issue>) {
        if self.issues.is_empty() {
            self.status = status;
        }
        self.issues.extend(issues);
    }

    /// Fails with the issues gathered, if any.
    fn check(&mut self) -> Result<(), BundleError> {
        if self.issues.is_empty() {
            return Ok(());
        }
        let mut issues = std::mem::take(&mut self.issues);
        if issues.len() > MAX_ISSUES {
            issues.truncate(MAX_ISSUES);
            issues.push(Issue::error(
                IssueType::TooCosts,
                format!("more than {MAX_ISSUES} issues; stopped reporting"),
            ));
        }
        Err(BundleError {
            status: self.status,
            issues,
        })
    }
}

/// What the searches found, per (type, normalised criteria).
type Found = HashMap<(ResourceType, String), Result<Condition, CriteriaError>>;

/// Puts the search results `found` into a write entry: its own condition, and its conditional
/// references into `refs`. Fails with the status, member and issues of the first criteria the
/// search refused.
fn apply_resolved(
    e: &mut TxEntry,
    needs: &[Need],
    found: &Found,
    refs: &mut ResolvedReferences,
) -> Result<(), (u16, &'static str, Vec<Issue>)> {
    for need in needs {
        let Some(result) = found.get(&need.key()) else {
            continue;
        };
        match (&need.reference, result) {
            (None, Ok(cond)) => {
                if let Some((c, _)) = condition_mut(&mut e.op) {
                    *c = cond.clone();
                }
            }
            (None, Err(err)) => {
                let member = condition_mut(&mut e.op).map_or("request", |(_, m)| m);
                return Err((err.status, member, err.issues.clone()));
            }
            (Some(reference), Ok(cond)) => refs.insert(reference.clone(), cond.clone()),
            (Some(reference), Err(err)) => {
                let issues = err
                    .issues
                    .iter()
                    .cloned()
                    .map(|mut i| {
                        i.diagnostics = format!(
                            "the conditional reference '{}': {}",
                            shorten(reference),
                            i.diagnostics
                        );
                        i
                    })
                    .collect();
                return Err((err.status, "resource", issues));
            }
        }
    }
    Ok(())
}

/// Processes a `batch` or `transaction` Bundle for tenant `t` and returns the response Bundle.
/// See the [module documentation](self) for the rules.
pub fn process(
    store: &Store,
    t: &TenantId,
    bundle: Json,
    opts: &BundleOptions,
) -> Result<BundleBuilder, BundleError> {
    let Json::Object(mut root) = bundle else {
        return Err(BundleError::bad(format!(
            "expected a Bundle (a JSON object), found {}",
            bundle.kind()
        )));
    };
    match root.get("resourceType").and_then(Json::as_str) {
        Some("Bundle") => {}
        Some(other) => {
            return Err(BundleError::bad(format!(
                "a batch or transaction must be a Bundle, not a {}",
                shorten(other)
            )));
        }
        None => {
            return Err(BundleError::bad(
                "missing 'resourceType': expected a Bundle",
            ));
        }
    }
    let transaction = match root.get("type").and_then(Json::as_str) {
        Some("transaction") => true,
        Some("batch") => false,
        other => {
            return Err(BundleError {
                status: 400,
                issues: vec![Issue::at(
                    IssueType::Invalid,
                    "Bundle.type",
                    format!(
                        "Bundle.type must be 'batch' or 'transaction' to be processed here, not '{}'",
                        shorten(other.unwrap_or_default())
                    ),
                )],
            });
        }
    };
    let entries = match root.remove("entry") {
        None => Vec::new(),
        Some(Json::Array(items)) => items,
        Some(other) => {
            return Err(BundleError {
                status: 400,
                issues: vec![Issue::at(
                    IssueType::Structure,
                    "Bundle.entry",
                    format!("Bundle.entry must be an array, not {}", other.kind()),
                )],
            });
        }
    };
    if entries.len() > opts.max_entries {
        return Err(BundleError {
            status: 413,
            issues: vec![Issue::at(
                IssueType::TooCosts,
                "Bundle.entry",
                format!(
                    "the Bundle has {} entries; at most {} are accepted in one Bundle",
                    entries.len(),
                    opts.max_entries
                ),
            )],
        });
    }
    // An unknown tenant is one answer, not one per entry.
    match store.tenant(t) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(BundleError::from_store(StoreError::TenantNotFound(
                t.clone(),
            )));
        }
        Err(e) => return Err(BundleError::from_store(e)),
    }

    // Parsing and validation: the CPU-heavy part, on all cores.
    let parsed: Vec<Result<Parsed, EntryError>> = entries
        .into_par_iter()
        .enumerate()
        .map(|(i, e)| parse_entry(i, e, opts))
        .collect();

    let response_type = if transaction {
        "transaction-response"
    } else {
        "batch-response"
    };
    let mut out: Vec<Option<Entry>> = vec![None; parsed.len()];
    let mut writes: Vec<(usize, String, TxEntry, Vec<Need>)> = Vec::new();
    let mut reads: Vec<(usize, String, ReadKind, bool)> = Vec::new();
    let mut refused = Refused::default();
    for p in parsed {
        match p {
            Ok(Parsed {
                index,
                label,
                action: Action::Write(e),
                needs,
            }) => writes.push((index, label, e, needs)),
            Ok(Parsed {
                index,
                label,
                action: Action::Read { read, head },
                ..
            }) => reads.push((index, label, read, head)),
            Err(e) if transaction => refused.add(e.status, e.issues),
            Err(e) => out[e.index] = Some(failed_entry(e.status, e.issues)),
        }
    }
    refused.check()?;

    // Criteria only a search can resolve: locked, searched, and handed to the writer as
    // `Condition::resolved`; the locks are held until the commit (see `CriteriaResolver`).
    let mut refs = ResolvedReferences::new();
    let mut lock = None;
    if let Some(resolver) = opts.resolver.as_deref() {
        if transaction {
            // Malformed search criteria refuse the whole transaction before anything is
            // written, like malformed conditions do.
            for (i, label, read, _) in &reads {
                if let ReadKind::Search {
                    ty,
                    cond: None,
                    query,
                } = read
                    && let Err(e) = resolver.check_search(t, *ty, query)
                {
                    refused.add(e.status, named(e.issues, *i, label, "request.url"));
                }
            }
            refused.check()?;
        }
        let keys: BTreeSet<(ResourceType, String)> = writes
            .iter()
            .flat_map(|(_, _, _, needs)| needs.iter().map(Need::key))
            .collect();
        if !keys.is_empty() {
            let keys: Vec<(ResourceType, String)> = keys.into_iter().collect();
            lock = Some(resolver.lock(t, &keys).map_err(|e| BundleError {
                status: e.status,
                issues: e.issues,
            })?);
            let found: Found = keys
                .into_iter()
                .map(|(ty, criteria)| {
                    let r = resolver
                        .find(t, ty, &criteria)
                        .map(|matches| Condition::resolved(&criteria, matches));
                    ((ty, criteria), r)
                })
                .collect();
            let mut kept = Vec::with_capacity(writes.len());
            for (i, label, mut e, needs) in writes {
                match apply_resolved(&mut e, &needs, &found, &mut refs) {
                    Ok(()) => kept.push((i, label, e, needs)),
                    Err((status, member, issues)) => {
                        let issues = named(issues, i, &label, member);
                        if transaction {
                            refused.add(status, issues);
                        } else {
                            out[i] = Some(failed_entry(status, issues));
                        }
                    }
                }
            }
            writes = kept;
            refused.check()?;
        }
    }

    // (index, label, whether it has search-resolved criteria) of each write.
    let (indexes, rest): (Vec<(usize, String, bool)>, Vec<TxEntry>) = writes
        .into_iter()
        .map(|(i, label, e, needs)| ((i, label, !needs.is_empty()), e))
        .unzip();
    if transaction {
        let outcomes = store
            .transaction_entries_resolved(t, rest, refs)
            .map_err(|e| match e {
                StoreError::TransactionFailed { index, source } => {
                    let (i, label, searched) = indexes
                        .get(index)
                        .map_or((index, "", false), |(i, l, s)| (*i, l.as_str(), *s));
                    BundleError {
                        status: source.http_status(),
                        issues: write_issues(&source, i, label, searched),
                    }
                }
                other => BundleError::from_store(other),
            })?;
        for ((i, _, _), o) in indexes.into_iter().zip(outcomes) {
            out[i] = Some(write_entry(o, opts));
        }
    } else {
        let results = store
            .batch_entries_resolved(t, rest, refs)
            .map_err(BundleError::from_store)?;
        for ((i, label, searched), r) in indexes.into_iter().zip(results) {
            out[i] = Some(match r {
                Ok(o) => write_entry(o, opts),
                Err(e) => failed_entry(e.http_status(), write_issues(&e, i, &label, searched)),
            });
        }
    }
    // Committed: the next conditional operation on these criteria will see this Bundle's
    // writes. The reads need no lock.
    drop(lock);
    for (i, label, read, head) in reads {
        out[i] = Some(read_entry(store, t, i, &label, read, head, opts));
    }

    let mut b = BundleBuilder::new(response_type);
    b.entries = out
        .into_iter()
        .map(|e| {
            e.unwrap_or_else(|| {
                failed_entry(
                    500,
                    vec![Issue::error(IssueType::Exception, "internal server error")],
                )
            })
        })
        .collect();
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_known_values() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a$==").is_none());
    }

    #[test]
    fn urls_relative_to_the_base() {
        let base = "http://h/fhir/t";
        assert_eq!(
            split_url("Patient/1", base).unwrap(),
            (vec!["Patient", "1"], None)
        );
        assert_eq!(
            split_url("http://h/fhir/t/Patient?identifier=a", base).unwrap(),
            (vec!["Patient"], Some("identifier=a"))
        );
        assert_eq!(
            split_url("Observation?code=http://loinc.org|8867-4", base).unwrap(),
            (vec!["Observation"], Some("code=http://loinc.org|8867-4"))
        );
        assert!(split_url("http://h/fhir/other/Patient/1", base).is_err());
        assert!(split_url("http://evil/Patient?a=http://h/fhir/t", base).is_err());
        assert!(split_url("http://h/fhir/tt/Patient/1", base).is_err());
        assert!(split_url("/fhir/t/Patient", base).is_err());
        assert!(split_url("?x=1", base).is_err());
    }

    #[test]
    fn compact_splice_equals_tree_serialisation() {
        let mut b = BundleBuilder::new("history");
        b.links.push(("self", "http://x/fhir/t/_history".into()));
        b.entries.push(Entry {
            full_url: Some("http://x/fhir/t/Patient/1".into()),
            resource: Some(
                br#"{"resourceType":"Patient","id":"1","birthDate":"1970-01-01"}"#.to_vec(),
            ),
            request: Some(("PUT".into(), "Patient/1".into())),
            response: Some(EntryResponse {
                status: "200 OK".into(),
                etag: Some("W/\"2\"".into()),
                last_modified: Some("2024-01-01T00:00:00Z".into()),
                location: None,
                outcome: None,
            }),
            ..Entry::default()
        });
        b.entries.push(failed_entry(
            412,
            vec![Issue::error(IssueType::Conflict, "version conflict")],
        ));
        let mut compact = fhir_core::json::parse(&b.to_compact_json()).unwrap();
        let mut tree = b.to_tree().unwrap();
        // The two renderings were made at different moments: compare all but id/meta.
        for t in [&mut tree, &mut compact] {
            t.as_object_mut().unwrap().remove("id");
            t.as_object_mut().unwrap().remove("meta");
        }
        assert_eq!(compact, tree);
        let e = compact.get("entry").unwrap().as_array().unwrap();
        assert_eq!(
            e[0].get("resource")
                .unwrap()
                .get("birthDate")
                .unwrap()
                .as_str(),
            Some("1970-01-01")
        );
        assert_eq!(
            e[1].get("response")
                .unwrap()
                .get("outcome")
                .unwrap()
                .get("resourceType"),
            Some(&Json::str("OperationOutcome"))
        );
    }
}
