//! One tenant's index: its directory, tantivy index and writer, the change-log sequence number
//! it covers, and the tenant's search parameters (R4 plus its custom SearchParameters).
//!
//! The writer is behind a mutex that is also *the indexing lock*: whoever holds it reads the
//! store's change log from the covered sequence number on, applies the changes (the last change
//! of each resource in the batch: a delete of its document, plus the new document of the
//! logged version unless it is a deletion), and commits once with the new sequence number in
//! the commit payload. A search that needs a newer sequence number either takes the lock and
//! does this itself, or waits for whoever holds it; so N concurrent searches after N writes
//! cost one tantivy commit, not N.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock, TryLockError};
use std::time::{Duration, Instant};

use fhir_core::json::{self, Json, Map};
use fhir_core::search_param::{SearchParam, SearchParamRegistry};
use fhir_core::{ResourceId, ResourceType, TenantId, VersionId};
use fhir_store::{Change, Method, ReadResult, Store, StoreError};
use tantivy::indexer::IndexWriterOptions;
use tantivy::query::TermQuery;
use tantivy::schema::IndexRecordOption;
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Term};

use crate::collect::{TopCollector, keys_and_versions};
use crate::error::SearchError;
use crate::fields::{Fields, doc_key, document};

/// Version of the index layout; an index of another version is rebuilt. 2: the `dates`
/// columns (an index without them would answer date ranges as if no resource had dates).
const FORMAT: u64 = 2;

/// Changes read from the log per commit.
const BATCH: usize = 5000;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while a lock was held leaves plain data behind; the data is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The R4 registry, shared by every tenant without custom parameters.
fn r4() -> Arc<SearchParamRegistry> {
    static R4: OnceLock<Arc<SearchParamRegistry>> = OnceLock::new();
    R4.get_or_init(|| Arc::new(SearchParamRegistry::r4().clone()))
        .clone()
}

/// What a commit records besides the documents.
#[derive(Debug, Clone, PartialEq)]
struct Payload {
    format: u64,
    seq: u64,
    /// The tenant's creation instant: a tenant removed and created again has a new one (and a
    /// change log that starts at 1 again), so an index of the old one is never reused.
    created: String,
}

impl Payload {
    fn encode(&self) -> String {
        let mut m = Map::new();
        m.insert("format", Json::Number(self.format.to_string()));
        m.insert("seq", Json::Number(self.seq.to_string()));
        m.insert("created", Json::str(self.created.clone()));
        Json::Object(m).to_string()
    }

    fn decode(s: &str) -> Option<Payload> {
        let j = json::parse(s.as_bytes()).ok()?;
        let num = |k: &str| j.get(k)?.as_number()?.parse::<u64>().ok();
        Some(Payload {
            format: num("format")?,
            seq: num("seq")?,
            created: j.get("created")?.as_str()?.to_string(),
        })
    }
}

/// How the writer is set up.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WriterConfig {
    pub memory: usize,
}

pub(crate) struct TenantIndex {
    pub tenant: TenantId,
    pub created: String,
    pub dir: PathBuf,
    pub fields: Fields,
    index: Index,
    pub reader: IndexReader,
    writer: Mutex<Option<IndexWriter>>,
    config: WriterConfig,
    /// The sequence number the committed and reloaded index covers.
    seq: Mutex<u64>,
    progressed: Condvar,
    registry: RwLock<Arc<SearchParamRegistry>>,
    /// The tenant's own parameters, by SearchParameter resource id.
    custom: Mutex<BTreeMap<String, SearchParam>>,
    /// Set when the tenant is removed: nothing may write the directory any more.
    removed: AtomicBool,
}

impl std::fmt::Debug for TenantIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantIndex")
            .field("tenant", &self.tenant)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Opens the index in `dir` if it belongs to this tenant incarnation and layout and does not
/// cover more of the change log than the store has (`store_seq`: a store restored from an older
/// backup); otherwise starts an empty one there.
fn open_or_create(
    dir: &Path,
    created: &str,
    store_seq: u64,
) -> Result<(Index, Fields, u64), SearchError> {
    if dir.exists() {
        if let Ok(index) = Index::open_in_dir(dir) {
            let payload = index
                .load_metas()
                .ok()
                .and_then(|m| m.payload)
                .and_then(|p| Payload::decode(&p));
            let fields = Fields::of(&index.schema());
            match (fields, payload) {
                (Some(f), Some(p))
                    if p.format == FORMAT && p.created == created && p.seq <= store_seq =>
                {
                    return Ok((index, f, p.seq));
                }
                // Created but never committed: empty, and ours to use.
                (Some(f), None) if index.searchable_segment_ids()?.is_empty() => {
                    return Ok((index, f, 0));
                }
                _ => {}
            }
        }
        tracing::info!(dir = %dir.display(), "search index is stale or unreadable: rebuilding it");
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let index = Index::create_in_dir(dir, Fields::new_schema())?;
    let fields = Fields::of(&index.schema())
        .ok_or_else(|| SearchError::Index("new index has an unexpected schema".into()))?;
    Ok((index, fields, 0))
}

impl TenantIndex {
    pub fn open(
        dir: PathBuf,
        tenant: TenantId,
        created: String,
        store: &Store,
        config: WriterConfig,
    ) -> Result<TenantIndex, SearchError> {
        let (index, fields, seq) = open_or_create(&dir, &created, store.last_seq(&tenant)?)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        let ti = TenantIndex {
            tenant,
            created,
            dir,
            fields,
            index,
            reader,
            writer: Mutex::new(None),
            config,
            seq: Mutex::new(seq),
            progressed: Condvar::new(),
            registry: RwLock::new(r4()),
            custom: Mutex::new(BTreeMap::new()),
            removed: AtomicBool::new(false),
        };
        ti.load_custom_from_index(store)?;
        Ok(ti)
    }

    /// The sequence number the searchable index covers.
    pub fn indexed(&self) -> u64 {
        *lock(&self.seq)
    }

    pub fn registry(&self) -> Arc<SearchParamRegistry> {
        self.registry
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn check_live(&self) -> Result<(), SearchError> {
        if self.removed.load(Ordering::SeqCst) {
            return Err(SearchError::Store(StoreError::TenantNotFound(
                self.tenant.clone(),
            )));
        }
        Ok(())
    }

    /// Stops all writing: waits for a running catch-up and closes the writer (releasing the
    /// directory's lock). Searches still running keep their snapshot.
    pub fn shut_down(&self) {
        self.removed.store(true, Ordering::SeqCst);
        let mut w = lock(&self.writer);
        if let Some(writer) = w.take() {
            // Waiting for merges lets the writer's threads finish before the directory goes.
            let _ = writer.wait_merging_threads();
        }
        self.progressed.notify_all();
    }

    // ------------------------------------------------------------------ custom parameters

    fn rebuild_registry(&self) {
        let custom = lock(&self.custom);
        let reg = if custom.is_empty() {
            r4()
        } else {
            let mut reg = SearchParamRegistry::r4().clone();
            for p in custom.values() {
                if let Err(e) = reg.add(p.clone()) {
                    tracing::warn!(tenant = %self.tenant, url = %p.url, error = %e, "custom search parameter ignored");
                }
            }
            Arc::new(reg)
        };
        *self.registry.write().unwrap_or_else(|p| p.into_inner()) = reg;
    }

    /// Sets or removes the custom parameter of SearchParameter `id` from its JSON (`None`: it
    /// is deleted). Returns whether the parameter set changed.
    fn set_custom(&self, id: &str, json: Option<&[u8]>) -> bool {
        let param = json.and_then(|bytes| {
            let tree = json::parse(bytes).ok()?;
            if tree.get("status").and_then(Json::as_str) == Some("retired") {
                return None;
            }
            match SearchParam::from_resource(&tree) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(tenant = %self.tenant, id, error = %e, "SearchParameter cannot be used for search");
                    None
                }
            }
        });
        let mut custom = lock(&self.custom);
        match param {
            Some(p) => custom.insert(id.to_string(), p.clone()).as_ref() != Some(&p),
            None => custom.remove(id).is_some(),
        }
    }

    /// Loads the SearchParameters the index holds (their current versions from the store).
    fn load_custom_from_index(&self, store: &Store) -> Result<(), SearchError> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(
            Term::from_field_text(self.fields.ty, "SearchParameter"),
            IndexRecordOption::Basic,
        );
        let (_, addrs) = searcher.search(&q, &TopCollector::new(&[], usize::MAX))?;
        let sp = ResourceType::parse("SearchParameter");
        let mut changed = false;
        for hit in keys_and_versions(&searcher, &addrs)? {
            let Some(id) = hit
                .key
                .split_once('/')
                .and_then(|(_, id)| ResourceId::new(id).ok())
            else {
                continue;
            };
            let Some(sp) = sp else { continue };
            if let ReadResult::Found(r) = store.read(&self.tenant, sp, &id)? {
                changed |= self.set_custom(id.as_str(), Some(&r.json));
            }
        }
        if changed {
            self.rebuild_registry();
        }
        Ok(())
    }

    /// Loads every current SearchParameter of the tenant from the store (for a rebuild, so that
    /// resources logged before their parameter was created get its values too).
    fn load_custom_from_store(&self, store: &Store) -> Result<(), SearchError> {
        let mut ids = std::collections::BTreeSet::new();
        for c in store.changes(&self.tenant, 1)? {
            let c = c?;
            if c.resource_type.as_str() == "SearchParameter" {
                ids.insert(c.id);
            }
        }
        let mut changed = false;
        if let Some(sp) = ResourceType::parse("SearchParameter") {
            for id in ids {
                let json = match store.read(&self.tenant, sp, &id)? {
                    ReadResult::Found(r) => Some(r.json),
                    _ => None,
                };
                changed |= self.set_custom(id.as_str(), json.as_deref());
            }
        }
        if changed {
            self.rebuild_registry();
        }
        Ok(())
    }

    // ------------------------------------------------------------------ indexing

    fn writer<'a>(
        &self,
        slot: &'a mut Option<IndexWriter>,
    ) -> Result<&'a mut IndexWriter, SearchError> {
        self.check_live()?;
        if slot.is_none() {
            let options = IndexWriterOptions::builder()
                .memory_budget_per_thread(self.config.memory)
                .num_worker_threads(1)
                .num_merge_threads(1)
                .build();
            *slot = Some(self.index.writer_with_options(options)?);
        }
        slot.as_mut()
            .ok_or_else(|| SearchError::Index("no index writer".into()))
    }

    fn commit(&self, slot: &mut Option<IndexWriter>, seq: u64) -> Result<(), SearchError> {
        let payload = Payload {
            format: FORMAT,
            seq,
            created: self.created.clone(),
        }
        .encode();
        let w = self.writer(slot)?;
        let mut prepared = w.prepare_commit()?;
        prepared.set_payload(&payload);
        prepared.commit()?;
        self.reader.reload()?;
        *lock(&self.seq) = seq;
        self.progressed.notify_all();
        Ok(())
    }

    /// Applies one batch of changes (without committing).
    fn apply(
        &self,
        slot: &mut Option<IndexWriter>,
        store: &Store,
        batch: &[Change],
    ) -> Result<(), SearchError> {
        // Only the last change of each resource in the batch matters.
        let mut last: HashMap<(ResourceType, &ResourceId), &Change> = HashMap::new();
        for c in batch {
            last.insert((c.resource_type, &c.id), c);
        }
        let mut params_changed = false;
        for c in last.values() {
            if c.resource_type.as_str() == "SearchParameter" {
                let json = match c.method {
                    Method::Delete => None,
                    _ => match store.vread(&self.tenant, c.resource_type, &c.id, c.version)? {
                        ReadResult::Found(r) => Some(r.json),
                        _ => None,
                    },
                };
                params_changed |= self.set_custom(c.id.as_str(), json.as_deref());
            }
        }
        if params_changed {
            self.rebuild_registry();
        }
        let reg = self.registry();
        let f = &self.fields;
        let w = self.writer(slot)?;
        for c in last.values() {
            let key = doc_key(c.resource_type, c.id.as_str());
            w.delete_term(Term::from_field_text(f.key, &key));
            if c.method == Method::Delete {
                continue;
            }
            match store.vread(&self.tenant, c.resource_type, &c.id, c.version)? {
                ReadResult::Found(r) => {
                    let Ok(Json::Object(m)) = json::parse(&r.json) else {
                        tracing::error!(tenant = %self.tenant, %key, "stored resource is not a JSON object; not indexed");
                        continue;
                    };
                    w.add_document(document(
                        f,
                        &reg,
                        c.resource_type,
                        c.id.as_str(),
                        c.version.0,
                        &m,
                    ))?;
                }
                other => {
                    tracing::error!(tenant = %self.tenant, %key, version = %c.version, ?other, "logged version cannot be read; not indexed");
                }
            }
        }
        Ok(())
    }

    /// Indexes the changes after the covered sequence number, one commit per batch, until the
    /// log is exhausted or (if given) `target` is covered. `progress` hears of each commit.
    fn catch_up_locked(
        &self,
        slot: &mut Option<IndexWriter>,
        store: &Store,
        target: Option<u64>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), SearchError> {
        loop {
            self.check_live()?;
            let from = self.indexed() + 1;
            let mut batch = Vec::new();
            for c in store.changes(&self.tenant, from)?.take(BATCH) {
                batch.push(c?);
            }
            let Some(last) = batch.last().map(|c| c.seq) else {
                return Ok(());
            };
            let applied = self
                .apply(slot, store, &batch)
                .and_then(|()| self.commit(slot, last));
            if let Err(e) = applied {
                // Uncommitted work is dropped with the writer; the next attempt starts over
                // from the covered sequence number.
                if let Some(mut w) = slot.take() {
                    let _ = w.rollback();
                }
                return Err(e);
            }
            progress(last);
            if batch.len() < BATCH || target.is_some_and(|t| last >= t) {
                return Ok(());
            }
        }
    }

    /// Indexes what the log holds beyond the covered sequence number, unless someone else is
    /// already doing so.
    pub fn catch_up_if_idle(&self, store: &Store) -> Result<(), SearchError> {
        let mut slot = match self.writer.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        self.catch_up_locked(&mut slot, store, None, &mut |_| {})
    }

    /// Returns once the searchable index covers `target`: catches up itself if nobody else is
    /// indexing, else waits for whoever is. Fails after `timeout`.
    pub fn ensure(&self, store: &Store, target: u64, timeout: Duration) -> Result<(), SearchError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_live()?;
            let indexed = self.indexed();
            if indexed >= target {
                return Ok(());
            }
            let slot = match self.writer.try_lock() {
                Ok(g) => Some(g),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            };
            if let Some(mut slot) = slot {
                self.catch_up_locked(&mut slot, store, Some(target), &mut |_| {})?;
                drop(slot);
                if self.indexed() > indexed {
                    continue;
                }
                // No progress although the log should hold `target`: do not spin.
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SearchError::IndexBehind {
                    needed: target,
                    indexed,
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(25));
            let guard = lock(&self.seq);
            let _ = self
                .progressed
                .wait_timeout_while(guard, wait, |s| *s < target);
        }
    }

    /// Throws the index away and builds it again from the store's whole change log.
    /// `progress(seq)` hears of each commit.
    pub fn rebuild(&self, store: &Store, progress: &mut dyn FnMut(u64)) -> Result<(), SearchError> {
        let mut slot = lock(&self.writer);
        let w = self.writer(&mut slot)?;
        w.delete_all_documents()?;
        lock(&self.custom).clear();
        self.rebuild_registry();
        self.load_custom_from_store(store)?;
        self.commit(&mut slot, 0)?;
        self.catch_up_locked(&mut slot, store, None, progress)
    }

    /// Reindexes the current version of every resource of `types` (all if `None`) with the
    /// current parameters, e.g. after a custom SearchParameter was added. Works in chunks, each
    /// its own commit, so searches and indexing go on meanwhile. `progress(done, total)`.
    pub fn reindex(
        &self,
        store: &Store,
        types: Option<&[ResourceType]>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64, SearchError> {
        const CHUNK: usize = 500;
        {
            let mut slot = lock(&self.writer);
            self.catch_up_locked(&mut slot, store, None, &mut |_| {})?;
        }
        let mut keys = std::collections::BTreeSet::new();
        for c in store.changes(&self.tenant, 1)? {
            let c = c?;
            if types.is_none_or(|ts| ts.contains(&c.resource_type)) {
                keys.insert((c.resource_type, c.id));
            }
        }
        let total = keys.len() as u64;
        let keys: Vec<_> = keys.into_iter().collect();
        let mut done = 0u64;
        progress(0, total);
        for chunk in keys.chunks(CHUNK) {
            let mut slot = lock(&self.writer);
            let reg = self.registry();
            let f = &self.fields;
            let w = self.writer(&mut slot)?;
            for (ty, id) in chunk {
                w.delete_term(Term::from_field_text(f.key, &doc_key(*ty, id.as_str())));
                // The current version: changes after the covered sequence number are applied
                // again by the incremental indexer, which converges on the same document.
                if let ReadResult::Found(r) = store.read(&self.tenant, *ty, id)?
                    && let Ok(Json::Object(m)) = json::parse(&r.json)
                {
                    w.add_document(document(f, &reg, *ty, id.as_str(), r.version.0, &m))?;
                }
            }
            let seq = self.indexed();
            if let Err(e) = self.commit(&mut slot, seq) {
                if let Some(mut w) = slot.take() {
                    let _ = w.rollback();
                }
                return Err(e);
            }
            done += chunk.len() as u64;
            progress(done, total);
        }
        Ok(total)
    }

    /// The version of `key` this index holds, if any (for tests and diagnostics).
    pub fn indexed_version(
        &self,
        ty: ResourceType,
        id: &str,
    ) -> Result<Option<VersionId>, SearchError> {
        let searcher = self.reader.searcher();
        let q = TermQuery::new(
            Term::from_field_text(self.fields.key, &doc_key(ty, id)),
            IndexRecordOption::Basic,
        );
        let (_, addrs) = searcher.search(&q, &TopCollector::new(&[], 1))?;
        Ok(keys_and_versions(&searcher, &addrs)?
            .first()
            .map(|h| VersionId(h.version)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip() {
        let p = Payload {
            format: FORMAT,
            seq: 42,
            created: "2026-01-01T00:00:00.000001Z".into(),
        };
        assert_eq!(Payload::decode(&p.encode()), Some(p));
        assert_eq!(Payload::decode("{}"), None);
    }
}
