//! Validation as seen through `Resource::from_json_bytes`, which every create and update uses.

use fhir_core::{FhirError, IssueType, Resource};

#[test]
fn from_json_accepts_a_valid_resource() {
    let r = Resource::from_json_bytes(
        br#"{"resourceType":"Observation","status":"final","code":{"text":"pulse"},
            "component":[{"code":{"text":"a"},"valueQuantity":{"value":120.50}}]}"#,
    )
    .expect("valid");
    let text = String::from_utf8(r.to_json_bytes()).expect("utf-8");
    assert!(text.contains("120.50"), "{text}");
}

#[test]
fn from_json_rejects_with_every_issue_and_its_path() {
    let err = Resource::from_json_bytes(
        br#"{"resourceType":"Observation","status":"bogus",
            "component":[{"code":{"text":"a"}},{"code":{"text":"b"},"valueQuantity":{"value":"72.5"}}]}"#,
    )
    .expect_err("invalid");
    let FhirError::Invalid(issues) = err else {
        panic!("expected FhirError::Invalid, got {err:?}");
    };
    let found: Vec<(IssueType, &str)> = issues
        .iter()
        .map(|i| (i.code, i.expression.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        found,
        [
            (IssueType::Value, "Observation.status"),
            (
                IssueType::Structure,
                "Observation.component[1].valueQuantity.value"
            ),
            (IssueType::Required, "Observation.code"),
        ],
        "{issues:#?}"
    );
}
