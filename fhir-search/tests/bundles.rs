//! `batch`/`transaction` Bundles with full search criteria: [`fhir_search::BundleResolver`]
//! under [`fhir_store::bundle::process`], and its locks.

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use fhir_core::{Json, Resource, json};
use fhir_search::{Handling, SearchIndex};
use fhir_store::bundle::{BundleBuilder, BundleOptions, process};
use fhir_store::{Store, WriteKind};
use serde_json::json as j;

const PHG: &str = "urn:oid:2.16.578.1.12.4.1.1.9999";

fn opts(index: &SearchIndex, handling: Handling) -> BundleOptions {
    BundleOptions {
        base_url: "http://fhir.example.no/fhir/hf".into(),
        resolver: Some(Arc::new(index.bundle_resolver(handling))),
        ..BundleOptions::default()
    }
}

fn statuses(b: &BundleBuilder) -> Vec<String> {
    b.entries
        .iter()
        .map(|e| e.response.as_ref().unwrap().status.clone())
        .collect()
}

fn bundle(v: serde_json::Value) -> Json {
    json::parse(v.to_string().as_bytes()).unwrap()
}

fn pulse(id_value: &str, patient: &str, value: u32) -> serde_json::Value {
    j!({"resourceType": "Observation", "status": "final",
        "identifier": [{"system": PHG, "value": id_value}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": patient},
        "effectiveDateTime": "2024-03-01T10:00:00Z",
        "valueQuantity": {"value": value, "unit": "/min"}})
}

#[test]
fn conditional_entries_and_searches_take_full_criteria() {
    let e = env();
    let p = e.create(
        j!({"resourceType": "Patient", "name": [{"family": "Nordmann"}],
        "birthDate": "1970-01-01"}),
    );
    let o = opts(&e.index, Handling::Lenient);
    let criteria = format!("identifier={PHG}|m-1&subject=Patient/{p}");
    let tx = bundle(
        j!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": pulse("m-1", &format!("Patient/{p}"), 72),
             "request": {"method": "POST", "url": "Observation", "ifNoneExist": criteria}},
            {"resource": pulse("m-2", "Patient?family=Nordmann&birthdate=1970-01-01", 80),
             "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "GET",
                         "url": format!("Observation?subject=Patient/{p}&code=8867-4&_count=1&_sort=-value-quantity&bogus=1")}}
        ]}),
    );
    let resp = process(&e.store, &e.t, tx.clone(), &o).unwrap();
    assert_eq!(statuses(&resp), ["201 Created", "201 Created", "200 OK"]);
    // The conditional reference on name and birth date was resolved.
    let second = json::parse(resp.entries[1].resource.as_ref().unwrap()).unwrap();
    assert_eq!(
        second
            .get("subject")
            .unwrap()
            .get("reference")
            .unwrap()
            .as_str(),
        Some(format!("Patient/{p}").as_str())
    );
    // The GET is a full search after the writes: total, sort, paging, ignored parameters.
    let set = json::parse(resp.entries[2].resource.as_ref().unwrap()).unwrap();
    assert_eq!(set.get("type").unwrap().as_str(), Some("searchset"));
    assert_eq!(set.get("total"), Some(&Json::Number("2".into())));
    let entries = set.get("entry").unwrap().as_array().unwrap();
    assert_eq!(
        entries[0]
            .get("resource")
            .unwrap()
            .get("valueQuantity")
            .unwrap()
            .get("value"),
        Some(&Json::Number("80".into()))
    );
    let outcome = entries.last().unwrap().to_string();
    assert!(
        outcome.contains(r#""mode":"outcome""#) && outcome.contains("bogus"),
        "{outcome}"
    );
    let links = set.get("link").unwrap().to_string();
    assert!(
        links.contains("http://fhir.example.no/fhir/hf?_getpages="),
        "{links}"
    );

    // Sent again: the measurement with the same criteria is found, not created.
    let resp = process(&e.store, &e.t, tx, &o).unwrap();
    assert_eq!(statuses(&resp), ["200 OK", "201 Created", "200 OK"]);
    assert_eq!(
        e.index
            .find(&e.t, rt("Observation"), &criteria)
            .unwrap()
            .len(),
        1
    );

    // Strict handling refuses the unknown parameter of the GET: a batch answers that entry.
    let strict = opts(&e.index, Handling::Strict);
    let batch = bundle(j!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": "Observation?bogus=1"}},
        {"request": {"method": "GET", "url": "Observation?date=notadate"}},
        {"request": {"method": "GET", "url": format!("Observation?subject=Patient/{p}&_summary=count")}}
    ]}));
    let resp = process(&e.store, &e.t, batch, &strict).unwrap();
    assert_eq!(
        statuses(&resp),
        ["400 Bad Request", "400 Bad Request", "200 OK"]
    );
    let text = String::from_utf8(resp.to_compact_json()).unwrap();
    assert!(
        text.contains("Bundle.entry[0] (GET Observation?bogus=1)"),
        "{text}"
    );
    // ... and the whole transaction, before anything is written.
    let before = e.store.last_seq(&e.t).unwrap();
    let tx = bundle(
        j!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Observation?date=notadate"}}
        ]}),
    );
    let err = process(&e.store, &e.t, tx, &o).unwrap_err();
    assert_eq!(err.status, 400);
    assert_eq!(
        err.issues[0].expression.as_deref(),
        Some("Bundle.entry[1].request.url")
    );
    assert_eq!(e.store.last_seq(&e.t).unwrap(), before);
}

#[test]
fn criteria_locks_serialise_bundles_with_single_conditional_operations() {
    let e = env();
    let patient = rt("Patient");
    let held = e
        .index
        .lock_criteria(&e.t, &[(patient, "name=Ola&birthdate=1970-01-01".into())]);
    // The same criteria in another order, through the REST-style conditional create.
    let (tx, rx) = mpsc::channel();
    let (index, store, t) = (e.index.clone(), e.store.clone(), e.t.clone());
    let worker = std::thread::spawn(move || {
        let r = Resource::from_json_bytes(
            br#"{"resourceType":"Patient","name":[{"given":["Ola"]}],"birthDate":"1970-01-01"}"#,
        )
        .unwrap();
        let w = index
            .conditional_create(&store, &t, r, "birthdate=1970-01-01&name=Ola")
            .unwrap();
        tx.send(w.kind).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "the conditional create must wait for the lock"
    );
    drop(held);
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        WriteKind::Created
    );
    worker.join().unwrap();
    // Several criteria at once, in any order, are taken without deadlocking each other.
    let a = (patient, "name=a".to_string());
    let b = (rt("Observation"), "code=b".to_string());
    let (ab, ba) = ([a.clone(), b.clone()], [b, a]);
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = [ab.to_vec(), ba.to_vec()]
        .into_iter()
        .map(|criteria| {
            let (index, t, barrier) = (e.index.clone(), e.t.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for _ in 0..200 {
                    let _g = index.lock_criteria(&t, &criteria);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Eight clients send the same batch at once; its entries' `ifNoneExist` criteria are not
/// identifier-only, so they are searched: each measurement must still be stored once.
#[test]
fn identical_concurrent_batches_on_full_criteria_store_each_measurement_once() {
    let e = env();
    let p = e.create(j!({"resourceType": "Patient", "name": [{"family": "Nordmann"}]}));
    let n = 12;
    let entries: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            j!({"resource": pulse(&format!("c-{i}"), &format!("Patient/{p}"), 60 + i),
                "request": {"method": "POST", "url": "Observation",
                            "ifNoneExist": format!("identifier={PHG}|c-{i}&patient={p}&code=8867-4")}})
        })
        .collect();
    let batch = bundle(j!({"resourceType": "Bundle", "type": "batch", "entry": entries}));
    let clients = 8;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (store, index, t, batch, barrier): (Store, SearchIndex, _, _, _) = (
                e.store.clone(),
                e.index.clone(),
                e.t.clone(),
                batch.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                barrier.wait();
                process(&store, &t, batch, &opts(&index, Handling::Lenient)).unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for h in handles {
        for s in statuses(&h.join().unwrap()) {
            match s.as_str() {
                "201 Created" => created += 1,
                "200 OK" => {}
                other => panic!("{other}"),
            }
        }
    }
    assert_eq!(created, n);
    // The Patient and one create per measurement.
    assert_eq!(e.store.last_seq(&e.t).unwrap(), 1 + n as u64);
    for i in 0..n {
        assert_eq!(
            e.index
                .find(&e.t, rt("Observation"), &format!("identifier={PHG}|c-{i}"))
                .unwrap()
                .len(),
            1
        );
    }
}
