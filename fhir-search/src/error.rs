//! The search crate's error type.

use fhir_core::{Issue, IssueType};
use fhir_store::StoreError;

/// Why a search (or an index operation) failed.
///
/// The first group is the client's problem: an HTTP server answers 400 (410 for
/// [`SearchError::PageExpired`], 412 for [`SearchError::MultipleMatches`]) with the
/// [`issues`](SearchError::issues). [`SearchError::IndexBehind`] is a 503: the index could not
/// catch up with the store in time. The rest are the server's.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    /// A parameter's value is malformed (a bad date, prefix, number, token …).
    #[error("invalid value for '{param}': {message}")]
    InvalidValue {
        /// The parameter as written (with modifier).
        param: String,
        /// What is wrong.
        message: String,
    },
    /// A parameter, modifier or feature this server does not support, where ignoring it would
    /// change the meaning of the search (a modifier), or the client asked for strict handling.
    #[error("{0}")]
    NotSupported(String),
    /// A parameter that is not known for the resource type (with `Prefer: handling=strict`).
    #[error("unknown search parameter '{param}' for {scope}")]
    UnknownParameter {
        /// The parameter as written.
        param: String,
        /// The resource type(s) searched.
        scope: String,
    },
    /// The search would be too expensive (e.g. a chain matching too many resources).
    #[error("{0}")]
    TooCostly(String),
    /// A paging link that expired or never existed.
    #[error("the page '{0}' has expired or does not exist; run the search again")]
    PageExpired(String),
    /// A conditional operation matched more than one resource.
    #[error("the criteria matched {count} resources; they must match at most one")]
    MultipleMatches {
        /// How many matched.
        count: usize,
    },
    /// The index did not catch up with the store in time (read-your-writes could not be
    /// guaranteed).
    #[error(
        "the search index is behind the store (at change {indexed}, the search needs {needed}); \
         try again shortly"
    )]
    IndexBehind {
        /// The change-log sequence number the search must see.
        needed: u64,
        /// The sequence number the index has reached.
        indexed: u64,
    },
    /// The store failed (or the tenant does not exist: [`StoreError::TenantNotFound`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// tantivy or the file system failed.
    #[error("search index error: {0}")]
    Index(String),
}

impl From<tantivy::TantivyError> for SearchError {
    fn from(e: tantivy::TantivyError) -> SearchError {
        SearchError::Index(e.to_string())
    }
}

impl From<std::io::Error> for SearchError {
    fn from(e: std::io::Error) -> SearchError {
        SearchError::Index(e.to_string())
    }
}

impl SearchError {
    pub(crate) fn invalid(param: &str, message: impl Into<String>) -> SearchError {
        SearchError::InvalidValue {
            param: crate::terms::shorten(param),
            message: message.into(),
        }
    }

    /// Whether this is the client's fault (a 4xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            SearchError::IndexBehind { .. } | SearchError::Store(_) | SearchError::Index(_)
        ) || matches!(self, SearchError::Store(StoreError::TenantNotFound(_)))
    }

    /// The OperationOutcome issues for a client error.
    pub fn issues(&self) -> Vec<Issue> {
        let code = match self {
            SearchError::InvalidValue { .. } => IssueType::Value,
            SearchError::NotSupported(_) | SearchError::UnknownParameter { .. } => {
                IssueType::NotSupported
            }
            SearchError::TooCostly(_) => IssueType::TooCosts,
            SearchError::PageExpired(_) => IssueType::NotFound,
            SearchError::MultipleMatches { .. } => IssueType::MultipleMatches,
            SearchError::IndexBehind { .. } => IssueType::Timeout,
            SearchError::Store(StoreError::TenantNotFound(_)) => IssueType::NotFound,
            SearchError::Store(_) | SearchError::Index(_) => IssueType::Exception,
        };
        vec![Issue::error(code, self.to_string())]
    }
}
