//! The tenant's append-only audit area: records appended on their own
//! ([`Store::append_audit`]) or in the same commit as the write they describe
//! ([`Store::with_audit`]), and read back by time and patient ([`Store::audit_page`]).
//!
//! The store knows nothing about what a record says (it is opaque JSON to it) or who made the
//! request: a caller that wants a write and its audit record to be one atomic, durable change
//! attaches an [`AuditHook`] to a store handle. The writer thread runs the hook after the write
//! succeeded in its layer and before the group's durable commit, and puts the records the hook
//! returns into that same layer. So either both are committed or neither is: a crash can no
//! longer lose the record of a write that happened, and the write pays no second fsync.
//!
//! ```
//! use fhir_core::{Resource, TenantId};
//! use fhir_store::{AuditQuery, AuditRecord, AuditedWrite, Store, WriteOutcome};
//!
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(dir.path())?;
//! let t = TenantId::new("ous")?;
//! store.create_tenant(&t, "OUS")?;
//! let obs = Resource::from_json_bytes(br#"{"resourceType":"Observation","status":"final",
//!     "code":{"text":"pulse"},"subject":{"reference":"Patient/p1"}}"#)?;
//! // The hook sees the id the store assigned and the patients the resource is about.
//! let audited = store.with_audit(Box::new(|writes: &[AuditedWrite<'_>]| {
//!     writes.iter().map(|w| {
//!         let WriteOutcome::Write(r) = w.outcome else { unreachable!() };
//!         AuditRecord {
//!             micros: 1,
//!             nonce: 1,
//!             json: format!(r#"{{"created":"Observation/{}"}}"#, r.resource.id).into_bytes(),
//!             patients: w.patients.to_vec(),
//!         }
//!     }).collect()
//! }));
//! let created = audited.create(&t, obs, None)?;
//! let page = store.audit_page(&t, &AuditQuery { patient: Some("p1".into()), ..AuditQuery::default() })?;
//! assert_eq!(page.records, vec![format!(r#"{{"created":"Observation/{}"}}"#, created.resource.id).into_bytes()]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::{Arc, Mutex};

use fhir_core::TenantId;

use crate::error::StoreError;
use crate::keys;
use crate::kv::Direction;
use crate::types::WriteOutcome;
use crate::view::{Committed, Source};
use crate::writer::{Answer, Job};
use crate::{Store, unexpected};

/// One access-log record for [`Store::append_audit`] or an [`AuditHook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When it happened (microseconds since the Unix epoch); orders the audit area. Times
    /// before 1970 are kept as 1970.
    pub micros: i64,
    /// Random, so that records of the same microsecond do not overwrite each other.
    pub nonce: u64,
    /// The AuditEvent JSON.
    pub json: Vec<u8>,
    /// Ids of the patients whose data was accessed (indexed for [`AuditQuery::patient`]).
    pub patients: Vec<String>,
}

/// One successful write of a request, as an [`AuditHook`] sees it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct AuditedWrite<'a> {
    /// What the write did: the resource as stored (with the id the store assigned) or the
    /// deletion.
    pub outcome: &'a WriteOutcome,
    /// Ids of the patients in whose compartment the resource is (R4 patient compartment): of
    /// the version written, of the existing resource for [`crate::WriteKind::Existing`], and for a
    /// deletion of the version it deleted. Sorted, without duplicates.
    pub patients: &'a [String],
}

/// Called by the writer thread with the successful writes of one request, after they succeeded
/// and before the durable commit; the records it returns are committed atomically with them.
///
/// Runs once per request: for a [`Store::batch`] with the entries that succeeded (possibly
/// none), in the order of the request; for a request that fails as a whole (an error, a failed
/// transaction, an unknown tenant) it is not called, and nothing is written. It runs on the
/// writer thread, so every other write waits for it: keep it to building records. If it
/// panics, the request fails and nothing of it is written.
pub type AuditHook = Box<dyn FnOnce(&[AuditedWrite<'_>]) -> Vec<AuditRecord> + Send>;

/// The hook of a scoped handle, taken by its first write request.
pub(crate) type HookSlot = Mutex<Option<AuditHook>>;

/// Where a page of audit records ends: an opaque position in the audit area's order (time,
/// then a random tie-breaker). Its text form (32 hex digits) is safe in URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AuditCursor([u8; 16]);

impl std::fmt::Display for AuditCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A text that is not an [`AuditCursor`] (shortened to 40 characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not an audit cursor (32 hex digits from a next link)")]
pub struct InvalidAuditCursor(pub String);

impl std::str::FromStr for AuditCursor {
    type Err = InvalidAuditCursor;

    fn from_str(s: &str) -> Result<AuditCursor, InvalidAuditCursor> {
        let bad = || InvalidAuditCursor(s.chars().take(40).collect());
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            let pair = s.get(2 * i..2 * i + 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(AuditCursor(out))
    }
}

/// Which audit records [`Store::audit_page`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// Only records indexed under this patient id.
    pub patient: Option<String>,
    /// Records at or after this time (microseconds since the Unix epoch).
    pub from_micros: i64,
    /// Records before this time.
    pub to_micros: i64,
    /// Newest first (the default) or oldest first.
    pub newest_first: bool,
    /// Continue after this position (the [`AuditPage::next`] of the page before).
    pub after: Option<AuditCursor>,
    /// Most records on the page (at most [`AuditQuery::MAX_COUNT`]).
    pub count: usize,
}

impl AuditQuery {
    /// Largest page.
    pub const MAX_COUNT: usize = 1000;
}

impl Default for AuditQuery {
    fn default() -> Self {
        AuditQuery {
            patient: None,
            from_micros: 0,
            to_micros: i64::MAX,
            newest_first: true,
            after: None,
            count: 100,
        }
    }
}

/// One page of audit records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The records' JSON, in the order asked for.
    pub records: Vec<Vec<u8>>,
    /// Where the next page starts, if there are more records in the range.
    pub next: Option<AuditCursor>,
}

/// The key suffix `<micros u64 BE> <nonce u64 BE>` of a record.
pub(crate) fn suffix(micros: i64, nonce: u64) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..8].copy_from_slice(&clamp(micros).to_be_bytes());
    s[8..].copy_from_slice(&nonce.to_be_bytes());
    s
}

fn clamp(micros: i64) -> u64 {
    u64::try_from(micros).unwrap_or(0)
}

/// The keys of `records` in tenant `t`'s audit area: the record itself and its patient index
/// entries.
pub(crate) fn record_keys(
    t: &TenantId,
    records: Vec<AuditRecord>,
) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    records.into_iter().flat_map(move |r| {
        let s = suffix(r.micros, r.nonce);
        let mut key = keys::audit_prefix(t);
        key.extend_from_slice(&s);
        let mut out = vec![(key, r.json)];
        for p in &r.patients {
            let mut k = keys::audit_patient_prefix(t, p);
            k.extend_from_slice(&s);
            out.push((k, Vec::new()));
        }
        out
    })
}

impl Store {
    /// A handle to the same store whose next write request (create, update, patch, delete,
    /// their conditional forms, [`Store::transaction`], [`Store::transaction_entries`],
    /// [`Store::batch`]) carries `hook`: its records are committed atomically with that
    /// write. Clones of the returned handle share the one hook; later writes through them
    /// carry none. Cheap: the handle shares everything else with `self`.
    pub fn with_audit(&self, hook: AuditHook) -> Store {
        Store {
            inner: self.inner.clone(),
            audit: Some(Arc::new(Mutex::new(Some(hook)))),
        }
    }

    /// Whether this handle still holds an audit hook that no write has taken.
    pub fn has_pending_audit(&self) -> bool {
        self.audit
            .as_ref()
            .is_some_and(|s| s.lock().unwrap_or_else(|e| e.into_inner()).is_some())
    }

    /// Whether `other` is a handle of the same open store (e.g. one from
    /// [`Store::with_audit`]), so that writes through either land in the same place.
    pub fn same_store(&self, other: &Store) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// The hook for the next write request, if this handle still holds one.
    pub(crate) fn take_audit_hook(&self) -> Option<AuditHook> {
        let slot = self.audit.as_ref()?;
        // A poisoned lock cannot hold a half-taken hook: take() is all that runs under it.
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Appends audit records to the tenant's audit area, durably (in the writer's next group
    /// commit). There is no way to change or delete them except removing the tenant.
    ///
    /// For the record of a write, prefer [`Store::with_audit`], which commits it with the
    /// write.
    pub fn append_audit(&self, t: &TenantId, records: Vec<AuditRecord>) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        match self.submit(Job::Audit {
            tenant: t.clone(),
            records,
        })? {
            Answer::Flag(_) => Ok(()),
            _ => Err(unexpected()),
        }
    }

    /// Audit records (JSON) with `from_micros <= time < to_micros`, of one patient if given,
    /// oldest first, at most `limit`. [`Store::audit_page`] pages and sorts.
    pub fn audit_records(
        &self,
        t: &TenantId,
        patient: Option<&str>,
        from_micros: i64,
        to_micros: i64,
        limit: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let q = AuditQuery {
            patient: patient.map(str::to_string),
            from_micros,
            to_micros,
            newest_first: false,
            after: None,
            count: limit,
        };
        Ok(self.page(t, &q, limit)?.records)
    }

    /// One page of the tenant's audit records in time order (see [`AuditQuery`]). Following
    /// [`AuditPage::next`] never repeats or skips a record that was there when the first page
    /// was read; records appended later appear only ahead of a newest-first listing or at the
    /// end of an oldest-first one.
    pub fn audit_page(&self, t: &TenantId, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        self.page(t, q, q.count.min(AuditQuery::MAX_COUNT))
    }

    fn page(&self, t: &TenantId, q: &AuditQuery, count: usize) -> Result<AuditPage, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        let mut page = AuditPage {
            records: Vec::new(),
            next: None,
        };
        if count == 0 {
            return Ok(page);
        }
        let (prefix, start, end) = range(t, q);
        if start >= end {
            return Ok(page);
        }
        let direction = if q.newest_first {
            Direction::Reverse
        } else {
            Direction::Forward
        };
        // One more than asked for tells whether there is a next page.
        let pairs = src.scan(&start, Some(&end), direction, count.saturating_add(1))?;
        let more = pairs.len() > count;
        for (k, v) in pairs.into_iter().take(count) {
            let tail: [u8; 16] = k
                .get(prefix.len()..)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| StoreError::Corrupt("malformed audit key".into()))?;
            if q.patient.is_some() {
                let mut key = keys::audit_prefix(t);
                key.extend_from_slice(&tail);
                // Written in the same commit as the index entry; absent only if removed with
                // the tenant meanwhile.
                if let Some(v) = src.get(&key)? {
                    page.records.push(v);
                }
            } else {
                page.records.push(v);
            }
            page.next = Some(AuditCursor(tail));
        }
        if !more {
            page.next = None;
        }
        Ok(page)
    }

    /// How many audit records [`Store::audit_page`] would list for `q` over all its pages
    /// (`after` and `count` are ignored). Counts by scanning the range.
    pub fn audit_count(&self, t: &TenantId, q: &AuditQuery) -> Result<u64, StoreError> {
        let src = Committed(self.kv());
        src.require_tenant(t)?;
        let q = AuditQuery {
            after: None,
            ..q.clone()
        };
        let (_, start, end) = range(t, &q);
        if start >= end {
            return Ok(0);
        }
        let mut n = 0u64;
        for item in self.kv().iter(
            std::ops::Bound::Included(&start),
            std::ops::Bound::Excluded(&end),
            Direction::Forward,
        )? {
            item?;
            n += 1;
        }
        Ok(n)
    }
}

/// The prefix and the key range `[start, end)` of `q`.
fn range(t: &TenantId, q: &AuditQuery) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let prefix = match &q.patient {
        Some(p) => keys::audit_patient_prefix(t, p),
        None => keys::audit_prefix(t),
    };
    let at = |micros: i64| {
        let mut k = prefix.clone();
        k.extend_from_slice(&clamp(micros).to_be_bytes());
        k
    };
    let mut start = at(q.from_micros);
    let mut end = at(q.to_micros);
    if let Some(c) = q.after {
        let mut k = prefix.clone();
        k.extend_from_slice(&c.0);
        if q.newest_first {
            end = end.min(k);
        } else {
            // The key right after the cursor's: every record key has the same length.
            k.push(0);
            start = start.max(k);
        }
    }
    (prefix, start, end)
}
