//! fhir-store
