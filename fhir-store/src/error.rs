//! The store's error type.

use fhir_core::patch::PatchError;
use fhir_core::{IssueType, ResourceId, ResourceType, TenantId, VersionId};

use crate::kv::KvError;

/// Why a store operation failed.
///
/// Most variants are the client's problem; [`StoreError::http_status`] says which HTTP status
/// each stands for. `Backend`, `Closed` and `Corrupt` are the server's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No such tenant (or it is being removed).
    #[error("tenant '{0}' not found")]
    TenantNotFound(TenantId),
    /// A tenant with this id exists already.
    #[error("tenant '{0}' already exists")]
    TenantExists(TenantId),
    /// An `If-Match` precondition failed.
    #[error("version conflict: expected version {expected}, {}", match actual {
        Some(v) => format!("but the current version is {v}"),
        None => "but the resource does not exist or is deleted".to_string(),
    })]
    VersionConflict {
        /// The version the client expected.
        expected: VersionId,
        /// The current version (`None`: absent or deleted).
        actual: Option<VersionId>,
    },
    /// A conditional operation matched more than one resource.
    #[error("the condition matched {count} resources; it must match at most one")]
    MultipleMatches {
        /// How many resources matched.
        count: usize,
    },
    /// A condition (or `_since`) that cannot be parsed or is not supported.
    #[error("invalid condition: {0}")]
    InvalidCondition(String),
    /// The resource's id or type disagrees with the request.
    #[error("{0}")]
    IdMismatch(String),
    /// The resource addressed (by a patch) does not exist, or is deleted.
    #[error("{resource_type}/{id} {}", if *deleted { "is deleted" } else { "is not known" })]
    NotFound {
        /// Its type.
        resource_type: ResourceType,
        /// Its id.
        id: ResourceId,
        /// Whether it existed and was deleted.
        deleted: bool,
    },
    /// A JSON Patch is malformed, does not apply, or yields an invalid resource.
    #[error(transparent)]
    InvalidPatch(PatchError),
    /// An `If-None-Match` precondition failed: the resource exists (in that version).
    #[error("If-None-Match: the resource exists (current version {current})")]
    IfNoneMatch {
        /// The current version.
        current: VersionId,
    },
    /// A reference in a transaction could not be resolved: a conditional reference
    /// (`Patient?identifier=…`) that matches no or several resources, or a `urn:uuid:`/`urn:oid:`
    /// placeholder that no entry's `fullUrl` declares.
    #[error("{}", match count {
        0 => format!("the reference '{reference}' matches no resource"),
        1 => format!("the reference '{reference}' cannot be resolved"),
        n => format!("the conditional reference '{reference}' matches {n} resources; it must match exactly one"),
    })]
    UnresolvedReference {
        /// The reference as written (shortened).
        reference: String,
        /// How many resources matched (0 for an unknown placeholder).
        count: usize,
    },
    /// A request that breaks the rules of a transaction (e.g. two entries with one `fullUrl`).
    #[error("{0}")]
    InvalidTransaction(String),
    /// Entry `index` of a transaction failed, so nothing of the transaction was written.
    #[error("entry {index} failed: {source}")]
    TransactionFailed {
        /// Position of the failing entry in the request (0-based).
        index: usize,
        /// Why it failed.
        source: Box<StoreError>,
    },
    /// The KV backend failed (I/O, locking, wrong backend for the directory).
    #[error("storage backend error: {0}")]
    Backend(String),
    /// The store's writer has stopped.
    #[error("the store is closed")]
    Closed,
    /// Stored data could not be decoded.
    #[error("corrupt store data: {0}")]
    Corrupt(String),
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> StoreError {
        StoreError::Backend(e.0)
    }
}

impl StoreError {
    /// The HTTP status an HTTP server answers with for this error (for a failed transaction, the
    /// status of the entry's error).
    pub fn http_status(&self) -> u16 {
        match self {
            StoreError::TenantNotFound(_) => 404,
            StoreError::TenantExists(_) => 409,
            StoreError::VersionConflict { .. }
            | StoreError::MultipleMatches { .. }
            | StoreError::IfNoneMatch { .. } => 412,
            StoreError::InvalidCondition(_)
            | StoreError::IdMismatch(_)
            | StoreError::InvalidTransaction(_) => 400,
            StoreError::NotFound { deleted: false, .. } => 404,
            StoreError::NotFound { deleted: true, .. } => 410,
            StoreError::InvalidPatch(p) if p.is_malformed() => 400,
            StoreError::InvalidPatch(_) => 422,
            StoreError::UnresolvedReference { count, .. } if *count > 1 => 412,
            StoreError::UnresolvedReference { .. } => 400,
            StoreError::TransactionFailed { source, .. } => source.http_status(),
            StoreError::Backend(_) | StoreError::Closed | StoreError::Corrupt(_) => 500,
        }
    }

    /// The OperationOutcome issue type for this error.
    pub fn issue_type(&self) -> IssueType {
        match self {
            StoreError::TenantNotFound(_) => IssueType::NotFound,
            StoreError::TenantExists(_)
            | StoreError::VersionConflict { .. }
            | StoreError::IfNoneMatch { .. } => IssueType::Conflict,
            StoreError::MultipleMatches { .. } => IssueType::MultipleMatches,
            StoreError::InvalidCondition(_) => IssueType::NotSupported,
            StoreError::IdMismatch(_) | StoreError::InvalidTransaction(_) => IssueType::Invalid,
            StoreError::NotFound { deleted: false, .. } => IssueType::NotFound,
            StoreError::NotFound { deleted: true, .. } => IssueType::Deleted,
            StoreError::InvalidPatch(p) => {
                p.issues().first().map_or(IssueType::Invalid, |i| i.code)
            }
            StoreError::UnresolvedReference { count, .. } if *count > 1 => {
                IssueType::MultipleMatches
            }
            StoreError::UnresolvedReference { .. } => IssueType::NotFound,
            StoreError::TransactionFailed { source, .. } => source.issue_type(),
            StoreError::Backend(_) | StoreError::Closed | StoreError::Corrupt(_) => {
                IssueType::Exception
            }
        }
    }

    /// Whether the server is at fault (the client cannot fix it by changing the request).
    pub fn is_internal(&self) -> bool {
        self.http_status() >= 500
    }
}
