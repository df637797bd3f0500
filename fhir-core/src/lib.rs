//! # fhir-core
//!
//! The FHIR R4 model of this server, driven by the official definitions: a JSON tree that keeps
//! decimals exactly ([`json`]), the structure of every resource and data type ([`schema`]),
//! validation ([`validate`]), XML ([`xml`]), typed identifiers ([`ids`]), [`Resource`] and
//! [`OperationOutcome`].
//!
//! ```
//! use fhir_core::Resource;
//! let obs = Resource::from_json_bytes(br#"{"resourceType":"Observation","status":"final",
//!     "code":{"text":"pulse"},"valueQuantity":{"value":72.50,"unit":"/min"}}"#).unwrap();
//! assert_eq!(obs.resource_type().as_str(), "Observation");
//! assert!(String::from_utf8(obs.to_json_bytes()).unwrap().contains("72.50"));
//! ```
#![warn(missing_docs)]

pub mod error;
pub mod fhirpath;
pub mod ids;
pub mod json;
pub mod outcome;
pub mod patch;
pub mod references;
pub mod resource;
pub mod schema;
pub mod search_escape;
pub mod search_param;
#[cfg(feature = "fhirbolt")]
pub mod typed;
pub mod validate;
pub mod xml;

pub use error::FhirError;
pub use ids::{InvalidId, ResourceId, ResourceType, TenantId, VersionId};
pub use json::{Json, Map};
pub use outcome::{Issue, IssueType, OperationOutcome, Severity};
pub use resource::{Identifier, Resource};
pub use schema::Schema;
