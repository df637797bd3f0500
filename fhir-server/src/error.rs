//! Every error a request can end in, mapped to an HTTP status and an OperationOutcome in one
//! place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fhir_core::{FhirError, InvalidId, Issue, IssueType, OperationOutcome};
use fhir_store::StoreError;
use fhir_store::bundle::BundleError;

use crate::format::Format;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The tenant in the URL does not exist.
    #[error("unknown tenant '{0}'")]
    UnknownTenant(String),
    /// The resource type in the URL is not an R4 resource.
    #[error("unknown resource type '{0}'")]
    UnknownResourceType(String),
    /// The resource does not exist.
    #[error("{0} is not known")]
    NotFound(String),
    /// The resource was deleted.
    #[error("{0} has been deleted")]
    Gone(String),
    /// The body or a parameter is wrong.
    #[error("{}", .0.first().map(|i| i.diagnostics.as_str()).unwrap_or("bad request"))]
    BadRequest(Vec<Issue>),
    /// The content is not valid FHIR.
    #[error(transparent)]
    Fhir(#[from] FhirError),
    /// A version or precondition check failed (If-Match, conditional matches).
    #[error("{0}")]
    PreconditionFailed(String),
    /// A conflict with the current state (e.g. tenant exists).
    #[error("{0}")]
    Conflict(String),
    /// The body is larger than allowed.
    #[error("request body larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// The body's media type is not accepted.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No supported output format was asked for.
    #[error("{0}")]
    NotAcceptable(String),
    /// The method is not allowed on this URL.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A status and issues decided elsewhere (a refused Bundle, a failed patch, …).
    #[error("{}", .issues.first().map(|i| i.diagnostics.as_str()).unwrap_or("request failed"))]
    Outcome {
        /// The HTTP status.
        status: StatusCode,
        /// What went wrong.
        issues: Vec<Issue>,
    },
    /// Something went wrong on our side.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 with one issue.
    pub fn bad_request(code: IssueType, msg: impl Into<String>) -> ApiError {
        ApiError::BadRequest(vec![Issue::error(code, msg)])
    }

    fn status_and_issues(&self) -> (StatusCode, Vec<Issue>) {
        let one = |code, msg: String| vec![Issue::error(code, msg)];
        match self {
            ApiError::UnknownTenant(_) => (
                StatusCode::NOT_FOUND,
                one(IssueType::NotFound, self.to_string()),
            ),
            ApiError::UnknownResourceType(_) => (
                StatusCode::NOT_FOUND,
                one(IssueType::NotSupported, self.to_string()),
            ),
            ApiError::NotFound(_) => (
                StatusCode::NOT_FOUND,
                one(IssueType::NotFound, self.to_string()),
            ),
            ApiError::Gone(_) => (StatusCode::GONE, one(IssueType::Deleted, self.to_string())),
            ApiError::BadRequest(issues) => (StatusCode::BAD_REQUEST, issues.clone()),
            ApiError::Fhir(FhirError::UnknownResourceType(_)) => (
                StatusCode::BAD_REQUEST,
                one(IssueType::NotSupported, self.to_string()),
            ),
            ApiError::Fhir(e) => (StatusCode::BAD_REQUEST, e.issues()),
            ApiError::PreconditionFailed(_) => (
                StatusCode::PRECONDITION_FAILED,
                one(IssueType::Conflict, self.to_string()),
            ),
            ApiError::Conflict(_) => (
                StatusCode::CONFLICT,
                one(IssueType::Conflict, self.to_string()),
            ),
            ApiError::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                one(IssueType::TooLong, self.to_string()),
            ),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                one(IssueType::NotSupported, self.to_string()),
            ),
            ApiError::NotAcceptable(_) => (
                StatusCode::NOT_ACCEPTABLE,
                one(IssueType::NotSupported, self.to_string()),
            ),
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                one(IssueType::NotSupported, self.to_string()),
            ),
            ApiError::Outcome { status, issues } => (*status, issues.clone()),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                // The detail goes to the log, not to the client.
                one(IssueType::Exception, "internal server error".to_string()),
            ),
        }
    }

    /// The response in the given format.
    pub fn into_response_as(self, format: Format, pretty: bool) -> Response {
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "request failed");
        }
        let (status, issues) = self.status_and_issues();
        let outcome = OperationOutcome::new(issues).to_json();
        let mut resp = crate::format::render_tree(&outcome, format, pretty);
        *resp.status_mut() = status;
        resp
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_as(Format::Json, false)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::TenantNotFound(t) => ApiError::UnknownTenant(t.to_string()),
            StoreError::TenantExists(t) => {
                ApiError::Conflict(format!("tenant '{t}' already exists"))
            }
            StoreError::VersionConflict { expected, actual } => {
                ApiError::PreconditionFailed(match actual {
                    Some(a) => format!(
                        "version conflict: If-Match asked for version {expected} but the current version is {a}"
                    ),
                    None => format!(
                        "version conflict: If-Match asked for version {expected} but the resource does not exist"
                    ),
                })
            }
            StoreError::MultipleMatches { count } => ApiError::PreconditionFailed(format!(
                "the conditional criteria matched {count} resources; they must match at most one"
            )),
            StoreError::InvalidCondition(msg) => {
                ApiError::bad_request(IssueType::NotSupported, msg)
            }
            StoreError::IdMismatch(msg) => ApiError::bad_request(IssueType::Invalid, msg),
            StoreError::NotFound {
                resource_type,
                id,
                deleted,
            } => {
                let what = format!("{resource_type}/{id}");
                if deleted {
                    ApiError::Gone(what)
                } else {
                    ApiError::NotFound(what)
                }
            }
            e @ (StoreError::InvalidPatch(_)
            | StoreError::IfNoneMatch { .. }
            | StoreError::UnresolvedReference { .. }
            | StoreError::InvalidTransaction(_)
            | StoreError::TransactionFailed { .. }) => {
                let mut issues = vec![Issue::error(e.issue_type(), e.to_string())];
                if let StoreError::InvalidPatch(fhir_core::patch::PatchError::InvalidResult(
                    details,
                )) = &e
                {
                    issues.extend(details.iter().cloned());
                }
                ApiError::Outcome {
                    status: StatusCode::from_u16(e.http_status())
                        .unwrap_or(StatusCode::BAD_REQUEST),
                    issues,
                }
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<InvalidId> for ApiError {
    fn from(e: InvalidId) -> ApiError {
        ApiError::bad_request(IssueType::Value, e.to_string())
    }
}

impl From<BundleError> for ApiError {
    fn from(e: BundleError) -> ApiError {
        match StatusCode::from_u16(e.status) {
            Ok(s) if s.is_server_error() => ApiError::Internal(e.to_string()),
            Ok(status) => ApiError::Outcome {
                status,
                issues: e.issues,
            },
            Err(_) => ApiError::Internal(format!("bundle status {}", e.status)),
        }
    }
}

impl From<fhir_search::SearchError> for ApiError {
    fn from(e: fhir_search::SearchError) -> ApiError {
        use fhir_search::SearchError as S;
        let status = match &e {
            S::Store(_) | S::Index(_) => None,
            S::PageExpired(_) => Some(StatusCode::GONE),
            S::MultipleMatches { .. } => Some(StatusCode::PRECONDITION_FAILED),
            // The index could not catch up in time: worth retrying, not the client's fault.
            S::IndexBehind { .. } => Some(StatusCode::SERVICE_UNAVAILABLE),
            _ => Some(StatusCode::BAD_REQUEST),
        };
        match (status, e) {
            (Some(status), e) => ApiError::Outcome {
                status,
                issues: e.issues(),
            },
            (None, S::Store(s)) => ApiError::from(s),
            (None, other) => ApiError::Internal(other.to_string()),
        }
    }
}
