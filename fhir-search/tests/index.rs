//! The index as a library: it resumes from the sequence number of its last commit, belongs to
//! one tenant incarnation, can be rebuilt to the same answers, and keeps its limits.

mod common;

use std::time::Duration;

use common::*;
use fhir_core::{ResourceId, TenantId};
use fhir_search::{Handling, IndexOptions, Scope, SearchError};
use serde_json::json;

fn quiet() -> IndexOptions {
    IndexOptions {
        background_interval: None,
        ..IndexOptions::default()
    }
}

#[test]
fn resumes_from_the_sequence_number_of_its_last_commit() {
    let e = env_with(quiet());
    for i in 0..5 {
        e.create(observation(
            "8867-4",
            "2024-03-01T10:00:00+01:00",
            &format!("{i}"),
        ));
    }
    assert_eq!(e.index.catch_up(&e.t).unwrap(), 5);
    let mut kept = String::new();
    let e = e.reopen(quiet(), |store, t| {
        // Written while no index is open.
        let later = create(
            store,
            t,
            observation("2708-6", "2024-03-01T10:00:00+01:00", "97"),
        );
        store
            .delete(
                t,
                rt("Observation"),
                &ResourceId::new(&later).unwrap(),
                None,
            )
            .unwrap();
        kept = create(
            store,
            t,
            observation("2708-6", "2024-03-01T10:00:00+01:00", "98"),
        );
    });
    let index = &e.index;
    assert_eq!(index.indexed_seq(&e.t).unwrap(), 5, "resumes, not rebuilt");
    let ty = rt("Observation");
    let req = index
        .parse(
            &e.t,
            &Scope::Type(ty),
            &[("code".into(), "2708-6".into())],
            Handling::Strict,
        )
        .unwrap();
    let r = index.search(&e.t, &req).unwrap();
    assert_eq!(ids(&r), [kept.as_str()]);
    assert_eq!(index.indexed_seq(&e.t).unwrap(), 8);
    let kept = ResourceId::new(&kept).unwrap();
    assert_eq!(
        index.indexed_version(&e.t, ty, &kept).unwrap().map(|v| v.0),
        Some(1)
    );
}

#[test]
fn an_index_belongs_to_one_tenant_incarnation() {
    let e = env_with(quiet());
    let old = e.create(observation("8867-4", "2024-03-01T10:00:00+01:00", "70"));
    e.create(observation("8867-4", "2024-03-01T10:00:00+01:00", "71"));
    assert_eq!(e.set("Observation", "code=8867-4").len(), 2);
    // Removed and created again behind the index's back: the new log starts at 1 again.
    e.store.remove_tenant(&e.t).unwrap();
    assert!(matches!(
        e.try_search(fhir_search::Scope::Type(rt("Observation")), "code=8867-4"),
        Err(SearchError::Store(fhir_store::StoreError::TenantNotFound(
            _
        )))
    ));
    e.store.create_tenant(&e.t, "again").unwrap();
    let fresh = e.create(observation("2708-6", "2024-03-01T10:00:00+01:00", "97"));
    assert_eq!(e.ids("Observation", ""), [fresh.as_str()]);
    assert!(!e.ids("Observation", &format!("_id={old}")).contains(&old));

    // An index folder of a tenant that no longer exists is deleted when the index opens.
    let other = TenantId::new("gone").unwrap();
    e.store.create_tenant(&other, "Gone").unwrap();
    e.create_in(&other, json!({"resourceType": "Patient", "gender": "male"}));
    e.index.catch_up(&other).unwrap();
    let dir = e.dir.path().join("index");
    assert!(dir.join("gone").is_dir());
    let e = e.reopen(quiet(), |store, _| {
        store.remove_tenant(&other).unwrap();
    });
    assert!(!dir.join("gone").exists());
    assert_eq!(e.ids("Observation", ""), [fresh]);
    assert!(dir.join("hf").is_dir());
}

#[test]
fn a_rebuild_gives_the_same_answers() {
    let e = env_with(quiet());
    let mut ids_ = Vec::new();
    for i in 0..30 {
        ids_.push(e.create(observation(
            if i % 3 == 0 { "8867-4" } else { "2708-6" },
            &format!("2024-03-{:02}T10:00:00+01:00", i % 28 + 1),
            &format!("{}", 60 + i),
        )));
    }
    for id in ids_.iter().step_by(4) {
        e.delete("Observation", id);
    }
    for id in ids_.iter().skip(1).step_by(5) {
        e.update(
            id,
            observation("29463-7", "2024-04-01T10:00:00+02:00", "80"),
        );
    }
    let queries = [
        "code=8867-4",
        "code=29463-7",
        "date=ge2024-03-15&_sort=-date",
        "value-quantity=lt75&_sort=value-quantity",
        "_sort=_id&_count=100",
    ];
    // Ties (and unsorted results) come in index order, which a rebuild changes: compare sets.
    let before: Vec<Vec<String>> = queries.iter().map(|q| e.set("Observation", q)).collect();
    let mut calls = 0;
    let mut last = (0, 0);
    e.index
        .rebuild(&e.t, &mut |done, total| {
            calls += 1;
            last = (done, total);
        })
        .unwrap();
    assert!(calls >= 2);
    assert_eq!(last.0, last.1);
    assert_eq!(last.1, e.store.last_seq(&e.t).unwrap());
    let after: Vec<Vec<String>> = queries.iter().map(|q| e.set("Observation", q)).collect();
    assert_eq!(before, after);
    // 8 deleted; one of them (#16) brought back by an update.
    assert_eq!(e.ids("Observation", "_count=100").len(), 30 - 8 + 1);
}

#[test]
fn limits_are_reported_not_silent() {
    let e = env_with(IndexOptions {
        max_include: 3,
        max_chain: 4,
        page_ttl: Duration::from_secs(2),
        ..quiet()
    });
    let patient = e.create(json!({"resourceType": "Patient", "name": [{"family": "Nordmann"}]}));
    for i in 0..6 {
        let mut o = observation("8867-4", "2024-03-01T10:00:00+01:00", &format!("{i}"));
        o["subject"] = json!({"reference": format!("Patient/{patient}")});
        e.create(o);
    }
    // Includes over the cap: the page says so.
    let r = e.search("Patient", "_revinclude=Observation:subject");
    let included = r
        .entries
        .iter()
        .filter(|x| x.mode == fhir_search::EntryMode::Include)
        .count();
    assert_eq!(included, 3);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.diagnostics.contains("left out")),
        "{:?}",
        r.warnings
    );
    // A chain that matches too much is refused.
    for i in 0..5 {
        e.create(json!({"resourceType": "Patient", "name": [{"family": format!("Nord{i}")}]}));
    }
    let err = e
        .try_search(Scope::Type(rt("Observation")), "subject:Patient.name=nord")
        .unwrap_err();
    assert!(matches!(err, SearchError::TooCostly(_)), "{err}");
    // Pages expire.
    let r = e.search("Observation", "_count=2");
    let token = r.page_token.clone().unwrap();
    assert!(e.index.page(&e.t, &token, 2).is_ok());
    std::thread::sleep(Duration::from_millis(2500));
    assert!(matches!(
        e.index.page(&e.t, &token, 2),
        Err(SearchError::PageExpired(_))
    ));
    // And a token is useless in another tenant.
    let other = TenantId::new("other").unwrap();
    e.store.create_tenant(&other, "Other").unwrap();
    let r = e.search("Observation", "_count=2");
    let token = r.page_token.unwrap();
    assert!(matches!(
        e.index.page(&other, &token, 2),
        Err(SearchError::PageExpired(_))
    ));
}

#[test]
fn custom_parameters_survive_a_restart_and_a_rebuild() {
    let e = env_with(quiet());
    let qr = |v: u32| {
        json!({"resourceType": "QuestionnaireResponse", "status": "completed",
               "item": [{"linkId": "pain", "answer": [{"valueInteger": v}]}]})
    };
    // Written before its parameter exists: found only after a reindex or rebuild.
    let early = e.create(qr(7));
    e.index.catch_up(&e.t).unwrap();
    e.create(json!({
        "resourceType": "SearchParameter",
        "url": "http://example.org/SearchParameter/pain", "name": "pain", "status": "active",
        "description": "pain score", "code": "pain", "base": ["QuestionnaireResponse"],
        "type": "number", "expression": "QuestionnaireResponse.item.where(linkId='pain').answer.value"
    }));
    let a = e.create(qr(2));
    let b = e.create(qr(8));
    assert_eq!(e.ids("QuestionnaireResponse", "pain=gt5"), [b.as_str()]);
    let e = e.reopen(quiet(), |_, _| {});
    let index = &e.index;
    let req = index
        .parse(
            &e.t,
            &Scope::Type(rt("QuestionnaireResponse")),
            &[("pain".into(), "lt5".into())],
            Handling::Strict,
        )
        .unwrap();
    assert_eq!(ids(&index.search(&e.t, &req).unwrap()), [a.as_str()]);
    // A rebuild indexes resources written before their parameter existed, too.
    let c = e.create(qr(9));
    let req = index
        .parse(
            &e.t,
            &Scope::Type(rt("QuestionnaireResponse")),
            &[("pain".into(), "ge7".into())],
            Handling::Strict,
        )
        .unwrap();
    assert_eq!(
        sorted(ids(&index.search(&e.t, &req).unwrap())),
        sorted(vec![b.clone(), c.clone()])
    );
    index.rebuild(&e.t, &mut |_, _| {}).unwrap();
    let req = index
        .parse(
            &e.t,
            &Scope::Type(rt("QuestionnaireResponse")),
            &[("pain".into(), "ge7".into())],
            Handling::Strict,
        )
        .unwrap();
    assert_eq!(
        sorted(ids(&index.search(&e.t, &req).unwrap())),
        sorted(vec![early, b, c])
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn an_index_ahead_of_a_restored_store_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let t = TenantId::new("hf").unwrap();
    let (store_dir, backup, index_dir) = (
        dir.path().join("store"),
        dir.path().join("backup"),
        dir.path().join("index"),
    );
    let mut kept = Vec::new();
    {
        let store = fhir_store::Store::open(&store_dir).unwrap();
        store.create_tenant(&t, "Helse Test").unwrap();
        for i in 0..2 {
            kept.push(create(
                &store,
                &t,
                observation("8867-4", "2024-03-01", &format!("{i}")),
            ));
        }
    }
    copy_dir(&store_dir, &backup);
    {
        let store = fhir_store::Store::open(&store_dir).unwrap();
        for i in 0..3 {
            create(
                &store,
                &t,
                observation("8867-4", "2024-03-01", &format!("{i}")),
            );
        }
        let index = fhir_search::SearchIndex::open_with(&index_dir, store, quiet()).unwrap();
        assert_eq!(index.catch_up(&t).unwrap(), 5);
    }
    // The store comes back from its backup; the index is newer than it.
    std::fs::remove_dir_all(&store_dir).unwrap();
    copy_dir(&backup, &store_dir);
    let store = fhir_store::Store::open(&store_dir).unwrap();
    let index = fhir_search::SearchIndex::open_with(&index_dir, store, quiet()).unwrap();
    assert_eq!(index.indexed_seq(&t).unwrap(), 0, "rebuilt, not trusted");
    let req = index
        .parse(&t, &Scope::Type(rt("Observation")), &[], Handling::Strict)
        .unwrap();
    assert_eq!(sorted(ids(&index.search(&t, &req).unwrap())), sorted(kept));
}
