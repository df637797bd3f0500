//! Batch, FHIR transaction and patch semantics of the store, and the library Bundle processor,
//! on both backends.

#[macro_use]
mod common;

use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use fhir_core::patch::PatchError;
use fhir_core::{Json, Resource, ResourceId, VersionId, json};
use fhir_store::bundle::{BundleOptions, process};
use fhir_store::{
    Backend, Condition, HistoryQuery, HistoryScope, IfNoneMatch, ReadResult, StoreError, TxEntry,
    WriteKind, WriteOp, WriteOutcome, WriteResult,
};

backend_tests!(
    batch_entries_are_independent_but_share_one_commit,
    batch_with_unknown_tenant_fails_as_a_whole,
    transaction_entries_follow_the_spec_order,
    transaction_rewrites_placeholders_and_conditional_references,
    transaction_failure_names_the_entry_and_writes_nothing,
    transaction_conditional_reference_must_match_exactly_one,
    duplicate_conditional_creates_in_one_transaction_are_one_resource,
    patch_applies_to_the_current_version,
    patch_errors,
    concurrent_patches_serialize,
    if_none_match_star_creates_only_if_absent,
    bundle_process_library_call,
    concurrent_identical_batches_create_each_resource_once,
);

fn r(src: &str) -> Resource {
    Resource::from_json_bytes(src.as_bytes()).unwrap()
}

fn written(o: &WriteOutcome) -> &WriteResult {
    match o {
        WriteOutcome::Write(w) => w,
        other => panic!("expected a write, got {other:?}"),
    }
}

fn stored_json(
    store: &fhir_store::Store,
    t: &fhir_core::TenantId,
    ty: &str,
    id: &ResourceId,
) -> Json {
    json::parse(&found(store.read(t, common::ty(ty), id).unwrap()).json).unwrap()
}

fn reference(v: &Json, path: &[&str]) -> String {
    let mut cur = v;
    for p in path {
        cur = match p.parse::<usize>() {
            Ok(i) => &cur.as_array().unwrap()[i],
            Err(_) => cur.get(p).unwrap_or_else(|| panic!("no {p} in {cur}")),
        };
    }
    cur.as_str().unwrap().to_string()
}

fn batch_entries_are_independent_but_share_one_commit(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let existing = store
        .create(&t, patient(None, "1", "A"), None)
        .unwrap()
        .resource
        .id;
    let results = store
        .batch(
            &t,
            vec![
                WriteOp::Create {
                    resource: obs(Some("urn:phg"), "b-1", "70"),
                    if_none_exist: Some(Condition::identifier(Some("urn:phg"), "b-1")),
                },
                // Fails: wrong version. Must not block the others.
                WriteOp::Update {
                    id: existing.clone(),
                    resource: patient(None, "1", "B"),
                    if_match: Some(VersionId(7)),
                },
                // A second create with the same condition sees the first one.
                WriteOp::Create {
                    resource: obs(Some("urn:phg"), "b-1", "70"),
                    if_none_exist: Some(Condition::identifier(Some("urn:phg"), "b-1")),
                },
                WriteOp::Delete {
                    ty: patient_type(),
                    id: existing.clone(),
                    if_match: Some(VersionId(1)),
                },
            ],
        )
        .unwrap();
    assert_eq!(results.len(), 4);
    let first = written(results[0].as_ref().unwrap());
    assert_eq!(first.kind, WriteKind::Created);
    assert!(matches!(
        results[1],
        Err(StoreError::VersionConflict {
            expected: VersionId(7),
            actual: Some(VersionId(1))
        })
    ));
    let third = written(results[2].as_ref().unwrap());
    assert_eq!(third.kind, WriteKind::Existing);
    assert_eq!(third.resource.id, first.resource.id);
    match results[3].as_ref().unwrap() {
        WriteOutcome::Delete(d) => assert_eq!(d.version, Some(VersionId(2))),
        other => panic!("{other:?}"),
    }
    // Two changes written (create, delete), with consecutive sequence numbers after the setup.
    let seqs: Vec<u64> = store
        .changes(&t, 1)
        .unwrap()
        .map(|c| c.unwrap().seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(matches!(
        store.read(&t, patient_type(), &existing).unwrap(),
        ReadResult::Deleted { .. }
    ));
}

fn batch_with_unknown_tenant_fails_as_a_whole(backend: Backend) {
    let (_dir, store, _t) = setup(backend);
    let err = store
        .batch(
            &tenant("nobody"),
            vec![WriteOp::Create {
                resource: plain_obs("1"),
                if_none_exist: None,
            }],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::TenantNotFound(_)), "{err}");
}

fn transaction_entries_follow_the_spec_order(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let old = store
        .create(&t, patient(None, "42", "Old"), None)
        .unwrap()
        .resource
        .id;
    let kept = store
        .update(
            &t,
            &ResourceId::new("kept").unwrap(),
            patient(Some("kept"), "7", "K"),
            None,
        )
        .unwrap();
    assert_eq!(kept.resource.version, VersionId(1));
    // In request order the conditional create would find `old`; the spec processes the DELETE
    // first, so it creates a new Patient. The PUT comes before the POST in the request but is
    // applied after it.
    let out = store
        .transaction_entries(
            &t,
            vec![
                TxEntry::new(WriteOp::Update {
                    id: ResourceId::new("kept").unwrap(),
                    resource: patient(Some("kept"), "7", "K2"),
                    if_match: Some(VersionId(1)),
                }),
                TxEntry::new(WriteOp::Create {
                    resource: patient(None, "42", "New"),
                    if_none_exist: Some(Condition::identifier(Some(FNR_SYSTEM), "42")),
                }),
                TxEntry::new(WriteOp::Delete {
                    ty: patient_type(),
                    id: old.clone(),
                    if_match: None,
                }),
            ],
        )
        .unwrap();
    assert_eq!(written(&out[0]).kind, WriteKind::Updated);
    let created = written(&out[1]);
    assert_eq!(created.kind, WriteKind::Created);
    assert_ne!(created.resource.id, old);
    match &out[2] {
        WriteOutcome::Delete(d) => assert_eq!(d.version, Some(VersionId(2))),
        other => panic!("{other:?}"),
    }
    // Changes in processing order: delete, create, update — contiguous, one lastUpdated.
    let changes: Vec<_> = store.changes(&t, 3).unwrap().map(Result::unwrap).collect();
    let got: Vec<_> = changes
        .iter()
        .map(|c| (c.seq, c.method, c.id.clone()))
        .collect();
    use fhir_store::Method::*;
    assert_eq!(
        got,
        vec![
            (3, Delete, old.clone()),
            (4, Create, created.resource.id.clone()),
            (5, Update, ResourceId::new("kept").unwrap()),
        ]
    );
    assert!(
        changes
            .iter()
            .all(|c| c.last_updated == changes[0].last_updated)
    );
}

fn transaction_rewrites_placeholders_and_conditional_references(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let gp = store
        .create(&t, patient(None, "999", "GP"), None)
        .unwrap()
        .resource
        .id;
    let p_url = "urn:uuid:8c5c2f4e-2c1a-4f0e-9c1e-111111111111";
    let e_url = "urn:oid:1.2.3.4.5";
    let cp_url = "http://example.org/fhir/CarePlan/client-side-1";
    let observation = r(&format!(
        r##"{{"resourceType":"Observation","status":"final","code":{{"text":"bp"}},
        "subject":{{"reference":"{p_url}"}},"encounter":{{"reference":"{e_url}"}},
        "basedOn":[{{"reference":"{cp_url}"}}],
        "performer":[{{"reference":"Patient?identifier={FNR_SYSTEM}|999"}}],
        "extension":[{{"url":"http://example.org/ext/careplan","valueReference":{{"reference":"{cp_url}"}}}}]}}"##
    ));
    let careplan = r(&format!(
        r##"{{"resourceType":"CarePlan","status":"active","intent":"plan",
        "contained":[{{"resourceType":"Goal","id":"g1","lifecycleStatus":"active",
            "description":{{"text":"BP below 140/90"}},"subject":{{"reference":"{p_url}"}}}}],
        "subject":{{"reference":"{p_url}"}},"encounter":{{"reference":"{e_url}"}},
        "goal":[{{"reference":"#g1"}}]}}"##
    ));
    let encounter = r(&format!(
        r#"{{"resourceType":"Encounter","status":"planned","class":{{"code":"VR"}},
        "subject":{{"reference":"{p_url}"}}}}"#
    ));
    let out = store
        .transaction_entries(
            &t,
            vec![
                TxEntry::new(WriteOp::Create {
                    resource: observation,
                    if_none_exist: None,
                }),
                TxEntry::with_full_url(
                    cp_url,
                    WriteOp::Create {
                        resource: careplan,
                        if_none_exist: None,
                    },
                ),
                TxEntry::with_full_url(
                    e_url,
                    WriteOp::Create {
                        resource: encounter,
                        if_none_exist: None,
                    },
                ),
                TxEntry::with_full_url(
                    p_url,
                    WriteOp::Create {
                        resource: patient(None, "123", "Nordmann"),
                        if_none_exist: None,
                    },
                ),
            ],
        )
        .unwrap();
    let id = |i: usize| written(&out[i]).resource.id.clone();
    let (o, cp, e, p) = (id(0), id(1), id(2), id(3));
    let obs_json = stored_json(&store, &t, "Observation", &o);
    assert_eq!(
        reference(&obs_json, &["subject", "reference"]),
        format!("Patient/{p}")
    );
    assert_eq!(
        reference(&obs_json, &["encounter", "reference"]),
        format!("Encounter/{e}")
    );
    assert_eq!(
        reference(&obs_json, &["basedOn", "0", "reference"]),
        format!("CarePlan/{cp}")
    );
    assert_eq!(
        reference(&obs_json, &["performer", "0", "reference"]),
        format!("Patient/{gp}")
    );
    assert_eq!(
        reference(
            &obs_json,
            &["extension", "0", "valueReference", "reference"]
        ),
        format!("CarePlan/{cp}")
    );
    let cp_json = stored_json(&store, &t, "CarePlan", &cp);
    assert_eq!(
        reference(&cp_json, &["contained", "0", "subject", "reference"]),
        format!("Patient/{p}")
    );
    assert_eq!(reference(&cp_json, &["goal", "0", "reference"]), "#g1");
    assert_eq!(
        reference(&cp_json, &["encounter", "reference"]),
        format!("Encounter/{e}")
    );
    let e_json = stored_json(&store, &t, "Encounter", &e);
    assert_eq!(
        reference(&e_json, &["subject", "reference"]),
        format!("Patient/{p}")
    );
}

fn transaction_failure_names_the_entry_and_writes_nothing(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let existing = store
        .create(&t, patient(None, "1", "A"), None)
        .unwrap()
        .resource
        .id;
    let before = store.last_seq(&t).unwrap();
    let err = store
        .transaction_entries(
            &t,
            vec![
                TxEntry::with_full_url(
                    "urn:uuid:a",
                    WriteOp::Create {
                        resource: patient(None, "new", "B"),
                        if_none_exist: None,
                    },
                ),
                TxEntry::new(WriteOp::Delete {
                    ty: patient_type(),
                    id: existing.clone(),
                    if_match: None,
                }),
                TxEntry::new(WriteOp::Update {
                    id: ResourceId::new("x").unwrap(),
                    resource: patient(Some("x"), "x", "X"),
                    if_match: Some(VersionId(3)),
                }),
            ],
        )
        .unwrap_err();
    match &err {
        StoreError::TransactionFailed { index, source } => {
            assert_eq!(*index, 2);
            assert!(
                matches!(**source, StoreError::VersionConflict { .. }),
                "{source}"
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(err.http_status(), 412);
    assert_eq!(store.last_seq(&t).unwrap(), before);
    assert_eq!(
        found(store.read(&t, patient_type(), &existing).unwrap()).version,
        VersionId(1)
    );
    assert!(
        store
            .find(&t, patient_type(), &Condition::identifier(None, "new"))
            .unwrap()
            .is_empty()
    );

    // A placeholder no entry declares.
    let err = store
        .transaction_entries(
            &t,
            vec![TxEntry::new(WriteOp::Create {
                resource: r(
                    r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
                    "subject":{"reference":"urn:uuid:nowhere"}}"#,
                ),
                if_none_exist: None,
            })],
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 0, source }
            if matches!(**source, StoreError::UnresolvedReference { count: 0, .. })),
        "{err}"
    );
    // Two entries with one fullUrl.
    let err = store
        .transaction_entries(
            &t,
            vec![
                TxEntry::with_full_url(
                    "urn:uuid:same",
                    WriteOp::Create {
                        resource: plain_obs("1"),
                        if_none_exist: None,
                    },
                ),
                TxEntry::with_full_url(
                    "urn:uuid:same",
                    WriteOp::Create {
                        resource: plain_obs("2"),
                        if_none_exist: None,
                    },
                ),
            ],
        )
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 1, .. }),
        "{err}"
    );
    assert_eq!(store.last_seq(&t).unwrap(), before);
}

fn transaction_conditional_reference_must_match_exactly_one(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    store.create(&t, patient(None, "twin", "A"), None).unwrap();
    store.create(&t, patient(None, "twin", "B"), None).unwrap();
    let obs_to = |q: &str| {
        TxEntry::new(WriteOp::Create {
            resource: r(&format!(
                r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},
                "subject":{{"reference":"Patient?{q}"}}}}"#
            )),
            if_none_exist: None,
        })
    };
    let err = store
        .transaction_entries(&t, vec![obs_to("identifier=nobody")])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 0, source }
            if matches!(**source, StoreError::UnresolvedReference { count: 0, .. })),
        "{err}"
    );
    assert_eq!(err.http_status(), 400);
    let err = store
        .transaction_entries(&t, vec![obs_to("identifier=twin")])
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 0, source }
            if matches!(**source, StoreError::UnresolvedReference { count: 2, .. })),
        "{err}"
    );
    assert_eq!(err.http_status(), 412);
    // A conditional reference to a Patient created by the same transaction.
    let out = store
        .transaction_entries(
            &t,
            vec![
                obs_to("identifier=urn:oid:2.16.578.1.12.4.1.4.1|13031353453"),
                TxEntry::new(WriteOp::Create {
                    resource: patient(None, "13031353453", "New"),
                    if_none_exist: None,
                }),
            ],
        )
        .unwrap();
    let p = &written(&out[1]).resource.id;
    let o = stored_json(&store, &t, "Observation", &written(&out[0]).resource.id);
    assert_eq!(
        reference(&o, &["subject", "reference"]),
        format!("Patient/{p}")
    );
    assert_eq!(store.last_seq(&t).unwrap(), 4);
}

fn duplicate_conditional_creates_in_one_transaction_are_one_resource(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let cond = Condition::identifier(Some("urn:phg"), "dup");
    let entry = |url: &str| {
        TxEntry::with_full_url(
            url,
            WriteOp::Create {
                resource: obs(Some("urn:phg"), "dup", "1"),
                if_none_exist: Some(cond.clone()),
            },
        )
    };
    let out = store
        .transaction_entries(&t, vec![entry("urn:uuid:1"), entry("urn:uuid:2")])
        .unwrap();
    assert_eq!(written(&out[0]).kind, WriteKind::Created);
    assert_eq!(written(&out[1]).kind, WriteKind::Existing);
    assert_eq!(written(&out[0]).resource.id, written(&out[1]).resource.id);
    assert_eq!(store.find(&t, obs_type(), &cond).unwrap().len(), 1);
}

fn patch_json(s: &str) -> Json {
    json::parse(s.as_bytes()).unwrap()
}

fn patch_applies_to_the_current_version(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = store
        .create(&t, obs(Some("urn:phg"), "p-1", "72.50"), None)
        .unwrap()
        .resource
        .id;
    let w = store
        .patch(
            &t,
            obs_type(),
            &id,
            patch_json(
                r#"[{"op":"test","path":"/status","value":"final"},
                {"op":"replace","path":"/status","value":"amended"},
                {"op":"add","path":"/identifier/-","value":{"system":"urn:other","value":"o-1"}}]"#,
            ),
            Some(VersionId(1)),
        )
        .unwrap();
    assert_eq!(w.kind, WriteKind::Updated);
    assert_eq!(w.resource.version, VersionId(2));
    let text = text(&w.resource.json);
    assert!(text.contains(r#""status":"amended""#), "{text}");
    assert!(text.contains("72.50"), "decimals survive a patch: {text}");
    assert!(text.contains(r#""versionId":"2""#), "{text}");
    // The identifier index follows the patch.
    assert_eq!(
        store
            .find(
                &t,
                obs_type(),
                &Condition::identifier(Some("urn:other"), "o-1")
            )
            .unwrap(),
        vec![id.clone()]
    );
    // Inside a transaction too.
    let out = store
        .transaction_entries(
            &t,
            vec![TxEntry::new(WriteOp::Patch {
                ty: obs_type(),
                id: id.clone(),
                patch: patch_json(r#"[{"op":"remove","path":"/valueQuantity"}]"#),
                if_match: Some(VersionId(2)),
            })],
        )
        .unwrap();
    assert_eq!(written(&out[0]).resource.version, VersionId(3));
    assert!(!text_of(&store, &t, &id).contains("valueQuantity"));
}

fn text_of(store: &fhir_store::Store, t: &fhir_core::TenantId, id: &ResourceId) -> String {
    text(&found(store.read(t, obs_type(), id).unwrap()).json)
}

fn patch_errors(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = store.create(&t, plain_obs("1"), None).unwrap().resource.id;
    let p = |s: &str, m: Option<VersionId>| store.patch(&t, obs_type(), &id, patch_json(s), m);
    let e = p(
        r#"[{"op":"replace","path":"/status","value":"final"}]"#,
        Some(VersionId(9)),
    )
    .unwrap_err();
    assert!(matches!(e, StoreError::VersionConflict { .. }), "{e}");
    let e = p(r#"{"op":"replace"}"#, None).unwrap_err();
    assert!(
        matches!(e, StoreError::InvalidPatch(PatchError::NotAPatch(_))),
        "{e}"
    );
    assert_eq!(e.http_status(), 400);
    let e = p(r#"[{"op":"test","path":"/status","value":"draft"}]"#, None).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidPatch(PatchError::TestFailed { index: 0, .. })
        ),
        "{e}"
    );
    assert_eq!(e.http_status(), 422);
    let e = p(
        r#"[{"op":"replace","path":"/status","value":"nonsense"}]"#,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, StoreError::InvalidPatch(PatchError::InvalidResult(_))),
        "{e}"
    );
    let e = p(r#"[{"op":"replace","path":"/id","value":"other"}]"#, None).unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::InvalidPatch(PatchError::ChangesIdentity("id"))
        ),
        "{e}"
    );
    let missing = ResourceId::new("missing").unwrap();
    let e = store
        .patch(&t, obs_type(), &missing, patch_json("[]"), None)
        .unwrap_err();
    assert!(
        matches!(e, StoreError::NotFound { deleted: false, .. }),
        "{e}"
    );
    store.delete(&t, obs_type(), &id, None).unwrap();
    let e = p("[]", None).unwrap_err();
    assert!(
        matches!(e, StoreError::NotFound { deleted: true, .. }),
        "{e}"
    );
    assert_eq!(e.http_status(), 410);
    // Nothing but the create and the delete was written.
    assert_eq!(store.last_seq(&t).unwrap(), 2);
}

fn concurrent_patches_serialize(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = store
        .create(
            &t,
            r(r#"{"resourceType":"Basic","code":{"text":"counter"},"identifier":[{"value":"start"}]}"#),
            None,
        )
        .unwrap()
        .resource
        .id;
    let (threads, per) = (8, 10);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (store, t, id, barrier) = (store.clone(), t.clone(), id.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                for j in 0..per {
                    // Appending to an array: a lost update would lose an item.
                    let p = format!(
                        r#"[{{"op":"add","path":"/identifier/-","value":{{"value":"t{i}-{j}"}}}}]"#
                    );
                    store
                        .patch(&t, ty("Basic"), &id, patch_json(&p), None)
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let current = found(store.read(&t, ty("Basic"), &id).unwrap());
    let v = json::parse(&current.json).unwrap();
    let items = v.get("identifier").unwrap().as_array().unwrap().len();
    assert_eq!(items, 1 + threads * per, "no patch lost");
    assert_eq!(current.version.0 as usize, 1 + threads * per);
    let hist = store
        .history(
            &t,
            HistoryScope::Instance(ty("Basic"), id),
            &HistoryQuery::default(),
        )
        .unwrap();
    assert_eq!(hist.entries.len(), 1 + threads * per);
}

fn if_none_match_star_creates_only_if_absent(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = ResourceId::new("once").unwrap();
    let op = || WriteOp::UpdateIfNoneMatch {
        id: id.clone(),
        resource: patient(Some("once"), "1", "A"),
        if_none_match: IfNoneMatch::Any,
    };
    let out = store
        .transaction_entries(&t, vec![TxEntry::new(op())])
        .unwrap();
    assert_eq!(written(&out[0]).kind, WriteKind::Created);
    let err = store
        .transaction_entries(&t, vec![TxEntry::new(op())])
        .unwrap_err();
    assert_eq!(err.http_status(), 412);
    let r = store.batch(&t, vec![op()]).unwrap();
    assert!(matches!(
        r[0],
        Err(StoreError::IfNoneMatch {
            current: VersionId(1)
        })
    ));
    // Only if the current version is not 1.
    let r = store
        .batch(
            &t,
            vec![WriteOp::UpdateIfNoneMatch {
                id: id.clone(),
                resource: patient(Some("once"), "1", "B"),
                if_none_match: IfNoneMatch::Version(VersionId(3)),
            }],
        )
        .unwrap();
    assert_eq!(
        written(r[0].as_ref().unwrap()).resource.version,
        VersionId(2)
    );
}

fn bundle_process_library_call(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let opts = BundleOptions {
        base_url: "http://fhir.example.no/fhir/hf-a".into(),
        ..BundleOptions::default()
    };
    let bundle = json::parse(
        br#"{"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"pulse"},
            "identifier":[{"system":"urn:phg","value":"m1"}],"valueQuantity":{"value":72.50}},
         "request":{"method":"POST","url":"Observation","ifNoneExist":"identifier=urn:phg|m1"}},
        {"resource":{"resourceType":"Observation","status":"bogus","code":{"text":"pulse"}},
         "request":{"method":"POST","url":"Observation"}},
        {"request":{"method":"GET","url":"http://fhir.example.no/fhir/hf-a/Observation?identifier=urn:phg|m1"}},
        {"request":{"method":"GET","url":"Patient/nobody"}}]}"#,
    )
    .unwrap();
    let resp = process(&store, &t, bundle.clone(), &opts).unwrap();
    assert_eq!(resp.bundle_type, "batch-response");
    let statuses: Vec<_> = resp
        .entries
        .iter()
        .map(|e| e.response.as_ref().unwrap().status.as_str())
        .collect();
    assert_eq!(
        statuses,
        ["201 Created", "400 Bad Request", "200 OK", "404 Not Found"]
    );
    let tree = resp.to_tree().unwrap();
    let entries = tree.get("entry").unwrap().as_array().unwrap();
    let outcome = entries[1].get("response").unwrap().get("outcome").unwrap();
    assert!(
        outcome
            .to_string()
            .contains("Bundle.entry[1].resource.status"),
        "{outcome}"
    );
    let found = entries[2].get("resource").unwrap();
    assert_eq!(found.get("total"), Some(&Json::Number("1".into())));
    let text = String::from_utf8(resp.to_compact_json()).unwrap();
    assert!(text.contains(r#""value":72.50"#), "{text}");
    // Retried: nothing new.
    let resp = process(&store, &t, bundle, &opts).unwrap();
    assert_eq!(resp.entries[0].response.as_ref().unwrap().status, "200 OK");
    assert_eq!(store.last_seq(&t).unwrap(), 1);

    // A transaction with a bad entry is refused as a whole, naming the entry.
    let tx = json::parse(
        br#"{"resourceType":"Bundle","type":"transaction","entry":[
        {"resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Patient","birthDate":"1970-13-01"},"request":{"method":"POST","url":"Patient"}}]}"#,
    )
    .unwrap();
    let err = process(&store, &t, tx, &opts).unwrap_err();
    assert_eq!(err.status, 400);
    assert_eq!(
        err.issues[0].expression.as_deref(),
        Some("Bundle.entry[1].resource.birthDate")
    );
    assert_eq!(store.last_seq(&t).unwrap(), 1);
    // Limits.
    let small = BundleOptions {
        max_entries: 1,
        ..opts.clone()
    };
    let two = json::parse(
        br#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"GET","url":"Patient/a"}},{"request":{"method":"GET","url":"Patient/b"}}]}"#,
    )
    .unwrap();
    assert_eq!(process(&store, &t, two, &small).unwrap_err().status, 413);
}

fn concurrent_identical_batches_create_each_resource_once(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let n = 40;
    let ops = move || -> Vec<WriteOp> {
        (0..n)
            .map(|i| {
                let v = format!("m-{i}");
                WriteOp::Create {
                    resource: obs(Some("urn:phg"), &v, "70"),
                    if_none_exist: Some(Condition::identifier(Some("urn:phg"), &v)),
                }
            })
            .collect()
    };
    let clients = 8;
    let barrier = Arc::new(Barrier::new(clients));
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (store, t, barrier) = (store.clone(), t.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                store.batch(&t, ops()).unwrap()
            })
        })
        .collect();
    let mut created = 0;
    for h in handles {
        for r in h.join().unwrap() {
            match written(&r.unwrap()).kind {
                WriteKind::Created => created += 1,
                WriteKind::Existing => {}
                WriteKind::Updated => panic!("no updates expected"),
            }
        }
    }
    assert_eq!(created, n);
    assert_eq!(store.last_seq(&t).unwrap(), n as u64);
    for i in 0..n {
        let c = Condition::identifier(Some("urn:phg"), &format!("m-{i}"));
        assert_eq!(store.find(&t, obs_type(), &c).unwrap().len(), 1);
    }
}
