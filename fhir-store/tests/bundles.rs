//! Batch, FHIR transaction and patch semantics of the store, and the library Bundle processor,
//! on both backends.

#[macro_use]
mod common;

use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use common::*;
use fhir_core::patch::PatchError;
use fhir_core::{Issue, IssueType, ResourceType, TenantId};
use fhir_core::{Json, Resource, ResourceId, VersionId, json};
use fhir_store::bundle::{
    BundleBuilder, BundleOptions, CriteriaError, CriteriaLock, CriteriaResolver, Entry, process,
};
use fhir_store::{
    Backend, Condition, HistoryQuery, HistoryScope, IfNoneMatch, ReadResult, ResolvedReferences,
    Store, StoreError, TxEntry, WriteKind, WriteOp, WriteOutcome, WriteResult,
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
    resolved_conditions_are_rechecked_by_the_writer,
    transaction_with_search_resolved_conditions_and_references,
    batch_counts_earlier_creates_for_the_same_resolved_criteria,
    bundle_process_resolves_criteria_with_a_resolver,
    bundle_process_without_a_resolver_refuses_search_criteria,
    bundle_process_refuses_entries_whose_matches_changed_after_the_search,
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

fn resolved_conditions_are_rechecked_by_the_writer(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let p = store
        .create(&t, patient(None, "1", "Hansen"), None)
        .unwrap()
        .resource;
    let as_seen = |v: u64| Condition::resolved("family=Hansen", [(p.id.clone(), VersionId(v))]);
    // The search saw the patient as it is: it matches.
    let w = store
        .create(&t, patient(None, "2", "Hansen"), Some(&as_seen(1)))
        .unwrap();
    assert_eq!(w.kind, WriteKind::Existing);
    assert_eq!(w.resource.id, p.id);
    // Nothing matched: created.
    let none = Condition::resolved("family=Hansen", []);
    let other = store
        .create(&t, patient(None, "3", "Berg"), Some(&none))
        .unwrap();
    assert_eq!(other.kind, WriteKind::Created);
    // Two matches: 412.
    let two = Condition::resolved(
        "family=Hansen",
        [
            (p.id.clone(), VersionId(1)),
            (other.resource.id.clone(), VersionId(1)),
        ],
    );
    let err = store
        .create(&t, patient(None, "4", "Hansen"), Some(&two))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::MultipleMatches { count: 2 }),
        "{err}"
    );
    let seq = store.last_seq(&t).unwrap();
    // Changed since the search: the search's verdict may be stale, nothing is written.
    store
        .update(&t, &p.id, patient(Some(p.id.as_str()), "1", "Hansen"), None)
        .unwrap();
    let err = store
        .create(&t, patient(None, "5", "Hansen"), Some(&as_seen(1)))
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::VersionConflict {
            expected: VersionId(1),
            actual: Some(VersionId(2))
        }
    );
    assert_eq!(err.http_status(), 412);
    let err = store
        .conditional_delete(&t, patient_type(), &as_seen(1))
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert_eq!(store.last_seq(&t).unwrap(), seq + 1);
    // A conditional update of the version seen updates that resource.
    let u = store
        .conditional_update(
            &t,
            patient_type(),
            &as_seen(2),
            patient(None, "1", "Hansen-Berg"),
            None,
        )
        .unwrap();
    assert_eq!((u.kind, &u.resource.id), (WriteKind::Updated, &p.id));
    assert_eq!(u.resource.version, VersionId(3));
    // Deleted since the search: it matches nothing any more.
    let d = store
        .conditional_delete(&t, patient_type(), &as_seen(3))
        .unwrap();
    assert_eq!(d.id.as_ref(), Some(&p.id));
    let w = store
        .create(&t, patient(None, "1", "Hansen"), Some(&as_seen(4)))
        .unwrap();
    assert_eq!(w.kind, WriteKind::Created);
    assert_ne!(w.resource.id, p.id);
    // `Store::find` applies the same rules to committed state.
    assert_eq!(
        store.find(&t, patient_type(), &as_seen(4)).unwrap(),
        Vec::<ResourceId>::new()
    );
}

fn transaction_with_search_resolved_conditions_and_references(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let existing = store
        .create(&t, patient(None, "1", "Berg"), None)
        .unwrap()
        .resource;
    let hansen = Condition::resolved("family=Hansen", []);
    let create = |url: &str| {
        TxEntry::with_full_url(
            url,
            WriteOp::Create {
                resource: patient(None, "2", "Hansen"),
                if_none_exist: Some(hansen.clone()),
            },
        )
    };
    let obs_to = |reference: &str| {
        TxEntry::new(WriteOp::Create {
            resource: r(&format!(
                r#"{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},
                "subject":{{"reference":"{reference}"}}}}"#
            )),
            if_none_exist: None,
        })
    };
    let mut refs = ResolvedReferences::new();
    // The same criteria as the creates: resolved to the resource they create.
    refs.insert("Patient?family=Hansen", hansen.clone());
    refs.insert(
        "Patient?family=Berg",
        Condition::resolved("family=Berg", [(existing.id.clone(), VersionId(1))]),
    );
    let out = store
        .transaction_entries_resolved(
            &t,
            vec![
                obs_to("Patient?family=Hansen"),
                create("urn:uuid:1"),
                create("urn:uuid:2"),
                obs_to("Patient?family=Berg"),
            ],
            refs,
        )
        .unwrap();
    // Two entries with the same ifNoneExist criteria are one resource.
    assert_eq!(written(&out[1]).kind, WriteKind::Created);
    assert_eq!(written(&out[2]).kind, WriteKind::Existing);
    let new = &written(&out[1]).resource.id;
    assert_eq!(&written(&out[2]).resource.id, new);
    let o = stored_json(&store, &t, "Observation", &written(&out[0]).resource.id);
    assert_eq!(
        reference(&o, &["subject", "reference"]),
        format!("Patient/{new}")
    );
    let o = stored_json(&store, &t, "Observation", &written(&out[3]).resource.id);
    assert_eq!(
        reference(&o, &["subject", "reference"]),
        format!("Patient/{}", existing.id)
    );
    // Patient, Patient, two Observations.
    assert_eq!(store.last_seq(&t).unwrap(), 4);

    // No match, several matches, and a match that changed since the search: the transaction
    // fails naming the entry, and writes nothing.
    let fail = |cond: Condition| {
        let mut refs = ResolvedReferences::new();
        refs.insert("Patient?name=x", cond);
        store
            .transaction_entries_resolved(
                &t,
                vec![create("urn:uuid:3"), obs_to("Patient?name=x")],
                refs,
            )
            .unwrap_err()
    };
    let err = fail(Condition::resolved("name=x", []));
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 1, source }
            if matches!(**source, StoreError::UnresolvedReference { count: 0, .. })),
        "{err}"
    );
    assert_eq!(err.http_status(), 400);
    let err = fail(Condition::resolved(
        "name=x",
        [
            (existing.id.clone(), VersionId(1)),
            (new.clone(), VersionId(1)),
        ],
    ));
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 1, source }
            if matches!(**source, StoreError::UnresolvedReference { count: 2, .. })),
        "{err}"
    );
    assert_eq!(err.http_status(), 412);
    let err = fail(Condition::resolved(
        "name=x",
        [(existing.id.clone(), VersionId(7))],
    ));
    assert!(
        matches!(&err, StoreError::TransactionFailed { index: 1, source }
            if matches!(**source, StoreError::VersionConflict { .. })),
        "{err}"
    );
    assert_eq!(store.last_seq(&t).unwrap(), 4);
    // A match the transaction deletes first no longer matches: the create goes ahead.
    let out = store
        .transaction_entries(
            &t,
            vec![
                TxEntry::new(WriteOp::Create {
                    resource: patient(None, "1", "Berg"),
                    if_none_exist: Some(Condition::resolved(
                        "family=Berg",
                        [(existing.id.clone(), VersionId(1))],
                    )),
                }),
                TxEntry::new(WriteOp::Delete {
                    ty: patient_type(),
                    id: existing.id.clone(),
                    if_match: None,
                }),
            ],
        )
        .unwrap();
    assert_eq!(written(&out[0]).kind, WriteKind::Created);
}

fn batch_counts_earlier_creates_for_the_same_resolved_criteria(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let cond = Condition::resolved("family=Hansen&birthdate=1970", []);
    let create = || {
        TxEntry::new(WriteOp::Create {
            resource: patient(None, "2", "Hansen"),
            if_none_exist: Some(cond.clone()),
        })
    };
    let mut refs = ResolvedReferences::new();
    refs.insert("Patient?birthdate=1970&family=Hansen", cond.clone());
    let obs = TxEntry::new(WriteOp::Create {
        resource: r(
            r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"Patient?birthdate=1970&family=Hansen"}}"#,
        ),
        if_none_exist: None,
    });
    let update = TxEntry::new(WriteOp::ConditionalUpdate {
        ty: patient_type(),
        cond: cond.clone(),
        resource: patient(None, "2", "Hansen"),
        if_match: None,
    });
    let results = store
        .batch_entries_resolved(&t, vec![create(), create(), obs, update], refs)
        .unwrap();
    let first = written(results[0].as_ref().unwrap());
    let second = written(results[1].as_ref().unwrap());
    assert_eq!(first.kind, WriteKind::Created);
    assert_eq!(second.kind, WriteKind::Existing);
    assert_eq!(first.resource.id, second.resource.id);
    let o = stored_json(
        &store,
        &t,
        "Observation",
        &written(results[2].as_ref().unwrap()).resource.id,
    );
    assert_eq!(
        reference(&o, &["subject", "reference"]),
        format!("Patient/{}", first.resource.id)
    );
    let updated = written(results[3].as_ref().unwrap());
    assert_eq!(updated.kind, WriteKind::Updated);
    assert_eq!(updated.resource.id, first.resource.id);
    // Patient, Observation, the Patient's second version.
    assert_eq!(store.last_seq(&t).unwrap(), 3);
}

/// A stand-in for a search index: answers `family=…` on Patients by reading the store, logs
/// what `process` asks, and refuses every other parameter.
struct FamilyResolver {
    store: Store,
    log: Arc<Mutex<Vec<String>>>,
}

/// Logs the store's last sequence number when `process` releases the criteria.
struct Unlock {
    store: Store,
    t: TenantId,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Unlock {
    fn drop(&mut self) {
        let seq = self.store.last_seq(&self.t).unwrap();
        self.log.lock().unwrap().push(format!("unlock at {seq}"));
    }
}

impl FamilyResolver {
    fn family_matches(
        &self,
        t: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<(ResourceId, VersionId)>, CriteriaError> {
        let family = match criteria.split_once('=') {
            Some(("family", v)) if ty == patient_type() && !v.contains('&') => v.to_string(),
            _ => {
                return Err(CriteriaError {
                    status: 400,
                    issues: vec![Issue::error(
                        IssueType::NotSupported,
                        format!("unknown criteria '{criteria}'"),
                    )],
                });
            }
        };
        let q = HistoryQuery {
            count: 1000,
            ..HistoryQuery::default()
        };
        let mut out = Vec::new();
        for e in self
            .store
            .history(t, HistoryScope::Type(ty), &q)
            .unwrap()
            .entries
        {
            if out.iter().any(|(id, _)| *id == e.id) {
                continue;
            }
            if let ReadResult::Found(r) = self.store.read(t, ty, &e.id).unwrap()
                && text(&r.json).contains(&format!(r#""family":"{family}""#))
            {
                // As if the resource changed between the search and the write.
                let seen = match family.as_str() {
                    "Stale" => VersionId(r.version.0 - 1),
                    _ => r.version,
                };
                out.push((r.id, seen));
            }
        }
        Ok(out)
    }
}

impl CriteriaResolver for FamilyResolver {
    fn lock<'a>(
        &'a self,
        t: &TenantId,
        criteria: &[(ResourceType, String)],
    ) -> Result<CriteriaLock<'a>, CriteriaError> {
        let keys: Vec<String> = criteria.iter().map(|(ty, c)| format!("{ty}?{c}")).collect();
        self.log
            .lock()
            .unwrap()
            .push(format!("lock {}", keys.join(" ")));
        Ok(CriteriaLock::new(Unlock {
            store: self.store.clone(),
            t: t.clone(),
            log: self.log.clone(),
        }))
    }

    fn find(
        &self,
        t: &TenantId,
        ty: ResourceType,
        criteria: &str,
    ) -> Result<Vec<(ResourceId, VersionId)>, CriteriaError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("find {ty}?{criteria}"));
        self.family_matches(t, ty, criteria)
    }

    fn check_search(
        &self,
        t: &TenantId,
        ty: ResourceType,
        query: &str,
    ) -> Result<(), CriteriaError> {
        self.family_matches(t, ty, query).map(|_| ())
    }

    fn search(
        &self,
        t: &TenantId,
        ty: ResourceType,
        query: &str,
        base_url: &str,
    ) -> Result<BundleBuilder, CriteriaError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("search {ty}?{query}"));
        let mut b = BundleBuilder::new("searchset");
        for (id, _) in self.family_matches(t, ty, query)? {
            let r = found(self.store.read(t, ty, &id).unwrap());
            b.entries.push(Entry {
                full_url: Some(format!("{base_url}/{ty}/{id}")),
                resource: Some(r.json),
                search_mode: Some("match"),
                ..Entry::default()
            });
        }
        b.total = Some(b.entries.len() as u64);
        Ok(b)
    }
}

fn statuses_of(b: &BundleBuilder) -> Vec<String> {
    b.entries
        .iter()
        .map(|e| e.response.as_ref().unwrap().status.clone())
        .collect()
}

fn bundle_process_resolves_criteria_with_a_resolver(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let log = Arc::new(Mutex::new(Vec::new()));
    let opts = BundleOptions {
        base_url: "http://fhir.example.no/fhir/hf-a".into(),
        resolver: Some(Arc::new(FamilyResolver {
            store: store.clone(),
            log: log.clone(),
        })),
        ..BundleOptions::default()
    };
    let tx = json::parse(
        br#"{"resourceType":"Bundle","type":"transaction","entry":[
        {"request":{"method":"GET","url":"Patient?family=Hansen"}},
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"Patient?family=Hansen"}},
         "request":{"method":"POST","url":"Observation"}},
        {"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient","name":[{"family":"Hansen"}]},
         "request":{"method":"POST","url":"Patient","ifNoneExist":"Patient?family=Hansen"}},
        {"resource":{"resourceType":"Patient","name":[{"family":"Berg"}]},
         "request":{"method":"PUT","url":"Patient?family=Berg"}},
        {"resource":{"resourceType":"Patient","name":[{"family":"Hansen"}]},
         "request":{"method":"POST","url":"Patient","ifNoneExist":"family=Hansen"}}]}"#,
    )
    .unwrap();
    let resp = process(&store, &t, tx.clone(), &opts).unwrap();
    assert_eq!(
        statuses_of(&resp),
        [
            "200 OK",
            "201 Created",
            "201 Created",
            "201 Created",
            "200 OK"
        ]
    );
    let patient_id = resp.entries[2].full_url.clone().unwrap();
    assert_eq!(resp.entries[4].full_url.as_ref(), Some(&patient_id));
    let patient_rel = patient_id.split("/hf-a/").nth(1).unwrap().to_string();
    let obs = json::parse(resp.entries[1].resource.as_ref().unwrap()).unwrap();
    assert_eq!(reference(&obs, &["subject", "reference"]), patient_rel);
    // The GET ran after the writes, through the resolver.
    let found = json::parse(resp.entries[0].resource.as_ref().unwrap()).unwrap();
    assert_eq!(found.get("total"), Some(&Json::Number("1".into())));
    // One lock on the sorted, distinct criteria, held until after the commit; one search per
    // criteria.
    let events = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(
        events,
        [
            "lock Patient?family=Berg Patient?family=Hansen",
            "find Patient?family=Berg",
            "find Patient?family=Hansen",
            "unlock at 3",
            "search Patient?family=Hansen",
        ]
    );
    // Again: the Patients are found, the conditional update updates; only a new Observation.
    let resp = process(&store, &t, tx, &opts).unwrap();
    assert_eq!(
        statuses_of(&resp),
        ["200 OK", "201 Created", "200 OK", "200 OK", "200 OK"]
    );
    assert_eq!(resp.entries[2].full_url.as_ref(), Some(&patient_id));
    assert_eq!(store.last_seq(&t).unwrap(), 5);

    // Criteria the search refuses: that entry in a batch, the whole transaction otherwise.
    let bad = |ty: &str| {
        json::parse(
            format!(
                r#"{{"resourceType":"Bundle","type":"{ty}","entry":[
            {{"resource":{{"resourceType":"Patient"}},"request":{{"method":"POST","url":"Patient"}}}},
            {{"resource":{{"resourceType":"Patient"}},
              "request":{{"method":"POST","url":"Patient","ifNoneExist":"birthdate=1970"}}}},
            {{"resource":{{"resourceType":"Observation","status":"final","code":{{"text":"x"}},
                "subject":{{"reference":"Patient?name=x"}}}},
             "request":{{"method":"POST","url":"Observation"}}}},
            {{"request":{{"method":"GET","url":"Patient?gender=x"}}}}]}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    };
    let resp = process(&store, &t, bad("batch"), &opts).unwrap();
    assert_eq!(
        statuses_of(&resp),
        [
            "201 Created",
            "400 Bad Request",
            "400 Bad Request",
            "400 Bad Request"
        ]
    );
    let tree = resp.to_tree().unwrap();
    let entries = tree.get("entry").unwrap().as_array().unwrap();
    for (i, needle) in [
        (1, "Bundle.entry[1].request.ifNoneExist"),
        (2, "Bundle.entry[2].resource"),
        (3, "Bundle.entry[3]"),
    ] {
        let oo = entries[i]
            .get("response")
            .unwrap()
            .get("outcome")
            .unwrap()
            .to_string();
        assert!(
            oo.contains(needle) && oo.contains("unknown criteria"),
            "{i}: {oo}"
        );
    }
    let oo = entries[2]
        .get("response")
        .unwrap()
        .get("outcome")
        .unwrap()
        .to_string();
    assert!(
        oo.contains("conditional reference 'Patient?name=x'"),
        "{oo}"
    );
    assert_eq!(store.last_seq(&t).unwrap(), 6);
    let err = process(&store, &t, bad("transaction"), &opts).unwrap_err();
    assert_eq!(err.status, 400);
    let exprs: Vec<_> = err
        .issues
        .iter()
        .map(|i| i.expression.clone().unwrap_or_default())
        .collect();
    // The GET is checked first, before any search or lock.
    assert_eq!(exprs, ["Bundle.entry[3].request.url"]);
    assert_eq!(store.last_seq(&t).unwrap(), 6);
    let tx_without_get = {
        let mut b = bad("transaction");
        if let Some(Json::Array(e)) = b.as_object_mut().unwrap().get_mut("entry") {
            e.pop();
        }
        b
    };
    let err = process(&store, &t, tx_without_get, &opts).unwrap_err();
    assert_eq!(err.status, 400);
    let exprs: Vec<_> = err
        .issues
        .iter()
        .map(|i| i.expression.clone().unwrap_or_default())
        .collect();
    assert_eq!(
        exprs,
        [
            "Bundle.entry[1].request.ifNoneExist",
            "Bundle.entry[2].resource"
        ]
    );
    assert_eq!(store.last_seq(&t).unwrap(), 6);
}

fn bundle_process_refuses_entries_whose_matches_changed_after_the_search(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let opts = BundleOptions {
        resolver: Some(Arc::new(FamilyResolver {
            store: store.clone(),
            log: Arc::new(Mutex::new(Vec::new())),
        })),
        ..BundleOptions::default()
    };
    let p = store
        .create(&t, patient(None, "1", "Stale"), None)
        .unwrap()
        .resource;
    store
        .update(&t, &p.id, patient(Some(p.id.as_str()), "1", "Stale"), None)
        .unwrap();
    let batch = json::parse(
        br#"{"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Patient","name":[{"family":"Stale"}]},
         "request":{"method":"PUT","url":"Patient?family=Stale"}}]}"#,
    )
    .unwrap();
    let resp = process(&store, &t, batch, &opts).unwrap();
    assert_eq!(statuses_of(&resp), ["412 Precondition Failed"]);
    let text = String::from_utf8(resp.to_compact_json()).unwrap();
    assert!(
        text.contains("changed between the search and the write"),
        "{text}"
    );
    assert_eq!(store.last_seq(&t).unwrap(), 2);
}

fn bundle_process_without_a_resolver_refuses_search_criteria(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let opts = BundleOptions::default();
    let batch = json::parse(
        br#"{"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Patient"},
         "request":{"method":"POST","url":"Patient","ifNoneExist":"family=Hansen"}},
        {"request":{"method":"GET","url":"Patient?family=Hansen"}},
        {"request":{"method":"DELETE","url":"Patient?family=Hansen"}},
        {"resource":{"resourceType":"Patient"},
         "request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=a"}}]}"#,
    )
    .unwrap();
    let resp = process(&store, &t, batch, &opts).unwrap();
    assert_eq!(
        statuses_of(&resp),
        [
            "400 Bad Request",
            "400 Bad Request",
            "400 Bad Request",
            "201 Created"
        ]
    );
    let text = String::from_utf8(resp.to_compact_json()).unwrap();
    assert!(text.contains("not supported by the store alone"), "{text}");
    // A conditional reference the store cannot evaluate fails its entry in the writer.
    let batch = json::parse(
        br#"{"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"Patient?family=Hansen"}},
         "request":{"method":"POST","url":"Observation"}}]}"#,
    )
    .unwrap();
    let resp = process(&store, &t, batch, &opts).unwrap();
    assert_eq!(statuses_of(&resp), ["400 Bad Request"]);
    assert_eq!(store.last_seq(&t).unwrap(), 1);
}
