//! FHIR transaction semantics (R4 §3.1.0.11.2 "Transaction Processing Rules") inside the writer.
//!
//! A transaction is one unit of the writer, so it is all-or-nothing and gets one contiguous
//! range of sequence numbers and one `lastUpdated`. Its entries are processed in the order the
//! spec asks, whatever order they came in:
//!
//! 1. every DELETE (plain and conditional), in request order;
//! 2. the target id of every other entry is decided: a create gets a new UUID, or with
//!    `ifNoneExist` the one matching resource (nothing is written for it); a conditional update
//!    gets its one match, or the body's id, or a new UUID; an update or patch has its id;
//! 3. each entry's `fullUrl` (`urn:uuid:…`, `urn:oid:…`, or an absolute URL) now stands for
//!    `Type/id`, and every reference to it in the other entries is rewritten — wherever it is
//!    (see [`fhir_core::references`]). Conditional references (`Patient?identifier=s|v`) are
//!    resolved against the store as it is after step 1 plus the entries of this transaction,
//!    and must match exactly one resource. A conditional reference on other criteria comes
//!    resolved by a search made before the transaction ([`ResolvedReferences`]): its matches
//!    still current in the version the search saw, plus the entries of this transaction whose
//!    own `ifNoneExist` or conditional-update criteria are the same (as HAPI FHIR does; the
//!    search could not see them). A placeholder no entry declares is an error;
//! 4. the creates (POST), then the updates and patches (PUT/PATCH) are written, in request order
//!    within each group, with the ids of step 2.
//!
//! Any failure ends the transaction with [`StoreError::TransactionFailed`] naming the entry; the
//! unit's layer is then thrown away, so nothing is written. GETs are not write operations; the
//! Bundle processor answers them after the commit.

use std::collections::HashMap;

use fhir_core::references::RefKind;
use fhir_core::{Json, Resource, ResourceId, ResourceType};

use super::{Tx, indexed_identifiers};
use crate::condition::{Condition, ResolvedReferences, find};
use crate::error::StoreError;
use crate::keys::IndexedIdentifier;
use crate::types::{TxEntry, WriteKind, WriteOp, WriteOutcome, WriteResult};

/// Where a non-delete entry writes.
#[derive(Debug, Clone)]
enum Target {
    /// A new resource with this id.
    New(ResourceId),
    /// This existing resource (an update or patch target).
    Id(ResourceId),
    /// `ifNoneExist` matched this resource: nothing is written.
    Existing(ResourceId),
    /// `ifNoneExist` equal to an earlier create's of this transaction: the same resource.
    Alias(ResourceId),
}

impl Target {
    fn id(&self) -> &ResourceId {
        match self {
            Target::New(id) | Target::Id(id) | Target::Existing(id) | Target::Alias(id) => id,
        }
    }
}

struct Planned {
    index: usize,
    full_url: Option<String>,
    op: WriteOp,
    ty: ResourceType,
    target: Option<Target>,
}

fn failed(index: usize, e: StoreError) -> StoreError {
    StoreError::TransactionFailed {
        index,
        source: Box::new(e),
    }
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Placeholders must be declared by an entry of the same Bundle.
fn is_placeholder(s: &str) -> bool {
    s.starts_with("urn:uuid:") || s.starts_with("urn:oid:")
}

/// `Type?query` → (type, query), for a conditional reference.
fn conditional(s: &str) -> Option<(ResourceType, &str)> {
    let (ty, query) = s.split_once('?')?;
    Some((ResourceType::parse(ty)?, query))
}

/// The resource an op writes, if it carries one.
fn resource_mut(op: &mut WriteOp) -> Option<&mut Resource> {
    match op {
        WriteOp::Create { resource, .. }
        | WriteOp::Update { resource, .. }
        | WriteOp::ConditionalUpdate { resource, .. }
        | WriteOp::UpdateIfNoneMatch { resource, .. } => Some(resource),
        WriteOp::Patch { .. } | WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => None,
    }
}

/// Replaces placeholder strings anywhere in a JSON Patch's values (a patch has no schema to tell
/// references from other strings, but placeholders are unique enough).
fn rewrite_placeholders(v: &mut Json, map: &HashMap<String, String>) {
    match v {
        Json::String(s) => {
            if let Some(to) = map.get(s.as_str()) {
                *s = to.clone();
            }
        }
        Json::Array(items) => items.iter_mut().for_each(|i| rewrite_placeholders(i, map)),
        Json::Object(m) => m.iter_mut().for_each(|(_, i)| rewrite_placeholders(i, map)),
        _ => {}
    }
}

/// What a pending entry will be, for resolving conditional references to it.
struct PendingIdentity {
    ty: ResourceType,
    id: ResourceId,
    identifiers: Vec<IndexedIdentifier>,
    /// The normalised criteria of its search-resolved `ifNoneExist` or conditional update.
    criteria: Option<String>,
}

/// The normalised criteria of an op's search-resolved condition, if it has one.
fn searched_criteria(op: &WriteOp) -> Option<String> {
    match op {
        WriteOp::Create {
            if_none_exist: Some(cond),
            ..
        }
        | WriteOp::ConditionalUpdate { cond, .. } => cond.searched_criteria().map(str::to_string),
        _ => None,
    }
}

impl Tx<'_, '_> {
    pub(super) fn fhir_transaction(
        &mut self,
        entries: Vec<TxEntry>,
        refs: &ResolvedReferences,
    ) -> Result<Vec<WriteOutcome>, StoreError> {
        let n = entries.len();
        let mut seen_urls: HashMap<&str, usize> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if let Some(u) = e.full_url.as_deref()
                && let Some(first) = seen_urls.insert(u, i)
            {
                return Err(failed(
                    i,
                    StoreError::InvalidTransaction(format!(
                        "fullUrl '{}' is also the fullUrl of entry {first}; each must be unique",
                        shorten(u)
                    )),
                ));
            }
        }

        // 1. Deletes.
        let mut outcomes: Vec<Option<WriteOutcome>> = vec![None; n];
        let mut plan: Vec<Planned> = Vec::with_capacity(n);
        for (index, e) in entries.into_iter().enumerate() {
            match e.op {
                op @ (WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. }) => {
                    outcomes[index] = Some(self.apply(op).map_err(|err| failed(index, err))?);
                }
                op => {
                    let ty = match &op {
                        WriteOp::Create { resource, .. }
                        | WriteOp::Update { resource, .. }
                        | WriteOp::UpdateIfNoneMatch { resource, .. } => resource.resource_type(),
                        WriteOp::ConditionalUpdate { ty, .. } | WriteOp::Patch { ty, .. } => *ty,
                        WriteOp::Delete { ty, .. } | WriteOp::ConditionalDelete { ty, .. } => *ty,
                    };
                    plan.push(Planned {
                        index,
                        full_url: e.full_url,
                        op,
                        ty,
                        target: None,
                    });
                }
            }
        }
        // POSTs before PUTs/PATCHes; stable, so request order holds within each group.
        plan.sort_by_key(|p| !matches!(p.op, WriteOp::Create { .. }));

        // 2. Target ids.
        let mut created_by_condition: Vec<(ResourceType, Condition, ResourceId)> = Vec::new();
        let mut placeholders: HashMap<String, String> = HashMap::new();
        for p in &mut plan {
            let target = self
                .decide_target(p, &mut created_by_condition)
                .map_err(|e| failed(p.index, e))?;
            if let Some(u) = &p.full_url {
                placeholders.insert(u.clone(), format!("{}/{}", p.ty, target.id()));
            }
            p.target = Some(target);
        }

        // 3. References.
        let pending: Vec<PendingIdentity> = plan
            .iter_mut()
            .filter_map(|p| {
                let id = p.target.as_ref()?.id().clone();
                let criteria = searched_criteria(&p.op);
                let r = resource_mut(&mut p.op)?;
                Some(PendingIdentity {
                    ty: p.ty,
                    id,
                    identifiers: indexed_identifiers(r),
                    criteria,
                })
            })
            .collect();
        let mut resolved: HashMap<String, String> = HashMap::new();
        for p in &mut plan {
            let index = p.index;
            if let WriteOp::Patch { patch, .. } = &mut p.op {
                rewrite_placeholders(patch, &placeholders);
                continue;
            }
            let Some(resource) = resource_mut(&mut p.op) else {
                continue;
            };
            let mut error = None;
            resource.visit_references_mut(&mut |kind, s| {
                if error.is_some() {
                    return;
                }
                if let Some(to) = placeholders.get(s.as_str()) {
                    *s = to.clone();
                    return;
                }
                if kind != RefKind::Reference {
                    return;
                }
                if is_placeholder(s) {
                    error = Some(StoreError::UnresolvedReference {
                        reference: shorten(s),
                        count: 0,
                    });
                    return;
                }
                if let Some(to) = resolved.get(s.as_str()) {
                    *s = to.clone();
                    return;
                }
                if let Some((ty, query)) = conditional(s) {
                    match self.resolve_conditional(ty, query, s, &pending, refs) {
                        Ok(to) => {
                            resolved.insert(s.clone(), to.clone());
                            *s = to;
                        }
                        Err(e) => error = Some(e),
                    }
                }
            });
            if let Some(e) = error {
                return Err(failed(index, e));
            }
        }

        // 4. Writes.
        for p in plan {
            let index = p.index;
            let out = self.write_planned(p).map_err(|e| failed(index, e))?;
            outcomes[index] = Some(out);
        }
        outcomes
            .into_iter()
            .map(|o| o.ok_or_else(crate::unexpected))
            .collect()
    }

    fn decide_target(
        &self,
        p: &Planned,
        created_by_condition: &mut Vec<(ResourceType, Condition, ResourceId)>,
    ) -> Result<Target, StoreError> {
        Ok(match &p.op {
            WriteOp::Create {
                if_none_exist: Some(cond),
                ..
            } => {
                let ids = find(&*self.view, self.t, p.ty, cond)?;
                match ids.as_slice() {
                    [id] => Target::Existing(id.clone()),
                    [] => match created_by_condition
                        .iter()
                        .find(|(ty, c, _)| *ty == p.ty && c == cond)
                    {
                        // A retry inside one Bundle: both entries are the same resource.
                        Some((_, _, id)) => Target::Alias(id.clone()),
                        None => {
                            let id = self.fresh_id(p.ty)?;
                            created_by_condition.push((p.ty, cond.clone(), id.clone()));
                            Target::New(id)
                        }
                    },
                    _ => return Err(StoreError::MultipleMatches { count: ids.len() }),
                }
            }
            WriteOp::Create { .. } => Target::New(self.fresh_id(p.ty)?),
            WriteOp::ConditionalUpdate {
                ty, cond, resource, ..
            } => {
                if resource.resource_type() != *ty {
                    return Err(StoreError::IdMismatch(format!(
                        "the resource is a {} but the condition is on {ty}",
                        resource.resource_type()
                    )));
                }
                let ids = find(&*self.view, self.t, *ty, cond)?;
                match (ids.as_slice(), resource.id()) {
                    ([id], Some(body_id)) if body_id != id.as_str() => {
                        return Err(StoreError::IdMismatch(format!(
                            "the condition matched {ty}/{id} but the resource has id '{}'",
                            shorten(body_id)
                        )));
                    }
                    ([id], _) => Target::Id(id.clone()),
                    ([], Some(body_id)) => Target::Id(
                        ResourceId::new(body_id)
                            .map_err(|e| StoreError::IdMismatch(e.to_string()))?,
                    ),
                    ([], None) => Target::New(self.fresh_id(*ty)?),
                    _ => return Err(StoreError::MultipleMatches { count: ids.len() }),
                }
            }
            WriteOp::Update { id, .. }
            | WriteOp::UpdateIfNoneMatch { id, .. }
            | WriteOp::Patch { id, .. } => Target::Id(id.clone()),
            WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. } => {
                return Err(crate::unexpected());
            }
        })
    }

    /// The one resource `ty?query` matches, among the stored resources and this transaction's
    /// entries, as `Type/id`.
    fn resolve_conditional(
        &self,
        ty: ResourceType,
        query: &str,
        reference: &str,
        pending: &[PendingIdentity],
        refs: &ResolvedReferences,
    ) -> Result<String, StoreError> {
        let cond = match refs.get(reference) {
            Some(c) => c.clone(),
            None => Condition::parse(query)?,
        };
        let mut ids = find(&*self.view, self.t, ty, &cond)?;
        let searched = cond.searched_criteria();
        for p in pending {
            let same_criteria = searched.is_some() && p.criteria.as_deref() == searched;
            if p.ty == ty
                && (same_criteria || cond.matches(Some(&p.id), &p.identifiers))
                && !ids.contains(&p.id)
            {
                ids.push(p.id.clone());
            }
        }
        match ids.as_slice() {
            [id] => Ok(format!("{ty}/{id}")),
            _ => Err(StoreError::UnresolvedReference {
                reference: shorten(reference),
                count: ids.len(),
            }),
        }
    }

    fn write_planned(&mut self, p: Planned) -> Result<WriteOutcome, StoreError> {
        let target = p.target.ok_or_else(crate::unexpected)?;
        let existing = |tx: &Self, id: &ResourceId| -> Result<WriteOutcome, StoreError> {
            Ok(WriteOutcome::Write(WriteResult {
                kind: WriteKind::Existing,
                resource: tx.current(p.ty, id)?,
                seq: None,
            }))
        };
        match (p.op, target) {
            (_, Target::Existing(id) | Target::Alias(id)) => existing(self, &id),
            (WriteOp::Create { resource, .. }, Target::New(id)) => {
                Ok(WriteOutcome::Write(self.create_with_id(&id, resource)?))
            }
            (
                WriteOp::ConditionalUpdate {
                    resource, if_match, ..
                },
                Target::New(id) | Target::Id(id),
            )
            | (
                WriteOp::Update {
                    resource, if_match, ..
                },
                Target::New(id) | Target::Id(id),
            ) => Ok(WriteOutcome::Write(self.update(&id, resource, if_match)?)),
            (
                WriteOp::UpdateIfNoneMatch {
                    resource,
                    if_none_match,
                    ..
                },
                Target::Id(id) | Target::New(id),
            ) => Ok(WriteOutcome::Write(self.update_if_none_match(
                &id,
                resource,
                if_none_match,
            )?)),
            (
                WriteOp::Patch {
                    ty,
                    patch,
                    if_match,
                    ..
                },
                Target::Id(id) | Target::New(id),
            ) => Ok(WriteOutcome::Write(self.patch(ty, &id, &patch, if_match)?)),
            (WriteOp::Create { .. }, Target::Id(_))
            | (WriteOp::Delete { .. } | WriteOp::ConditionalDelete { .. }, _) => {
                Err(crate::unexpected())
            }
        }
    }
}
