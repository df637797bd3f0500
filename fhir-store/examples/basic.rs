//! A tour of the store: a tenant, an Observation created, updated and read, and its history.
//!
//! Run with `cargo run -p fhir-store --example basic` (add `--features sled` and pass `sled` as
//! the first argument to use the sled backend).

use fhir_core::{Resource, ResourceType, TenantId};
use fhir_store::{Backend, Condition, HistoryQuery, HistoryScope, ReadResult, Store, StoreOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let backend = match std::env::args().nth(1).as_deref() {
        #[cfg(feature = "sled")]
        Some("sled") => Backend::Sled,
        _ => Backend::Redb,
    };
    // A throwaway directory; a real server keeps its store in its data folder.
    let dir = tempfile::tempdir()?;
    let store = Store::open_with(
        dir.path(),
        StoreOptions {
            backend,
            ..StoreOptions::default()
        },
    )?;
    println!("opened a {backend:?} store in {}", dir.path().display());

    let tenant = TenantId::new("helse-bergen")?;
    let info = store.create_tenant(&tenant, "Helse Bergen HF")?;
    println!(
        "created tenant {} ({}) at {}",
        info.id, info.name, info.created
    );

    let pulse = |value: &str| {
        Resource::from_json_bytes(
            format!(
                r#"{{"resourceType":"Observation","status":"final",
                "identifier":[{{"system":"urn:example:phg","value":"reading-1"}}],
                "code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}],"text":"Heart rate"}},
                "valueQuantity":{{"value":{value},"unit":"/min"}}}}"#
            )
            .as_bytes(),
        )
    };

    // Conditional create: a retried upload of the same reading does not duplicate it.
    let cond = Condition::parse("identifier=urn%3Aexample%3Aphg%7Creading-1")?;
    let created = store.create(&tenant, pulse("72.50")?, Some(&cond))?;
    let retried = store.create(&tenant, pulse("72.50")?, Some(&cond))?;
    println!(
        "create: {:?} {} v{} (seq {:?}); retry: {:?}",
        created.kind, created.resource.id, created.resource.version, created.seq, retried.kind
    );

    let id = created.resource.id.clone();
    let updated = store.update(&tenant, &id, pulse("75")?, Some(created.resource.version))?;
    println!("update: {:?} v{}", updated.kind, updated.resource.version);

    let ty = ResourceType::parse("Observation").ok_or("no Observation type")?;
    if let ReadResult::Found(current) = store.read(&tenant, ty, &id)? {
        println!("read: {}", String::from_utf8_lossy(&current.json));
    }

    println!("history of Observation/{id}, newest first:");
    let page = store.history(
        &tenant,
        HistoryScope::Instance(ty, id.clone()),
        &HistoryQuery::default(),
    )?;
    for e in &page.entries {
        println!("  v{} {:?} at {}", e.version, e.method, e.last_updated);
    }

    println!("change log:");
    for change in store.changes(&tenant, 1)? {
        let c = change?;
        println!(
            "  #{} {:?} {}/{} v{}",
            c.seq, c.method, c.resource_type, c.id, c.version
        );
    }
    Ok(())
}
