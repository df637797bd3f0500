//! # fhir-store
//!
//! Versioned, multitenant storage of FHIR R4 resources over an ordered key-value store.
//!
//! - **Versions are immutable.** Every create, update and delete writes a new version; reads
//!   serve the exact JSON bytes stored on write (with `id`, `meta.versionId` and
//!   `meta.lastUpdated` set), history keeps every version.
//! - **One source of truth.** Each change is committed atomically together with its current
//!   pointer, identifier-index entries and a change-log record with a per-tenant sequence number
//!   (1, 2, 3, … without gaps). Search indexes, subscriptions and exports are derived from the
//!   change log ([`Store::changes`]).
//! - **Durable before acknowledged.** A write returns only after its commit is fsynced. All
//!   writes go through one writer thread that commits every queued request in one group, so
//!   concurrent writers share an fsync; conditional creates and `If-Match` are atomic.
//! - **Tenants are isolated by construction**: every key of a tenant lives under a prefix that
//!   no other tenant's prefix can collide with.
//! - Backends: [redb](Backend::Redb) (default) and sled (crate feature `sled`), behind the
//!   small [`kv::Kv`] trait.
//!
//! The API is blocking; an async server calls it through `spawn_blocking`.
//!
//! ## How it works
//!
//! *Keys.* One ordered keyspace. Tenant `t`'s data lives under `D <t>`, with every string
//! escaped so that no tenant prefix is a prefix of another's: current pointers
//! (`D <t> r <type> <id>`), versions (`D <t> v <type> <id> <version>`), the change log
//! (`D <t> c <seq>`), a per-type copy of it for type history (`D <t> h <type> <seq>`) and the
//! identifier index (`D <t> i <type> <value> <system> <id>`). Every write puts all of these in
//! one atomic commit. Removing a tenant first hides it, then deletes its prefix in chunks (and
//! finishes on the next open if interrupted).
//!
//! *Group commit.* Writes are requests to one writer thread. It takes every queued request,
//! applies each to its own layer over the committed state plus the layers of the requests
//! before it (so a second conditional create in the same group finds the first), keeps the
//! layers of the requests that succeeded, writes them all in one durable KV commit, and then
//! answers. A request that fails leaves no trace; a failed commit fails the whole group.
//!
//! *Batches and transactions.* A [batch](Store::batch) is one request whose ops are applied
//! each in its own layer (a failing op leaves no trace, the others go on) and committed together.
//! A [FHIR transaction](Store::transaction_entries) is one layer: all or nothing, processed in
//! the spec's order with `urn:uuid:` placeholders and conditional references rewritten (see
//! the `writer::transaction` module). [`bundle::process`] turns a FHIR `batch` or `transaction`
//! Bundle into either, validating its entries in parallel first.
//!
//! *The audit area.* Each tenant has an append-only area of access-log records
//! (`D <t> a <time> <nonce>`, indexed by patient under `D <t> p <patient> <time> <nonce>`),
//! which only removing the tenant deletes. A write request can carry an [`AuditHook`]
//! ([`Store::with_audit`]): the writer calls it with what the request wrote (ids, versions,
//! patient compartments) before the group commit and commits its records with the write, so a
//! write and its record are durable together or not at all. [`Store::audit_page`] reads the area
//! by patient and time, in pages, in either order.
//!
//! *Reads* go straight to the backend and see only committed, durable state.
//!
//! ```
//! use fhir_core::{Resource, ResourceType, TenantId};
//! use fhir_store::{Condition, HistoryQuery, HistoryScope, ReadResult, Store, WriteKind};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let hf = TenantId::new("helse-vest")?;
//! store.create_tenant(&hf, "Helse Vest RHF")?;
//!
//! let obs = Resource::from_json_bytes(br#"{"resourceType":"Observation","status":"final",
//!     "identifier":[{"system":"urn:phg","value":"m-1"}],
//!     "code":{"text":"pulse"},"valueQuantity":{"value":72.50,"unit":"/min"}}"#)?;
//! // Idempotent ingest: a retry with the same identifier does not create a duplicate.
//! let cond = Condition::parse("identifier=urn%3Aphg%7Cm-1")?;
//! let first = store.create(&hf, obs.clone(), Some(&cond))?;
//! let retry = store.create(&hf, obs, Some(&cond))?;
//! assert_eq!(first.kind, WriteKind::Created);
//! assert_eq!(retry.kind, WriteKind::Existing);
//!
//! let ty = ResourceType::parse("Observation").unwrap();
//! let ReadResult::Found(current) = store.read(&hf, ty, &first.resource.id)? else { panic!() };
//! assert!(String::from_utf8(current.json)?.contains("72.50"));
//!
//! let page = store.history(&hf, HistoryScope::Type(ty), &HistoryQuery::default())?;
//! assert_eq!(page.entries.len(), 1);
//! assert_eq!(store.last_seq(&hf)?, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod audit;
pub mod bundle;
mod condition;
mod error;
mod keys;
pub mod kv;
mod time;
mod types;
mod view;
mod writer;

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use fhir_core::{Json, Resource, ResourceId, ResourceType, TenantId, VersionId};

pub use audit::{
    AuditCursor, AuditHook, AuditPage, AuditQuery, AuditRecord, AuditedWrite, InvalidAuditCursor,
};
pub use condition::{Condition, ResolvedReferences, normalize_criteria};
pub use error::StoreError;
pub use types::{
    Backend, Change, DeleteResult, HistoryEntry, HistoryPage, HistoryQuery, HistoryScope,
    IfNoneMatch, Method, ReadResult, StoreOptions, StoredResource, TenantInfo, TxEntry, WriteKind,
    WriteOp, WriteOutcome, WriteResult,
};

use keys::{ChangeRecord, TenantRecord, VersionRecord};
use kv::{Direction, Kv, WriteBatch, prefix_end};
use time::{format_micros, parse_instant};
use view::{Committed, Source};
use writer::{Answer, Job, Request};

/// A handle to an open store. Cheap to clone; all clones share one backend and one writer
/// thread, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// The audit hook of a handle made by [`Store::with_audit`], for its next write request.
    audit: Option<Arc<audit::HookSlot>>,
}

struct Inner {
    kv: Arc<dyn Kv>,
    tx: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer's loop after the requests already queued; joining
        // it makes sure the backend is closed (and its file lock released) when drop returns.
        self.tx.take();
        if let Some(handle) = self.writer.take() {
            let _ = handle.join();
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.inner.kv.name())
            .finish_non_exhaustive()
    }
}

/// Changes read from the log per backend scan.
const CHANGES_CHUNK: usize = 256;

impl Store {
    /// Opens (or creates) the store in directory `dir` with the redb backend.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(dir, StoreOptions::default())
    }

    /// Opens (or creates) the store in directory `dir`. Fails if the directory was created with
    /// another backend, or is open already.
    pub fn open_with(dir: impl AsRef<Path>, opts: StoreOptions) -> Result<Store, StoreError> {
        let kv: Arc<dyn Kv> = Arc::from(kv::open(dir.as_ref(), opts.backend, opts.cache_size)?);
        match kv.get(keys::FORMAT_KEY)? {
            Some(v) if v == keys::FORMAT_VERSION.to_be_bytes() => {}
            Some(v) => {
                return Err(StoreError::Corrupt(format!(
                    "unsupported store format {v:?} (this version reads format {})",
                    keys::FORMAT_VERSION
                )));
            }
            None => {
                let mut b = WriteBatch::new();
                b.put(
                    keys::FORMAT_KEY.to_vec(),
                    keys::FORMAT_VERSION.to_be_bytes().to_vec(),
                );
                kv.commit(b)?;
            }
        }
        let (tx, handle) = writer::spawn(kv.clone())?;
        let store = Store {
            inner: Arc::new(Inner {
                kv,
                tx: Some(tx),
                writer: Some(handle),
            }),
            audit: None,
        };
        // Finish tenant removals that a crash interrupted.
        for (k, v) in Committed(store.kv()).scan_prefix(&keys::tenants_prefix(), usize::MAX)? {
            if TenantRecord::decode(&v)?.removing {
                let id = keys::tenant_id_of_key(&k)?;
                tracing::info!(tenant = %id, "finishing an interrupted tenant removal");
                store.purge(&id)?;
            }
        }
        Ok(store)
    }

    fn kv(&self) -> &dyn Kv {
        self.inner.kv.as_ref()
    }

    fn submit(&self, job: Job) -> Result<Answer, StoreError> {
        // Only write requests carry an audit hook; tenant and audit jobs leave it for the next.
        let audit = match &job {
            Job::Write { .. } | Job::Transaction { .. } | Job::Batch { .. } => {
                self.take_audit_hook()
            }
            _ => None,
        };
        let (reply, answer) = mpsc::sync_channel(1);
        let tx = self.inner.tx.as_ref().ok_or(StoreError::Closed)?;
        tx.send(Request { job, audit, reply })
            .map_err(|_| StoreError::Closed)?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }

    fn submit_write(
        &self,
        t: &TenantId,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        match self.submit(Job::Write {
            tenant: t.clone(),
            ops,
        })? {
            Answer::Outcomes(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    fn submit_one(&self, t: &TenantId, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        self.submit_write(t, vec![op])?.pop().ok_or_else(unexpected)
    }

    // ------------------------------------------------------------------ tenants

    /// Creates a tenant. Fails with [`StoreError::TenantExists`] if the id is taken (also
    /// while a tenant of that id is still being removed).
    pub fn create_tenant(&self, id: &TenantId, name: &str) -> Result<TenantInfo, StoreError> {
        match self.submit(Job::CreateTenant {
            id: id.clone(),
            name: name.to_string(),
        })? {
            Answer::Tenant(t) => Ok(t),
            _ => Err(unexpected()),
        }
    }

    /// All tenants, sorted by id.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in Committed(self.kv()).scan_prefix(&keys::tenants_prefix(), usize::MAX)? {
            let rec = TenantRecord::decode(&v)?;
            if !rec.removing {
                out.push(tenant_info(keys::tenant_id_of_key(&k)?, rec));
            }
        }
        Ok(out)
    }

    /// One tenant.
    pub fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, StoreError> {
        Ok(Committed(self.kv())
            .active_tenant(id)?
            .map(|rec| tenant_info(id.clone(), rec)))
    }

    /// Removes a tenant and all its data. From the moment this is called, the tenant is gone
    /// for reads and writes; its keys are then deleted in chunks. Returns whether it existed.
    pub fn remove_tenant(&self, id: &TenantId) -> Result<bool, StoreError> {
        let existed = match self.submit(Job::MarkRemoving { id: id.clone() })? {
            Answer::Flag(f) => f,
            _ => return Err(unexpected()),
        };
        self.purge(id)?;
        Ok(existed)
    }

    fn purge(&self, id: &TenantId) -> Result<(), StoreError> {
        loop {
            match self.submit(Job::Purge { id: id.clone() })? {
                Answer::Flag(true) => continue,
                Answer::Flag(false) => return Ok(()),
                _ => return Err(unexpected()),
            }
        }
    }

    // ------------------------------------------------------------------ writes

    /// Creates a resource with a new id (any id in the body is replaced) as version 1.
    ///
    /// With `if_none_exist`, nothing is written if exactly one resource of the type matches
    /// ([`WriteKind::Existing`] with that resource); more than one match is
    /// [`StoreError::MultipleMatches`]. The check and the create are atomic.
    pub fn create(
        &self,
        t: &TenantId,
        mut resource: Resource,
        if_none_exist: Option<&Condition>,
    ) -> Result<WriteResult, StoreError> {
        resource.clear_id();
        match self.submit_one(
            t,
            WriteOp::Create {
                resource,
                if_none_exist: if_none_exist.cloned(),
            },
        )? {
            WriteOutcome::Write(w) => Ok(w),
            WriteOutcome::Delete(_) => Err(unexpected()),
        }
    }

    /// Writes `resource` as the next version of `id` ([`WriteKind::Updated`]), or creates it
    /// if it does not exist or is deleted ([`WriteKind::Created`]; a deleted resource keeps its
    /// version numbering). `if_match` must equal the current version. The body's id, if any,
    /// must equal `id` ([`StoreError::IdMismatch`]).
    pub fn update(
        &self,
        t: &TenantId,
        id: &ResourceId,
        resource: Resource,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        match self.submit_one(
            t,
            WriteOp::Update {
                id: id.clone(),
                resource,
                if_match,
            },
        )? {
            WriteOutcome::Write(w) => Ok(w),
            WriteOutcome::Delete(_) => Err(unexpected()),
        }
    }

    /// Updates the one resource of type `ty` matching `cond`; with no match, creates it (with
    /// the body's id if it has one, else a new one); more than one match is
    /// [`StoreError::MultipleMatches`].
    pub fn conditional_update(
        &self,
        t: &TenantId,
        ty: ResourceType,
        cond: &Condition,
        resource: Resource,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        match self.submit_one(
            t,
            WriteOp::ConditionalUpdate {
                ty,
                cond: cond.clone(),
                resource,
                if_match,
            },
        )? {
            WriteOutcome::Write(w) => Ok(w),
            WriteOutcome::Delete(_) => Err(unexpected()),
        }
    }

    /// Deletes a resource logically: writes a deletion as its next version. Deleting an absent
    /// or already deleted resource writes nothing (`version: None`).
    pub fn delete(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
        if_match: Option<VersionId>,
    ) -> Result<DeleteResult, StoreError> {
        match self.submit_one(
            t,
            WriteOp::Delete {
                ty,
                id: id.clone(),
                if_match,
            },
        )? {
            WriteOutcome::Delete(d) => Ok(d),
            WriteOutcome::Write(_) => Err(unexpected()),
        }
    }

    /// Deletes the one resource of type `ty` matching `cond`; no match deletes nothing; more
    /// than one is [`StoreError::MultipleMatches`].
    pub fn conditional_delete(
        &self,
        t: &TenantId,
        ty: ResourceType,
        cond: &Condition,
    ) -> Result<DeleteResult, StoreError> {
        match self.submit_one(
            t,
            WriteOp::ConditionalDelete {
                ty,
                cond: cond.clone(),
            },
        )? {
            WriteOutcome::Delete(d) => Ok(d),
            WriteOutcome::Write(_) => Err(unexpected()),
        }
    }

    /// Applies `ops` in order, all or nothing, in one commit; each op sees the effects of the
    /// ones before it. The changes get a contiguous range of sequence numbers and one
    /// `lastUpdated`. The first failing op fails the whole transaction with its error.
    ///
    /// This is the plain, sequential primitive; a FHIR transaction (the spec's processing order,
    /// `fullUrl` placeholders, conditional references) is [`Store::transaction_entries`].
    pub fn transaction(
        &self,
        t: &TenantId,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let ops = ops
            .into_iter()
            .map(|op| match op {
                WriteOp::Create {
                    mut resource,
                    if_none_exist,
                } => {
                    resource.clear_id();
                    WriteOp::Create {
                        resource,
                        if_none_exist,
                    }
                }
                other => other,
            })
            .collect();
        self.submit_write(t, ops)
    }

    /// Applies a JSON Patch (RFC 6902) to the current version of `ty/id` and writes the result
    /// as the next version. The patch is applied by the writer, so concurrent patches of one
    /// resource serialize and each sees the result of the one before. The patched resource is
    /// validated like any other; a patch may not change `resourceType` or `id`.
    ///
    /// Errors: [`StoreError::NotFound`] (absent or deleted), [`StoreError::VersionConflict`]
    /// (`if_match`), [`StoreError::InvalidPatch`].
    pub fn patch(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
        patch: Json,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        match self.submit_one(
            t,
            WriteOp::Patch {
                ty,
                id: id.clone(),
                patch,
                if_match,
            },
        )? {
            WriteOutcome::Write(w) => Ok(w),
            WriteOutcome::Delete(_) => Err(unexpected()),
        }
    }

    /// Applies each op on its own — one failing op leaves no trace and does not stop the others —
    /// but commits all of them in one durable commit (one fsync). The results are in the order
    /// of `ops`. The outer error is for the whole call: an unknown tenant, or a failed commit (then
    /// nothing was written).
    pub fn batch(
        &self,
        t: &TenantId,
        ops: Vec<WriteOp>,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        self.batch_entries(t, ops.into_iter().map(TxEntry::new).collect())
    }

    /// [`Store::batch`] with FHIR entries: each entry is processed like a one-entry
    /// [`Store::transaction_entries`], so conditional references in it are resolved.
    pub fn batch_entries(
        &self,
        t: &TenantId,
        entries: Vec<TxEntry>,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        self.batch_entries_resolved(t, entries, ResolvedReferences::new())
    }

    /// [`Store::batch_entries`] whose entries may carry [`Condition::resolved`] conditions, and
    /// whose conditional references may be resolved by a search beforehand (`refs`). A
    /// resource an entry creates for such criteria counts as a match of the same criteria in
    /// the entries after it (the search could not see it).
    pub fn batch_entries_resolved(
        &self,
        t: &TenantId,
        entries: Vec<TxEntry>,
        refs: ResolvedReferences,
    ) -> Result<Vec<Result<WriteOutcome, StoreError>>, StoreError> {
        match self.submit(Job::Batch {
            tenant: t.clone(),
            entries,
            refs,
        })? {
            Answer::Batch(results) => Ok(results),
            _ => Err(unexpected()),
        }
    }

    /// A FHIR transaction: all entries or none, in one commit with a contiguous range of
    /// sequence numbers, processed in the order of the FHIR spec (deletes, creates, then updates
    /// and patches) with `urn:uuid:`/`urn:oid:` placeholders and conditional references
    /// (`Patient?identifier=…`) resolved and rewritten in every entry. Outcomes are in the order
    /// of `entries`. A failing entry fails the whole transaction with
    /// [`StoreError::TransactionFailed`] naming its index.
    ///
    /// ```
    /// use fhir_core::{Resource, TenantId};
    /// use fhir_store::{Store, TxEntry, WriteOp, WriteOutcome};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path())?;
    /// let t = TenantId::new("ous")?;
    /// store.create_tenant(&t, "OUS")?;
    /// let patient = Resource::from_json_bytes(br#"{"resourceType":"Patient"}"#)?;
    /// let obs = Resource::from_json_bytes(br#"{"resourceType":"Observation","status":"final",
    ///     "code":{"text":"pulse"},"subject":{"reference":"urn:uuid:7f1c0b36-2b43-4b8e-9d0e-1a2b3c4d5e6f"}}"#)?;
    /// let out = store.transaction_entries(&t, vec![
    ///     TxEntry::new(WriteOp::Create { resource: obs, if_none_exist: None }),
    ///     TxEntry::with_full_url("urn:uuid:7f1c0b36-2b43-4b8e-9d0e-1a2b3c4d5e6f",
    ///         WriteOp::Create { resource: patient, if_none_exist: None }),
    /// ])?;
    /// let (WriteOutcome::Write(o), WriteOutcome::Write(p)) = (&out[0], &out[1]) else { panic!() };
    /// let stored = String::from_utf8(o.resource.json.clone())?;
    /// assert!(stored.contains(&format!(r#""reference":"Patient/{}""#, p.resource.id)));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn transaction_entries(
        &self,
        t: &TenantId,
        entries: Vec<TxEntry>,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.transaction_entries_resolved(t, entries, ResolvedReferences::new())
    }

    /// [`Store::transaction_entries`] with conditional references whose criteria a search
    /// resolved beforehand (`refs`, by the reference as written). Such a reference must match
    /// exactly one resource: of the search's matches, those still current in the version the
    /// search saw (one changed since fails the transaction with
    /// [`StoreError::VersionConflict`]), plus the entries of this transaction whose own
    /// `ifNoneExist` or conditional-update criteria are the same (the search could not see
    /// them). The entries' own conditions may be [`Condition::resolved`] too.
    pub fn transaction_entries_resolved(
        &self,
        t: &TenantId,
        entries: Vec<TxEntry>,
        refs: ResolvedReferences,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        match self.submit(Job::Transaction {
            tenant: t.clone(),
            entries,
            refs: Arc::new(refs),
        })? {
            Answer::Outcomes(o) => Ok(o),
            _ => Err(unexpected()),
        }
    }

    // ------------------------------------------------------------------ reads

    /// The current version of a resource.
    pub fn read(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
    ) -> Result<ReadResult, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        let Some(p) = src.pointer(t, ty, id)? else {
            return Ok(ReadResult::NotFound);
        };
        if p.deleted {
            return Ok(ReadResult::Deleted {
                version: p.version,
                last_updated: format_micros(p.last_updated_micros),
            });
        }
        match src.version(t, ty, id, p.version)? {
            Some(rec) => Ok(found(ty, id, p.version, rec)),
            None => Err(self.missing_version(t, ty, id, p.version)),
        }
    }

    /// One version of a resource.
    pub fn vread(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
        v: VersionId,
    ) -> Result<ReadResult, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        Ok(match src.version(t, ty, id, v)? {
            None => ReadResult::NotFound,
            Some(rec) if rec.method == Method::Delete => ReadResult::Deleted {
                version: v,
                last_updated: format_micros(rec.last_updated_micros),
            },
            Some(rec) => found(ty, id, v, rec),
        })
    }

    /// A version that a pointer or the log names is missing: the tenant was removed meanwhile,
    /// or the store is damaged.
    fn missing_version(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
        v: VersionId,
    ) -> StoreError {
        match Committed(self.kv()).active_tenant(t) {
            Ok(Some(_)) => StoreError::Corrupt(format!("{ty}/{id}: version {v} is missing")),
            Ok(None) => StoreError::TenantNotFound(t.clone()),
            Err(e) => e,
        }
    }

    /// The ids of the current, non-deleted resources of type `ty` that match `cond`, sorted.
    pub fn find(
        &self,
        t: &TenantId,
        ty: ResourceType,
        cond: &Condition,
    ) -> Result<Vec<ResourceId>, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        condition::find(&src, t, ty, cond)
    }

    /// One page of history, newest first. Paging with [`HistoryPage::next`] never repeats or
    /// skips an entry, also while writes go on: later writes only ever appear on a new first
    /// page.
    pub fn history(
        &self,
        t: &TenantId,
        scope: HistoryScope,
        q: &HistoryQuery,
    ) -> Result<HistoryPage, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        let since = q.since.as_deref().map(parse_instant).transpose()?;
        let count = q.count.min(HistoryQuery::MAX_COUNT);
        let mut page = HistoryPage {
            entries: Vec::new(),
            next: None,
        };
        if count == 0 {
            return Ok(page);
        }
        // Every scope is one reverse range scan whose keys end in the cursor value (a sequence
        // number, or for one resource its version number; both grow with time).
        let (prefix, instance) = match &scope {
            HistoryScope::System => (keys::changes_prefix(t), None),
            HistoryScope::Type(ty) => (keys::type_history_prefix(t, *ty), None),
            HistoryScope::Instance(ty, id) => (keys::versions_prefix(t, *ty, id), Some((*ty, id))),
        };
        let end = match q.before {
            Some(before) => {
                let mut k = prefix.clone();
                k.extend_from_slice(&before.to_be_bytes());
                Some(k)
            }
            None => prefix_end(&prefix),
        };
        let end_bound = end.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
        let iter = self
            .kv()
            .iter(Bound::Included(&prefix), end_bound, Direction::Reverse)?;
        for item in iter {
            let (k, v) = item?;
            let cursor = keys::seq_of_key(&k)?;
            let (entry_key, rec) = match instance {
                Some((ty, id)) => (
                    (ty, id.clone(), VersionId(cursor)),
                    VersionRecord::decode(&v)?,
                ),
                None => {
                    let c = ChangeRecord::decode(&v)?;
                    // The JSON is only fetched below, for entries that make it onto the page.
                    let rec = VersionRecord {
                        method: c.method,
                        seq: cursor,
                        last_updated_micros: c.last_updated_micros,
                        json: Vec::new(),
                    };
                    ((c.resource_type, c.id, c.version), rec)
                }
            };
            // lastUpdated never decreases along the log, so the first older entry ends it.
            if since.is_some_and(|s| rec.last_updated_micros < s) {
                break;
            }
            if page.entries.len() == count {
                page.next = Some(cursor.saturating_add(1));
                break;
            }
            let (ty, id, version) = entry_key;
            let rec = if instance.is_none() && rec.method != Method::Delete {
                src.version(t, ty, &id, version)?
                    .ok_or_else(|| self.missing_version(t, ty, &id, version))?
            } else {
                rec
            };
            page.entries.push(history_entry(ty, id, version, rec));
        }
        Ok(page)
    }

    /// The tenant's change log from sequence number `from_seq` (inclusive) on, in order. The
    /// iterator reads the log in chunks and also yields changes committed while it runs.
    pub fn changes(
        &self,
        t: &TenantId,
        from_seq: u64,
    ) -> Result<impl Iterator<Item = Result<Change, StoreError>> + '_, StoreError> {
        Committed(self.kv()).require_tenant(t)?;
        Ok(ChangeIter {
            kv: self.kv(),
            prefix: keys::changes_prefix(t),
            next_seq: from_seq.max(1),
            buf: VecDeque::new(),
            done: false,
        })
    }

    /// The sequence number of the tenant's newest change (0: none yet).
    pub fn last_seq(&self, t: &TenantId) -> Result<u64, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        let prefix = keys::changes_prefix(t);
        let end = prefix_end(&prefix);
        match src
            .scan(&prefix, end.as_deref(), Direction::Reverse, 1)?
            .first()
        {
            Some((k, _)) => keys::seq_of_key(k),
            None => Ok(0),
        }
    }
}

// The server shares one Store between request tasks.
const _: fn() = || {
    fn send_sync<T: Send + Sync + Clone + 'static>() {}
    send_sync::<Store>();
};

pub(crate) fn unexpected() -> StoreError {
    StoreError::Backend("internal error: unexpected answer from the writer".into())
}

fn tenant_info(id: TenantId, rec: TenantRecord) -> TenantInfo {
    TenantInfo {
        id,
        name: rec.name,
        created: format_micros(rec.created_micros),
    }
}

fn found(ty: ResourceType, id: &ResourceId, v: VersionId, rec: VersionRecord) -> ReadResult {
    ReadResult::Found(StoredResource {
        resource_type: ty,
        id: id.clone(),
        version: v,
        last_updated: format_micros(rec.last_updated_micros),
        json: rec.json,
    })
}

fn history_entry(
    ty: ResourceType,
    id: ResourceId,
    version: VersionId,
    rec: VersionRecord,
) -> HistoryEntry {
    let json = (rec.method != Method::Delete).then_some(rec.json);
    HistoryEntry {
        method: rec.method,
        resource_type: ty,
        id,
        version,
        last_updated: format_micros(rec.last_updated_micros),
        json,
    }
}

struct ChangeIter<'a> {
    kv: &'a dyn Kv,
    prefix: Vec<u8>,
    next_seq: u64,
    buf: VecDeque<Change>,
    done: bool,
}

impl ChangeIter<'_> {
    fn fill(&mut self) -> Result<(), StoreError> {
        let mut start = self.prefix.clone();
        start.extend_from_slice(&self.next_seq.to_be_bytes());
        let end = prefix_end(&self.prefix);
        let chunk =
            Committed(self.kv).scan(&start, end.as_deref(), Direction::Forward, CHANGES_CHUNK)?;
        if chunk.is_empty() {
            self.done = true;
        }
        for (k, v) in chunk {
            let seq = keys::seq_of_key(&k)?;
            let c = ChangeRecord::decode(&v)?;
            self.next_seq = seq + 1;
            self.buf.push_back(Change {
                seq,
                method: c.method,
                resource_type: c.resource_type,
                id: c.id,
                version: c.version,
                last_updated: format_micros(c.last_updated_micros),
            });
        }
        Ok(())
    }
}

impl Iterator for ChangeIter<'_> {
    type Item = Result<Change, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty()
            && !self.done
            && let Err(e) = self.fill()
        {
            self.done = true;
            return Some(Err(e));
        }
        self.buf.pop_front().map(Ok)
    }
}
