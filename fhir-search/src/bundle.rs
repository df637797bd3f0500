//! Search in `batch` and `transaction` Bundles: [`BundleResolver`], the
//! [`CriteriaResolver`] that lets [`fhir_store::bundle::process`] take full search criteria in
//! conditional entries, conditional references and `GET Type?…` entries; and [`searchset`],
//! the `searchset` Bundle of a result page, shared with the REST search of `fhir-server`.

use fhir_core::{
    Issue, IssueType, OperationOutcome, ResourceId, ResourceType, TenantId, VersionId,
};
use fhir_store::bundle::{BundleBuilder, CriteriaError, CriteriaLock, CriteriaResolver, Entry};

use crate::error::SearchError;
use crate::index::{EntryMode, SearchIndex, SearchResult};
use crate::request::{Handling, Scope};

/// The `searchset` Bundle of one result page.
///
/// `base` is the tenant's FHIR base (`http://host/fhir/ous`): each entry's `fullUrl` is
/// `{base}/{Type}/{id}`, and the `next`/`previous` links of a search with more pages are
/// `{base}?_getpages={token}&_getpagesoffset={offset}&_count={count}` plus `link_params`
/// (e.g. `_format`), the form in which [`SearchIndex::page`] is served over HTTP. `self_url`
/// is the search as asked. Warnings (ignored parameters, capped includes) become an
/// OperationOutcome entry with `search.mode = outcome`.
pub fn searchset(
    result: SearchResult,
    base: &str,
    self_url: String,
    link_params: &[(String, String)],
) -> BundleBuilder {
    let mut b = BundleBuilder::new("searchset");
    b.total = result.total;
    b.links.push(("self", self_url));
    if let Some(token) = &result.page_token {
        let link = |offset: usize| {
            let mut ser = form_urlencoded::Serializer::new(String::new());
            ser.append_pair("_getpages", token);
            ser.append_pair("_getpagesoffset", &offset.to_string());
            ser.append_pair("_count", &result.count.to_string());
            for (k, v) in link_params {
                ser.append_pair(k, v);
            }
            format!("{base}?{}", ser.finish())
        };
        if let Some(n) = result.next_offset {
            b.links.push(("next", link(n)));
        }
        if let Some(p) = result.prev_offset {
            b.links.push(("previous", link(p)));
        }
    }
    for e in result.entries {
        let r = e.resource;
        b.entries.push(Entry {
            full_url: Some(format!("{base}/{}/{}", r.resource_type, r.id)),
            resource: Some(r.json),
            search_mode: Some(match e.mode {
                EntryMode::Match => "match",
                EntryMode::Include => "include",
            }),
            ..Entry::default()
        });
    }
    if !result.warnings.is_empty() {
        let oo = OperationOutcome::new(result.warnings).to_json();
        b.entries.push(Entry {
            full_url: Some(format!("urn:uuid:{}", uuid::Uuid::new_v4())),
            resource: Some(oo.to_bytes()),
            search_mode: Some("outcome"),
            ..Entry::default()
        });
    }
    b
}

/// The HTTP status and issues of a search error, as a Bundle entry reports them: 400 for bad
/// criteria, 412 several matches, 410 an expired page, 503 an index that could not catch up,
/// the store's status for its errors, 500 (without details) for the server's faults.
impl From<SearchError> for CriteriaError {
    fn from(e: SearchError) -> CriteriaError {
        let internal = || {
            tracing::error!(error = %e, "search for a bundle entry failed");
            CriteriaError {
                status: 500,
                issues: vec![Issue::error(IssueType::Exception, "internal server error")],
            }
        };
        let status = match &e {
            SearchError::Store(s) if s.is_internal() => return internal(),
            SearchError::Store(s) => {
                return CriteriaError {
                    status: s.http_status(),
                    issues: vec![Issue::error(s.issue_type(), s.to_string())],
                };
            }
            SearchError::Index(_) => return internal(),
            SearchError::PageExpired(_) => 410,
            SearchError::MultipleMatches { .. } => 412,
            // Worth retrying, not the client's fault.
            SearchError::IndexBehind { .. } => 503,
            _ => 400,
        };
        CriteriaError {
            status,
            issues: e.issues(),
        }
    }
}

/// A [`CriteriaResolver`] over a [`SearchIndex`] of the store the Bundle is written to.
///
/// Criteria of conditional entries and references are searched like those of
/// [`SearchIndex::conditional_create`]: every parameter must be understood, the search sees
/// every write acknowledged before it, and conditional operations on the same criteria are
/// serialised with the REST ones ([`SearchIndex::lock_criteria`]). `GET Type?…` entries are
/// searches like REST searches, with `handling` for unknown parameters (`Prefer:
/// handling=strict` of the Bundle's request, or lenient: ignored and named in an `outcome`
/// entry).
///
/// ```
/// use std::sync::Arc;
/// use fhir_core::{json, Resource, TenantId};
/// use fhir_search::{Handling, SearchIndex};
/// use fhir_store::Store;
/// use fhir_store::bundle::{process, BundleOptions};
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("store"))?;
/// let t = TenantId::new("ous")?;
/// store.create_tenant(&t, "OUS")?;
/// let index = SearchIndex::open(dir.path().join("index"), store.clone())?;
/// let opts = BundleOptions {
///     resolver: Some(Arc::new(index.bundle_resolver(Handling::Lenient))),
///     ..BundleOptions::default()
/// };
/// // Conditional create on a name and birth date: created once, found the second time.
/// let bundle = json::parse(br#"{"resourceType":"Bundle","type":"transaction","entry":[
///   {"resource":{"resourceType":"Patient","name":[{"family":"Nordmann"}],"birthDate":"1970-01-01"},
///    "request":{"method":"POST","url":"Patient","ifNoneExist":"family=Nordmann&birthdate=1970-01-01"}}]}"#)?;
/// let first = process(&store, &t, bundle.clone(), &opts)?;
/// let again = process(&store, &t, bundle, &opts)?;
/// assert_eq!(first.entries[0].response.as_ref().unwrap().status, "201 Created");
/// assert_eq!(again.entries[0].response.as_ref().unwrap().status, "200 OK");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BundleResolver {
    index: SearchIndex,
    handling: Handling,
}

impl SearchIndex {
    /// A [`CriteriaResolver`] for [`fhir_store::bundle::process`] over this index; `handling`
    /// is for unknown parameters of `GET` entries.
    pub fn bundle_resolver(&self, handling: Handling) -> BundleResolver {
        BundleResolver {
            index: self.clone(),
            handling,
        }
    }
}

/// The parameters of a `GET` entry's query that are search parameters (paging tokens belong
/// to REST links, not to entries).
fn search_params(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(k, _)| !matches!(k.as_str(), "_getpages" | "_getpagesoffset"))
        .collect()
}

impl CriteriaResolver for BundleResolver {
    fn lock<'a>(
        &'a self,
        t: &TenantId,
        criteria: &[(ResourceType, String)],
    ) -> Result<CriteriaLock<'a>, CriteriaError> {
        Ok(CriteriaLock::new(self.index.lock_criteria(t, criteria)))
    }

    fn find(
        &self,
        t: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<(ResourceId, VersionId)>, CriteriaError> {
        Ok(self.index.find_versions(t, ty, criteria)?)
    }

    fn check_search(
        &self,
        t: &TenantId,
        ty: ResourceType,
        query: &str,
    ) -> Result<(), CriteriaError> {
        self.index
            .parse(t, &Scope::Type(ty), &search_params(query), self.handling)?;
        Ok(())
    }

    fn search(
        &self,
        t: &TenantId,
        ty: ResourceType,
        query: &str,
        base_url: &str,
    ) -> Result<BundleBuilder, CriteriaError> {
        let params = search_params(query);
        let req = self
            .index
            .parse(t, &Scope::Type(ty), &params, self.handling)?;
        let result = self.index.search(t, &req)?;
        let link_params: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| matches!(k.as_str(), "_format" | "_pretty"))
            .cloned()
            .collect();
        let self_url = if query.is_empty() {
            format!("{base_url}/{ty}")
        } else {
            format!("{base_url}/{ty}?{query}")
        };
        Ok(searchset(result, base_url, self_url, &link_params))
    }
}
