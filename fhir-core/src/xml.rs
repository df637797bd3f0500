//! FHIR XML, converted to and from the JSON tree with the help of the R4 schema.

use crate::error::FhirError;
use crate::json::Json;

/// Parses a FHIR XML resource into the equivalent FHIR JSON tree (not yet validated).
pub fn from_xml(bytes: &[u8]) -> Result<Json, FhirError> {
    let _ = bytes;
    Err(FhirError::Xml("XML is not supported yet".into()))
}

/// Serialises a FHIR JSON resource tree as FHIR XML.
pub fn to_xml(resource: &Json, pretty: bool) -> Result<Vec<u8>, FhirError> {
    let _ = (resource, pretty);
    Err(FhirError::Xml("XML is not supported yet".into()))
}
