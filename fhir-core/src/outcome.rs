//! OperationOutcome: how every error and warning is reported to a client.

use crate::json::{Json, Map};

/// `OperationOutcome.issue.severity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The action failed.
    Fatal,
    /// The input is in error.
    Error,
    /// Worth knowing, not blocking.
    Warning,
    /// Information only.
    Information,
}

impl Severity {
    /// The FHIR code.
    pub fn code(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// `OperationOutcome.issue.code` (the subset of the IssueType value set this server reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueType {
    /// Content invalid against the specification or a profile.
    Invalid,
    /// A structural issue (e.g. malformed JSON/XML, unknown element).
    Structure,
    /// A required element is missing.
    Required,
    /// An element or header value is invalid.
    Value,
    /// The request is not allowed for this resource or server.
    NotSupported,
    /// The resource or tenant was not found.
    NotFound,
    /// The resource was deleted.
    Deleted,
    /// A version conflict (If-Match) or a duplicate.
    Conflict,
    /// Processing failed; too costly, or too large.
    TooCosts,
    /// Too many matches for a conditional operation.
    MultipleMatches,
    /// An unexpected internal error.
    Exception,
    /// The caller is not allowed to do this.
    Forbidden,
    /// The caller did not authenticate.
    Login,
    /// Informational message.
    Informational,
    /// Processing was incomplete.
    Incomplete,
    /// Too long (e.g. body size).
    TooLong,
    /// Throttled or timed out.
    Timeout,
}

impl IssueType {
    /// The FHIR code.
    pub fn code(self) -> &'static str {
        match self {
            IssueType::Invalid => "invalid",
            IssueType::Structure => "structure",
            IssueType::Required => "required",
            IssueType::Value => "value",
            IssueType::NotSupported => "not-supported",
            IssueType::NotFound => "not-found",
            IssueType::Deleted => "deleted",
            IssueType::Conflict => "conflict",
            IssueType::TooCosts => "too-costly",
            IssueType::MultipleMatches => "multiple-matches",
            IssueType::Exception => "exception",
            IssueType::Forbidden => "forbidden",
            IssueType::Login => "login",
            IssueType::Informational => "informational",
            IssueType::Incomplete => "incomplete",
            IssueType::TooLong => "too-long",
            IssueType::Timeout => "timeout",
        }
    }
}

/// One issue: what is wrong and, where known, at which element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// How bad.
    pub severity: Severity,
    /// What kind of problem.
    pub code: IssueType,
    /// Human-readable explanation.
    pub diagnostics: String,
    /// FHIRPath of the offending element, e.g. `Observation.component[0].valueQuantity.value`.
    pub expression: Option<String>,
}

impl Issue {
    /// An error without a location.
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    /// An error at the element `expression`.
    pub fn at(
        code: IssueType,
        expression: impl Into<String>,
        diagnostics: impl Into<String>,
    ) -> Issue {
        Issue {
            severity: Severity::Error,
            code,
            diagnostics: diagnostics.into(),
            expression: Some(expression.into()),
        }
    }

    /// A warning without a location.
    pub fn warning(code: IssueType, diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Warning,
            code,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }

    /// An informational issue.
    pub fn information(diagnostics: impl Into<String>) -> Issue {
        Issue {
            severity: Severity::Information,
            code: IssueType::Informational,
            diagnostics: diagnostics.into(),
            expression: None,
        }
    }
}

/// An OperationOutcome resource.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OperationOutcome {
    /// The issues, most important first.
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome of the given issues.
    pub fn new(issues: Vec<Issue>) -> OperationOutcome {
        OperationOutcome { issues }
    }

    /// The outcome as a FHIR JSON resource.
    pub fn to_json(&self) -> Json {
        let mut root = Map::new();
        root.insert("resourceType", Json::str("OperationOutcome"));
        let issues = if self.issues.is_empty() {
            vec![Issue::information("All OK")]
        } else {
            self.issues.clone()
        };
        let arr = issues
            .iter()
            .map(|i| {
                let mut m = Map::new();
                m.insert("severity", Json::str(i.severity.code()));
                m.insert("code", Json::str(i.code.code()));
                if !i.diagnostics.is_empty() {
                    m.insert("diagnostics", Json::str(i.diagnostics.clone()));
                }
                if let Some(e) = &i.expression {
                    m.insert("expression", Json::Array(vec![Json::str(e.clone())]));
                }
                Json::Object(m)
            })
            .collect();
        root.insert("issue", Json::Array(arr));
        Json::Object(root)
    }
}
