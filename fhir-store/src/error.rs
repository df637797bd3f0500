//! The store's error type.

use fhir_core::{TenantId, VersionId};

use crate::kv::KvError;

/// Why a store operation failed.
///
/// The first six variants are the client's problem (an HTTP server maps them to 404, 409, 412,
/// 412, 400 and 400); the last three are the server's.
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
