//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::Path;

use fhir_core::{Resource, ResourceType, TenantId};
use fhir_store::{Backend, ReadResult, Store, StoreOptions, StoredResource};

/// Generates one `#[test]` per backend from functions `fn name(backend: Backend)`.
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod redb_backend {
            $(
                #[test]
                fn $name() {
                    super::$name(fhir_store::Backend::Redb)
                }
            )*
        }
        #[cfg(feature = "sled")]
        mod sled_backend {
            $(
                #[test]
                fn $name() {
                    super::$name(fhir_store::Backend::Sled)
                }
            )*
        }
    };
}

pub fn open(dir: &Path, backend: Backend) -> Store {
    Store::open_with(
        dir,
        StoreOptions {
            backend,
            // Many stores are open at once in a test run; keep each one's cache small.
            cache_size: Some(16 << 20),
        },
    )
    .unwrap()
}

pub fn tenant(id: &str) -> TenantId {
    TenantId::new(id).unwrap()
}

/// A fresh store in a temporary directory with tenant `hf-a`.
pub fn setup(backend: Backend) -> (tempfile::TempDir, Store, TenantId) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend);
    let t = tenant("hf-a");
    store.create_tenant(&t, "Helse A").unwrap();
    (dir, store, t)
}

pub fn ty(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

pub fn obs_type() -> ResourceType {
    ty("Observation")
}

pub fn patient_type() -> ResourceType {
    ty("Patient")
}

fn json_str(s: &str) -> String {
    let mut out = String::new();
    fhir_core::json::write_string(&mut out, s);
    out
}

/// An Observation with one identifier (`system` may be absent) and a pulse value given as JSON
/// number text (e.g. `72.50`).
pub fn obs(system: Option<&str>, value: &str, pulse: &str) -> Resource {
    let system = system
        .map(|s| format!("\"system\":{},", json_str(s)))
        .unwrap_or_default();
    let body = format!(
        r#"{{"resourceType":"Observation","identifier":[{{{system}"value":{}}}],"status":"final","code":{{"text":"pulse"}},"valueQuantity":{{"value":{pulse},"unit":"/min"}}}}"#,
        json_str(value)
    );
    Resource::from_json_bytes(body.as_bytes()).unwrap()
}

/// An Observation without identifiers.
pub fn plain_obs(pulse: &str) -> Resource {
    let body = format!(
        r#"{{"resourceType":"Observation","status":"final","code":{{"text":"pulse"}},"valueQuantity":{{"value":{pulse},"unit":"/min"}}}}"#
    );
    Resource::from_json_bytes(body.as_bytes()).unwrap()
}

/// A Patient with a national identity number, optionally with an id in the body.
pub fn patient(id: Option<&str>, fnr: &str, family: &str) -> Resource {
    let id = id
        .map(|i| format!("\"id\":{},", json_str(i)))
        .unwrap_or_default();
    let body = format!(
        r#"{{"resourceType":"Patient",{id}"identifier":[{{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":{}}}],"name":[{{"family":{}}}]}}"#,
        json_str(fnr),
        json_str(family)
    );
    Resource::from_json_bytes(body.as_bytes()).unwrap()
}

pub const FNR_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.4.1";

pub fn found(r: ReadResult) -> StoredResource {
    match r {
        ReadResult::Found(s) => s,
        other => panic!("expected Found, got {other:?}"),
    }
}

pub fn text(json: &[u8]) -> String {
    String::from_utf8(json.to_vec()).unwrap()
}

/// Whether `s` is an instant like `2026-11-23T03:22:46.123456Z`.
pub fn is_micro_instant(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 27
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            26 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}
