//! Measures durable ingestion throughput over HTTP against a real server on 127.0.0.1:
//!
//! (a) `batch` Bundles of 1,000 blood-pressure Observations, each entry with `ifNoneExist` on
//!     its identifier (the PHG path), posted one after another by one client;
//! (b) single `POST /Observation`s with `If-None-Exist` from 16 concurrent clients.
//!
//! Every acknowledged write is fsynced (redb `Durability::Immediate`, group commit). Run it in
//! release mode on the disk you care about:
//!
//! `cargo run --release -p fhir-server --example ingest_throughput -- [bundles] [singles] [dir]`
//!
//! (defaults: 20 bundles, 10,000 single POSTs, a temporary directory under the current one).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fhir_core::TenantId;
use fhir_server::{AppState, ServerConfig};
use fhir_store::Store;

const PHG: &str = "urn:oid:2.16.578.1.12.4.1.1.9999";
const BUNDLE_ENTRIES: usize = 1000;
const CLIENTS: usize = 16;

fn observation(id_value: &str, systolic: u32) -> String {
    format!(
        r#"{{"resourceType":"Observation","identifier":[{{"system":"{PHG}","value":"{id_value}"}}],"status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"85354-9","display":"Blood pressure panel with all children optional"}}]}},"subject":{{"identifier":{{"system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"13031353453"}}}},"effectiveDateTime":"2026-11-23T08:15:00+01:00","component":[{{"code":{{"coding":[{{"system":"http://loinc.org","code":"8480-6"}}]}},"valueQuantity":{{"value":{systolic}.0,"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}},{{"code":{{"coding":[{{"system":"http://loinc.org","code":"8462-4"}}]}},"valueQuantity":{{"value":84,"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}}]}}"#
    )
}

fn batch(b: usize) -> String {
    let entries: Vec<String> = (0..BUNDLE_ENTRIES)
        .map(|i| {
            let v = format!("bundle-{b}-{i}");
            format!(
                r#"{{"resource":{},"request":{{"method":"POST","url":"Observation","ifNoneExist":"identifier={PHG}|{v}"}}}}"#,
                observation(&v, 100 + (i % 60) as u32)
            )
        })
        .collect();
    format!(
        r#"{{"resourceType":"Bundle","type":"batch","entry":[{}]}}"#,
        entries.join(",")
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let bundles: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let singles: usize = args
        .get(2)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir_in(".")?;
    let dir = args
        .get(3)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());

    let store = Store::open(dir.join("store"))?;
    let tenant = TenantId::new("bench")?;
    if store.tenant(&tenant)?.is_none() {
        store.create_tenant(&tenant, "Benchmark")?;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let state = AppState::open(store.clone(), ServerConfig::default(), &dir.join("index"))?;
    tokio::spawn(async move { axum::serve(listener, fhir_server::app(state)).await });
    let base = format!("http://{addr}/fhir/bench");
    let client = reqwest::Client::new();
    println!(
        "{} cores; store in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );

    // (a) batch Bundles, prepared up front so that only the server is measured.
    let bodies: Vec<String> = (0..bundles).map(batch).collect();
    let start = Instant::now();
    for body in bodies {
        let r = client
            .post(&base)
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=minimal")
            .body(body)
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("batch failed: {} {}", r.status(), r.text().await?).into());
        }
        let text = r.text().await?;
        let created = text.matches("201 Created").count();
        if created != BUNDLE_ENTRIES {
            return Err(format!("only {created} of {BUNDLE_ENTRIES} created").into());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let n = bundles * BUNDLE_ENTRIES;
    println!(
        "(a) {bundles} batch Bundles x {BUNDLE_ENTRIES} Observations (ifNoneExist): {n} resources in {secs:.2} s = {:.0} resources/s ({:.0} ms per Bundle)",
        n as f64 / secs,
        secs * 1000.0 / bundles as f64
    );

    // (b) single POSTs from 16 concurrent clients.
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, base, next) = (client.clone(), base.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= singles {
                        return Ok::<(), String>(());
                    }
                    let v = format!("single-{i}");
                    let r = client
                        .post(format!("{base}/Observation"))
                        .header("content-type", "application/fhir+json")
                        .header("prefer", "return=minimal")
                        .header("if-none-exist", format!("identifier={PHG}|{v}"))
                        .body(observation(&v, 120))
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if r.status() != reqwest::StatusCode::CREATED {
                        return Err(format!("single POST: {}", r.status()));
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "(b) {singles} single POSTs (If-None-Exist) from {CLIENTS} clients: {:.0} resources/s",
        singles as f64 / secs
    );
    Ok(())
}
