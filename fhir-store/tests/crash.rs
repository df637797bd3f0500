//! Crash test: a child process (this test binary, re-executed) writes as fast as it can and
//! prints every acknowledged write; the parent kills it with SIGKILL mid-stream, reopens the
//! store and checks that every acknowledged write is there and that nothing is half-written.
//!
//! This covers a process crash (`kill -9`), not a power loss: the OS page cache survives.
//!
//! Half of the writer threads attach an audit hook to every write ([`Store::with_audit`]); after
//! each crash, the audit records and those threads' committed changes must match one to one.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use fhir_core::{ResourceId, ResourceType, VersionId};
use fhir_store::{
    AuditHook, AuditRecord, AuditedWrite, Backend, Condition, Method, ReadResult, Store, WriteKind,
    WriteOutcome,
};

const DIR_ENV: &str = "FHIR_STORE_CRASH_CHILD_DIR";
const BACKEND_ENV: &str = "FHIR_STORE_CRASH_CHILD_BACKEND";
const WRITER_THREADS: usize = 4;

backend_tests!(kill_9_loses_no_acknowledged_write);

/// The child's side. In a normal test run (no environment variable) it does nothing.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let backend = match std::env::var(BACKEND_ENV).as_deref() {
        #[cfg(feature = "sled")]
        Ok("sled") => Backend::Sled,
        _ => Backend::Redb,
    };
    let store = open(std::path::Path::new(&dir), backend);
    let t = tenant("crash");
    let _ = store.create_tenant(&t, "Crash test");
    let handles: Vec<_> = (0..WRITER_THREADS)
        .map(|k| {
            let (store, t) = (store.clone(), t.clone());
            thread::spawn(move || {
                let mut own: Option<ResourceId> = None;
                // Even threads audit every write, in the write's own commit.
                let handle = |store: &Store| {
                    if k % 2 == 0 {
                        store.with_audit(audit_hook())
                    } else {
                        store.clone()
                    }
                };
                for i in 0u64.. {
                    let store = handle(&store);
                    // Unique across the crash rounds, which share one store.
                    let marker = format!("p{}t{k}-{i}", std::process::id());
                    // Creates (some conditional), updates of one resource per thread, and
                    // deletes, so that every kind of record is in flight when the kill comes.
                    let (id, version, method) = match (i % 4, &own) {
                        (1, Some(id)) => {
                            let w = store
                                .update(&t, id, obs(Some("urn:crash"), &marker, "1"), None)
                                .unwrap();
                            (id.clone(), w.resource.version, "U")
                        }
                        (3, Some(id)) if i % 12 == 3 => {
                            let d = store.delete(&t, obs_type(), id, None).unwrap();
                            let v = d.version.unwrap_or(VersionId(0));
                            (id.clone(), v, "D")
                        }
                        _ => {
                            let cond = Condition::identifier(Some("urn:crash"), &marker);
                            let w = store
                                .create(&t, obs(Some("urn:crash"), &marker, "72.50"), Some(&cond))
                                .unwrap();
                            assert_eq!(w.kind, WriteKind::Created);
                            if own.is_none() || i % 12 == 4 {
                                own = Some(w.resource.id.clone());
                            }
                            (w.resource.id, w.resource.version, "C")
                        }
                    };
                    let mut out = std::io::stdout().lock();
                    // The trailing '.' proves the line was printed whole.
                    writeln!(out, "ACK {method} {id} {} {marker} .", version.0).unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
}

/// The record of an audited write: `id/version`.
fn audit_hook() -> AuditHook {
    Box::new(|writes: &[AuditedWrite<'_>]| {
        writes
            .iter()
            .filter_map(|w| match w.outcome {
                WriteOutcome::Write(r) if r.seq.is_some() => {
                    Some(format!("{}/{}", r.resource.id, r.resource.version))
                }
                WriteOutcome::Delete(d) => Some(format!("{}/{}", d.id.as_ref()?, d.version?)),
                WriteOutcome::Write(_) => None,
            })
            .map(|what| AuditRecord {
                micros: 1,
                nonce: u64::from_be_bytes(
                    uuid::Uuid::new_v4().as_bytes()[..8]
                        .try_into()
                        .unwrap_or([0; 8]),
                ),
                json: what.into_bytes(),
                patients: Vec::new(),
            })
            .collect()
    })
}

struct Ack {
    method: String,
    id: ResourceId,
    version: VersionId,
    marker: String,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let parts: Vec<&str> = line.split(' ').collect();
    match parts.as_slice() {
        ["ACK", method, id, version, marker, "."] => Some(Ack {
            method: method.to_string(),
            id: ResourceId::new(id).ok()?,
            version: VersionId(version.parse().ok()?),
            marker: marker.to_string(),
        }),
        _ => None,
    }
}

/// Runs the child writer on `dir` until it has acknowledged `kill_after` writes, kills it with
/// SIGKILL, and returns every write it acknowledged.
fn run_child_and_kill(dir: &std::path::Path, backend_name: &str, kill_after: usize) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(BACKEND_ENV, backend_name)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                // A line cut off by the kill has no newline: it was never acknowledged whole.
                Ok(_) if buf.ends_with(b"\n") => {
                    if let Some(ack) = parse_ack(String::from_utf8_lossy(&buf).trim_end()) {
                        let _ = tx.send(ack);
                    }
                }
                Ok(_) => break,
            }
        }
    });
    let mut acks = Vec::new();
    let started = Instant::now();
    // Kill mid-stream (or after a time limit on a slow disk).
    while acks.len() < kill_after && started.elapsed() < Duration::from_secs(30) {
        if let Ok(a) = rx.recv_timeout(Duration::from_millis(100)) {
            acks.push(a);
        }
    }
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
    reader.join().unwrap();
    acks.extend(rx.try_iter());
    assert!(
        acks.len() >= 20,
        "the child acknowledged only {} writes",
        acks.len()
    );
    acks
}

fn kill_9_loses_no_acknowledged_write(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let backend_name = match backend {
        Backend::Redb => "redb",
        #[cfg(feature = "sled")]
        Backend::Sled => "sled",
    };
    // Several crashes of the same store, each recovered from before the next.
    let mut acks = Vec::new();
    for kill_after in [150, 300, 75] {
        acks.extend(run_child_and_kill(dir.path(), backend_name, kill_after));
        check_store(dir.path(), backend, backend_name, &acks);
    }
}

fn check_store(dir: &std::path::Path, backend: Backend, backend_name: &str, acks: &[Ack]) {
    let store = open(dir, backend);
    let t = tenant("crash");
    let ty = obs_type();
    eprintln!(
        "{backend_name}: killed the writer after {} acknowledged writes, {} changes committed",
        acks.len(),
        store.last_seq(&t).unwrap()
    );
    // Every acknowledged write is there, with its content.
    for a in acks {
        match store.vread(&t, ty, &a.id, a.version).unwrap() {
            ReadResult::Found(r) => {
                assert_ne!(a.method, "D");
                let json = text(&r.json);
                assert!(
                    json.contains(&format!(r#""value":"{}""#, a.marker)),
                    "{json}"
                );
                assert!(json.contains(&format!(r#""versionId":"{}""#, a.version)));
            }
            ReadResult::Deleted { .. } => assert_eq!(a.method, "D"),
            ReadResult::NotFound => {
                // A delete that found nothing to delete wrote nothing.
                assert!(
                    a.method == "D" && a.version.0 == 0,
                    "lost {} v{}",
                    a.id,
                    a.version
                );
            }
        }
        let current = match store.read(&t, ty, &a.id).unwrap() {
            ReadResult::Found(r) => r.version,
            ReadResult::Deleted { version, .. } => version,
            ReadResult::NotFound => panic!("lost {}", a.id),
        };
        assert!(current >= a.version);
    }

    // The change log is contiguous and agrees with the current pointers and versions.
    let changes: Vec<_> = store.changes(&t, 1).unwrap().map(Result::unwrap).collect();
    let last = store.last_seq(&t).unwrap();
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>()
    );
    assert!(last as usize >= acks.len());
    let mut newest: HashMap<(ResourceType, ResourceId), (VersionId, Method)> = HashMap::new();
    for c in &changes {
        let prev = newest
            .insert((c.resource_type, c.id.clone()), (c.version, c.method))
            .map_or(0, |(v, _)| v.0);
        assert_eq!(c.version.0, prev + 1, "versions of {} out of order", c.id);
        match store.vread(&t, c.resource_type, &c.id, c.version).unwrap() {
            ReadResult::Found(_) => assert_ne!(c.method, Method::Delete),
            ReadResult::Deleted { .. } => assert_eq!(c.method, Method::Delete),
            ReadResult::NotFound => panic!("change {} has no version record", c.seq),
        }
    }
    for ((rt, id), (version, method)) in &newest {
        match store.read(&t, *rt, id).unwrap() {
            ReadResult::Found(r) => {
                assert_eq!((r.version, *method == Method::Delete), (*version, false));
            }
            ReadResult::Deleted { version: v, .. } => {
                assert_eq!((v, *method), (*version, Method::Delete));
            }
            ReadResult::NotFound => panic!("{id} has changes but no current pointer"),
        }
    }
    // The identifier index agrees with the current versions.
    for a in acks.iter().filter(|a| a.method == "C").take(50) {
        let cond = Condition::identifier(Some("urn:crash"), &a.marker);
        let hits = store.find(&t, ty, &cond).unwrap();
        let live_with_marker = match store.read(&t, ty, &a.id).unwrap() {
            ReadResult::Found(r) => text(&r.json).contains(&format!(r#""value":"{}""#, a.marker)),
            _ => false,
        };
        assert_eq!(hits == vec![a.id.clone()], live_with_marker, "{}", a.marker);
    }
    // Every change of an audited thread has its audit record, and every record its change.
    let audited_thread = |id: &ResourceId| match store.vread(&t, ty, id, VersionId(1)).unwrap() {
        ReadResult::Found(r) => {
            let json = text(&r.json);
            (0..WRITER_THREADS)
                .step_by(2)
                .any(|k| json.contains(&format!("t{k}-")))
        }
        _ => panic!("{id} has no first version"),
    };
    let mut audited: Vec<String> = changes
        .iter()
        .filter(|c| audited_thread(&c.id))
        .map(|c| format!("{}/{}", c.id, c.version))
        .collect();
    let mut records: Vec<String> = store
        .audit_records(&t, None, 0, i64::MAX, usize::MAX)
        .unwrap()
        .iter()
        .map(|r| text(r))
        .collect();
    audited.sort();
    records.sort();
    assert!(!records.is_empty());
    assert_eq!(records, audited, "audit records and audited changes differ");
    // And the store goes on from there.
    let w = store.create(&t, plain_obs("1"), None).unwrap();
    assert_eq!(w.seq, Some(last + 1));
}
