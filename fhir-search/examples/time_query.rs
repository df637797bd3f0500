//! Times one kind of search against an existing data folder (as `fhir-bench ingest --data`
//! leaves it), in release mode, without HTTP in the way:
//!
//! ```sh
//! cargo run --release -p fhir-search --example time_query -- /tmp/sp-300 [runs] [tenant]
//! ```
//!
//! The queries are the benchmark's `obs-code-date` shape (a patient's Observations of one
//! code in a 14-day window, `_sort=date`) for the first patients of the index, with windows
//! spread over the dataset's 90 days. Prints p50/p95/mean of `SearchIndex::search` (query,
//! collection, and reading each hit from the store). A measuring tool, not a test: it asserts
//! nothing about time.
//!
//! `TIME_QUERY_SHOW=1` also prints every query with its total and matches in order, and
//! `TIME_QUERY_FILE=queries.txt` runs the queries of that file (one a line) instead: together
//! they compare the answers of two builds on the same data. An index of an older format is
//! rebuilt when opened; until that is done a search fails after waiting 5 s — run again.

use std::time::{Duration, Instant};

use fhir_core::{ResourceType, TenantId};
use fhir_search::{Handling, Scope, SearchIndex};
use fhir_store::Store;

fn params(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let data = args
        .next()
        .ok_or("usage: time_query DATA_DIR [runs] [tenant]")?;
    let runs: usize = args.next().map_or(Ok(200), |s| s.parse())?;
    let tenant = TenantId::new(args.next().unwrap_or_else(|| "default".into()).as_str())?;
    let store = Store::open(std::path::Path::new(&data).join("store"))?;
    let index = SearchIndex::open(std::path::Path::new(&data).join("index"), store)?;

    let patient_ty = ResourceType::parse("Patient").ok_or("no Patient type")?;
    let obs_ty = ResourceType::parse("Observation").ok_or("no Observation type")?;
    // A (patient, code) pair per patient: the code of one of the patient's Observations.
    let search = |ty: ResourceType, q: &str| {
        let req = index.parse(&tenant, &Scope::Type(ty), &params(q), Handling::Strict)?;
        index.search(&tenant, &req)
    };
    let patients = search(patient_ty, "_count=20&_elements=id")?;
    let mut pairs = Vec::new();
    for e in &patients.entries {
        let json: serde_json::Value = serde_json::from_slice(&e.resource.json)?;
        let id = json["id"].as_str().unwrap_or_default().to_string();
        let obs = search(obs_ty, &format!("patient=Patient/{id}&_count=1"))?;
        if let Some(o) = obs.entries.first() {
            let json: serde_json::Value = serde_json::from_slice(&o.resource.json)?;
            let c = &json["code"]["coding"][0];
            let code = format!(
                "{}|{}",
                c["system"].as_str().unwrap_or_default(),
                c["code"].as_str().unwrap_or_default()
            );
            pairs.push((id, code));
        }
    }
    if std::env::var_os("TIME_QUERY_SHOW").is_some() {
        // To compare two builds on the same data: the (patient, code) pairs and, below, each
        // query's matches.
        for (id, code) in &pairs {
            println!("pair {id} {code}");
        }
    }
    if pairs.is_empty() {
        return Err("no Observations in this index".into());
    }
    let mut queries: Vec<String> = (0..runs)
        .map(|i| {
            let (id, code) = &pairs[i % pairs.len()];
            let day = (i * 7) % 76;
            let from = chrono::NaiveDate::from_ymd_opt(2026, 8, 3).unwrap_or_default()
                + chrono::Duration::days(day as i64);
            let to = from + chrono::Duration::days(14);
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            format!(
                "patient=Patient/{id}&code={}&date=ge{from}&date=lt{to}&_sort=date",
                enc(code)
            )
        })
        .collect();
    if let Some(file) = std::env::var_os("TIME_QUERY_FILE") {
        // The queries of another run (one a line), e.g. to compare two builds' answers.
        queries = std::fs::read_to_string(file)?
            .lines()
            .map(str::to_string)
            .collect();
    }

    // Warm up (page cache, lazily opened segments), then measure.
    for q in queries.iter().take(20) {
        search(obs_ty, q)?;
    }
    let mut times = Vec::with_capacity(runs);
    let mut matches = 0;
    for q in &queries {
        let t = Instant::now();
        let r = search(obs_ty, q)?;
        times.push(t.elapsed());
        matches += r.entries.len();
        if std::env::var_os("TIME_QUERY_SHOW").is_some() {
            let ids: Vec<String> = r
                .entries
                .iter()
                .map(|e| format!("{}/{}", e.resource.resource_type, e.resource.id))
                .collect();
            println!("{q} total={:?} {}", r.total, ids.join(","));
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p) as usize).min(times.len() - 1)];
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "obs-code-date × {runs}: p50 {:.3} ms, p95 {:.3} ms, mean {:.3} ms, {:.1} matches/query",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.95).as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
        matches as f64 / runs as f64
    );
    Ok(())
}
