//! Behaviour of the store's API on the real backends.

#[macro_use]
mod common;

use common::*;
use fhir_core::{Resource, ResourceId, VersionId};
use fhir_store::AuditRecord;
use fhir_store::{
    Backend, Condition, HistoryQuery, HistoryScope, Method, ReadResult, Store, StoreError,
    StoreOptions, WriteKind, WriteOp, WriteOutcome,
};

backend_tests!(
    create_read_vread_update_delete_recreate,
    update_as_create_and_id_checks,
    if_match_conflicts,
    conditional_create_forms,
    conditional_create_with_arbitrary_identifier_bytes,
    conditional_update_cases,
    conditional_delete_cases,
    identifier_index_follows_updates_and_deletes,
    invalid_conditions_are_rejected,
    tenant_isolation,
    remove_tenant_removes_only_its_data,
    unknown_tenant_errors,
    change_log_is_ordered_and_contiguous,
    transaction_is_all_or_nothing,
    transaction_ops_see_each_other,
    history_scopes_since_and_paging,
    decimals_are_preserved,
    data_survives_reopen,
    second_open_of_same_directory_fails,
    audit_records_are_appended_and_found_by_patient_and_time,
);

fn create_read_vread_update_delete_recreate(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = obs_type();
    let created = store.create(&t, plain_obs("70"), None).unwrap();
    assert_eq!(created.kind, WriteKind::Created);
    assert_eq!(created.resource.version, VersionId(1));
    assert_eq!(created.seq, Some(1));
    assert!(is_micro_instant(&created.resource.last_updated));
    let id = created.resource.id.clone();
    // A server-assigned id is a UUID.
    assert_eq!(id.as_str().len(), 36);

    let v1 = found(store.read(&t, ty, &id).unwrap());
    assert_eq!(v1, created.resource);
    let json = text(&v1.json);
    assert!(json.starts_with(&format!(
        r#"{{"resourceType":"Observation","id":"{id}","meta":{{"versionId":"1","lastUpdated":"{}"}}"#,
        v1.last_updated
    )));

    let updated = store.update(&t, &id, plain_obs("80"), None).unwrap();
    assert_eq!(updated.kind, WriteKind::Updated);
    assert_eq!(updated.resource.version, VersionId(2));
    assert!(updated.resource.last_updated >= v1.last_updated);
    let v2 = found(store.read(&t, ty, &id).unwrap());
    assert!(text(&v2.json).contains(r#""value":80"#));
    assert!(text(&v2.json).contains(r#""versionId":"2""#));
    // Versions are immutable.
    assert_eq!(found(store.vread(&t, ty, &id, VersionId(1)).unwrap()), v1);

    let deleted = store.delete(&t, ty, &id, None).unwrap();
    assert_eq!(deleted.version, Some(VersionId(3)));
    assert_eq!(deleted.id.as_ref(), Some(&id));
    assert_eq!(deleted.seq, Some(3));
    match store.read(&t, ty, &id).unwrap() {
        ReadResult::Deleted { version, .. } => assert_eq!(version, VersionId(3)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.vread(&t, ty, &id, VersionId(3)).unwrap(),
        ReadResult::Deleted {
            version: VersionId(3),
            ..
        }
    ));
    assert_eq!(found(store.vread(&t, ty, &id, VersionId(2)).unwrap()), v2);
    assert_eq!(
        store.vread(&t, ty, &id, VersionId(4)).unwrap(),
        ReadResult::NotFound
    );

    // Deleting again writes nothing.
    let again = store.delete(&t, ty, &id, None).unwrap();
    assert_eq!((again.version, again.seq), (None, None));
    assert_eq!(store.last_seq(&t).unwrap(), 3);

    // Re-creating continues the version numbering.
    let recreated = store.update(&t, &id, plain_obs("90"), None).unwrap();
    assert_eq!(recreated.kind, WriteKind::Created);
    assert_eq!(recreated.resource.version, VersionId(4));
    assert_eq!(
        found(store.read(&t, ty, &id).unwrap()).version,
        VersionId(4)
    );

    let hist = store
        .history(
            &t,
            HistoryScope::Instance(ty, id.clone()),
            &HistoryQuery::default(),
        )
        .unwrap();
    let got: Vec<_> = hist
        .entries
        .iter()
        .map(|e| (e.version.0, e.method, e.json.is_some()))
        .collect();
    assert_eq!(
        got,
        vec![
            (4, Method::Create, true),
            (3, Method::Delete, false),
            (2, Method::Update, true),
            (1, Method::Create, true),
        ]
    );
    assert_eq!(hist.next, None);
    assert_eq!(hist.entries[2].json.as_deref(), Some(v2.json.as_slice()));

    let unknown = ResourceId::new("nope").unwrap();
    assert_eq!(store.read(&t, ty, &unknown).unwrap(), ReadResult::NotFound);
    // The id is per type.
    assert_eq!(
        store.read(&t, patient_type(), &id).unwrap(),
        ReadResult::NotFound
    );
}

fn update_as_create_and_id_checks(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = ResourceId::new("pat-1").unwrap();
    let w = store
        .update(&t, &id, patient(Some("pat-1"), "1", "Nordmann"), None)
        .unwrap();
    assert_eq!(w.kind, WriteKind::Created);
    assert_eq!(w.resource.version, VersionId(1));
    assert_eq!(w.resource.id, id);
    // Without an id in the body the store sets it.
    let w = store
        .update(&t, &id, patient(None, "1", "Hansen"), None)
        .unwrap();
    assert_eq!(
        (w.kind, w.resource.version),
        (WriteKind::Updated, VersionId(2))
    );
    assert!(text(&w.resource.json).contains(r#""id":"pat-1""#));
    let err = store
        .update(&t, &id, patient(Some("other"), "1", "Hansen"), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::IdMismatch(_)), "{err}");
    // A create ignores the body's id.
    let c = store
        .create(&t, patient(Some("pat-1"), "2", "Olsen"), None)
        .unwrap();
    assert_ne!(c.resource.id, id);
    assert_eq!(
        found(store.read(&t, patient_type(), &id).unwrap()).version,
        VersionId(2)
    );
}

fn if_match_conflicts(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = obs_type();
    let id = store.create(&t, plain_obs("1"), None).unwrap().resource.id;
    let err = store
        .update(&t, &id, plain_obs("2"), Some(VersionId(2)))
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::VersionConflict {
            expected: VersionId(2),
            actual: Some(VersionId(1))
        }
    );
    let w = store
        .update(&t, &id, plain_obs("2"), Some(VersionId(1)))
        .unwrap();
    assert_eq!(w.resource.version, VersionId(2));
    let err = store.delete(&t, ty, &id, Some(VersionId(1))).unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }));
    let d = store.delete(&t, ty, &id, Some(VersionId(2))).unwrap();
    assert_eq!(d.version, Some(VersionId(3)));
    // A deleted or absent resource has no version to match.
    let err = store
        .update(&t, &id, plain_obs("3"), Some(VersionId(3)))
        .unwrap_err();
    assert_eq!(
        err,
        StoreError::VersionConflict {
            expected: VersionId(3),
            actual: None
        }
    );
    let absent = ResourceId::new("absent").unwrap();
    assert!(matches!(
        store.update(&t, &absent, plain_obs("3"), Some(VersionId(1))),
        Err(StoreError::VersionConflict { actual: None, .. })
    ));
    // Failed writes leave no trace.
    assert_eq!(store.last_seq(&t).unwrap(), 3);
    assert_eq!(store.read(&t, ty, &absent).unwrap(), ReadResult::NotFound);
}

fn conditional_create_forms(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = patient_type();
    let cond =
        Condition::parse("identifier=urn%3Aoid%3A2.16.578.1.12.4.1.4.1%7C12345678901").unwrap();
    let first = store
        .create(&t, patient(None, "12345678901", "Nordmann"), Some(&cond))
        .unwrap();
    assert_eq!(first.kind, WriteKind::Created);
    let id = first.resource.id.clone();

    for q in [
        "identifier=urn%3Aoid%3A2.16.578.1.12.4.1.4.1%7C12345678901",
        "identifier=12345678901",
        "identifier=other%7Cx,urn%3Aoid%3A2.16.578.1.12.4.1.4.1%7C12345678901",
        &format!("_id={id}"),
        &format!("_id={id}&identifier=12345678901"),
    ] {
        let cond = Condition::parse(q).unwrap();
        let again = store
            .create(&t, patient(None, "12345678901", "Nordmann"), Some(&cond))
            .unwrap();
        assert_eq!(again.kind, WriteKind::Existing, "{q}");
        assert_eq!(again.resource, first.resource, "{q}");
        assert_eq!(again.seq, None);
    }
    assert_eq!(store.last_seq(&t).unwrap(), 1);

    // No match: the system differs, the AND fails, `|value` wants no system.
    for q in [
        "identifier=urn%3Aother%7C12345678901",
        &format!("_id={id}&identifier=999"),
        "identifier=%7C12345678901",
    ] {
        let cond = Condition::parse(q).unwrap();
        assert!(store.find(&t, ty, &cond).unwrap().is_empty(), "{q}");
    }
    // An Observation with the same identifier value is another type.
    let cond = Condition::parse("identifier=12345678901").unwrap();
    assert!(store.find(&t, obs_type(), &cond).unwrap().is_empty());

    // `|value` matches identifiers without a system.
    let no_sys = Condition::parse("identifier=%7Cm-1").unwrap();
    let a = store
        .create(&t, obs(None, "m-1", "1"), Some(&no_sys))
        .unwrap();
    assert_eq!(a.kind, WriteKind::Created);
    let b = store
        .create(&t, obs(None, "m-1", "1"), Some(&no_sys))
        .unwrap();
    assert_eq!(
        (b.kind, &b.resource.id),
        (WriteKind::Existing, &a.resource.id)
    );

    // Two matches.
    store
        .create(&t, patient(None, "12345678901", "Twin"), None)
        .unwrap();
    let err = store
        .create(&t, patient(None, "12345678901", "Third"), Some(&cond))
        .unwrap_err();
    assert_eq!(err, StoreError::MultipleMatches { count: 2 });
    assert_eq!(store.find(&t, ty, &cond).unwrap().len(), 2);
}

fn conditional_create_with_arbitrary_identifier_bytes(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    // Stored bytes skip validation, which lets this test put characters FHIR forbids (NUL) into
    // an identifier: the index must still keep them apart.
    let make = |system: &str, value: &str| {
        let mut s = String::new();
        fhir_core::json::write_string(&mut s, system);
        let mut v = String::new();
        fhir_core::json::write_string(&mut v, value);
        let body = format!(
            r#"{{"resourceType":"Observation","identifier":[{{"system":{s},"value":{v}}}],"status":"final","code":{{"text":"x"}}}}"#
        );
        Resource::from_stored_bytes(body.as_bytes()).unwrap()
    };
    let pairs = [
        ("a", "b\0c"),
        ("a\0b", "c"),
        ("a|b", "c"),
        ("a", "b|c"),
        ("a,b", "c,d"),
        ("a", "b"),
        ("a", "b\0"),
        ("ø\u{1F600}", "\\"),
    ];
    let mut ids = Vec::new();
    for (s, v) in pairs {
        let cond = Condition::identifier(Some(s), v);
        let w = store.create(&t, make(s, v), Some(&cond)).unwrap();
        assert_eq!(w.kind, WriteKind::Created, "{s:?} {v:?}");
        ids.push(w.resource.id);
    }
    for ((s, v), id) in pairs.iter().zip(&ids) {
        let cond = Condition::identifier(Some(s), v);
        assert_eq!(store.find(&t, obs_type(), &cond).unwrap(), vec![id.clone()]);
    }
    // The query form with FHIR escapes reaches the same entries.
    let cond = Condition::parse("identifier=a%5C%7Cb%7Cc").unwrap();
    assert_eq!(
        store.find(&t, obs_type(), &cond).unwrap(),
        vec![ids[2].clone()]
    );
    let cond = Condition::parse("identifier=a%5C%2Cb%7Cc%5C%2Cd").unwrap();
    assert_eq!(
        store.find(&t, obs_type(), &cond).unwrap(),
        vec![ids[4].clone()]
    );
    // Any system: value "c" is used with three systems.
    let cond = Condition::identifier(None, "c");
    assert_eq!(store.find(&t, obs_type(), &cond).unwrap().len(), 2);
}

fn conditional_update_cases(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = patient_type();
    let cond = Condition::identifier(Some(FNR_SYSTEM), "111");
    // 0 matches, no id in the body: created with a new id.
    let w = store
        .conditional_update(&t, ty, &cond, patient(None, "111", "A"), None)
        .unwrap();
    assert_eq!(
        (w.kind, w.resource.version),
        (WriteKind::Created, VersionId(1))
    );
    let id = w.resource.id.clone();
    // 1 match: updated.
    let w = store
        .conditional_update(&t, ty, &cond, patient(None, "111", "B"), Some(VersionId(1)))
        .unwrap();
    assert_eq!((w.kind, &w.resource.id), (WriteKind::Updated, &id));
    assert_eq!(w.resource.version, VersionId(2));
    // 1 match with the same id in the body is fine, another id is not.
    let w = store
        .conditional_update(&t, ty, &cond, patient(Some(id.as_str()), "111", "C"), None)
        .unwrap();
    assert_eq!(w.resource.version, VersionId(3));
    let err = store
        .conditional_update(&t, ty, &cond, patient(Some("zzz"), "111", "D"), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::IdMismatch(_)), "{err}");
    // If-Match is honoured.
    let err = store
        .conditional_update(&t, ty, &cond, patient(None, "111", "E"), Some(VersionId(1)))
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }));
    // 0 matches with an id in the body: created with that id.
    let cond2 = Condition::identifier(Some(FNR_SYSTEM), "222");
    let w = store
        .conditional_update(&t, ty, &cond2, patient(Some("given-id"), "222", "F"), None)
        .unwrap();
    assert_eq!(w.kind, WriteKind::Created);
    assert_eq!(w.resource.id.as_str(), "given-id");
    // The type of the body must be the type searched.
    let err = store
        .conditional_update(&t, ty, &cond2, plain_obs("1"), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::IdMismatch(_)));
    // >1 matches.
    store.create(&t, patient(None, "222", "G"), None).unwrap();
    let err = store
        .conditional_update(&t, ty, &cond2, patient(None, "222", "H"), None)
        .unwrap_err();
    assert_eq!(err, StoreError::MultipleMatches { count: 2 });
}

fn conditional_delete_cases(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = patient_type();
    let cond = Condition::identifier(None, "333");
    let none = store.conditional_delete(&t, ty, &cond).unwrap();
    assert_eq!((none.id, none.version, none.seq), (None, None, None));
    let id = store
        .create(&t, patient(None, "333", "A"), None)
        .unwrap()
        .resource
        .id;
    let d = store.conditional_delete(&t, ty, &cond).unwrap();
    assert_eq!(d.id.as_ref(), Some(&id));
    assert_eq!(d.version, Some(VersionId(2)));
    assert!(store.find(&t, ty, &cond).unwrap().is_empty());
    // The deleted one no longer matches.
    let none = store.conditional_delete(&t, ty, &cond).unwrap();
    assert_eq!(none.version, None);
    store.create(&t, patient(None, "333", "B"), None).unwrap();
    store.create(&t, patient(None, "333", "C"), None).unwrap();
    assert_eq!(
        store.conditional_delete(&t, ty, &cond).unwrap_err(),
        StoreError::MultipleMatches { count: 2 }
    );
    let by_id = Condition::parse(&format!("_id={id}")).unwrap();
    assert_eq!(
        store.conditional_delete(&t, ty, &by_id).unwrap().version,
        None
    );
}

fn identifier_index_follows_updates_and_deletes(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = patient_type();
    let old = Condition::identifier(Some(FNR_SYSTEM), "old");
    let new = Condition::identifier(Some(FNR_SYSTEM), "new");
    let id = store
        .create(&t, patient(None, "old", "A"), None)
        .unwrap()
        .resource
        .id;
    assert_eq!(store.find(&t, ty, &old).unwrap(), vec![id.clone()]);
    store
        .update(&t, &id, patient(None, "new", "A"), None)
        .unwrap();
    assert!(store.find(&t, ty, &old).unwrap().is_empty());
    assert_eq!(store.find(&t, ty, &new).unwrap(), vec![id.clone()]);
    store.delete(&t, ty, &id, None).unwrap();
    assert!(store.find(&t, ty, &new).unwrap().is_empty());
    assert!(store.find(&t, ty, &Condition::id(&id)).unwrap().is_empty());
    store
        .update(&t, &id, patient(None, "old", "A"), None)
        .unwrap();
    assert_eq!(store.find(&t, ty, &old).unwrap(), vec![id.clone()]);
    assert_eq!(store.find(&t, ty, &Condition::id(&id)).unwrap(), vec![id]);
}

fn invalid_conditions_are_rejected(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    for q in [
        "name=Ola",
        "identifier:of-type=x",
        "identifier=sys%7C",
        "",
        "_id=a%2Fb",
    ] {
        match Condition::parse(q) {
            Err(StoreError::InvalidCondition(msg)) => assert!(!msg.is_empty()),
            other => panic!("{q}: {other:?}"),
        }
    }
    // The store is untouched by the attempts.
    assert_eq!(store.last_seq(&t).unwrap(), 0);
}

fn tenant_isolation(backend: Backend) {
    let (_dir, store, a) = setup(backend);
    let b = tenant("hf-b");
    store.create_tenant(&b, "Helse B").unwrap();
    let ty = patient_type();
    let id = ResourceId::new("same-id").unwrap();
    store
        .update(&a, &id, patient(None, "1", "InA"), None)
        .unwrap();
    store
        .update(&b, &id, patient(None, "1", "InB"), None)
        .unwrap();
    store
        .update(&b, &id, patient(None, "1", "InB2"), None)
        .unwrap();
    let ra = found(store.read(&a, ty, &id).unwrap());
    let rb = found(store.read(&b, ty, &id).unwrap());
    assert!(text(&ra.json).contains("InA"));
    assert!(text(&rb.json).contains("InB2"));
    assert_eq!((ra.version, rb.version), (VersionId(1), VersionId(2)));

    let only_a = store
        .create(&a, obs(Some("urn:x"), "only-a", "1"), None)
        .unwrap();
    let cond = Condition::identifier(Some("urn:x"), "only-a");
    assert!(store.find(&b, obs_type(), &cond).unwrap().is_empty());
    assert_eq!(
        store.read(&b, obs_type(), &only_a.resource.id).unwrap(),
        ReadResult::NotFound
    );
    // A conditional create in B does not see A's resource.
    let w = store
        .create(&b, obs(Some("urn:x"), "only-a", "1"), Some(&cond))
        .unwrap();
    assert_eq!(w.kind, WriteKind::Created);
    assert_ne!(w.resource.id, only_a.resource.id);

    let hist_a = store
        .history(&a, HistoryScope::System, &HistoryQuery::default())
        .unwrap();
    assert_eq!(hist_a.entries.len(), 2);
    assert!(hist_a.entries.iter().all(|e| {
        let j = text(e.json.as_deref().unwrap());
        !j.contains("InB")
    }));
    let hist_b = store
        .history(
            &b,
            HistoryScope::Instance(ty, id.clone()),
            &HistoryQuery::default(),
        )
        .unwrap();
    assert_eq!(hist_b.entries.len(), 2);
    let changes_a: Vec<_> = store
        .changes(&a, 1)
        .unwrap()
        .map(|c| c.unwrap().seq)
        .collect();
    let changes_b: Vec<_> = store
        .changes(&b, 1)
        .unwrap()
        .map(|c| c.unwrap().seq)
        .collect();
    // Sequence numbers are per tenant.
    assert_eq!(changes_a, vec![1, 2]);
    assert_eq!(changes_b, vec![1, 2, 3]);
}

fn remove_tenant_removes_only_its_data(backend: Backend) {
    let (dir, store, a) = setup(backend);
    // Prefix-related ids on purpose: "hf-a" must not take "hf-a2" with it.
    let a2 = tenant("hf-a2");
    store.create_tenant(&a2, "Helse A2").unwrap();
    let id = ResourceId::new("p").unwrap();
    for t in [&a, &a2] {
        for i in 0..30 {
            store
                .create(t, obs(Some("urn:x"), &i.to_string(), "1"), None)
                .unwrap();
        }
        store.update(t, &id, patient(None, "1", "X"), None).unwrap();
    }
    assert!(store.remove_tenant(&a).unwrap());
    assert!(!store.remove_tenant(&a).unwrap());
    assert_eq!(store.tenant(&a).unwrap(), None);
    assert_eq!(
        store.read(&a, patient_type(), &id).unwrap_err(),
        StoreError::TenantNotFound(a.clone())
    );
    let names: Vec<_> = store.tenants().unwrap().into_iter().map(|t| t.id).collect();
    assert_eq!(names, vec![a2.clone()]);
    assert_eq!(store.last_seq(&a2).unwrap(), 31);
    assert_eq!(
        store
            .find(&a2, obs_type(), &Condition::identifier(None, "7"))
            .unwrap()
            .len(),
        1
    );
    found(store.read(&a2, patient_type(), &id).unwrap());
    assert_eq!(store.changes(&a2, 1).unwrap().count(), 31);

    // A re-created tenant starts empty.
    store.create_tenant(&a, "Helse A again").unwrap();
    assert_eq!(store.last_seq(&a).unwrap(), 0);
    assert_eq!(
        store.read(&a, patient_type(), &id).unwrap(),
        ReadResult::NotFound
    );
    assert!(
        store
            .find(&a, obs_type(), &Condition::identifier(None, "7"))
            .unwrap()
            .is_empty()
    );
    let w = store.create(&a, plain_obs("1"), None).unwrap();
    assert_eq!(w.seq, Some(1));
    drop(store);
    // And nothing of the old tenant comes back after a reopen.
    let store = open(dir.path(), backend);
    assert_eq!(store.last_seq(&a).unwrap(), 1);
    assert_eq!(store.tenant(&a).unwrap().unwrap().name, "Helse A again");
}

fn unknown_tenant_errors(backend: Backend) {
    let (_dir, store, _a) = setup(backend);
    let x = tenant("nobody");
    let id = ResourceId::new("x").unwrap();
    let cond = Condition::identifier(None, "1");
    let nf = StoreError::TenantNotFound(x.clone());
    let ty = obs_type();
    assert_eq!(store.create(&x, plain_obs("1"), None).unwrap_err(), nf);
    assert_eq!(store.update(&x, &id, plain_obs("1"), None).unwrap_err(), nf);
    assert_eq!(
        store
            .conditional_update(&x, ty, &cond, plain_obs("1"), None)
            .unwrap_err(),
        nf
    );
    assert_eq!(store.delete(&x, ty, &id, None).unwrap_err(), nf);
    assert_eq!(store.conditional_delete(&x, ty, &cond).unwrap_err(), nf);
    assert_eq!(store.transaction(&x, vec![]).unwrap_err(), nf);
    assert_eq!(store.read(&x, ty, &id).unwrap_err(), nf);
    assert_eq!(store.vread(&x, ty, &id, VersionId(1)).unwrap_err(), nf);
    assert_eq!(store.find(&x, ty, &cond).unwrap_err(), nf);
    assert_eq!(
        store
            .history(&x, HistoryScope::System, &HistoryQuery::default())
            .unwrap_err(),
        nf
    );
    assert!(matches!(store.changes(&x, 1), Err(e) if e == nf));
    assert_eq!(store.last_seq(&x).unwrap_err(), nf);
    assert_eq!(store.tenant(&x).unwrap(), None);
    assert_eq!(
        store.create_tenant(&_a, "again").unwrap_err(),
        StoreError::TenantExists(_a.clone())
    );
}

fn change_log_is_ordered_and_contiguous(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = obs_type();
    let a = store.create(&t, plain_obs("1"), None).unwrap();
    let id = a.resource.id.clone();
    store.update(&t, &id, plain_obs("2"), None).unwrap();
    let outcomes = store
        .transaction(
            &t,
            vec![
                WriteOp::Create {
                    resource: plain_obs("3"),
                    if_none_exist: None,
                },
                WriteOp::Create {
                    resource: plain_obs("4"),
                    if_none_exist: None,
                },
                WriteOp::Delete {
                    ty,
                    id: id.clone(),
                    if_match: None,
                },
            ],
        )
        .unwrap();
    let seqs: Vec<_> = outcomes
        .iter()
        .map(|o| match o {
            WriteOutcome::Write(w) => w.seq.unwrap(),
            WriteOutcome::Delete(d) => d.seq.unwrap(),
        })
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    store.create(&t, plain_obs("5"), None).unwrap();

    let all: Vec<_> = store.changes(&t, 1).unwrap().map(Result::unwrap).collect();
    assert_eq!(
        all.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(
        all.iter().map(|c| c.method).collect::<Vec<_>>(),
        vec![
            Method::Create,
            Method::Update,
            Method::Create,
            Method::Create,
            Method::Delete,
            Method::Create
        ]
    );
    assert_eq!(
        (all[4].id.clone(), all[4].version),
        (id.clone(), VersionId(3))
    );
    // One transaction, one instant; never backwards.
    assert_eq!(all[2].last_updated, all[4].last_updated);
    assert!(
        all.windows(2)
            .all(|w| w[0].last_updated <= w[1].last_updated)
    );
    assert!(all.iter().all(|c| is_micro_instant(&c.last_updated)));

    let from4: Vec<_> = store
        .changes(&t, 4)
        .unwrap()
        .map(|c| c.unwrap().seq)
        .collect();
    assert_eq!(from4, vec![4, 5, 6]);
    assert_eq!(store.changes(&t, 7).unwrap().count(), 0);
    assert_eq!(store.changes(&t, 0).unwrap().count(), 6);
    assert_eq!(store.last_seq(&t).unwrap(), 6);

    // Longer than one internal chunk.
    for i in 0..600 {
        store.create(&t, plain_obs(&i.to_string()), None).unwrap();
    }
    let seqs: Vec<u64> = store
        .changes(&t, 2)
        .unwrap()
        .map(|c| c.unwrap().seq)
        .collect();
    assert_eq!(seqs, (2..=606).collect::<Vec<_>>());
}

fn transaction_is_all_or_nothing(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = patient_type();
    let existing = store
        .create(&t, patient(None, "1", "A"), None)
        .unwrap()
        .resource
        .id;
    let before = store.last_seq(&t).unwrap();
    let err = store
        .transaction(
            &t,
            vec![
                WriteOp::Create {
                    resource: patient(None, "new-1", "B"),
                    if_none_exist: None,
                },
                WriteOp::Update {
                    id: existing.clone(),
                    resource: patient(None, "1", "C"),
                    if_match: None,
                },
                WriteOp::Delete {
                    ty,
                    id: existing.clone(),
                    if_match: Some(VersionId(1)), // it is at 2 by now
                },
            ],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert_eq!(store.last_seq(&t).unwrap(), before);
    assert!(
        store
            .find(&t, ty, &Condition::identifier(None, "new-1"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        found(store.read(&t, ty, &existing).unwrap()).version,
        VersionId(1)
    );
    // The writer carries on normally.
    let w = store.create(&t, patient(None, "2", "D"), None).unwrap();
    assert_eq!(w.seq, Some(before + 1));
    assert!(store.transaction(&t, vec![]).unwrap().is_empty());
}

fn transaction_ops_see_each_other(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let cond = Condition::identifier(Some("urn:phg"), "m-1");
    let create = || WriteOp::Create {
        resource: obs(Some("urn:phg"), "m-1", "1"),
        if_none_exist: Some(cond.clone()),
    };
    let out = store.transaction(&t, vec![create(), create()]).unwrap();
    let kinds: Vec<_> = out
        .iter()
        .map(|o| match o {
            WriteOutcome::Write(w) => (w.kind, w.resource.id.clone()),
            WriteOutcome::Delete(_) => panic!(),
        })
        .collect();
    assert_eq!(kinds[0].0, WriteKind::Created);
    assert_eq!(kinds[1].0, WriteKind::Existing);
    assert_eq!(kinds[0].1, kinds[1].1);
    let id = ResourceId::new("tx-1").unwrap();
    let out = store
        .transaction(
            &t,
            vec![
                WriteOp::Update {
                    id: id.clone(),
                    resource: patient(None, "9", "A"),
                    if_match: None,
                },
                WriteOp::Update {
                    id: id.clone(),
                    resource: patient(None, "9", "B"),
                    if_match: Some(VersionId(1)),
                },
                WriteOp::ConditionalDelete {
                    ty: patient_type(),
                    cond: Condition::identifier(None, "9"),
                },
            ],
        )
        .unwrap();
    match &out[2] {
        WriteOutcome::Delete(d) => assert_eq!(d.version, Some(VersionId(3))),
        other => panic!("{other:?}"),
    }
    assert_eq!(store.last_seq(&t).unwrap(), 4);
}

fn history_scopes_since_and_paging(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ot = obs_type();
    let pt = patient_type();
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            store
                .create(&t, plain_obs(&i.to_string()), None)
                .unwrap()
                .resource
                .id,
        );
        store
            .create(&t, patient(None, &i.to_string(), "P"), None)
            .unwrap();
    }
    for _ in 0..4 {
        store.update(&t, &ids[0], plain_obs("99"), None).unwrap();
    }
    let page_all = |scope: HistoryScope, count: usize, since: Option<String>| {
        let mut out = Vec::new();
        let mut before = None;
        loop {
            let q = HistoryQuery {
                since: since.clone(),
                before,
                count,
            };
            let page = store.history(&t, scope.clone(), &q).unwrap();
            assert!(page.entries.len() <= count);
            out.extend(page.entries);
            match page.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        out
    };
    let sys = page_all(HistoryScope::System, 3, None);
    assert_eq!(sys.len(), 24);
    assert_eq!(
        (sys[0].id.clone(), sys[0].version),
        (ids[0].clone(), VersionId(5))
    );
    let obs_hist = page_all(HistoryScope::Type(ot), 4, None);
    assert_eq!(obs_hist.len(), 14);
    assert!(obs_hist.iter().all(|e| e.resource_type == ot));
    assert_eq!(page_all(HistoryScope::Type(pt), 100, None).len(), 10);
    let inst = page_all(HistoryScope::Instance(ot, ids[0].clone()), 2, None);
    assert_eq!(
        inst.iter().map(|e| e.version.0).collect::<Vec<_>>(),
        vec![5, 4, 3, 2, 1]
    );
    // Newest first, and the system history is the change log reversed.
    let log: Vec<_> = store.changes(&t, 1).unwrap().map(Result::unwrap).collect();
    let sys_keys: Vec<_> = sys.iter().map(|e| (e.id.clone(), e.version)).collect();
    let log_keys: Vec<_> = log
        .iter()
        .rev()
        .map(|c| (c.id.clone(), c.version))
        .collect();
    assert_eq!(sys_keys, log_keys);

    // `since` keeps lastUpdated >= since.
    let cut = log[15].last_updated.clone();
    let expected = log.iter().filter(|c| c.last_updated >= cut).count();
    let recent = page_all(HistoryScope::System, 5, Some(cut.clone()));
    assert_eq!(recent.len(), expected);
    assert!(recent.iter().all(|e| e.last_updated >= cut));
    let future = page_all(HistoryScope::System, 5, Some("2999-01-01T00:00:00Z".into()));
    assert!(future.is_empty());
    let past = page_all(HistoryScope::System, 50, Some("2000-01-01".into()));
    assert_eq!(past.len(), 24);
    let err = store
        .history(
            &t,
            HistoryScope::System,
            &HistoryQuery {
                since: Some("not-a-date".into()),
                ..HistoryQuery::default()
            },
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidCondition(_)));
    // count 0 and counts beyond the cap.
    let empty = store
        .history(
            &t,
            HistoryScope::System,
            &HistoryQuery {
                count: 0,
                ..HistoryQuery::default()
            },
        )
        .unwrap();
    assert!(empty.entries.is_empty());
    let big = store
        .history(
            &t,
            HistoryScope::System,
            &HistoryQuery {
                count: 1_000_000,
                ..HistoryQuery::default()
            },
        )
        .unwrap();
    assert_eq!((big.entries.len(), big.next), (24, None));
}

fn decimals_are_preserved(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let w = store.create(&t, plain_obs("72.50"), None).unwrap();
    assert!(text(&w.resource.json).contains(r#""value":72.50"#));
    let r = found(store.read(&t, obs_type(), &w.resource.id).unwrap());
    assert!(text(&r.json).contains(r#""valueQuantity":{"value":72.50,"unit":"/min"}"#));
    let w = store
        .update(&t, &w.resource.id, plain_obs("1.000e2"), None)
        .unwrap();
    assert!(text(&w.resource.json).contains(r#""value":1.000e2"#));
}

fn data_survives_reopen(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let t = tenant("hf-a");
    let (id, last, v1) = {
        let store = open(dir.path(), backend);
        store.create_tenant(&t, "Helse A").unwrap();
        let w = store
            .create(&t, obs(Some("urn:x"), "1", "72.50"), None)
            .unwrap();
        store
            .update(&t, &w.resource.id, obs(Some("urn:x"), "1", "73"), None)
            .unwrap();
        (
            w.resource.id.clone(),
            store.last_seq(&t).unwrap(),
            w.resource,
        )
    };
    let store = open(dir.path(), backend);
    assert_eq!(store.tenants().unwrap().len(), 1);
    assert_eq!(store.last_seq(&t).unwrap(), last);
    assert_eq!(
        found(store.vread(&t, obs_type(), &id, VersionId(1)).unwrap()),
        v1
    );
    assert_eq!(
        found(store.read(&t, obs_type(), &id).unwrap()).version,
        VersionId(2)
    );
    assert_eq!(
        store
            .find(&t, obs_type(), &Condition::identifier(Some("urn:x"), "1"))
            .unwrap(),
        vec![id.clone()]
    );
    // Sequence numbers and versions continue where they were.
    let w = store.update(&t, &id, plain_obs("1"), None).unwrap();
    assert_eq!((w.resource.version, w.seq), (VersionId(3), Some(last + 1)));
    assert!(w.resource.last_updated >= v1.last_updated);
}

fn second_open_of_same_directory_fails(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend);
    let second = Store::open_with(
        dir.path(),
        StoreOptions {
            backend,
            ..StoreOptions::default()
        },
    );
    assert!(matches!(second, Err(StoreError::Backend(_))), "{second:?}");
    drop(store);
    // Dropping the last handle closes it.
    let _again = open(dir.path(), backend);
}

#[cfg(feature = "sled")]
#[test]
fn opening_with_the_wrong_backend_fails() {
    for (made, wrong) in [
        (Backend::Redb, Backend::Sled),
        (Backend::Sled, Backend::Redb),
    ] {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path(), made);
            store.create_tenant(&tenant("x"), "x").unwrap();
        }
        let err = Store::open_with(
            dir.path(),
            StoreOptions {
                backend: wrong,
                ..StoreOptions::default()
            },
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Backend(_)), "{msg}");
        assert!(msg.contains("created with the"), "{msg}");
        // The right backend still opens it, data intact.
        let store = open(dir.path(), made);
        assert_eq!(store.tenants().unwrap().len(), 1);
    }
}

#[test]
fn opening_a_sled_store_without_sled_support_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("BACKEND"), "sled\n").unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("'sled' backend"), "{msg}");
    if cfg!(not(feature = "sled")) {
        assert!(msg.contains("enable the `sled` feature"), "{msg}");
    }
}

fn audit_records_are_appended_and_found_by_patient_and_time(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let rec = |micros: i64, nonce: u64, patients: &[&str]| AuditRecord {
        micros,
        nonce,
        json: format!("{{\"n\":{nonce}}}").into_bytes(),
        patients: patients.iter().map(|p| p.to_string()).collect(),
    };
    store
        .append_audit(&t, vec![rec(100, 1, &["p1"]), rec(100, 2, &["p2"])])
        .unwrap();
    store
        .append_audit(&t, vec![rec(200, 3, &["p1", "p2"])])
        .unwrap();
    let all = store.audit_records(&t, None, 0, i64::MAX, 100).unwrap();
    assert_eq!(all.len(), 3);
    let p1 = store
        .audit_records(&t, Some("p1"), 0, i64::MAX, 100)
        .unwrap();
    assert_eq!(p1, vec![b"{\"n\":1}".to_vec(), b"{\"n\":3}".to_vec()]);
    let late = store
        .audit_records(&t, Some("p2"), 150, i64::MAX, 100)
        .unwrap();
    assert_eq!(late, vec![b"{\"n\":3}".to_vec()]);
    assert!(
        store
            .audit_records(&t, Some("p3"), 0, i64::MAX, 100)
            .unwrap()
            .is_empty()
    );
    // The audit area belongs to the tenant: another tenant sees nothing, an unknown one errs.
    let other = tenant("other");
    store.create_tenant(&other, "Other").unwrap();
    assert!(
        store
            .audit_records(&other, None, 0, i64::MAX, 100)
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .append_audit(&tenant("nope"), vec![rec(1, 1, &[])])
            .is_err()
    );
    // Audit records are not resources: they do not show up in the change log.
    assert_eq!(store.last_seq(&t).unwrap(), 0);
}
