//! Measures durable write throughput: N threads each creating Observations as fast as they can.
//! Shows what group commit buys: with more writers, more writes share one fsync.
//!
//! `cargo run -p fhir-store --example write_throughput -- [threads] [seconds] [redb|sled] [dir]`
//! (the directory defaults to a temporary one; use one on the disk you want to measure).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fhir_core::{Resource, TenantId};
use fhir_store::{Backend, Store, StoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seconds: u64 = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let backend = match args.get(3).map(String::as_str) {
        #[cfg(feature = "sled")]
        Some("sled") => Backend::Sled,
        Some("redb") | None => Backend::Redb,
        Some(other) => return Err(format!("unknown or disabled backend '{other}'").into()),
    };
    let tmp = tempfile::tempdir()?;
    let dir = args
        .get(4)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let store = Store::open_with(
        &dir,
        StoreOptions {
            backend,
            ..StoreOptions::default()
        },
    )?;
    let tenant = TenantId::new("bench")?;
    if store.tenant(&tenant)?.is_none() {
        store.create_tenant(&tenant, "Benchmark")?;
    }
    let body = br#"{"resourceType":"Observation","status":"final","identifier":[{"system":"urn:bench","value":"x"}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}],"text":"Heart rate"},"subject":{"reference":"Patient/p1"},"effectiveDateTime":"2026-11-23T03:22:46Z","valueQuantity":{"value":72.50,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}"#;
    let resource = Resource::from_json_bytes(body)?;

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (store, tenant, resource) = (store.clone(), tenant.clone(), resource.clone());
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || -> Result<(), fhir_store::StoreError> {
                while !stop.load(Ordering::Relaxed) {
                    store.create(&tenant, resource.clone(), None)?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| "writer thread panicked")??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{backend:?}, {threads} thread(s): {n} durable creates in {elapsed:.2} s = {:.0} writes/s",
        n as f64 / elapsed
    );
    Ok(())
}
