//! Micro-benchmarks of the hot paths below HTTP: `cargo bench -p benches`.
//!
//! - `parse_validate/*`: `Resource::from_json_bytes` (parse + validate against R4) of generated
//!   PHG Observations.
//! - `extract/*`: search-parameter extraction of all of an Observation's R4 parameters.
//! - `store_write/*`: durable create in a redb store (each commit is fsynced), alone and as a
//!   100-resource transaction.
//! - `index_write/*`: the search index catching up with 1,000 changes of the store's change log
//!   (extraction, tantivy documents, one commit and reader reload).
//! - `search/*`: queries on an index of about 1,000 Observations of 8 patients: a term count
//!   (`code=…&_summary=count`) and a patient's Observations of one code in a date range,
//!   sorted by date.

use std::hint::black_box;
use std::time::Duration;

use benches::generate::{Dataset, DatasetConfig, GenResource};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use fhir_core::search_param::SearchParamRegistry;
use fhir_core::{Resource, ResourceType, TenantId};
use fhir_search::{Handling, IndexOptions, Scope, SearchIndex};
use fhir_store::{Store, WriteOp};

fn sample() -> Vec<GenResource> {
    Dataset::new(DatasetConfig {
        patients: 4,
        days: 7,
        ..DatasetConfig::default()
    })
    .resources()
    .collect()
}

fn first(data: &[GenResource], code: &str) -> Vec<u8> {
    data.iter()
        .find(|r| r.resource_type == "Observation" && r.json.contains(code))
        .map(|r| r.json.clone().into_bytes())
        .unwrap_or_else(|| panic!("no {code} Observation in the sample"))
}

fn parse_validate(c: &mut Criterion) {
    let data = sample();
    let mut g = c.benchmark_group("parse_validate");
    for (name, code) in [("heart_rate", "8867-4"), ("blood_pressure", "85354-9")] {
        let bytes = first(&data, code);
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| Resource::from_json_bytes(black_box(&bytes)).expect("valid"))
        });
    }
    g.finish();
}

fn extract(c: &mut Criterion) {
    let data = sample();
    let reg = SearchParamRegistry::r4();
    let mut g = c.benchmark_group("extract");
    for (name, code) in [("heart_rate", "8867-4"), ("blood_pressure", "85354-9")] {
        let r = Resource::from_json_bytes(&first(&data, code)).expect("valid");
        g.bench_function(name, |b| b.iter(|| reg.extract(black_box(r.json())).len()));
    }
    g.finish();
}

fn store_write(c: &mut Criterion) {
    let data = sample();
    let obs: Vec<Resource> = data
        .iter()
        .filter(|r| r.resource_type == "Observation")
        .take(100)
        .map(|r| Resource::from_json_bytes(r.json.as_bytes()).expect("valid"))
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("store");
    let t = TenantId::new("bench").expect("tenant id");
    store.create_tenant(&t, "bench").expect("tenant");
    let mut g = c.benchmark_group("store_write");
    // Every commit is an fsync: few, long samples.
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut i = 0usize;
    g.throughput(Throughput::Elements(1));
    g.bench_function("create_one", |b| {
        b.iter_batched(
            || {
                i += 1;
                obs[i % obs.len()].clone()
            },
            |r| store.create(&t, r, None).expect("create"),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(obs.len() as u64));
    g.bench_function("transaction_100", |b| {
        b.iter_batched(
            || {
                obs.iter()
                    .map(|r| WriteOp::Create {
                        resource: r.clone(),
                        if_none_exist: None,
                    })
                    .collect::<Vec<_>>()
            },
            |ops| store.transaction(&t, ops).expect("transaction"),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// A store with the first `observations` Observations (and their patients' other resources)
/// of 8 patients × 30 days, written in transactions of 100.
fn populated_store(dir: &std::path::Path, observations: usize) -> (Store, TenantId) {
    let store = Store::open(dir).expect("store");
    let t = TenantId::new("bench").expect("tenant id");
    store.create_tenant(&t, "bench").expect("tenant");
    let data: Vec<Resource> = Dataset::new(DatasetConfig {
        patients: 8,
        days: 30,
        ..DatasetConfig::default()
    })
    .resources()
    .filter(|r| r.resource_type == "Observation")
    .take(observations)
    .map(|r| Resource::from_json_bytes(r.json.as_bytes()).expect("valid"))
    .collect();
    for chunk in data.chunks(100) {
        let ops = chunk
            .iter()
            .map(|r| WriteOp::Create {
                resource: r.clone(),
                if_none_exist: None,
            })
            .collect();
        store.transaction(&t, ops).expect("transaction");
    }
    (store, t)
}

fn quiet_index_options() -> IndexOptions {
    // No background indexer: the bench decides when indexing happens.
    IndexOptions {
        background_interval: None,
        ..IndexOptions::default()
    }
}

fn index_write(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, t) = populated_store(&dir.path().join("store"), 1000);
    let mut g = c.benchmark_group("index_write");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(1000));
    g.bench_function("catch_up_1000", |b| {
        b.iter_batched(
            || {
                let idx_dir = tempfile::tempdir().expect("temp dir");
                let idx =
                    SearchIndex::open_with(idx_dir.path(), store.clone(), quiet_index_options())
                        .expect("index");
                (idx, idx_dir)
            },
            |(idx, idx_dir)| {
                idx.catch_up(&t).expect("catch up");
                (idx, idx_dir)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn search(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, t) = populated_store(&dir.path().join("store"), 1000);
    let idx = SearchIndex::open_with(dir.path().join("index"), store, quiet_index_options())
        .expect("index");
    idx.catch_up(&t).expect("catch up");
    let obs = Scope::Type(ResourceType::parse("Observation").expect("Observation"));
    let params = |q: &[(&str, &str)]| -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let count = idx
        .parse(
            &t,
            &obs,
            &params(&[("code", "http://loinc.org|8867-4"), ("_summary", "count")]),
            Handling::Strict,
        )
        .expect("query");
    let patient_range = idx
        .parse(
            &t,
            &obs,
            &params(&[
                ("patient", "Patient/p42-3"),
                ("code", "http://loinc.org|8867-4"),
                ("date", "ge2026-10-10"),
                ("date", "lt2026-10-24"),
                ("_sort", "date"),
            ]),
            Handling::Strict,
        )
        .expect("query");
    let mut g = c.benchmark_group("search");
    g.bench_function("term_count", |b| {
        b.iter(|| idx.search(&t, black_box(&count)).expect("search").total)
    });
    g.bench_function("patient_code_date_sorted", |b| {
        b.iter(|| {
            idx.search(&t, black_box(&patient_range))
                .expect("search")
                .entries
                .len()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    parse_validate,
    extract,
    store_write,
    index_write,
    search
);
criterion_main!(benches);
