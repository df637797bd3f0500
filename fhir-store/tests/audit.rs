//! Audit records committed with the writes they describe ([`Store::with_audit`]), and paging
//! through the audit area ([`Store::audit_page`]), on both backends.

#[macro_use]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use fhir_core::{Resource, ResourceId, VersionId};
use fhir_store::{
    AuditCursor, AuditHook, AuditQuery, AuditRecord, AuditedWrite, Backend, Condition, Store,
    StoreError, TxEntry, WriteKind, WriteOp, WriteOutcome,
};

backend_tests!(
    a_create_and_its_record_are_one_commit,
    a_failing_write_runs_no_hook_and_leaves_no_record,
    updates_patches_deletes_and_existing_matches_are_described,
    a_transaction_is_audited_whole_or_not_at_all,
    a_batch_calls_its_hook_once_with_the_entries_that_succeeded,
    a_panicking_hook_fails_the_write,
    a_panicking_batch_hook_takes_the_entries_out_again,
    the_hook_is_for_the_next_write_only,
    handles_know_their_store,
    audit_pages_sort_and_count,
);

/// An Observation about `patient` (an id, or a full reference such as a `urn:uuid:`).
fn obs_for(patient: &str) -> Resource {
    let reference = if patient.contains(':') {
        patient.to_string()
    } else {
        format!("Patient/{patient}")
    };
    Resource::from_json_bytes(
        format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"pulse"}},"subject":{{"reference":"{reference}"}}}}"#
        )
        .as_bytes(),
    )
    .unwrap()
}

/// What one write looked like to the hook: `Type/id/_history/version kind patients`.
fn describe(w: &AuditedWrite<'_>) -> String {
    let (what, kind) = match w.outcome {
        WriteOutcome::Write(r) => (
            format!(
                "{}/{}/_history/{}",
                r.resource.resource_type, r.resource.id, r.resource.version
            ),
            format!("{:?}", r.kind),
        ),
        WriteOutcome::Delete(d) => (
            format!(
                "{}/{}/_history/{}",
                d.resource_type,
                d.id.as_ref().map_or("-", |i| i.as_str()),
                d.version.map_or(0, |v| v.0)
            ),
            "Deleted".to_string(),
        ),
    };
    format!("{what} {kind} {}", w.patients.join(","))
}

/// A hook that makes one record per write (its description, indexed by its patients) and
/// counts its calls.
fn hook(calls: &Arc<AtomicUsize>) -> AuditHook {
    let calls = calls.clone();
    Box::new(move |writes: &[AuditedWrite<'_>]| {
        calls.fetch_add(1, Ordering::SeqCst);
        writes
            .iter()
            .enumerate()
            .map(|(i, w)| AuditRecord {
                micros: 1_000 + i as i64,
                nonce: rand_nonce(),
                json: describe(w).into_bytes(),
                patients: w.patients.to_vec(),
            })
            .collect()
    })
}

fn rand_nonce() -> u64 {
    u64::from_be_bytes(uuid::Uuid::new_v4().as_bytes()[..8].try_into().unwrap())
}

fn all_records(store: &Store, t: &fhir_core::TenantId) -> Vec<String> {
    store
        .audit_records(t, None, 0, i64::MAX, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| text(&r))
        .collect()
}

fn a_create_and_its_record_are_one_commit(backend: Backend) {
    let (dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    let created = store
        .with_audit(hook(&calls))
        .create(&t, obs_for("p1"), None)
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // The record names the id the store assigned, and is there as soon as the write returns.
    let want = format!("Observation/{}/_history/1 Created p1", created.resource.id);
    assert_eq!(all_records(&store, &t), vec![want.clone()]);
    let by_patient = store
        .audit_records(&t, Some("p1"), 0, i64::MAX, 10)
        .unwrap();
    assert_eq!(by_patient, vec![want.clone().into_bytes()]);
    // Both are durable together: they survive closing and reopening the store.
    drop(store);
    let store = open(dir.path(), backend);
    assert_eq!(all_records(&store, &t), vec![want]);
    assert_eq!(store.last_seq(&t).unwrap(), 1);
}

fn a_failing_write_runs_no_hook_and_leaves_no_record(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let id = store.create(&t, obs_for("p1"), None).unwrap().resource.id;
    let calls = Arc::new(AtomicUsize::new(0));
    let err = store
        .with_audit(hook(&calls))
        .update(&t, &id, obs_for("p1"), Some(VersionId(7)))
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "the hook ran for a failed write"
    );
    assert!(all_records(&store, &t).is_empty());
    assert_eq!(store.last_seq(&t).unwrap(), 1);
    // An unknown tenant fails the request whole too.
    let err = store
        .with_audit(hook(&calls))
        .create(&tenant("nope"), obs_for("p1"), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::TenantNotFound(_)), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

fn updates_patches_deletes_and_existing_matches_are_described(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    let id = store
        .create(
            &t,
            obs(Some("urn:phg"), "m-1", "70"),
            Some(&Condition::identifier(Some("urn:phg"), "m-1")),
        )
        .unwrap()
        .resource
        .id;
    // Update moves the resource into p2's compartment (keeping its identifier).
    let moved = Resource::from_json_bytes(
        format!(
            r#"{{"resourceType":"Observation","id":"{id}","identifier":[{{"system":"urn:phg","value":"m-1"}}],"status":"final","code":{{"text":"pulse"}},"subject":{{"reference":"Patient/p2"}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    store
        .with_audit(hook(&calls))
        .update(&t, &id, moved, None)
        .unwrap();
    let patch = fhir_core::json::parse(
        br#"[{"op":"replace","path":"/subject/reference","value":"Patient/p3"}]"#,
    )
    .unwrap();
    store
        .with_audit(hook(&calls))
        .patch(&t, obs_type(), &id, patch, None)
        .unwrap();
    // A conditional create that matches writes nothing but is still an access to the match.
    let existing = store
        .with_audit(hook(&calls))
        .create(
            &t,
            obs(Some("urn:phg"), "m-1", "70"),
            Some(&Condition::identifier(Some("urn:phg"), "m-1")),
        )
        .unwrap();
    assert_eq!(existing.kind, WriteKind::Existing);
    // The deletion is about the patient of the content it deleted.
    store
        .with_audit(hook(&calls))
        .delete(&t, obs_type(), &id, None)
        .unwrap();
    // Deleting it again deletes nothing: no patient.
    store
        .with_audit(hook(&calls))
        .delete(&t, obs_type(), &id, None)
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 5);
    let mut got = all_records(&store, &t);
    got.sort();
    let mut want = vec![
        format!("Observation/{id}/_history/2 Updated p2"),
        format!("Observation/{id}/_history/3 Updated p3"),
        format!("Observation/{id}/_history/3 Existing p3"),
        format!("Observation/{id}/_history/4 Deleted p3"),
        format!("Observation/{id}/_history/0 Deleted "),
    ];
    want.sort();
    assert_eq!(got, want);
}

fn a_transaction_is_audited_whole_or_not_at_all(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    let patient_url = "urn:uuid:7f1c0b36-2b43-4b8e-9d0e-1a2b3c4d5e6f";
    let out = store
        .with_audit(hook(&calls))
        .transaction_entries(
            &t,
            vec![
                TxEntry::new(WriteOp::Create {
                    resource: obs_for(patient_url),
                    if_none_exist: None,
                }),
                TxEntry::with_full_url(
                    patient_url,
                    WriteOp::Create {
                        resource: patient(None, "13031353453", "Nordmann"),
                        if_none_exist: None,
                    },
                ),
            ],
        )
        .unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let (WriteOutcome::Write(o), WriteOutcome::Write(p)) = (&out[0], &out[1]) else {
        panic!("{out:?}")
    };
    // Both name the patient the placeholder became: the compartment is taken after rewriting.
    let pid = &p.resource.id;
    let mut got = all_records(&store, &t);
    got.sort();
    let mut want = vec![
        format!("Observation/{}/_history/1 Created {pid}", o.resource.id),
        format!("Patient/{pid}/_history/1 Created {pid}"),
    ];
    want.sort();
    assert_eq!(got, want);

    // A failing transaction: no hook, no writes, no records.
    let before = store.last_seq(&t).unwrap();
    let err = store
        .with_audit(hook(&calls))
        .transaction(
            &t,
            vec![
                WriteOp::Create {
                    resource: obs_for("p9"),
                    if_none_exist: None,
                },
                WriteOp::Delete {
                    ty: obs_type(),
                    id: o.resource.id.clone(),
                    if_match: Some(VersionId(5)),
                },
            ],
        )
        .unwrap_err();
    assert!(matches!(err, StoreError::VersionConflict { .. }), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(store.last_seq(&t).unwrap(), before);
    assert_eq!(all_records(&store, &t).len(), 2);
}

fn a_batch_calls_its_hook_once_with_the_entries_that_succeeded(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let hook: AuditHook = {
        let (seen, calls) = (seen.clone(), calls.clone());
        Box::new(move |writes: &[AuditedWrite<'_>]| {
            calls.fetch_add(1, Ordering::SeqCst);
            let lines: Vec<String> = writes.iter().map(describe).collect();
            seen.lock().unwrap().extend(lines.clone());
            // One record for the whole batch, indexed by every patient in it.
            let mut patients: Vec<String> =
                writes.iter().flat_map(|w| w.patients.to_vec()).collect();
            patients.sort();
            patients.dedup();
            vec![AuditRecord {
                micros: 5,
                nonce: 1,
                json: lines.join("\n").into_bytes(),
                patients,
            }]
        })
    };
    let results = store
        .with_audit(hook)
        .batch(
            &t,
            vec![
                WriteOp::Create {
                    resource: obs_for("p1"),
                    if_none_exist: None,
                },
                WriteOp::Update {
                    id: ResourceId::new("x").unwrap(),
                    resource: obs_for("p2"),
                    if_match: Some(VersionId(3)), // fails: x does not exist
                },
                WriteOp::Create {
                    resource: obs_for("p2"),
                    if_none_exist: None,
                },
            ],
        )
        .unwrap();
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let ids: Vec<String> = [&results[0], &results[2]]
        .iter()
        .map(|r| match r {
            Ok(WriteOutcome::Write(w)) => w.resource.id.to_string(),
            other => panic!("{other:?}"),
        })
        .collect();
    let want = vec![
        format!("Observation/{}/_history/1 Created p1", ids[0]),
        format!("Observation/{}/_history/1 Created p2", ids[1]),
    ];
    assert_eq!(*seen.lock().unwrap(), want);
    for p in ["p1", "p2"] {
        let recs = store.audit_records(&t, Some(p), 0, i64::MAX, 10).unwrap();
        assert_eq!(recs, vec![want.join("\n").into_bytes()], "{p}");
    }
    assert_eq!(store.last_seq(&t).unwrap(), 2);
}

fn panicking(calls: &Arc<AtomicUsize>) -> AuditHook {
    let calls = calls.clone();
    Box::new(move |_: &[AuditedWrite<'_>]| {
        calls.fetch_add(1, Ordering::SeqCst);
        panic!("the audit trail is unavailable")
    })
}

fn a_panicking_hook_fails_the_write(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    let err = store
        .with_audit(panicking(&calls))
        .create(&t, obs_for("p1"), None)
        .unwrap_err();
    assert!(err.is_internal(), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // No write without its record.
    assert_eq!(store.last_seq(&t).unwrap(), 0);
    assert!(all_records(&store, &t).is_empty());
    // The writer goes on, with sequence numbers that have no gap.
    assert_eq!(store.create(&t, obs_for("p1"), None).unwrap().seq, Some(1));
}

fn a_panicking_batch_hook_takes_the_entries_out_again(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    // Concurrent plain writes share the group commit with the failing batch; they must stay.
    let others: Vec<_> = (0..4)
        .map(|_| {
            let (s, t) = (store.clone(), t.clone());
            std::thread::spawn(move || s.create(&t, obs_for("p7"), None).unwrap())
        })
        .collect();
    let err = store
        .with_audit(panicking(&calls))
        .batch(
            &t,
            (0..20)
                .map(|_| WriteOp::Create {
                    resource: obs_for("p1"),
                    if_none_exist: None,
                })
                .collect(),
        )
        .unwrap_err();
    assert!(err.is_internal(), "{err}");
    let others: Vec<_> = others.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(all_records(&store, &t).is_empty());
    // Only the other writes are there, numbered without gaps.
    let last = store.last_seq(&t).unwrap();
    assert_eq!(last, 4);
    let mut seqs: Vec<u64> = others.iter().filter_map(|w| w.seq).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    for c in store.changes(&t, 1).unwrap() {
        let c = c.unwrap();
        assert!(others.iter().any(|w| w.resource.id == c.id), "{c:?}");
    }
    assert_eq!(store.create(&t, obs_for("p1"), None).unwrap().seq, Some(5));
}

fn the_hook_is_for_the_next_write_only(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    let audited = store.with_audit(hook(&calls));
    let clone = audited.clone();
    assert!(clone.has_pending_audit());
    // Tenant administration and plain audit appends do not take it.
    store.create_tenant(&tenant("hf-b"), "B").unwrap();
    audited
        .append_audit(
            &t,
            vec![AuditRecord {
                micros: 1,
                nonce: 1,
                json: b"read".to_vec(),
                patients: vec![],
            }],
        )
        .unwrap();
    assert!(clone.has_pending_audit());
    clone.create(&t, obs_for("p1"), None).unwrap();
    assert!(!audited.has_pending_audit());
    audited.create(&t, obs_for("p1"), None).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(all_records(&store, &t).len(), 2);
    // The original handle never carried it.
    assert!(!store.has_pending_audit());
}

fn handles_know_their_store(backend: Backend) {
    let (_dir, store, _t) = setup(backend);
    let calls = Arc::new(AtomicUsize::new(0));
    assert!(store.same_store(&store.clone()));
    assert!(store.same_store(&store.with_audit(hook(&calls))));
    let (_dir2, other, _t2) = setup(backend);
    assert!(!store.same_store(&other));
}

fn audit_pages_sort_and_count(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let rec = |micros: i64, nonce: u64, patients: &[&str]| AuditRecord {
        micros,
        nonce,
        json: format!("{micros}.{nonce}").into_bytes(),
        patients: patients.iter().map(|p| p.to_string()).collect(),
    };
    let mut records = Vec::new();
    for i in 0..25 {
        let p: &[&str] = if i % 2 == 0 { &["p1"] } else { &["p2"] };
        records.push(rec(100 + i / 3, i as u64, p));
    }
    store.append_audit(&t, records).unwrap();
    let collect = |q: AuditQuery| {
        let mut out = Vec::new();
        let mut q = q;
        let mut pages = 0;
        loop {
            let page = store.audit_page(&t, &q).unwrap();
            assert!(page.records.len() <= q.count);
            out.extend(page.records.into_iter().map(|r| text(&r)));
            pages += 1;
            match page.next {
                Some(c) => {
                    // The cursor survives its text form.
                    let c: AuditCursor = c.to_string().parse().unwrap();
                    q.after = Some(c);
                }
                None => break,
            }
        }
        (out, pages)
    };
    let all_oldest: Vec<String> = (0..25).map(|i| format!("{}.{i}", 100 + i / 3)).collect();
    let (got, pages) = collect(AuditQuery {
        newest_first: false,
        count: 4,
        ..AuditQuery::default()
    });
    assert_eq!(got, all_oldest);
    assert_eq!(pages, 7);
    let (got, _) = collect(AuditQuery {
        count: 4,
        ..AuditQuery::default()
    });
    let mut newest = all_oldest.clone();
    newest.reverse();
    assert_eq!(got, newest, "newest first is the default");
    // By patient and time range, in both directions.
    let q = AuditQuery {
        patient: Some("p1".into()),
        from_micros: 102,
        to_micros: 106,
        count: 2,
        ..AuditQuery::default()
    };
    let want: Vec<String> = (0..25)
        .filter(|i| i % 2 == 0 && (102..106).contains(&(100 + i / 3)))
        .map(|i| format!("{}.{i}", 100 + i / 3))
        .rev()
        .collect();
    assert_eq!(collect(q.clone()).0, want);
    assert_eq!(store.audit_count(&t, &q).unwrap(), want.len() as u64);
    let mut forward = want.clone();
    forward.reverse();
    assert_eq!(
        collect(AuditQuery {
            newest_first: false,
            ..q.clone()
        })
        .0,
        forward
    );
    assert_eq!(store.audit_count(&t, &AuditQuery::default()).unwrap(), 25);
    // Records appended after the first page do not disturb an oldest-first walk's next page.
    let first = store
        .audit_page(
            &t,
            &AuditQuery {
                newest_first: false,
                count: 10,
                ..AuditQuery::default()
            },
        )
        .unwrap();
    store.append_audit(&t, vec![rec(50, 99, &[])]).unwrap();
    let second = store
        .audit_page(
            &t,
            &AuditQuery {
                newest_first: false,
                count: 10,
                after: first.next,
                ..AuditQuery::default()
            },
        )
        .unwrap();
    assert_eq!(text(&second.records[0]), all_oldest[10]);
    assert!("zz".parse::<AuditCursor>().is_err());
    assert!(
        "0123456789abcdef0123456789abcdeg"
            .parse::<AuditCursor>()
            .is_err()
    );
    // Unknown tenants err.
    assert!(
        store
            .audit_page(&tenant("nope"), &AuditQuery::default())
            .is_err()
    );
}
