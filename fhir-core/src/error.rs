//! Errors of parsing and validating FHIR content.

use crate::json::ParseError;
use crate::outcome::{Issue, IssueType};

/// Why content could not be accepted as a FHIR resource.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FhirError {
    /// Not well-formed JSON.
    #[error("malformed JSON: {0}")]
    Json(#[from] ParseError),
    /// Not well-formed XML, or XML that does not map onto FHIR.
    #[error("malformed XML: {0}")]
    Xml(String),
    /// The content is not a JSON object / resource.
    #[error("{0}")]
    NotAResource(String),
    /// `resourceType` names no R4 resource.
    #[error("unknown resource type '{0}'")]
    UnknownResourceType(String),
    /// Well-formed but invalid against the R4 definitions.
    #[error("{}", summary(.0))]
    Invalid(Vec<Issue>),
}

fn summary(issues: &[Issue]) -> String {
    match issues.first() {
        Some(i) if issues.len() == 1 => i.diagnostics.clone(),
        Some(i) => format!("{} (and {} more issues)", i.diagnostics, issues.len() - 1),
        None => "invalid resource".to_string(),
    }
}

impl FhirError {
    /// The issues to report in an OperationOutcome.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            FhirError::Invalid(issues) => issues.clone(),
            FhirError::Json(e) => vec![Issue::error(
                IssueType::Structure,
                format!("malformed JSON: {e}"),
            )],
            FhirError::Xml(e) => vec![Issue::error(
                IssueType::Structure,
                format!("malformed XML: {e}"),
            )],
            other => vec![Issue::error(IssueType::Invalid, other.to_string())],
        }
    }
}
