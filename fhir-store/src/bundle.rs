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
//! 3. The writes go to the store's single writer in **one** request:
//!    [`Store::transaction_entries`] (all or nothing, spec order, references rewritten) or
//!    [`Store::batch_entries`] (each entry on its own) — either way one durable commit.
//! 4. GET/HEAD entries are answered after the commit, so a transaction's reads see its writes.
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

use fhir_core::{
    Issue, IssueType, Json, Map, OperationOutcome, Resource, ResourceId, ResourceType, TenantId,
    VersionId,
};
use rayon::prelude::*;

use crate::Store;
use crate::condition::Condition;
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
#[derive(Debug, Clone)]
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
}

impl Default for BundleOptions {
    fn default() -> BundleOptions {
        BundleOptions {
            max_entries: 10_000,
            base_url: String::new(),
            return_representation: true,
        }
    }
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
    Search {
        ty: ResourceType,
        cond: Condition,
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
            if url.contains("://") || url.starts_with('/') {
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
        Condition::parse(q).map_err(|e| {
            entry_error(
                index,
                400,
                IssueType::NotSupported,
                member,
                format!("{label}: {e}"),
            )
        })
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
                cond: condition(q, "request.url")?,
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
    Ok(Parsed {
        index,
        label,
        action,
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
            search(store, t, ty, &cond, &query, opts).map(|b| Entry {
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
    let mut writes: Vec<(usize, String, TxEntry)> = Vec::new();
    let mut reads: Vec<(usize, String, ReadKind, bool)> = Vec::new();
    let mut refused: Vec<Issue> = Vec::new();
    let mut refused_status = 400;
    for p in parsed {
        match p {
            Ok(Parsed {
                index,
                label,
                action: Action::Write(e),
            }) => writes.push((index, label, e)),
            Ok(Parsed {
                index,
                label,
                action: Action::Read { read, head },
            }) => reads.push((index, label, read, head)),
            Err(e) if transaction => {
                if refused.is_empty() {
                    refused_status = e.status;
                }
                refused.extend(e.issues);
            }
            Err(e) => out[e.index] = Some(failed_entry(e.status, e.issues)),
        }
    }
    if !refused.is_empty() {
        if refused.len() > MAX_ISSUES {
            refused.truncate(MAX_ISSUES);
            refused.push(Issue::error(
                IssueType::TooCosts,
                format!("more than {MAX_ISSUES} issues; stopped reporting"),
            ));
        }
        return Err(BundleError {
            status: refused_status,
            issues: refused,
        });
    }

    let (indexes, rest): (Vec<(usize, String)>, Vec<TxEntry>) = writes
        .into_iter()
        .map(|(i, label, e)| ((i, label), e))
        .unzip();
    if transaction {
        let outcomes = store.transaction_entries(t, rest).map_err(|e| match e {
            StoreError::TransactionFailed { index, source } => {
                let (i, label) = indexes
                    .get(index)
                    .map_or((index, ""), |(i, l)| (*i, l.as_str()));
                BundleError {
                    status: source.http_status(),
                    issues: store_issues(&source, Some((i, label))),
                }
            }
            other => BundleError::from_store(other),
        })?;
        for ((i, _), o) in indexes.into_iter().zip(outcomes) {
            out[i] = Some(write_entry(o, opts));
        }
    } else {
        let results = store
            .batch_entries(t, rest)
            .map_err(BundleError::from_store)?;
        for ((i, label), r) in indexes.into_iter().zip(results) {
            out[i] = Some(match r {
                Ok(o) => write_entry(o, opts),
                Err(e) => failed_entry(e.http_status(), store_issues(&e, Some((i, &label)))),
            });
        }
    }
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
        assert!(split_url("http://h/fhir/other/Patient/1", base).is_err());
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
