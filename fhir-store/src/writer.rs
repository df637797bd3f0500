//! The single writer thread and group commit.
//!
//! Every change to the store is a [`Request`] to one thread. The thread takes the first waiting
//! request, then everything else already queued (up to [`MAX_GROUP`]), applies them one after
//! another to a layered [`View`] (so each sees the effects of the ones before it), commits all
//! their writes in **one** durable KV commit, and only then answers them. N concurrent writers
//! thus share one fsync, and because one thread decides everything, conditional creates,
//! If-Match checks and sequence numbers need no further locking.
//!
//! A request that fails contributes nothing (its writes stay in its own layer, which is thrown
//! away); a failing commit fails every request of the group, and nothing of it is visible.
//!
//! A *batch* request is a list of units, each applied like a request of its own (its own layer,
//! its own answer) but committed with the rest of the group. A FHIR *transaction* is one unit:
//! see [`transaction`].
//!
//! A write request may carry an [`AuditHook`]. Once the request has succeeded in its layer, the
//! writer computes the patient compartment of every resource written (from the tree it has at
//! hand, so nothing is parsed again), calls the hook, and puts the audit records it returns into
//! the same layer, so they are committed with the write or not at all. For a batch, whose
//! entries are merged into the group one by one, the writer keeps an undo log of the keys they
//! replaced, and rolls the entries back if the hook fails.

mod transaction;

use std::collections::{BTreeSet, HashMap};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use fhir_core::search_param::SearchParamRegistry;
use fhir_core::{Json, Resource, ResourceId, ResourceType, TenantId, VersionId};

use crate::audit::{AuditHook, AuditRecord, AuditedWrite, record_keys};
use crate::condition::{Condition, ResolvedReferences, find};
use crate::error::StoreError;
use crate::keys::{self, ChangeRecord, IndexedIdentifier, Pointer, TenantRecord, VersionRecord};
use crate::kv::{Direction, Kv, WriteBatch, prefix_end};
use crate::time::{format_micros, now_micros};
use crate::types::{
    DeleteResult, IfNoneMatch, Method, StoredResource, TenantInfo, TxEntry, WriteKind, WriteOp,
    WriteOutcome, WriteResult,
};
use crate::view::{Overlay, Source, View};

/// Most requests committed together; bounds the memory and latency of one group.
pub(crate) const MAX_GROUP: usize = 512;

/// Keys deleted per commit when a tenant is removed, so that removing a large tenant does not
/// stall other tenants' writes for long.
pub(crate) const PURGE_CHUNK: usize = 5000;

/// What a request asks the writer to do.
pub(crate) enum Job {
    CreateTenant {
        id: TenantId,
        name: String,
    },
    /// Hide the tenant and refuse its writes; answers whether it was active.
    MarkRemoving {
        id: TenantId,
    },
    /// Delete one chunk of a removing tenant's keys; answers whether more may remain.
    Purge {
        id: TenantId,
    },
    /// Apply the operations all-or-nothing, in the order given.
    Write {
        tenant: TenantId,
        ops: Vec<WriteOp>,
    },
    /// A FHIR transaction: all-or-nothing, in the order of the spec, with placeholder and
    /// conditional references resolved (see [`transaction`]); `refs` are the conditional
    /// references a search resolved beforehand.
    Transaction {
        tenant: TenantId,
        entries: Vec<TxEntry>,
        refs: Arc<ResolvedReferences>,
    },
    /// Append audit records (`D <t> a …` and their `D <t> p …` index entries).
    Audit {
        tenant: TenantId,
        records: Vec<AuditRecord>,
    },
    /// Each entry on its own (as a one-entry transaction), all in this group's commit.
    Batch {
        tenant: TenantId,
        entries: Vec<TxEntry>,
        refs: ResolvedReferences,
    },
}

pub(crate) enum Answer {
    Tenant(TenantInfo),
    Flag(bool),
    Outcomes(Vec<WriteOutcome>),
    Batch(Vec<Result<WriteOutcome, StoreError>>),
}

impl Job {
    /// The tenant whose resources a write job changes.
    fn write_tenant(&self) -> Option<&TenantId> {
        match self {
            Job::Write { tenant, .. }
            | Job::Transaction { tenant, .. }
            | Job::Batch { tenant, .. } => Some(tenant),
            _ => None,
        }
    }
}

pub(crate) struct Request {
    pub job: Job,
    /// Run when a write job succeeded, before the commit (see the module docs).
    pub audit: Option<AuditHook>,
    pub reply: SyncSender<Result<Answer, StoreError>>,
}

/// The patient compartments of the versions a request wrote, for its audit hook.
type Compartments = HashMap<(ResourceType, ResourceId, VersionId), Vec<String>>;

/// Keys a batch entry replaced in the group overlay, with what they held before (`None`: the
/// key was not in the overlay), so that the entry can be taken out again.
type Undo = Vec<(Vec<u8>, Option<Option<Vec<u8>>>)>;

/// What the writer remembers per tenant between requests, so that it need not read the change
/// log for every write.
#[derive(Debug, Clone, Copy)]
struct TenantState {
    last_seq: u64,
    last_micros: i64,
}

pub(crate) fn spawn(kv: Arc<dyn Kv>) -> Result<(Sender<Request>, JoinHandle<()>), StoreError> {
    let (tx, rx) = mpsc::channel();
    let writer = Writer {
        kv,
        tenants: HashMap::new(),
    };
    let handle = std::thread::Builder::new()
        .name("fhir-store-writer".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| StoreError::Backend(format!("cannot start the writer thread: {e}")))?;
    Ok((tx, handle))
}

struct Writer {
    kv: Arc<dyn Kv>,
    tenants: HashMap<TenantId, TenantState>,
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

impl Writer {
    fn run(mut self, rx: Receiver<Request>) {
        // Ends when every sender is gone, i.e. the last Store handle was dropped.
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            self.process(group);
        }
    }

    fn process(&mut self, requests: Vec<Request>) {
        let mut overlay = Overlay::new();
        let mut answers = Vec::with_capacity(requests.len());
        let mut replies = Vec::with_capacity(requests.len());
        for Request { job, audit, reply } in requests {
            let result = match job {
                Job::Batch {
                    tenant,
                    entries,
                    refs,
                } => self.batch(&mut overlay, tenant, entries, refs, audit),
                job => {
                    let audit = audit.map_or(UnitAudit::Off, UnitAudit::Hook);
                    self.unit(&mut overlay, job, audit, None)
                }
            };
            answers.push(result);
            replies.push(reply);
        }
        if !overlay.is_empty() {
            let mut batch = WriteBatch::new();
            for (k, v) in overlay {
                match v {
                    Some(v) => batch.put(k, v),
                    None => batch.delete(k),
                }
            }
            let committed = catch_unwind(AssertUnwindSafe(|| self.kv.commit(batch)))
                .unwrap_or_else(|p| {
                    Err(crate::kv::KvError(format!(
                        "commit panicked: {}",
                        panic_message(p.as_ref())
                    )))
                });
            if let Err(e) = committed {
                tracing::error!(error = %e, "fhir-store writer: group commit failed");
                // The cached sequence numbers count writes that never happened.
                self.tenants.clear();
                // Even answers that wrote nothing (a conditional create that matched, an
                // If-Match that failed) may rest on writes of this group that are now lost.
                for a in &mut answers {
                    *a = Err(StoreError::Backend(format!("commit failed: {}", e.0)));
                }
            }
        }
        for (reply, answer) in replies.into_iter().zip(answers) {
            // The caller may have gone away; its answer is then of no use to anyone.
            let _ = reply.send(answer);
        }
    }

    /// Applies one unit of work in its own layer over `overlay`; merges the layer into it only
    /// if the unit (and its audit hook, if any) succeeds, so that a failed unit leaves no trace.
    /// With `undo`, records what the merge replaced.
    fn unit(
        &mut self,
        overlay: &mut Overlay,
        job: Job,
        audit: UnitAudit<'_>,
        undo: Option<&mut Undo>,
    ) -> Result<Answer, StoreError> {
        let tenant = job.write_tenant().cloned();
        let (hook, collect) = match audit {
            UnitAudit::Off => (None, None),
            UnitAudit::Hook(h) => (Some(h), None),
            UnitAudit::Collect(c) => (None, Some(c)),
        };
        let mut ctx = Ctx {
            view: View::new(self.kv.as_ref(), overlay),
            tenants: &self.tenants,
            new_state: None,
            evict: None,
            compartments: (hook.is_some() || collect.is_some()).then(Compartments::new),
        };
        // Bad input must never take the writer down; a bug turns into an error for the one
        // unit that hit it. The audit hook runs inside too: if it fails, so does the unit.
        let result = catch_unwind(AssertUnwindSafe(|| {
            let answer = ctx.apply(job)?;
            if let (Some(hook), Some(t), Answer::Outcomes(outcomes)) = (hook, &tenant, &answer) {
                let compartments = ctx.compartments.take().unwrap_or_default();
                let records =
                    run_hook(&ctx.view, t, hook, outcomes.iter().collect(), &compartments)?;
                ctx.put_audit(t, records);
            }
            Ok(answer)
        }))
        .unwrap_or_else(|p| {
            let msg = panic_message(p.as_ref());
            tracing::error!(panic = %msg, "fhir-store writer: a request panicked");
            Err(StoreError::Backend(format!("internal error: {msg}")))
        });
        if result.is_ok() {
            let Ctx {
                view,
                new_state,
                evict,
                compartments,
                ..
            } = ctx;
            if let (Some(collect), Some(c)) = (collect, compartments) {
                collect.extend(c);
            }
            let local = view.into_local();
            match undo {
                Some(undo) => {
                    for (k, v) in local {
                        let before = overlay.insert(k.clone(), v);
                        undo.push((k, before));
                    }
                }
                None => overlay.extend(local),
            }
            if let Some(t) = evict {
                self.tenants.remove(&t);
            }
            if let Some((t, s)) = new_state {
                self.tenants.insert(t, s);
            }
        }
        result
    }

    /// Each entry as its own unit (a one-entry transaction), answered one by one; then the
    /// audit hook, if any, with the entries that succeeded.
    ///
    /// A resource created for search-resolved criteria (an `ifNoneExist`, or a conditional
    /// update that matched nothing) counts as a match of the same criteria in the later
    /// entries: the search ran before the batch and could not see it, and with identifier
    /// criteria the later entries would find it too. So the same measurement twice in one
    /// batch is stored once, whatever its criteria.
    fn batch(
        &mut self,
        overlay: &mut Overlay,
        tenant: TenantId,
        entries: Vec<TxEntry>,
        refs: ResolvedReferences,
        audit: Option<AuditHook>,
    ) -> Result<Answer, StoreError> {
        View::new(self.kv.as_ref(), overlay).require_tenant(&tenant)?;
        let mut undo = audit.as_ref().map(|_| Undo::new());
        let mut compartments = Compartments::new();
        let mut results = Vec::with_capacity(entries.len());
        let mut refs = Arc::new(refs);
        // (type, criteria) → the resource an earlier entry created for them.
        let mut created: HashMap<(ResourceType, String), (ResourceId, VersionId)> = HashMap::new();
        for mut entry in entries {
            let creates_for = searched_condition_mut(&mut entry.op).map(|(ty, cond)| {
                let key = (ty, cond.searched_criteria().unwrap_or_default().to_string());
                if let Some((id, version)) = created.get(&key) {
                    cond.add_match(id, *version);
                }
                key
            });
            let job = Job::Transaction {
                tenant: tenant.clone(),
                entries: vec![entry],
                refs: refs.clone(),
            };
            let result = match &mut undo {
                Some(undo) => self.unit(
                    overlay,
                    job,
                    UnitAudit::Collect(&mut compartments),
                    Some(undo),
                ),
                None => self.unit(overlay, job, UnitAudit::Off, None),
            };
            let result = match result {
                Ok(Answer::Outcomes(mut o)) => o.pop().ok_or_else(crate::unexpected),
                Ok(_) => Err(crate::unexpected()),
                Err(StoreError::TransactionFailed { source, .. }) => Err(*source),
                Err(e) => Err(e),
            };
            if let (Some(key), Ok(WriteOutcome::Write(w))) = (creates_for, &result)
                && w.kind == WriteKind::Created
            {
                let (id, version) = (w.resource.id.clone(), w.resource.version);
                // The jobs before hold no clone any more, so this does not copy the map.
                Arc::make_mut(&mut refs).add_match(&key.1, &id, version);
                created.entry(key).or_insert((id, version));
            }
            results.push(result);
        }
        if let (Some(hook), Some(undo)) = (audit, undo) {
            let done: Vec<&WriteOutcome> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            let mut view = View::new(self.kv.as_ref(), overlay);
            let hooked = catch_unwind(AssertUnwindSafe(|| {
                run_hook(&view, &tenant, hook, done, &compartments)
            }))
            .unwrap_or_else(|p| {
                let msg = panic_message(p.as_ref());
                tracing::error!(panic = %msg, "fhir-store writer: an audit hook panicked");
                Err(StoreError::Backend(format!("internal error: {msg}")))
            });
            match hooked {
                Ok(records) => {
                    for (k, v) in record_keys(&tenant, records) {
                        view.put(k, v);
                    }
                    let local = view.into_local();
                    overlay.extend(local);
                }
                Err(e) => {
                    // No write without its record: take the entries out again, newest first.
                    for (k, before) in undo.into_iter().rev() {
                        match before {
                            Some(v) => overlay.insert(k, v),
                            None => overlay.remove(&k),
                        };
                    }
                    // Its cached sequence number counts the entries just taken out.
                    self.tenants.remove(&tenant);
                    return Err(e);
                }
            }
        }
        Ok(Answer::Batch(results))
    }
}

/// The search-resolved condition of an `ifNoneExist` create or a conditional update, with
/// the type it is on.
fn searched_condition_mut(op: &mut WriteOp) -> Option<(ResourceType, &mut Condition)> {
    let (ty, cond) = match op {
        WriteOp::Create {
            resource,
            if_none_exist: Some(cond),
        } => (resource.resource_type(), cond),
        WriteOp::ConditionalUpdate { ty, cond, .. } => (*ty, cond),
        _ => return None,
    };
    cond.searched_criteria().is_some().then_some((ty, cond))
}

/// What a unit does for the audit trail.
enum UnitAudit<'a> {
    /// Nothing.
    Off,
    /// Run this hook when the unit succeeded.
    Hook(AuditHook),
    /// Keep the compartments of what it wrote here: a batch entry, whose batch runs the hook.
    Collect(&'a mut Compartments),
}

/// The (type, id, version) an outcome wrote, if it wrote anything.
fn version_key(o: &WriteOutcome) -> Option<(ResourceType, ResourceId, VersionId)> {
    match o {
        WriteOutcome::Write(w) if w.seq.is_some() => Some((
            w.resource.resource_type,
            w.resource.id.clone(),
            w.resource.version,
        )),
        WriteOutcome::Delete(d) => Some((d.resource_type, d.id.clone()?, d.version?)),
        WriteOutcome::Write(_) => None,
    }
}

/// The patient compartment of a stored version's JSON.
fn compartment_of(json: &[u8]) -> Vec<String> {
    fhir_core::json::parse(json)
        .ok()
        .and_then(|t| {
            t.as_object()
                .map(|m| SearchParamRegistry::r4().patient_compartment(m))
        })
        .unwrap_or_default()
}

/// Calls `hook` with the request's outcomes and their patients: from `compartments` for the
/// versions the request wrote, else (an existing resource matched by a conditional create)
/// from the stored JSON.
fn run_hook(
    view: &View<'_>,
    t: &TenantId,
    hook: AuditHook,
    outcomes: Vec<&WriteOutcome>,
    compartments: &Compartments,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut found: Vec<Vec<String>> = Vec::with_capacity(outcomes.len());
    for o in &outcomes {
        let patients = match version_key(o).and_then(|k| compartments.get(&k)) {
            Some(p) => p.clone(),
            None => match o {
                WriteOutcome::Write(w) => compartment_of(&w.resource.json),
                // A delete that deleted nothing is about no stored content.
                WriteOutcome::Delete(_) => Vec::new(),
            },
        };
        found.push(patients);
    }
    let writes: Vec<AuditedWrite<'_>> = outcomes
        .into_iter()
        .zip(&found)
        .map(|(outcome, patients)| AuditedWrite { outcome, patients })
        .collect();
    // The tenant exists: the request that ran before checked it in this view.
    view.require_tenant(t)?;
    Ok(hook(&writes))
}

/// One request's work: its view and the tenant-state changes to keep if it succeeds.
struct Ctx<'a> {
    view: View<'a>,
    tenants: &'a HashMap<TenantId, TenantState>,
    new_state: Option<(TenantId, TenantState)>,
    evict: Option<TenantId>,
    /// The patient compartments of the versions written, when the request is audited.
    compartments: Option<Compartments>,
}

impl Ctx<'_> {
    fn apply(&mut self, job: Job) -> Result<Answer, StoreError> {
        match job {
            Job::CreateTenant { id, name } => self.create_tenant(id, name).map(Answer::Tenant),
            Job::MarkRemoving { id } => self.mark_removing(id).map(Answer::Flag),
            Job::Purge { id } => self.purge(id).map(Answer::Flag),
            Job::Write { tenant, ops } => self.write(tenant, ops).map(Answer::Outcomes),
            Job::Transaction {
                tenant,
                entries,
                refs,
            } => self
                .fhir_transaction(tenant, entries, &refs)
                .map(Answer::Outcomes),
            Job::Audit { tenant, records } => {
                self.view.require_tenant(&tenant)?;
                self.put_audit(&tenant, records);
                Ok(Answer::Flag(true))
            }
            // Split into units by `Writer::process`; never applied as one.
            Job::Batch { .. } => Err(crate::unexpected()),
        }
    }

    fn put_audit(&mut self, t: &TenantId, records: Vec<AuditRecord>) {
        for (k, v) in record_keys(t, records) {
            self.view.put(k, v);
        }
    }

    fn create_tenant(&mut self, id: TenantId, name: String) -> Result<TenantInfo, StoreError> {
        let key = keys::tenant_key(&id);
        if self.view.get(&key)?.is_some() {
            return Err(StoreError::TenantExists(id));
        }
        let rec = TenantRecord {
            removing: false,
            created_micros: now_micros(),
            name,
        };
        self.view.put(key, rec.encode());
        self.evict = Some(id.clone());
        Ok(TenantInfo {
            id,
            name: rec.name,
            created: format_micros(rec.created_micros),
        })
    }

    fn mark_removing(&mut self, id: TenantId) -> Result<bool, StoreError> {
        let key = keys::tenant_key(&id);
        let Some(b) = self.view.get(&key)? else {
            return Ok(false);
        };
        let mut rec = TenantRecord::decode(&b)?;
        let was_active = !rec.removing;
        if was_active {
            rec.removing = true;
            self.view.put(key, rec.encode());
        }
        self.evict = Some(id);
        Ok(was_active)
    }

    fn purge(&mut self, id: TenantId) -> Result<bool, StoreError> {
        let key = keys::tenant_key(&id);
        match self.view.get(&key)? {
            Some(b) if TenantRecord::decode(&b)?.removing => {}
            // Never purge a tenant that is not being removed (e.g. re-created meanwhile).
            _ => return Ok(false),
        }
        let prefix = keys::tenant_prefix(&id);
        let chunk = self.view.scan_prefix(&prefix, PURGE_CHUNK)?;
        self.evict = Some(id);
        if chunk.is_empty() {
            self.view.delete(key);
            return Ok(false);
        }
        for (k, _) in chunk {
            self.view.delete(k);
        }
        Ok(true)
    }

    fn tenant_state(&self, t: &TenantId) -> Result<TenantState, StoreError> {
        if let Some(s) = self.tenants.get(t) {
            return Ok(*s);
        }
        let prefix = keys::changes_prefix(t);
        let end = prefix_end(&prefix);
        let last = self
            .view
            .scan(&prefix, end.as_deref(), Direction::Reverse, 1)?;
        match last.first() {
            Some((k, v)) => Ok(TenantState {
                last_seq: keys::seq_of_key(k)?,
                last_micros: ChangeRecord::decode(v)?.last_updated_micros,
            }),
            None => Ok(TenantState {
                last_seq: 0,
                last_micros: i64::MIN,
            }),
        }
    }

    fn write(&mut self, t: TenantId, ops: Vec<WriteOp>) -> Result<Vec<WriteOutcome>, StoreError> {
        self.with_tx(t, |tx| {
            let mut outcomes = Vec::with_capacity(ops.len());
            for op in ops {
                outcomes.push(tx.apply(op)?);
            }
            Ok(outcomes)
        })
    }

    fn fhir_transaction(
        &mut self,
        t: TenantId,
        entries: Vec<TxEntry>,
        refs: &ResolvedReferences,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        self.with_tx(t, |tx| tx.fhir_transaction(entries, refs))
    }

    fn with_tx<R>(
        &mut self,
        t: TenantId,
        f: impl FnOnce(&mut Tx<'_, '_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.view.require_tenant(&t)?;
        let st = self.tenant_state(&t)?;
        // One instant for the whole request (a transaction's entries share it), never before
        // the tenant's previous one, so lastUpdated never goes backwards even if the clock does.
        let now = now_micros().max(st.last_micros);
        let mut tx = Tx {
            view: &mut self.view,
            t: &t,
            st,
            now,
            compartments: self.compartments.as_mut(),
        };
        let r = f(&mut tx)?;
        let st = tx.st;
        self.new_state = Some((t, st));
        Ok(r)
    }
}

/// The write operations of one request for one tenant.
struct Tx<'c, 'a> {
    view: &'c mut View<'a>,
    t: &'c TenantId,
    st: TenantState,
    now: i64,
    /// Where to note the patient compartment of each version written (audited requests).
    compartments: Option<&'c mut Compartments>,
}

fn check_if_match(expected: Option<VersionId>, prev: Option<&Pointer>) -> Result<(), StoreError> {
    if let Some(expected) = expected {
        let actual = prev.filter(|p| !p.deleted).map(|p| p.version);
        if actual != Some(expected) {
            return Err(StoreError::VersionConflict { expected, actual });
        }
    }
    Ok(())
}

fn indexed_identifiers(r: &Resource) -> Vec<IndexedIdentifier> {
    let set: BTreeSet<IndexedIdentifier> = r
        .identifiers()
        .into_iter()
        .filter_map(|i| {
            let value = i.value.filter(|v| !v.is_empty())?;
            Some(IndexedIdentifier {
                system: i.system.filter(|s| !s.is_empty()),
                value,
            })
        })
        .collect();
    set.into_iter().collect()
}

impl Tx<'_, '_> {
    fn apply(&mut self, op: WriteOp) -> Result<WriteOutcome, StoreError> {
        Ok(match op {
            WriteOp::Create {
                resource,
                if_none_exist,
            } => WriteOutcome::Write(self.create(resource, if_none_exist.as_ref())?),
            WriteOp::Update {
                id,
                resource,
                if_match,
            } => WriteOutcome::Write(self.update(&id, resource, if_match)?),
            WriteOp::ConditionalUpdate {
                ty,
                cond,
                resource,
                if_match,
            } => WriteOutcome::Write(self.conditional_update(ty, &cond, resource, if_match)?),
            WriteOp::Delete { ty, id, if_match } => {
                WriteOutcome::Delete(self.delete(ty, &id, if_match)?)
            }
            WriteOp::ConditionalDelete { ty, cond } => {
                WriteOutcome::Delete(self.conditional_delete(ty, &cond)?)
            }
            WriteOp::Patch {
                ty,
                id,
                patch,
                if_match,
            } => WriteOutcome::Write(self.patch(ty, &id, &patch, if_match)?),
            WriteOp::UpdateIfNoneMatch {
                id,
                resource,
                if_none_match,
            } => WriteOutcome::Write(self.update_if_none_match(&id, resource, if_none_match)?),
        })
    }

    /// Applies a JSON Patch to the current version and writes the result as the next one.
    fn patch(
        &mut self,
        ty: ResourceType,
        id: &ResourceId,
        patch: &Json,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        let prev = match self.view.pointer(self.t, ty, id)? {
            Some(p) if !p.deleted => p,
            other => {
                return Err(StoreError::NotFound {
                    resource_type: ty,
                    id: id.clone(),
                    deleted: other.is_some(),
                });
            }
        };
        check_if_match(if_match, Some(&prev))?;
        let current = self.current(ty, id)?;
        let tree = fhir_core::json::parse(&current.json)
            .map_err(|e| StoreError::Corrupt(format!("{ty}/{id}: {e}")))?;
        let resource =
            fhir_core::patch::patch_resource(&tree, patch).map_err(StoreError::InvalidPatch)?;
        let (seq, stored) = self.write_version(ty, id, Some(prev), Some(resource))?;
        Ok(WriteResult {
            kind: WriteKind::Updated,
            resource: stored.ok_or_else(|| StoreError::Corrupt("no stored resource".into()))?,
            seq: Some(seq),
        })
    }

    fn update_if_none_match(
        &mut self,
        id: &ResourceId,
        resource: Resource,
        if_none_match: IfNoneMatch,
    ) -> Result<WriteResult, StoreError> {
        let ty = resource.resource_type();
        if let Some(p) = self.view.pointer(self.t, ty, id)?
            && !p.deleted
            && match if_none_match {
                IfNoneMatch::Any => true,
                IfNoneMatch::Version(v) => v == p.version,
            }
        {
            return Err(StoreError::IfNoneMatch { current: p.version });
        }
        self.update(id, resource, None)
    }

    /// Creates `ty/id`, an id chosen by the caller that nothing uses yet.
    fn create_with_id(
        &mut self,
        id: &ResourceId,
        resource: Resource,
    ) -> Result<WriteResult, StoreError> {
        let ty = resource.resource_type();
        let prev = self.view.pointer(self.t, ty, id)?;
        let (seq, stored) = self.write_version(ty, id, prev, Some(resource))?;
        Ok(WriteResult {
            kind: WriteKind::Created,
            resource: stored.ok_or_else(|| StoreError::Corrupt("no stored resource".into()))?,
            seq: Some(seq),
        })
    }

    fn current(&self, ty: ResourceType, id: &ResourceId) -> Result<StoredResource, StoreError> {
        let missing = || StoreError::Corrupt(format!("{ty}/{id}: current version is missing"));
        let p = self.view.pointer(self.t, ty, id)?.ok_or_else(missing)?;
        let rec = self
            .view
            .version(self.t, ty, id, p.version)?
            .ok_or_else(missing)?;
        Ok(StoredResource {
            resource_type: ty,
            id: id.clone(),
            version: p.version,
            last_updated: format_micros(rec.last_updated_micros),
            json: rec.json,
        })
    }

    fn fresh_id(&self, ty: ResourceType) -> Result<ResourceId, StoreError> {
        loop {
            let id = ResourceId::generate();
            if self.view.pointer(self.t, ty, &id)?.is_none() {
                return Ok(id);
            }
        }
    }

    fn create(
        &mut self,
        resource: Resource,
        if_none_exist: Option<&Condition>,
    ) -> Result<WriteResult, StoreError> {
        let ty = resource.resource_type();
        if let Some(cond) = if_none_exist {
            let ids = find(&*self.view, self.t, ty, cond)?;
            match ids.as_slice() {
                [] => {}
                [id] => {
                    return Ok(WriteResult {
                        kind: WriteKind::Existing,
                        resource: self.current(ty, id)?,
                        seq: None,
                    });
                }
                _ => return Err(StoreError::MultipleMatches { count: ids.len() }),
            }
        }
        let id = self.fresh_id(ty)?;
        let (seq, stored) = self.write_version(ty, &id, None, Some(resource))?;
        Ok(WriteResult {
            kind: WriteKind::Created,
            resource: stored.ok_or_else(|| StoreError::Corrupt("no stored resource".into()))?,
            seq: Some(seq),
        })
    }

    fn update(
        &mut self,
        id: &ResourceId,
        resource: Resource,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        let ty = resource.resource_type();
        if let Some(body_id) = resource.id()
            && body_id != id.as_str()
        {
            return Err(StoreError::IdMismatch(format!(
                "the resource's id '{}' does not match the id '{id}' it is written to",
                body_id.chars().take(64).collect::<String>()
            )));
        }
        let prev = self.view.pointer(self.t, ty, id)?;
        check_if_match(if_match, prev.as_ref())?;
        let kind = match &prev {
            Some(p) if !p.deleted => WriteKind::Updated,
            _ => WriteKind::Created,
        };
        let (seq, stored) = self.write_version(ty, id, prev, Some(resource))?;
        Ok(WriteResult {
            kind,
            resource: stored.ok_or_else(|| StoreError::Corrupt("no stored resource".into()))?,
            seq: Some(seq),
        })
    }

    fn conditional_update(
        &mut self,
        ty: ResourceType,
        cond: &Condition,
        resource: Resource,
        if_match: Option<VersionId>,
    ) -> Result<WriteResult, StoreError> {
        if resource.resource_type() != ty {
            return Err(StoreError::IdMismatch(format!(
                "the resource is a {} but the condition is on {ty}",
                resource.resource_type()
            )));
        }
        let ids = find(&*self.view, self.t, ty, cond)?;
        match ids.as_slice() {
            [] => match resource.id() {
                // No match but an id in the body: an update(-as-create) of that id.
                Some(body_id) => {
                    let id = ResourceId::new(body_id)
                        .map_err(|e| StoreError::IdMismatch(e.to_string()))?;
                    self.update(&id, resource, if_match)
                }
                None => {
                    check_if_match(if_match, None)?;
                    let id = self.fresh_id(ty)?;
                    let (seq, stored) = self.write_version(ty, &id, None, Some(resource))?;
                    Ok(WriteResult {
                        kind: WriteKind::Created,
                        resource: stored
                            .ok_or_else(|| StoreError::Corrupt("no stored resource".into()))?,
                        seq: Some(seq),
                    })
                }
            },
            [id] => {
                if let Some(body_id) = resource.id()
                    && body_id != id.as_str()
                {
                    return Err(StoreError::IdMismatch(format!(
                        "the condition matched {ty}/{id} but the resource has id '{}'",
                        body_id.chars().take(64).collect::<String>()
                    )));
                }
                self.update(id, resource, if_match)
            }
            _ => Err(StoreError::MultipleMatches { count: ids.len() }),
        }
    }

    fn delete(
        &mut self,
        ty: ResourceType,
        id: &ResourceId,
        if_match: Option<VersionId>,
    ) -> Result<DeleteResult, StoreError> {
        let prev = self.view.pointer(self.t, ty, id)?;
        check_if_match(if_match, prev.as_ref())?;
        match prev {
            Some(p) if !p.deleted => {
                let version = p.version.next();
                let (seq, _) = self.write_version(ty, id, Some(p), None)?;
                Ok(DeleteResult {
                    resource_type: ty,
                    id: Some(id.clone()),
                    version: Some(version),
                    seq: Some(seq),
                })
            }
            _ => Ok(DeleteResult {
                resource_type: ty,
                id: Some(id.clone()),
                version: None,
                seq: None,
            }),
        }
    }

    fn conditional_delete(
        &mut self,
        ty: ResourceType,
        cond: &Condition,
    ) -> Result<DeleteResult, StoreError> {
        let ids = find(&*self.view, self.t, ty, cond)?;
        match ids.as_slice() {
            [] => Ok(DeleteResult {
                resource_type: ty,
                id: None,
                version: None,
                seq: None,
            }),
            [id] => self.delete(ty, id, None),
            _ => Err(StoreError::MultipleMatches { count: ids.len() }),
        }
    }

    /// Writes the next version of `ty/id` after `prev` — `resource`, or a deletion if `None` —
    /// with its current pointer, identifier-index changes and change-log records.
    fn write_version(
        &mut self,
        ty: ResourceType,
        id: &ResourceId,
        prev: Option<Pointer>,
        resource: Option<Resource>,
    ) -> Result<(u64, Option<StoredResource>), StoreError> {
        let t = self.t;
        let version = prev.as_ref().map_or(VersionId::FIRST, |p| p.version.next());
        let was_live = prev.as_ref().is_some_and(|p| !p.deleted);
        let method = match (&resource, was_live) {
            (None, _) => Method::Delete,
            (Some(_), true) => Method::Update,
            (Some(_), false) => Method::Create,
        };
        let seq = self.st.last_seq + 1;
        let micros = self.now;
        let last_updated = format_micros(micros);

        let (json, identifiers) = match resource {
            Some(mut r) => {
                r.set_id(id);
                r.set_meta(version, &last_updated);
                if let Some(c) = self.compartments.as_deref_mut() {
                    // From the tree at hand: the JSON need not be parsed again for the audit.
                    let patients = SearchParamRegistry::r4().patient_compartment(r.json());
                    c.insert((ty, id.clone(), version), patients);
                }
                (r.to_json_bytes(), indexed_identifiers(&r))
            }
            None => {
                if let (Some(c), Some(p)) = (self.compartments.as_deref_mut(), &prev) {
                    // A deletion is about the patients of the content it deletes.
                    let patients = match self.view.version(t, ty, id, p.version)? {
                        Some(old) => compartment_of(&old.json),
                        None => Vec::new(),
                    };
                    c.insert((ty, id.clone(), version), patients);
                }
                (Vec::new(), Vec::new())
            }
        };
        let old: BTreeSet<&IndexedIdentifier> = match &prev {
            Some(p) if !p.deleted => p.identifiers.iter().collect(),
            _ => BTreeSet::new(),
        };
        let new: BTreeSet<&IndexedIdentifier> = identifiers.iter().collect();
        for gone in old.difference(&new) {
            self.view.delete(keys::identifier_key(t, ty, gone, id));
        }
        for added in new.difference(&old) {
            self.view.put(
                keys::identifier_key(t, ty, added, id),
                id.as_str().as_bytes().to_vec(),
            );
        }

        let record = VersionRecord {
            method,
            seq,
            last_updated_micros: micros,
            json,
        };
        self.view
            .put(keys::version_key(t, ty, id, version), record.encode());
        let pointer = Pointer {
            deleted: method == Method::Delete,
            version,
            last_updated_micros: micros,
            identifiers,
        };
        self.view
            .put(keys::current_key(t, ty, id), pointer.encode());
        let change = ChangeRecord {
            method,
            resource_type: ty,
            id: id.clone(),
            version,
            last_updated_micros: micros,
        }
        .encode();
        self.view
            .put(keys::type_history_key(t, ty, seq), change.clone());
        self.view.put(keys::change_key(t, seq), change);
        self.st = TenantState {
            last_seq: seq,
            last_micros: micros,
        };

        let stored = (method != Method::Delete).then(|| StoredResource {
            resource_type: ty,
            id: id.clone(),
            version,
            last_updated,
            json: record.json,
        });
        Ok((seq, stored))
    }
}
