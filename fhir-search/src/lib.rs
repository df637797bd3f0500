//! # fhir-search
//!
//! FHIR R4 search over a tantivy index derived from the store's change log.
//!
//! Not built yet: until it is, the server answers searches on `_id` and `identifier` from the
//! store's own identifier index (see `fhir_store::Condition`). The index will consume
//! `fhir_store::Store::changes` from the sequence number recorded in its last commit, so that it
//! is never the only copy of anything and can always be rebuilt.
