//! fhir-server
