//! The requests of the benchmarks, built from a dataset.
//!
//! - Ingest ([`ingest_plan`]): the dataset as `batch` (or `transaction`) Bundles posted to
//!   `/fhir/{tenant}`, with `ifNoneExist` on each measurement's identifier so that a retry
//!   creates nothing (what the PHG does); or as single requests (`PUT Patient/{id}`,
//!   `POST {type}` with `If-None-Exist`).
//! - Search ([`search_plan`]): a mix of the searches the users of the server make, drawn with
//!   fixed weights and a seed, so the same configuration asks the same questions:
//!
//! | kind | request | weight |
//! |---|---|---|
//! | `obs-code-date` | a patient's Observations of one code in a 14-day window, sorted by date | 35 |
//! | `obs-count-by-code` | `_summary=count` of one code over all patients | 10 |
//! | `careplan-patient-status` | a patient's active CarePlans | 15 |
//! | `qr-patient-authored` | a patient's QuestionnaireResponses authored since a date | 15 |
//! | `obs-include-patient` | a patient's blood pressures with `_include=Observation:patient` | 15 |
//! | `obs-page-1000` | one code over all patients, `_count=1000`, following `next` links | 10 |

use std::sync::Arc;

use axum::body::Bytes;
use chrono::Duration;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::generate::{
    BundleType, Dataset, DatasetConfig, GenResource, LOINC, Measurement, PatientProfile, bundle,
};
use crate::load::{Expect, HttpRequest, Method};

/// How the ingest benchmark sends the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum IngestMode {
    /// Bundles posted to the tenant's base.
    Batch,
    /// One request per resource.
    Single,
}

/// Percent-encodes everything but unreserved characters, so that the same request line reaches
/// the real server and the baseline.
const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn enc(s: &str) -> String {
    utf8_percent_encode(s, QUERY).to_string()
}

fn query(pairs: &[(&str, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The ingest requests of `dataset` for tenant `tenant`, in dataset order.
pub fn ingest_plan(
    dataset: &Dataset,
    tenant: &str,
    mode: IngestMode,
    batch_size: usize,
    bundle_type: BundleType,
) -> Vec<HttpRequest> {
    match mode {
        IngestMode::Batch => {
            let kind: Arc<str> = Arc::from(format!("bundle-{batch_size}"));
            let mut out = Vec::new();
            let mut pending: Vec<GenResource> = Vec::with_capacity(batch_size);
            let mut flush = |pending: &mut Vec<GenResource>| {
                if pending.is_empty() {
                    return;
                }
                out.push(HttpRequest {
                    kind: kind.clone(),
                    method: Method::Post,
                    path: format!("/fhir/{tenant}"),
                    body: Some(Bytes::from(bundle(bundle_type, pending))),
                    if_none_exist: None,
                    sent_resources: pending.len() as u32,
                    expect: Expect::BatchResponse,
                    follow_next: 0,
                });
                pending.clear();
            };
            for r in dataset.resources() {
                pending.push(r);
                if pending.len() >= batch_size.max(1) {
                    flush(&mut pending);
                }
            }
            flush(&mut pending);
            out
        }
        IngestMode::Single => {
            let put: Arc<str> = Arc::from("put-patient");
            let post: Arc<str> = Arc::from("post-conditional");
            dataset
                .resources()
                .map(|r| match &r.id {
                    Some(id) => HttpRequest {
                        kind: put.clone(),
                        method: Method::Put,
                        path: format!("/fhir/{tenant}/{}/{id}", r.resource_type),
                        body: Some(Bytes::from(r.json)),
                        if_none_exist: None,
                        sent_resources: 1,
                        expect: Expect::Single,
                        follow_next: 0,
                    },
                    None => HttpRequest {
                        kind: post.clone(),
                        method: Method::Post,
                        path: format!("/fhir/{tenant}/{}", r.resource_type),
                        body: Some(Bytes::from(r.json)),
                        if_none_exist: r.if_none_exist.map(|c| {
                            // The header carries a query string: encode the value part.
                            match c.split_once('=') {
                                Some((k, v)) => format!("{k}={}", enc(v)),
                                None => c,
                            }
                        }),
                        sent_resources: 1,
                        expect: Expect::Single,
                        follow_next: 0,
                    },
                })
                .collect()
        }
    }
}

/// The search kinds with their weights (see the module docs).
pub const SEARCH_KINDS: [(&str, u32); 6] = [
    ("obs-code-date", 35),
    ("obs-count-by-code", 10),
    ("careplan-patient-status", 15),
    ("qr-patient-authored", 15),
    ("obs-include-patient", 15),
    ("obs-page-1000", 10),
];

/// `size` search requests over the patients of `cfg` for tenant `tenant`; paging requests
/// follow at most `max_pages - 1` `next` links.
pub fn search_plan(
    cfg: &DatasetConfig,
    tenant: &str,
    size: usize,
    max_pages: u32,
) -> Vec<HttpRequest> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x005E_A4C4);
    let total: u32 = SEARCH_KINDS.iter().map(|(_, w)| w).sum();
    let kinds: Vec<Arc<str>> = SEARCH_KINDS.iter().map(|(k, _)| Arc::from(*k)).collect();
    let start = cfg.start();
    let window = i64::from(cfg.days.max(1));
    let mut out = Vec::with_capacity(size);
    let get = |kind: &Arc<str>, ty: &str, q: String, follow_next: u32| HttpRequest {
        kind: kind.clone(),
        method: Method::Get,
        path: format!("/fhir/{tenant}/{ty}?{q}"),
        body: None,
        if_none_exist: None,
        sent_resources: 0,
        expect: Expect::Searchset,
        follow_next,
    };
    for _ in 0..size {
        let mut pick = rng.gen_range(0..total);
        let mut k = 0;
        while pick >= SEARCH_KINDS[k].1 {
            pick -= SEARCH_KINDS[k].1;
            k += 1;
        }
        let index = cfg.first_patient + rng.gen_range(0..cfg.patients.max(1));
        let p = PatientProfile::new(cfg.seed, index);
        let patient = p.reference();
        let own = p.program.measurements();
        let code = |m: Measurement| format!("{LOINC}|{}", m.loinc());
        let req = match SEARCH_KINDS[k].0 {
            "obs-code-date" => {
                let m = own[rng.gen_range(0..own.len())];
                let from = start + Duration::days(rng.gen_range(0..window));
                let to = from + Duration::days(14);
                get(
                    &kinds[k],
                    "Observation",
                    query(&[
                        ("patient", patient),
                        ("code", code(m)),
                        ("date", format!("ge{from}")),
                        ("date", format!("lt{to}")),
                        ("_sort", "date".into()),
                    ]),
                    0,
                )
            }
            "obs-count-by-code" => {
                let m = Measurement::ALL[rng.gen_range(0..Measurement::ALL.len())];
                get(
                    &kinds[k],
                    "Observation",
                    query(&[("code", code(m)), ("_summary", "count".into())]),
                    0,
                )
            }
            "careplan-patient-status" => get(
                &kinds[k],
                "CarePlan",
                query(&[("patient", patient), ("status", "active".into())]),
                0,
            ),
            "qr-patient-authored" => {
                let from = start + Duration::days(rng.gen_range(0..window));
                get(
                    &kinds[k],
                    "QuestionnaireResponse",
                    query(&[("patient", patient), ("authored", format!("ge{from}"))]),
                    0,
                )
            }
            "obs-include-patient" => {
                let m = own[0];
                get(
                    &kinds[k],
                    "Observation",
                    query(&[
                        ("patient", patient),
                        ("code", code(m)),
                        ("_include", "Observation:patient".into()),
                        ("_count", "50".into()),
                    ]),
                    0,
                )
            }
            _ => {
                let m = Measurement::ALL[rng.gen_range(0..4)];
                get(
                    &kinds[k],
                    "Observation",
                    query(&[("code", code(m)), ("_count", "1000".into())]),
                    max_pages.saturating_sub(1),
                )
            }
        };
        out.push(req);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_plans_are_deterministic_and_mixed() {
        let cfg = DatasetConfig {
            patients: 10,
            days: 20,
            ..DatasetConfig::default()
        };
        let a = search_plan(&cfg, "default", 200, 3);
        let b = search_plan(&cfg, "default", 200, 3);
        assert_eq!(
            a.iter().map(|r| &r.path).collect::<Vec<_>>(),
            b.iter().map(|r| &r.path).collect::<Vec<_>>()
        );
        for (kind, _) in SEARCH_KINDS {
            assert!(a.iter().any(|r| &*r.kind == kind), "{kind} missing");
        }
        let r = a.iter().find(|r| &*r.kind == "obs-code-date").unwrap();
        assert!(
            r.path.contains("code=http%3A%2F%2Floinc.org%7C") && r.path.contains("_sort=date"),
            "{}",
            r.path
        );
        let paging = a.iter().find(|r| &*r.kind == "obs-page-1000").unwrap();
        assert_eq!(paging.follow_next, 2);
    }

    #[test]
    fn ingest_plans_hold_every_resource() {
        let cfg = DatasetConfig {
            patients: 3,
            days: 4,
            ..DatasetConfig::default()
        };
        let ds = Dataset::new(cfg);
        let total = ds.summary().total;
        let batch = ingest_plan(&ds, "t", IngestMode::Batch, 25, BundleType::Batch);
        assert_eq!(
            batch
                .iter()
                .map(|r| u64::from(r.sent_resources))
                .sum::<u64>(),
            total
        );
        assert!(batch.iter().all(|r| r.path == "/fhir/t"));
        let single = ingest_plan(&ds, "t", IngestMode::Single, 25, BundleType::Batch);
        assert_eq!(single.len() as u64, total);
        assert_eq!(single[0].method, Method::Put);
        assert!(
            single[1]
                .if_none_exist
                .as_deref()
                .unwrap()
                .starts_with("identifier=https%3A")
        );
    }
}
