//! [`SearchIndex`]: the tenants' indexes, the background indexer, searching and paging, and
//! conditional operations on full search criteria.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fhir_core::search_param::SearchParamRegistry;
use fhir_core::{Issue, IssueType, Resource, ResourceId, ResourceType, TenantId, VersionId};
use fhir_store::{
    Condition, DeleteResult, ReadResult, Store, StoreError, StoredResource, WriteKind, WriteResult,
};
use tantivy::query::{BooleanQuery, Occur, Query, TermQuery, TermSetQuery};
use tantivy::schema::IndexRecordOption;
use tantivy::{DocAddress, Searcher, Term};

use crate::collect::{Hit, TopCollector, keys_and_versions, references};
use crate::error::SearchError;
use crate::fields::Fields;
use crate::query::{Compiler, Limits};
use crate::request::{Handling, Include, Scope, SearchRequest, SortKey, Summary, Total};
use crate::summary::shape;
use crate::tenant::{TenantIndex, WriterConfig, lock};
use crate::terms::{SEP, term};

/// Settings of a [`SearchIndex`].
#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The indexing memory budget of each tenant's writer, in bytes: when a batch needs more,
    /// tantivy flushes a segment (at least 15 MB, tantivy's minimum per writer thread; each
    /// writer has one).
    pub writer_memory: usize,
    /// How long a search waits for the index to reach the store's newest change before it
    /// fails with [`SearchError::IndexBehind`].
    pub wait_timeout: Duration,
    /// How long `next`/`previous` links stay valid.
    pub page_ttl: Duration,
    /// Most searches kept for paging at once; the oldest are dropped first.
    pub max_pages: usize,
    /// How often the background indexer looks for new changes (`None`: no background indexer;
    /// searches still catch up themselves).
    pub background_interval: Option<Duration>,
    /// `_count` when the client gives none.
    pub default_count: usize,
    /// The largest `_count` (larger ones are capped).
    pub max_count: usize,
    /// Most resources `_include`/`_revinclude` add to one page; beyond it the page says so.
    pub max_include: usize,
    /// Most resources a chain or `_has` may match.
    pub max_chain: usize,
}

impl Default for IndexOptions {
    fn default() -> IndexOptions {
        IndexOptions {
            writer_memory: 20_000_000,
            wait_timeout: Duration::from_secs(5),
            page_ttl: Duration::from_secs(600),
            max_pages: 10_000,
            background_interval: Some(Duration::from_millis(200)),
            default_count: 50,
            max_count: 1000,
            max_include: 1000,
            max_chain: 10_000,
        }
    }
}

/// Whether an entry matched the search or was added by `_include`/`_revinclude`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// `search.mode = match`
    Match,
    /// `search.mode = include`
    Include,
}

/// One resource of a result page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchEntry {
    /// Match or include.
    pub mode: EntryMode,
    /// The version the index holds, with its stored JSON (shaped by `_summary`/`_elements` if
    /// asked for).
    pub resource: StoredResource,
}

/// One page of a search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchResult {
    /// The number of matches (`None` with `_total=none`).
    pub total: Option<u64>,
    /// Matches in order, then included resources.
    pub entries: Vec<SearchEntry>,
    /// Warnings: ignored parameters, capped includes.
    pub warnings: Vec<Issue>,
    /// Position of the page's first match among all matches.
    pub offset: usize,
    /// Page size.
    pub count: usize,
    /// The token of the kept search, if it has more than one page: pass it with an offset to
    /// [`SearchIndex::page`].
    pub page_token: Option<String>,
    /// Offset of the next page, if there is one.
    pub next_offset: Option<usize>,
    /// Offset of the previous page, if there is one.
    pub prev_offset: Option<usize>,
}

/// A search kept for its later pages: the searcher pins the snapshot.
struct PageState {
    tenant: TenantId,
    searcher: Searcher,
    fields: Fields,
    query: Box<dyn Query>,
    sort: Vec<SortKey>,
    count: usize,
    total: Total,
    summary: Summary,
    elements: Vec<String>,
    include: Vec<Include>,
    revinclude: Vec<Include>,
    warnings: Vec<Issue>,
}

#[derive(Default)]
struct Pages {
    map: HashMap<String, (Instant, Arc<PageState>)>,
    order: VecDeque<(Instant, String)>,
}

impl Pages {
    fn purge(&mut self, ttl: Duration) {
        let now = Instant::now();
        while let Some((t, _)) = self.order.front() {
            if now.duration_since(*t) < ttl {
                break;
            }
            if let Some((_, token)) = self.order.pop_front() {
                self.map.remove(&token);
            }
        }
    }

    fn insert(&mut self, state: Arc<PageState>, ttl: Duration, max: usize) -> String {
        self.purge(ttl);
        while self.map.len() >= max.max(1) {
            match self.order.pop_front() {
                Some((_, token)) => {
                    self.map.remove(&token);
                }
                None => break,
            }
        }
        let token = uuid::Uuid::new_v4().simple().to_string();
        let now = Instant::now();
        self.map.insert(token.clone(), (now, state));
        self.order.push_back((now, token.clone()));
        token
    }
}

/// How many stripes the locks of conditional operations have.
const COND_STRIPES: usize = 64;

/// Most rounds of `:iterate` includes.
const MAX_INCLUDE_ROUNDS: usize = 8;

struct Inner {
    root: PathBuf,
    store: Store,
    opts: IndexOptions,
    tenants: Mutex<HashMap<TenantId, Arc<TenantIndex>>>,
    pages: Mutex<Pages>,
    /// Serialises search-based conditional operations with the same criteria.
    cond_locks: Vec<Mutex<()>>,
}

struct Worker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        *lock(&self.stop.0) = true;
        self.stop.1.notify_all();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The search indexes of all tenants of a store, under one directory (`{dir}/{tenant}`).
///
/// Cheap to clone; the clones share everything. The API is blocking (like [`Store`]'s).
///
/// ```
/// use fhir_core::{Resource, ResourceType, TenantId};
/// use fhir_search::{Handling, Scope, SearchIndex};
/// use fhir_store::Store;
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path().join("store"))?;
/// let t = TenantId::new("ous")?;
/// store.create_tenant(&t, "Oslo universitetssykehus HF")?;
/// let index = SearchIndex::open(dir.path().join("index"), store.clone())?;
///
/// let obs = Resource::from_json_bytes(br#"{"resourceType":"Observation","status":"final",
///     "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
///     "effectiveDateTime":"2024-03-01T10:00:00+01:00","valueQuantity":{"value":72.5}}"#)?;
/// store.create(&t, obs, None)?;
///
/// // A search sees every write acknowledged before it started.
/// let ty = ResourceType::parse("Observation").unwrap();
/// let params = [("code".to_string(), "http://loinc.org|8867-4".to_string()),
///               ("date".to_string(), "ge2024-03-01".to_string())];
/// let req = index.parse(&t, &Scope::Type(ty), &params, Handling::Strict)?;
/// let result = index.search(&t, &req)?;
/// assert_eq!(result.total, Some(1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SearchIndex {
    inner: Arc<Inner>,
    _worker: Option<Arc<Worker>>,
}

impl std::fmt::Debug for SearchIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchIndex")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

fn parse_key(key: &str) -> Option<(ResourceType, ResourceId)> {
    let (t, id) = key.split_once('/')?;
    Some((ResourceType::parse(t)?, ResourceId::new(id).ok()?))
}

impl SearchIndex {
    /// Opens (or creates) the indexes under `dir` for `store`'s tenants with default options,
    /// and starts the background indexer.
    pub fn open(dir: impl AsRef<Path>, store: Store) -> Result<SearchIndex, SearchError> {
        SearchIndex::open_with(dir, store, IndexOptions::default())
    }

    /// Opens (or creates) the indexes under `dir`. The index directories of tenants that no
    /// longer exist are deleted; every tenant's index resumes from the sequence number of its
    /// last commit (in the background, or at the first search).
    pub fn open_with(
        dir: impl AsRef<Path>,
        store: Store,
        opts: IndexOptions,
    ) -> Result<SearchIndex, SearchError> {
        let root = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&root)?;
        let live: HashSet<String> = store
            .tenants()?
            .into_iter()
            .map(|t| t.id.to_string())
            .collect();
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if entry.path().is_dir() && !live.contains(&name) {
                tracing::info!(tenant = %name, "deleting the search index of a removed tenant");
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let inner = Arc::new(Inner {
            root,
            store,
            opts: IndexOptions {
                writer_memory: opts.writer_memory.max(15_000_000),
                ..opts
            },
            tenants: Mutex::new(HashMap::new()),
            pages: Mutex::new(Pages::default()),
            cond_locks: (0..COND_STRIPES).map(|_| Mutex::new(())).collect(),
        });
        let worker = match inner.opts.background_interval {
            Some(every) => {
                let stop = Arc::new((Mutex::new(false), Condvar::new()));
                let (i, s) = (inner.clone(), stop.clone());
                let handle = std::thread::Builder::new()
                    .name("fhir-search-indexer".into())
                    .spawn(move || background(i, s, every))?;
                Some(Arc::new(Worker {
                    stop,
                    handle: Some(handle),
                }))
            }
            None => None,
        };
        Ok(SearchIndex {
            inner,
            _worker: worker,
        })
    }

    /// The store the index is derived from.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The options in force.
    pub fn options(&self) -> &IndexOptions {
        &self.inner.opts
    }

    /// The search parameters of `tenant`: R4's and its own SearchParameters.
    pub fn registry(&self, tenant: &TenantId) -> Result<Arc<SearchParamRegistry>, SearchError> {
        Ok(self.inner.tenant_index(tenant)?.registry())
    }

    /// Parses a search against the tenant's parameters (see [`SearchRequest::parse`]), as they
    /// are after every write acknowledged before the call (a SearchParameter just created is
    /// known).
    pub fn parse(
        &self,
        tenant: &TenantId,
        scope: &Scope,
        params: &[(String, String)],
        handling: Handling,
    ) -> Result<SearchRequest, SearchError> {
        let (ti, _) = self.inner.caught_up(tenant)?;
        SearchRequest::parse(&ti.registry(), scope, params, handling)
    }

    /// The change-log sequence number `tenant`'s index covers.
    pub fn indexed_seq(&self, tenant: &TenantId) -> Result<u64, SearchError> {
        Ok(self.inner.tenant_index(tenant)?.indexed())
    }

    /// Waits until the index covers every change the store had when this was called;
    /// returns that sequence number.
    pub fn catch_up(&self, tenant: &TenantId) -> Result<u64, SearchError> {
        let (ti, seq) = self.inner.caught_up(tenant)?;
        drop(ti);
        Ok(seq)
    }

    /// The first page of a search. It sees every write acknowledged before it was called
    /// (it waits, up to [`IndexOptions::wait_timeout`], for the index to reach the store's
    /// newest change). If there are more pages, the result's `page_token` names the kept
    /// snapshot for [`SearchIndex::page`].
    pub fn search(
        &self,
        tenant: &TenantId,
        req: &SearchRequest,
    ) -> Result<SearchResult, SearchError> {
        let (ti, _) = self.inner.caught_up(tenant)?;
        let searcher = ti.reader.searcher();
        let query = self.inner.compile(&ti.fields, &searcher, req)?;
        let opts = &self.inner.opts;
        let count = req.count.unwrap_or(opts.default_count).min(opts.max_count);
        let state = Arc::new(PageState {
            tenant: tenant.clone(),
            searcher,
            fields: ti.fields.clone(),
            query,
            sort: req.sort.clone(),
            count,
            total: req.total,
            summary: req.summary,
            elements: req.elements.clone(),
            include: req.include.clone(),
            revinclude: req.revinclude.clone(),
            warnings: req.warnings.clone(),
        });
        self.inner.run_page(state, 0, None)
    }

    /// A later (or earlier) page of a kept search: `offset` matches into the snapshot the
    /// first page was taken from, so pages never repeat or skip a match, whatever was written
    /// since. Fails with [`SearchError::PageExpired`] after [`IndexOptions::page_ttl`] or for a
    /// token of another tenant.
    pub fn page(
        &self,
        tenant: &TenantId,
        token: &str,
        offset: usize,
    ) -> Result<SearchResult, SearchError> {
        if self.inner.store.tenant(tenant)?.is_none() {
            return Err(StoreError::TenantNotFound(tenant.clone()).into());
        }
        let state = {
            let mut pages = lock(&self.inner.pages);
            pages.purge(self.inner.opts.page_ttl);
            pages.map.get(token).map(|(_, s)| s.clone())
        };
        match state {
            Some(s) if s.tenant == *tenant => {
                self.inner.run_page(s, offset, Some(token.to_string()))
            }
            _ => Err(SearchError::PageExpired(crate::terms::shorten(token))),
        }
    }

    /// The ids of the current resources of `ty` matching `criteria` (a URL query string, as
    /// in `If-None-Exist`), after the index has caught up with the store. Every parameter must
    /// be understood (unknown ones are errors).
    pub fn find(
        &self,
        tenant: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<ResourceId>, SearchError> {
        Ok(self
            .find_versions(tenant, ty, criteria)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// [`SearchIndex::find`] with the version of each match the index holds: what
    /// [`fhir_store::Condition::resolved`] takes, so that the store's writer can re-check the
    /// search's verdict when it writes.
    pub fn find_versions(
        &self,
        tenant: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<(ResourceId, VersionId)>, SearchError> {
        let params = criteria_params(criteria)?;
        // One catch-up: the registry and the snapshot are both as of every write before.
        let (ti, _) = self.inner.caught_up(tenant)?;
        let req =
            SearchRequest::parse(&ti.registry(), &Scope::Type(ty), &params, Handling::Strict)?;
        let searcher = ti.reader.searcher();
        let q = self.inner.compile(&ti.fields, &searcher, &req)?;
        let (_, addrs) = searcher.search(&q, &TopCollector::new(&[], usize::MAX))?;
        Ok(keys_and_versions(&searcher, &addrs)?
            .into_iter()
            .filter_map(|h| parse_key(&h.key).map(|(_, id)| (id, VersionId(h.version))))
            .collect())
    }

    /// Serialises conditional operations on these criteria (`(type, URL query)` pairs) with
    /// every other conditional operation on any of them in this process — the single ones of
    /// [`conditional_create`](SearchIndex::conditional_create) and friends, and other callers
    /// of this — until the guard is dropped. Take it before searching and drop it after the
    /// write is committed: then the next holder's search sees the write.
    ///
    /// The locks are striped (criteria are hashed onto a fixed set of mutexes, so unrelated
    /// criteria may share one) and taken in ascending order, so holders of several cannot
    /// deadlock.
    pub fn lock_criteria(
        &self,
        tenant: &TenantId,
        criteria: &[(ResourceType, String)],
    ) -> CriteriaGuard<'_> {
        let stripes: BTreeSet<usize> = criteria
            .iter()
            .map(|(ty, c)| stripe(tenant, *ty, c))
            .collect();
        CriteriaGuard {
            _guards: stripes
                .into_iter()
                .map(|i| lock(&self.inner.cond_locks[i]))
                .collect(),
        }
    }

    /// Conditional create (`If-None-Exist`): creates `resource` unless a resource of its type
    /// matches `criteria` ([`WriteKind::Existing`] with that one; several matches:
    /// [`SearchError::MultipleMatches`]).
    ///
    /// Criteria the store can answer itself (`_id`, `identifier`) are checked inside the
    /// store's writer, atomically. Other criteria are a search; concurrent conditional
    /// operations with the same criteria in this process are serialised, and each searches only
    /// after the index has caught up with every write before it, so N identical concurrent
    /// conditional creates create one resource. A concurrent plain write that makes another
    /// resource match is not excluded (as in other servers).
    ///
    /// The write goes through `store`: a handle of the index's own store, such as one from
    /// [`Store::with_audit`] (whose audit records then commit with the write); a handle of
    /// another store is refused.
    pub fn conditional_create(
        &self,
        store: &Store,
        tenant: &TenantId,
        resource: Resource,
        criteria: &str,
    ) -> Result<WriteResult, SearchError> {
        self.check_store(store)?;
        let ty = resource.resource_type();
        if let Ok(cond) = Condition::parse(criteria) {
            return Ok(store.create(tenant, resource, Some(&cond))?);
        }
        let _guard = self.inner.cond_lock(tenant, ty, criteria)?;
        let ids = self.find(tenant, ty, criteria)?;
        match ids.as_slice() {
            [] => Ok(store.create(tenant, resource, None)?),
            [id] => match store.read(tenant, ty, id)? {
                ReadResult::Found(r) => Ok(WriteResult {
                    kind: WriteKind::Existing,
                    resource: r,
                    seq: None,
                }),
                // Deleted after the search: nothing matches any more.
                _ => Ok(store.create(tenant, resource, None)?),
            },
            _ => Err(SearchError::MultipleMatches { count: ids.len() }),
        }
    }

    /// Conditional update (`PUT Type?criteria`): updates the one match; with no match creates
    /// the resource (with the body's id if it has one); several matches:
    /// [`SearchError::MultipleMatches`]. Atomicity as for
    /// [`conditional_create`](SearchIndex::conditional_create), and so is `store`.
    pub fn conditional_update(
        &self,
        store: &Store,
        tenant: &TenantId,
        criteria: &str,
        resource: Resource,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, SearchError> {
        self.check_store(store)?;
        let ty = resource.resource_type();
        if let Ok(cond) = Condition::parse(criteria) {
            return Ok(store.conditional_update(tenant, ty, &cond, resource, if_match)?);
        }
        let _guard = self.inner.cond_lock(tenant, ty, criteria)?;
        let ids = self.find(tenant, ty, criteria)?;
        match ids.as_slice() {
            [] => {
                if let Some(expected) = if_match {
                    return Err(StoreError::VersionConflict {
                        expected,
                        actual: None,
                    }
                    .into());
                }
                match resource.id().map(ResourceId::new) {
                    Some(Ok(id)) => Ok(store.update(tenant, &id, resource, None)?),
                    Some(Err(e)) => Err(StoreError::IdMismatch(e.to_string()).into()),
                    None => Ok(store.create(tenant, resource, None)?),
                }
            }
            [id] => {
                if let Some(body_id) = resource.id()
                    && body_id != id.as_str()
                {
                    return Err(StoreError::IdMismatch(format!(
                        "the criteria matched {ty}/{id} but the resource has id '{}'",
                        crate::terms::shorten(body_id)
                    ))
                    .into());
                }
                Ok(store.update(tenant, id, resource, if_match)?)
            }
            _ => Err(SearchError::MultipleMatches { count: ids.len() }),
        }
    }

    /// Conditional delete (`DELETE Type?criteria`): deletes the one match; no match deletes
    /// nothing; several: [`SearchError::MultipleMatches`]. `store` as for
    /// [`conditional_create`](SearchIndex::conditional_create).
    pub fn conditional_delete(
        &self,
        store: &Store,
        tenant: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<DeleteResult, SearchError> {
        self.check_store(store)?;
        if let Ok(cond) = Condition::parse(criteria) {
            return Ok(store.conditional_delete(tenant, ty, &cond)?);
        }
        let _guard = self.inner.cond_lock(tenant, ty, criteria)?;
        let ids = self.find(tenant, ty, criteria)?;
        match ids.as_slice() {
            [] => Ok(DeleteResult {
                resource_type: ty,
                id: None,
                version: None,
                seq: None,
            }),
            [id] => Ok(store.delete(tenant, ty, id, None)?),
            _ => Err(SearchError::MultipleMatches { count: ids.len() }),
        }
    }

    /// Refuses a write handle of another store: the index would never see that write.
    fn check_store(&self, store: &Store) -> Result<(), SearchError> {
        if store.same_store(&self.inner.store) {
            Ok(())
        } else {
            Err(StoreError::Backend(
                "a conditional write must go through a handle of the search index's own store"
                    .into(),
            )
            .into())
        }
    }

    /// Rebuilds `tenant`'s index from the store's change log (e.g. after the index was lost or
    /// damaged). `progress(done, total)` counts change-log records. Searches wait (up to their
    /// timeout) while it runs.
    pub fn rebuild(
        &self,
        tenant: &TenantId,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), SearchError> {
        let ti = self.inner.tenant_index(tenant)?;
        let total = self.inner.store.last_seq(tenant)?;
        progress(0, total);
        ti.rebuild(&self.inner.store, &mut |seq| {
            progress(seq.min(total), total)
        })?;
        self.inner.purge_pages(tenant);
        Ok(())
    }

    /// Reindexes the current resources of `types` (every type if `None`) with the tenant's
    /// current search parameters — after a custom SearchParameter was added or changed.
    /// Returns how many resources were reindexed; `progress(done, total)` counts them.
    pub fn reindex(
        &self,
        tenant: &TenantId,
        types: Option<&[ResourceType]>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, SearchError> {
        let ti = self.inner.tenant_index(tenant)?;
        ti.reindex(&self.inner.store, types, progress)
    }

    /// Deletes `tenant`'s index (call it when the tenant is removed from the store; indexes of
    /// tenants removed behind the index's back are found and deleted on the next open, and
    /// never reused for a new tenant of the same id).
    pub fn remove_tenant(&self, tenant: &TenantId) -> Result<(), SearchError> {
        let old = lock(&self.inner.tenants).remove(tenant);
        if let Some(ti) = old {
            ti.shut_down();
        }
        self.inner.purge_pages(tenant);
        match std::fs::remove_dir_all(self.inner.root.join(tenant.as_str())) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The version of `ty/id` the index holds for `tenant` (`None`: not indexed), as of the
    /// last commit. For tests and diagnostics.
    pub fn indexed_version(
        &self,
        tenant: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<VersionId>, SearchError> {
        self.inner
            .tenant_index(tenant)?
            .indexed_version(ty, id.as_str())
    }
}

/// The locks of [`SearchIndex::lock_criteria`], released when dropped.
#[must_use = "the criteria are locked only while the guard lives"]
pub struct CriteriaGuard<'a> {
    _guards: Vec<MutexGuard<'a, ()>>,
}

impl std::fmt::Debug for CriteriaGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriteriaGuard")
            .field("stripes", &self._guards.len())
            .finish()
    }
}

/// The lock stripe of conditional operations on `criteria`: the same for the same parameters
/// in any order and encoding (`_format`/`_pretty` aside), so that a Bundle entry and a REST
/// request on the same criteria serialise.
fn stripe(t: &TenantId, ty: ResourceType, criteria: &str) -> usize {
    let q = criteria.split_once('?').map_or(criteria, |(_, q)| q);
    let mut params: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .filter(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty"))
        .collect();
    params.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (t, ty, params).hash(&mut h);
    (h.finish() % COND_STRIPES as u64) as usize
}

fn criteria_params(criteria: &str) -> Result<Vec<(String, String)>, SearchError> {
    let q = criteria.split_once('?').map_or(criteria, |(_, q)| q);
    let params: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
        .into_owned()
        .filter(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty"))
        .collect();
    if params.is_empty() {
        return Err(SearchError::invalid(
            "criteria",
            "a conditional operation needs search criteria, e.g. identifier=system|value",
        ));
    }
    Ok(params)
}

impl Inner {
    fn tenant_index(&self, t: &TenantId) -> Result<Arc<TenantIndex>, SearchError> {
        let info = self
            .store
            .tenant(t)?
            .ok_or_else(|| StoreError::TenantNotFound(t.clone()))?;
        let mut map = lock(&self.tenants);
        if let Some(ti) = map.get(t) {
            if ti.created == info.created {
                return Ok(ti.clone());
            }
            // The tenant was removed and created again behind our back.
            if let Some(old) = map.remove(t) {
                old.shut_down();
            }
            self.purge_pages(t);
        }
        let ti = Arc::new(TenantIndex::open(
            self.root.join(t.as_str()),
            t.clone(),
            info.created,
            &self.store,
            WriterConfig {
                memory: self.opts.writer_memory,
            },
        )?);
        map.insert(t.clone(), ti.clone());
        Ok(ti)
    }

    /// The tenant's index once it covers the store's newest change (read-your-writes).
    fn caught_up(&self, t: &TenantId) -> Result<(Arc<TenantIndex>, u64), SearchError> {
        let ti = self.tenant_index(t)?;
        let target = self.store.last_seq(t)?;
        ti.ensure(&self.store, target, self.opts.wait_timeout)?;
        Ok((ti, target))
    }

    fn purge_pages(&self, t: &TenantId) {
        lock(&self.pages).map.retain(|_, (_, s)| s.tenant != *t);
    }

    fn cond_lock(
        &self,
        t: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<MutexGuard<'_, ()>, SearchError> {
        criteria_params(criteria)?;
        Ok(lock(&self.cond_locks[stripe(t, ty, criteria)]))
    }

    fn compile(
        &self,
        fields: &Fields,
        searcher: &Searcher,
        req: &SearchRequest,
    ) -> Result<Box<dyn Query>, SearchError> {
        Compiler {
            f: fields,
            searcher,
            limits: Limits {
                chain: self.opts.max_chain,
            },
            now_micros: chrono::Utc::now().timestamp_micros(),
        }
        .request(req)
    }

    fn load(
        &self,
        t: &TenantId,
        key: &str,
        version: u64,
    ) -> Result<Option<StoredResource>, SearchError> {
        let Some((ty, id)) = parse_key(key) else {
            return Ok(None);
        };
        match self.store.vread(t, ty, &id, VersionId(version))? {
            ReadResult::Found(r) => Ok(Some(r)),
            other => {
                // Versions are immutable, so an indexed version is always there while the
                // tenant exists.
                tracing::error!(tenant = %t, key, version, ?other, "indexed version cannot be read");
                Ok(None)
            }
        }
    }

    fn run_page(
        &self,
        st: Arc<PageState>,
        offset: usize,
        token: Option<String>,
    ) -> Result<SearchResult, SearchError> {
        let count = st.count;
        let counting_only = st.summary == Summary::Count;
        let limit = if counting_only {
            0
        } else {
            offset.saturating_add(count)
        };
        let (total, addrs) = st
            .searcher
            .search(&*st.query, &TopCollector::new(&st.sort, limit))?;
        let page = addrs.get(offset..).unwrap_or(&[]);
        let hits = keys_and_versions(&st.searcher, page)?;
        let mut entries = Vec::with_capacity(hits.len());
        for h in &hits {
            if let Some(mut r) = self.load(&st.tenant, &h.key, h.version)? {
                if let Some(shaped) = shape(&r.json, st.summary, &st.elements) {
                    r.json = shaped;
                }
                entries.push(SearchEntry {
                    mode: EntryMode::Match,
                    resource: r,
                });
            }
        }
        let mut warnings = st.warnings.clone();
        if !counting_only {
            let included = self.includes(&st, &hits, &mut warnings)?;
            entries.extend(included.into_iter().map(|r| SearchEntry {
                mode: EntryMode::Include,
                resource: r,
            }));
        }
        let end = offset.saturating_add(count);
        let next_offset = (!counting_only && (end as u64) < total).then_some(end);
        let prev_offset = (offset > 0).then(|| offset.saturating_sub(count));
        let page_token = match token {
            Some(t) => Some(t),
            None if next_offset.is_some() => {
                Some(lock(&self.pages).insert(st.clone(), self.opts.page_ttl, self.opts.max_pages))
            }
            None => None,
        };
        Ok(SearchResult {
            total: (st.total != Total::None).then_some(total),
            entries,
            warnings,
            offset,
            count,
            page_token,
            next_offset,
            prev_offset,
        })
    }

    /// `_include` and `_revinclude` for the matches of one page, from the same snapshot.
    fn includes(
        &self,
        st: &PageState,
        matches: &[Hit],
        warnings: &mut Vec<Issue>,
    ) -> Result<Vec<StoredResource>, SearchError> {
        let mut out = Vec::new();
        if st.include.is_empty() && st.revinclude.is_empty() {
            return Ok(out);
        }
        let f = &st.fields;
        let searcher = &st.searcher;
        let cap = self.opts.max_include;
        let mut seen: HashSet<String> = matches.iter().map(|h| h.key.clone()).collect();
        let mut frontier: Vec<Hit> = matches.to_vec();
        let mut left_out = 0usize;
        for round in 0..MAX_INCLUDE_ROUNDS {
            let includes: Vec<&Include> = st
                .include
                .iter()
                .filter(|i| round == 0 || i.iterate)
                .collect();
            let revincludes: Vec<&Include> = st
                .revinclude
                .iter()
                .filter(|i| round == 0 || i.iterate)
                .collect();
            if frontier.is_empty() || (includes.is_empty() && revincludes.is_empty()) {
                break;
            }
            let mut found: Vec<DocAddress> = Vec::new();
            if !includes.is_empty() {
                let addrs: Vec<DocAddress> = frontier.iter().map(|h| h.addr).collect();
                let mut targets = BTreeSet::new();
                for (hit, refs) in frontier.iter().zip(references(searcher, &addrs)?) {
                    let src = hit.key.split('/').next().unwrap_or_default();
                    for inc in &includes {
                        if inc.source.is_some_and(|s| s.as_str() != src) {
                            continue;
                        }
                        for r in &refs {
                            let Some((code, target)) = r.split_once(SEP) else {
                                continue;
                            };
                            if inc.param.as_deref().is_some_and(|p| p != code) {
                                continue;
                            }
                            if inc
                                .target
                                .is_some_and(|t| target.split('/').next() != Some(t.as_str()))
                            {
                                continue;
                            }
                            if !seen.contains(target) {
                                targets.insert(target.to_string());
                            }
                        }
                    }
                }
                if !targets.is_empty() {
                    let q =
                        TermSetQuery::new(targets.iter().map(|k| Term::from_field_text(f.key, k)));
                    let (_, addrs) = searcher.search(&q, &TopCollector::new(&[], cap + 1))?;
                    found.extend(addrs);
                }
            }
            for rev in &revincludes {
                let code = rev.param.as_deref().unwrap_or("*");
                let terms: Vec<Term> = frontier
                    .iter()
                    .filter(|h| {
                        rev.target
                            .is_none_or(|t| h.key.split('/').next() == Some(t.as_str()))
                    })
                    .map(|h| Term::from_field_text(f.reference, &term(code, &["T", &h.key])))
                    .collect();
                if terms.is_empty() {
                    continue;
                }
                let mut clauses: Vec<(Occur, Box<dyn Query>)> =
                    vec![(Occur::Must, Box::new(TermSetQuery::new(terms)))];
                if let Some(src) = rev.source {
                    clauses.push((
                        Occur::Must,
                        Box::new(TermQuery::new(
                            Term::from_field_text(f.ty, src.as_str()),
                            IndexRecordOption::Basic,
                        )),
                    ));
                }
                let q = BooleanQuery::new(clauses);
                let (_, addrs) = searcher.search(&q, &TopCollector::new(&[], cap + 1))?;
                found.extend(addrs);
            }
            let mut next = Vec::new();
            for hit in keys_and_versions(searcher, &found)? {
                if seen.contains(&hit.key) {
                    continue;
                }
                seen.insert(hit.key.clone());
                if out.len() >= cap {
                    left_out += 1;
                    continue;
                }
                if let Some(r) = self.load(&st.tenant, &hit.key, hit.version)? {
                    out.push(r);
                    next.push(hit);
                }
            }
            frontier = next;
        }
        if left_out > 0 {
            warnings.push(Issue::warning(
                IssueType::Incomplete,
                format!(
                    "_include/_revinclude found more resources than the {cap} one page may \
                     include; at least {left_out} were left out (use a smaller _count)"
                ),
            ));
        }
        Ok(out)
    }
}

/// The background indexer: keeps every tenant's index close to its change log, so searches
/// rarely wait, and resumes indexing after a restart without waiting for a search.
fn background(inner: Arc<Inner>, stop: Arc<(Mutex<bool>, Condvar)>, every: Duration) {
    loop {
        {
            let guard = lock(&stop.0);
            let (guard, _) = stop
                .1
                .wait_timeout_while(guard, every, |s| !*s)
                .unwrap_or_else(|p| p.into_inner());
            if *guard {
                return;
            }
        }
        let tenants = match inner.store.tenants() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "background indexer cannot list tenants");
                continue;
            }
        };
        {
            // Indexes of tenants that are gone (removed without telling the index).
            let live: HashSet<&TenantId> = tenants.iter().map(|t| &t.id).collect();
            let gone: Vec<TenantId> = lock(&inner.tenants)
                .keys()
                .filter(|t| !live.contains(t))
                .cloned()
                .collect();
            for t in gone {
                let mut map = lock(&inner.tenants);
                if matches!(inner.store.tenant(&t), Ok(None))
                    && let Some(ti) = map.remove(&t)
                {
                    ti.shut_down();
                    let _ = std::fs::remove_dir_all(&ti.dir);
                }
            }
        }
        for t in tenants {
            if *lock(&stop.0) {
                return;
            }
            let result = inner.tenant_index(&t.id).and_then(|ti| {
                if inner.store.last_seq(&t.id)? > ti.indexed() {
                    ti.catch_up_if_idle(&inner.store)?;
                }
                Ok(())
            });
            match result {
                Ok(()) | Err(SearchError::Store(StoreError::TenantNotFound(_))) => {}
                Err(e) => tracing::warn!(tenant = %t.id, error = %e, "background indexing failed"),
            }
        }
    }
}
