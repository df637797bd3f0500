//! Concurrent writers and readers against the real backends.

#[macro_use]
mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use common::*;
use fhir_core::{ResourceId, ResourceType, VersionId};
use fhir_store::{Backend, Condition, HistoryQuery, HistoryScope, Store, StoreError, WriteKind};

backend_tests!(
    concurrent_conditional_creates_yield_one_resource,
    concurrent_updates_keep_every_version,
    concurrent_if_match_updates_serialize,
    history_paging_while_writing_never_repeats_or_skips,
);

fn concurrent_conditional_creates_yield_one_resource(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let n = 50;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (store, t, barrier) = (store.clone(), t.clone(), barrier.clone());
            thread::spawn(move || {
                let cond = Condition::parse("identifier=urn%3Aphg%7Cmeasurement-42").unwrap();
                barrier.wait();
                store
                    .create(
                        &t,
                        obs(Some("urn:phg"), "measurement-42", "72.50"),
                        Some(&cond),
                    )
                    .unwrap()
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created = results
        .iter()
        .filter(|r| r.kind == WriteKind::Created)
        .count();
    assert_eq!(created, 1);
    let ids: BTreeSet<_> = results.iter().map(|r| r.resource.id.clone()).collect();
    assert_eq!(ids.len(), 1);
    let cond = Condition::identifier(Some("urn:phg"), "measurement-42");
    assert_eq!(store.find(&t, obs_type(), &cond).unwrap().len(), 1);
    assert_eq!(store.last_seq(&t).unwrap(), 1);
}

fn concurrent_updates_keep_every_version(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = obs_type();
    let id = store.create(&t, plain_obs("0"), None).unwrap().resource.id;
    let (threads, per_thread) = (8, 25);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|k| {
            let (store, t, id, barrier) = (store.clone(), t.clone(), id.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                let mut versions = Vec::new();
                for i in 0..per_thread {
                    let w = store
                        .update(&t, &id, plain_obs(&format!("{k}.{i:03}")), None)
                        .unwrap();
                    assert_eq!(w.kind, WriteKind::Updated);
                    versions.push(w.resource.version.0);
                }
                versions
            })
        })
        .collect();
    let mut versions: Vec<u64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    versions.sort_unstable();
    // Every update got its own version.
    assert_eq!(versions, (2..=201).collect::<Vec<_>>());
    assert_eq!(
        found(store.read(&t, ty, &id).unwrap()).version,
        VersionId(201)
    );

    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = store
            .history(
                &t,
                HistoryScope::Instance(ty, id.clone()),
                &HistoryQuery {
                    since: None,
                    before,
                    count: 50,
                },
            )
            .unwrap();
        seen.extend(page.entries.iter().map(|e| e.version.0));
        match page.next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, (1..=201).rev().collect::<Vec<_>>());
    // Each version's content is one of the writes, with its own versionId.
    for v in [1, 57, 201] {
        let r = found(store.vread(&t, ty, &id, VersionId(v)).unwrap());
        assert!(text(&r.json).contains(&format!(r#""versionId":"{v}""#)));
    }
    let log: Vec<_> = store
        .changes(&t, 1)
        .unwrap()
        .map(|c| c.unwrap().version.0)
        .collect();
    assert_eq!(log, (1..=201).collect::<Vec<_>>());
}

fn concurrent_if_match_updates_serialize(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ty = obs_type();
    let id = store.create(&t, plain_obs("0"), None).unwrap().resource.id;
    let threads = 6;
    let per_thread = 5;
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (store, t, id) = (store.clone(), t.clone(), id.clone());
            thread::spawn(move || {
                let mut conflicts = 0;
                let mut done = 0;
                while done < per_thread {
                    let current = found(store.read(&t, ty, &id).unwrap()).version;
                    match store.update(&t, &id, plain_obs("1"), Some(current)) {
                        Ok(w) => {
                            assert_eq!(w.resource.version, current.next());
                            done += 1;
                        }
                        Err(StoreError::VersionConflict { expected, .. }) => {
                            assert_eq!(expected, current);
                            conflicts += 1;
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                conflicts
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let v = found(store.read(&t, ty, &id).unwrap()).version;
    assert_eq!(v, VersionId(1 + threads * per_thread));
}

/// Maps each change to its sequence number, to check which entries a history listing holds.
fn seqs_by_key(
    store: &Store,
    t: &fhir_core::TenantId,
) -> HashMap<(ResourceType, ResourceId, VersionId), (u64, String)> {
    store
        .changes(t, 1)
        .unwrap()
        .map(|c| {
            let c = c.unwrap();
            ((c.resource_type, c.id, c.version), (c.seq, c.last_updated))
        })
        .collect()
}

fn history_paging_while_writing_never_repeats_or_skips(backend: Backend) {
    let (_dir, store, t) = setup(backend);
    let ot = obs_type();
    // Some history to page through before the concurrent writer starts.
    let mut obs_ids = Vec::new();
    for i in 0..40 {
        obs_ids.push(
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
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, t, stop, obs_ids) = (store.clone(), t.clone(), stop.clone(), obs_ids.clone());
        thread::spawn(move || {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                match i % 3 {
                    0 => {
                        store.create(&t, plain_obs("1"), None).unwrap();
                    }
                    1 => {
                        store
                            .update(&t, &obs_ids[i % obs_ids.len()], plain_obs("2"), None)
                            .unwrap();
                    }
                    _ => {
                        store
                            .create(&t, patient(None, "x", "Concurrent"), None)
                            .unwrap();
                    }
                }
                i += 1;
            }
            i
        })
    };
    let page_through = |scope: HistoryScope, since: Option<String>| {
        let mut entries = Vec::new();
        let mut before = None;
        loop {
            let q = HistoryQuery {
                since: since.clone(),
                before,
                count: 7,
            };
            let page = store.history(&t, scope.clone(), &q).unwrap();
            entries.extend(page.entries);
            // Give the writer time to commit between pages.
            thread::sleep(std::time::Duration::from_millis(2));
            match page.next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        entries
    };
    let system = page_through(HistoryScope::System, None);
    let of_type = page_through(HistoryScope::Type(ot), None);
    let log = seqs_by_key(&store, &t);
    let since = log
        .values()
        .find(|(seq, _)| *seq == 30)
        .map(|(_, lu)| lu.clone())
        .unwrap();
    let recent = page_through(HistoryScope::System, Some(since.clone()));
    stop.store(true, Ordering::Relaxed);
    let concurrent_writes = writer.join().unwrap();
    assert!(concurrent_writes > 0);

    let log = seqs_by_key(&store, &t);
    let seq_of = |e: &fhir_store::HistoryEntry| log[&(e.resource_type, e.id.clone(), e.version)].0;
    // System history: exactly top, top-1, …, 1.
    let seqs: Vec<u64> = system.iter().map(seq_of).collect();
    let top = seqs[0];
    assert!(top >= 80);
    assert_eq!(seqs, (1..=top).rev().collect::<Vec<_>>());
    // Type history: every Observation change up to its first entry, newest first, once each.
    let seqs: Vec<u64> = of_type.iter().map(seq_of).collect();
    let top = seqs[0];
    let mut expected: Vec<u64> = log
        .iter()
        .filter(|((ty, _, _), (seq, _))| *ty == ot && *seq <= top)
        .map(|(_, (seq, _))| *seq)
        .collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seqs, expected);
    // With _since: every change with lastUpdated >= since, up to the first entry.
    let seqs: Vec<u64> = recent.iter().map(seq_of).collect();
    let top = seqs[0];
    let mut expected: Vec<u64> = log
        .values()
        .filter(|(seq, lu)| *seq <= top && *lu >= since)
        .map(|(seq, _)| *seq)
        .collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seqs, expected);
    assert!(*seqs.last().unwrap() <= 30);
}
