//! Reading committed state, and the writer's view of it with uncommitted writes on top.

use std::collections::BTreeMap;
use std::ops::Bound;

use fhir_core::{ResourceId, ResourceType, TenantId, VersionId};

use crate::error::StoreError;
use crate::keys::{self, Pointer, TenantRecord, VersionRecord};
use crate::kv::{Direction, Kv, KvPair, prefix_end};

/// Pending writes: `None` is a delete.
pub(crate) type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Something to read keys from: committed state, or the writer's layered view.
pub(crate) trait Source {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// At most `limit` pairs with keys in `[start, end)` (`end` `None`: unbounded).
    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError>;

    /// At most `limit` pairs whose keys start with `prefix`, ascending.
    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<KvPair>, StoreError> {
        let end = prefix_end(prefix);
        self.scan(prefix, end.as_deref(), Direction::Forward, limit)
    }

    /// The tenant's record, if it exists and is not being removed.
    fn active_tenant(&self, t: &TenantId) -> Result<Option<TenantRecord>, StoreError> {
        match self.get(&keys::tenant_key(t))? {
            Some(b) => {
                let rec = TenantRecord::decode(&b)?;
                Ok((!rec.removing).then_some(rec))
            }
            None => Ok(None),
        }
    }

    /// Fails with `TenantNotFound` unless the tenant is active.
    fn require_tenant(&self, t: &TenantId) -> Result<TenantRecord, StoreError> {
        self.active_tenant(t)?
            .ok_or_else(|| StoreError::TenantNotFound(t.clone()))
    }

    /// The current pointer of a resource.
    fn pointer(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<Pointer>, StoreError> {
        self.get(&keys::current_key(t, ty, id))?
            .map(|b| Pointer::decode(&b))
            .transpose()
    }

    /// One version record of a resource.
    fn version(
        &self,
        t: &TenantId,
        ty: ResourceType,
        id: &ResourceId,
        v: VersionId,
    ) -> Result<Option<VersionRecord>, StoreError> {
        self.get(&keys::version_key(t, ty, id, v))?
            .map(|b| VersionRecord::decode(&b))
            .transpose()
    }
}

fn bounds<'a>(start: &'a [u8], end: Option<&'a [u8]>) -> (Bound<&'a [u8]>, Bound<&'a [u8]>) {
    (
        Bound::Included(start),
        end.map_or(Bound::Unbounded, Bound::Excluded),
    )
}

/// Committed state straight from the backend.
pub(crate) struct Committed<'a>(pub &'a dyn Kv);

impl Source for Committed<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.0.get(key)?)
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError> {
        let (s, e) = bounds(start, end);
        Ok(self.0.scan(s, e, direction, limit)?)
    }
}

/// The writer's view while it applies one request: committed state, then the writes of earlier
/// requests of the same group (`group`), then this request's own writes (`local`). Only when
/// the request succeeds is `local` merged into `group`, so a failed request leaves no trace.
pub(crate) struct View<'a> {
    kv: &'a dyn Kv,
    group: &'a Overlay,
    local: Overlay,
}

impl<'a> View<'a> {
    pub fn new(kv: &'a dyn Kv, group: &'a Overlay) -> View<'a> {
        View {
            kv,
            group,
            local: Overlay::new(),
        }
    }

    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.local.insert(key, Some(value));
    }

    pub fn delete(&mut self, key: Vec<u8>) {
        self.local.insert(key, None);
    }

    /// This request's writes.
    pub fn into_local(self) -> Overlay {
        self.local
    }

    fn overlaid(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.local.get(key).or_else(|| self.group.get(key))
    }
}

impl Source for View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.overlaid(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.kv.get(key)?),
        }
    }

    fn scan(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<KvPair>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (s, e) = bounds(start, end);
        let in_group: Vec<_> = self.group.range::<[u8], _>((s, e)).collect();
        let in_local: Vec<_> = self.local.range::<[u8], _>((s, e)).collect();
        // Each overlay entry can hide at most one committed key, so `limit + overlay entries`
        // committed keys are enough: the first `limit` merged keys all lie within them.
        let overlay_len = in_group.len() + in_local.len();
        let fetch = limit.saturating_add(overlay_len);
        let committed = self.kv.scan(s, e, direction, fetch)?;
        let window_full = committed.len() == fetch;
        let window_edge = committed.last().map(|(k, _)| k.clone());
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = committed.into_iter().collect();
        for (k, v) in in_group.into_iter().chain(in_local) {
            // Beyond a full window there may be committed keys we did not fetch; overlay keys
            // out there could jump the queue, so leave them out (they are not needed).
            if window_full
                && let Some(edge) = &window_edge
                && match direction {
                    Direction::Forward => k > edge,
                    Direction::Reverse => k < edge,
                }
            {
                continue;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(match direction {
            Direction::Forward => merged.into_iter().take(limit).collect(),
            Direction::Reverse => merged.into_iter().rev().take(limit).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use crate::kv::WriteBatch;

    #[test]
    fn view_merges_layers() {
        let dir = tempfile::tempdir().unwrap();
        let kv = crate::kv::open(dir.path(), Backend::Redb, None).unwrap();
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(vec![7, i], vec![i]);
        }
        kv.commit(b).unwrap();
        let mut group = Overlay::new();
        group.insert(vec![7, 0], None);
        group.insert(vec![7, 1], None);
        group.insert(vec![7, 20], Some(vec![20]));
        let mut view = View::new(kv.as_ref(), &group);
        view.delete(vec![7, 2]);
        view.put(vec![7, 3], vec![33]);
        view.put(vec![7, 0], vec![100]);
        let got: Vec<_> = view
            .scan_prefix(&[7], 3)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k[1], v[0]))
            .collect();
        assert_eq!(got, vec![(0, 100), (3, 33), (4, 4)]);
        let all = view.scan_prefix(&[7], usize::MAX).unwrap();
        assert_eq!(all.len(), 9);
        let rev: Vec<_> = view
            .scan(&[7], Some(&[8]), Direction::Reverse, 2)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k[1])
            .collect();
        assert_eq!(rev, vec![20, 9]);
        assert_eq!(view.get(&[7, 1]).unwrap(), None);
        assert_eq!(view.get(&[7, 5]).unwrap(), Some(vec![5]));
    }
}
