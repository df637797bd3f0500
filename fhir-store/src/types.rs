//! The data types of the store's API.

use fhir_core::{Json, Resource, ResourceId, ResourceType, TenantId, VersionId};

use crate::condition::Condition;

/// Which KV backend a store uses. It is recorded in the store directory when it is created;
/// opening it with another backend fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// redb: ACID, stable file format; the default.
    #[default]
    Redb,
    /// sled 0.34 (crate feature `sled`).
    #[cfg(feature = "sled")]
    Sled,
}

/// How to open a store.
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// The KV backend.
    pub backend: Backend,
    /// The backend's page cache in bytes (`None`: the backend's default, 1 GiB for both).
    pub cache_size: Option<usize>,
}

/// A tenant: one hospital trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantInfo {
    /// Its id, as used in URLs.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// When it was created (FHIR instant, UTC).
    pub created: String,
}

/// One stored version of a resource that is not a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResource {
    /// Its type.
    pub resource_type: ResourceType,
    /// Its logical id.
    pub id: ResourceId,
    /// Its version (`meta.versionId`).
    pub version: VersionId,
    /// `meta.lastUpdated`: a FHIR instant in UTC with microseconds, e.g.
    /// `2026-11-23T03:22:46.123456Z`.
    pub last_updated: String,
    /// The exact stored JSON (with `id`, `meta.versionId` and `meta.lastUpdated`), to be served
    /// as is.
    pub json: Vec<u8>,
}

/// The answer to [`Store::read`](crate::Store::read) and [`Store::vread`](crate::Store::vread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadResult {
    /// The resource (version).
    Found(StoredResource),
    /// The resource is deleted (read), or that version is a deletion (vread).
    Deleted {
        /// The version that is the deletion.
        version: VersionId,
        /// When it was deleted.
        last_updated: String,
    },
    /// No such resource or version.
    NotFound,
}

/// What a create or update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// A new resource was created (also by an update of an absent or deleted resource).
    Created,
    /// A new version of an existing resource was written.
    Updated,
    /// A conditional create matched an existing resource; nothing was written.
    Existing,
}

/// The result of a create or update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteResult {
    /// What happened.
    pub kind: WriteKind,
    /// The resource as now stored (for `Existing`: the matched resource's current version).
    pub resource: StoredResource,
    /// The change-log sequence number of the write (`None` when nothing was written).
    pub seq: Option<u64>,
}

/// The result of a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteResult {
    /// The type of the deleted resource.
    pub resource_type: ResourceType,
    /// The resource addressed (`None` when a conditional delete matched nothing).
    pub id: Option<ResourceId>,
    /// The new version that records the deletion (`None`: there was nothing to delete).
    pub version: Option<VersionId>,
    /// The change-log sequence number of the deletion (`None` when nothing was written).
    pub seq: Option<u64>,
}

/// Which history to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryScope {
    /// Every change of the tenant.
    System,
    /// Every change of one resource type.
    Type(ResourceType),
    /// The versions of one resource.
    Instance(ResourceType, ResourceId),
}

/// Filters and paging of a history listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    /// Keep only entries with `lastUpdated >= since` (FHIR `_since`, an instant).
    pub since: Option<String>,
    /// Opaque cursor: a previous page's [`HistoryPage::next`].
    pub before: Option<u64>,
    /// Entries per page, at most [`HistoryQuery::MAX_COUNT`]; 0 gives an empty page.
    pub count: usize,
}

impl HistoryQuery {
    /// The largest page size; larger counts are capped to it.
    pub const MAX_COUNT: usize = 1000;
}

impl Default for HistoryQuery {
    /// The first page of 100 entries, without `_since`.
    fn default() -> HistoryQuery {
        HistoryQuery {
            since: None,
            before: None,
            count: 100,
        }
    }
}

/// One page of history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The entries.
    pub entries: Vec<HistoryEntry>,
    /// The cursor for the next (older) page, if there are more entries.
    pub next: Option<u64>,
}

/// What a change did to its resource. `Create` means the resource did not exist (or was
/// deleted) before — also when it came from an update (update-as-create).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// The resource came into existence.
    Create,
    /// A new version of an existing resource.
    Update,
    /// The resource was deleted.
    Delete,
}

/// One version in a history listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// What the change did.
    pub method: Method,
    /// The resource's type.
    pub resource_type: ResourceType,
    /// The resource's id.
    pub id: ResourceId,
    /// The version.
    pub version: VersionId,
    /// Its `meta.lastUpdated`.
    pub last_updated: String,
    /// The stored JSON of the version (`None` for a deletion).
    pub json: Option<Vec<u8>>,
}

/// One record of a tenant's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Per-tenant sequence number: 1, 2, 3, … without gaps, in commit order.
    pub seq: u64,
    /// What the change did.
    pub method: Method,
    /// The resource's type.
    pub resource_type: ResourceType,
    /// The resource's id.
    pub id: ResourceId,
    /// The version written.
    pub version: VersionId,
    /// Its `meta.lastUpdated`.
    pub last_updated: String,
}

/// One operation of a [`Store::transaction`](crate::Store::transaction); each variant is the
/// single-call method of the same name.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// See [`Store::create`](crate::Store::create).
    Create {
        /// The resource (its id is ignored).
        resource: Resource,
        /// `If-None-Exist`.
        if_none_exist: Option<Condition>,
    },
    /// See [`Store::update`](crate::Store::update).
    Update {
        /// The resource's id.
        id: ResourceId,
        /// The new content.
        resource: Resource,
        /// `If-Match`.
        if_match: Option<VersionId>,
    },
    /// See [`Store::conditional_update`](crate::Store::conditional_update).
    ConditionalUpdate {
        /// The resource type searched.
        ty: ResourceType,
        /// The search criteria.
        cond: Condition,
        /// The new content.
        resource: Resource,
        /// `If-Match`.
        if_match: Option<VersionId>,
    },
    /// See [`Store::delete`](crate::Store::delete).
    Delete {
        /// The resource type.
        ty: ResourceType,
        /// The resource's id.
        id: ResourceId,
        /// `If-Match`.
        if_match: Option<VersionId>,
    },
    /// See [`Store::conditional_delete`](crate::Store::conditional_delete).
    ConditionalDelete {
        /// The resource type searched.
        ty: ResourceType,
        /// The search criteria.
        cond: Condition,
    },
    /// See [`Store::patch`](crate::Store::patch): a JSON Patch applied to the current version
    /// inside the writer, so concurrent patches of one resource serialize.
    Patch {
        /// The resource type.
        ty: ResourceType,
        /// The resource's id.
        id: ResourceId,
        /// The JSON Patch document (an array of operations).
        patch: Json,
        /// `If-Match`.
        if_match: Option<VersionId>,
    },
    /// An update (`PUT`) with `If-None-Match`: written only if the precondition holds, e.g.
    /// `*` = only if the resource does not exist (or is deleted). A failed precondition is
    /// [`StoreError::IfNoneMatch`](crate::StoreError::IfNoneMatch).
    UpdateIfNoneMatch {
        /// The resource's id.
        id: ResourceId,
        /// The new content.
        resource: Resource,
        /// The precondition.
        if_none_match: IfNoneMatch,
    },
}

/// An `If-None-Match` precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfNoneMatch {
    /// `*`: only if the resource does not exist (a deleted resource does not exist).
    Any,
    /// `W/"n"`: only if the current version is not `n`.
    Version(VersionId),
}

/// One entry of a FHIR transaction
/// ([`Store::transaction_entries`](crate::Store::transaction_entries)) or batch
/// ([`Store::batch_entries`](crate::Store::batch_entries)).
#[derive(Debug, Clone, PartialEq)]
pub struct TxEntry {
    /// `Bundle.entry.fullUrl`: a placeholder (`urn:uuid:…`, `urn:oid:…`) or absolute URL that
    /// other entries may reference; such references are rewritten to the entry's `Type/id`.
    pub full_url: Option<String>,
    /// What to do.
    pub op: WriteOp,
}

impl TxEntry {
    /// An entry without a `fullUrl`.
    pub fn new(op: WriteOp) -> TxEntry {
        TxEntry { full_url: None, op }
    }

    /// An entry whose resource other entries may reference as `full_url`.
    pub fn with_full_url(full_url: impl Into<String>, op: WriteOp) -> TxEntry {
        TxEntry {
            full_url: Some(full_url.into()),
            op,
        }
    }
}

/// The result of one [`WriteOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// From a create or (conditional) update.
    Write(WriteResult),
    /// From a (conditional) delete.
    Delete(DeleteResult),
}
