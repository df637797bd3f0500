//! The ordered key-value layer under the store.
//!
//! [`Kv`] is deliberately small — point get, ordered range scans in either direction and one
//! atomic, durable multi-key write — so that another backend (or a distributed KV) can be put
//! under the store without touching the versioning logic. Keys and values are plain bytes and
//! keys are ordered bytewise.
//!
//! Two backends exist: [`RedbKv`] (the default) and, with the crate feature `sled`, `SledKv`.
//! [`open`] records which one created a directory in a marker file, so that a store is never
//! opened with the wrong backend.

use std::fs;
use std::io::Write;
use std::ops::Bound;
use std::path::Path;

use crate::Backend;

/// A key-value pair as returned by scans.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// A lazily evaluated range scan.
pub type KvIter<'a> = Box<dyn Iterator<Item = Result<KvPair, KvError>> + 'a>;

/// An error of the KV backend (I/O, corruption, locking), as text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KvError(pub String);

impl KvError {
    fn from_display(context: &str, e: impl std::fmt::Display) -> KvError {
        KvError(format!("{context}: {e}"))
    }
}

/// Scan order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Ascending keys.
    Forward,
    /// Descending keys.
    Reverse,
}

/// One write of a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOp {
    /// Set `key` to `value`.
    Put(Vec<u8>, Vec<u8>),
    /// Remove `key` (no error if absent).
    Delete(Vec<u8>),
}

/// Writes that are committed together: all or none become visible, durably, in one call of
/// [`Kv::commit`]. Operations apply in order, so a later write to a key wins.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<BatchOp>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Adds a put.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(BatchOp::Put(key, value));
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(BatchOp::Delete(key));
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether the batch has no operations.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The operations in order.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }
}

/// An ordered key-value store with atomic, durable batches.
///
/// Readers must only ever observe committed, durable state: a value visible to [`Kv::get`] or
/// a scan must survive a crash. Implementations must be usable from many threads at once; the
/// store itself issues all commits from one writer thread.
pub trait Kv: Send + Sync {
    /// The backend's name, as recorded in the marker file.
    fn name(&self) -> &'static str;

    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError>;

    /// Pairs with keys in `(start, end)`, in `direction`, lazily.
    fn iter<'a>(
        &'a self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        direction: Direction,
    ) -> Result<KvIter<'a>, KvError>;

    /// At most `limit` pairs with keys in `(start, end)`, in `direction`.
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        direction: Direction,
        limit: usize,
    ) -> Result<Vec<KvPair>, KvError> {
        self.iter(start, end, direction)?.take(limit).collect()
    }

    /// Applies `batch` atomically and returns only once it is durable (fsync).
    fn commit(&self, batch: WriteBatch) -> Result<(), KvError>;
}

/// The first key after every key that starts with `prefix` (`None`: no such key exists, the
/// range is unbounded above).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// redb

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");

type RedbGuard = redb::AccessGuard<'static, &'static [u8]>;

/// The redb backend: one table in one file, every commit with `Durability::Immediate`.
pub struct RedbKv {
    db: redb::Database,
}

impl RedbKv {
    /// Opens or creates the database file at `path`.
    pub fn open(path: &Path, cache_size: Option<usize>) -> Result<RedbKv, KvError> {
        let mut builder = redb::Builder::new();
        if let Some(bytes) = cache_size {
            builder.set_cache_size(bytes);
        }
        let db = builder
            .create(path)
            .map_err(|e| KvError::from_display("cannot open redb database", e))?;
        // Readers open the table read-only, which fails until it exists, so create it up front.
        let txn = db
            .begin_write()
            .map_err(|e| KvError::from_display("redb begin_write", e))?;
        txn.open_table(REDB_TABLE)
            .map_err(|e| KvError::from_display("redb open_table", e))?;
        txn.commit()
            .map_err(|e| KvError::from_display("redb commit", e))?;
        Ok(RedbKv { db })
    }

    fn table(&self) -> Result<redb::ReadOnlyTable<&'static [u8], &'static [u8]>, KvError> {
        use redb::ReadableDatabase;
        let txn = self
            .db
            .begin_read()
            .map_err(|e| KvError::from_display("redb begin_read", e))?;
        txn.open_table(REDB_TABLE)
            .map_err(|e| KvError::from_display("redb open_table", e))
    }
}

impl Kv for RedbKv {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let table = self.table()?;
        let value = table
            .get(key)
            .map_err(|e| KvError::from_display("redb get", e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    fn iter<'a>(
        &'a self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        direction: Direction,
    ) -> Result<KvIter<'a>, KvError> {
        if is_empty_range(start, end) {
            return Ok(Box::new(std::iter::empty()));
        }
        let table = self.table()?;
        // The range keeps its read transaction alive, so it is a consistent snapshot.
        let range = table
            .range::<&[u8]>((start, end))
            .map_err(|e| KvError::from_display("redb range", e))?;
        let map = |item: Result<(RedbGuard, RedbGuard), redb::StorageError>| {
            item.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .map_err(|e| KvError::from_display("redb scan", e))
        };
        Ok(match direction {
            Direction::Forward => Box::new(range.map(map)),
            Direction::Reverse => Box::new(range.rev().map(map)),
        })
    }

    fn commit(&self, batch: WriteBatch) -> Result<(), KvError> {
        let mut txn = self
            .db
            .begin_write()
            .map_err(|e| KvError::from_display("redb begin_write", e))?;
        txn.set_durability(redb::Durability::Immediate)
            .map_err(|e| KvError::from_display("redb set_durability", e))?;
        {
            let mut table = txn
                .open_table(REDB_TABLE)
                .map_err(|e| KvError::from_display("redb open_table", e))?;
            for op in batch.ops {
                match op {
                    BatchOp::Put(k, v) => {
                        table
                            .insert(k.as_slice(), v.as_slice())
                            .map_err(|e| KvError::from_display("redb insert", e))?;
                    }
                    BatchOp::Delete(k) => {
                        table
                            .remove(k.as_slice())
                            .map_err(|e| KvError::from_display("redb remove", e))?;
                    }
                }
            }
        }
        // Dropping an uncommitted transaction on an error above aborts it: nothing is visible.
        txn.commit()
            .map_err(|e| KvError::from_display("redb commit", e))
    }
}

/// Scans built from cursors can produce a range whose start lies after its end. It is empty,
/// and answering that here keeps every backend (some of which assert on it) out of the case.
fn is_empty_range(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e))
        | (Bound::Excluded(s), Bound::Excluded(e)) => s >= e,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// sled

#[cfg(feature = "sled")]
pub use sled_backend::SledKv;

#[cfg(feature = "sled")]
mod sled_backend {
    use std::ops::Bound;
    use std::path::Path;
    use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

    use super::{BatchOp, Direction, Kv, KvError, KvIter, KvPair, WriteBatch, is_empty_range};

    /// The sled backend: the default tree of one `sled::Db`; a commit is `apply_batch`
    /// followed by `flush()`.
    ///
    /// sled makes a batch visible to readers *before* `flush()` has made it durable. A reader
    /// that saw such data could act on it (index it, notify a subscriber) and then lose it in a
    /// crash, so readers are gated: a commit holds `gate` for writing from `apply_batch` until
    /// `flush` returns, and every read holds it for reading.
    pub struct SledKv {
        db: sled::Db,
        gate: RwLock<()>,
    }

    impl SledKv {
        /// Opens or creates the sled database in directory `path`.
        pub fn open(path: &Path, cache_size: Option<usize>) -> Result<SledKv, KvError> {
            let mut config = sled::Config::new().path(path);
            if let Some(bytes) = cache_size {
                config = config.cache_capacity(bytes as u64);
            }
            let db = config
                .open()
                .map_err(|e| KvError(format!("cannot open sled database: {e}")))?;
            Ok(SledKv {
                db,
                gate: RwLock::new(()),
            })
        }

        fn read_gate(&self) -> RwLockReadGuard<'_, ()> {
            // The guarded data is `()`, so a poisoned lock carries no broken state.
            self.gate.read().unwrap_or_else(|p| p.into_inner())
        }

        fn write_gate(&self) -> RwLockWriteGuard<'_, ()> {
            self.gate.write().unwrap_or_else(|p| p.into_inner())
        }
    }

    fn pair(item: sled::Result<(sled::IVec, sled::IVec)>) -> Result<KvPair, KvError> {
        item.map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(|e| KvError(format!("sled scan: {e}")))
    }

    struct GatedIter<'a> {
        kv: &'a SledKv,
        inner: sled::Iter,
        direction: Direction,
    }

    impl Iterator for GatedIter<'_> {
        type Item = Result<KvPair, KvError>;

        fn next(&mut self) -> Option<Self::Item> {
            let _gate = self.kv.read_gate();
            let item = match self.direction {
                Direction::Forward => self.inner.next(),
                Direction::Reverse => self.inner.next_back(),
            };
            item.map(pair)
        }
    }

    impl Kv for SledKv {
        fn name(&self) -> &'static str {
            "sled"
        }

        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
            let _gate = self.read_gate();
            self.db
                .get(key)
                .map(|v| v.map(|v| v.to_vec()))
                .map_err(|e| KvError(format!("sled get: {e}")))
        }

        fn iter<'a>(
            &'a self,
            start: Bound<&[u8]>,
            end: Bound<&[u8]>,
            direction: Direction,
        ) -> Result<KvIter<'a>, KvError> {
            if is_empty_range(start, end) {
                return Ok(Box::new(std::iter::empty()));
            }
            let inner = self.db.range::<&[u8], _>((start, end));
            Ok(Box::new(GatedIter {
                kv: self,
                inner,
                direction,
            }))
        }

        fn commit(&self, batch: WriteBatch) -> Result<(), KvError> {
            let mut sled_batch = sled::Batch::default();
            for op in batch.ops {
                match op {
                    BatchOp::Put(k, v) => sled_batch.insert(k, v),
                    BatchOp::Delete(k) => sled_batch.remove(k),
                }
            }
            let _gate = self.write_gate();
            self.db
                .apply_batch(sled_batch)
                .map_err(|e| KvError(format!("sled apply_batch: {e}")))?;
            self.db
                .flush()
                .map_err(|e| KvError(format!("sled flush: {e}")))?;
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// opening a directory

/// Name of the marker file that records the backend of a store directory.
pub const MARKER_FILE: &str = "BACKEND";
const REDB_FILE: &str = "store.redb";
const SLED_DIR: &str = "sled";

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Redb => "redb",
        #[cfg(feature = "sled")]
        Backend::Sled => "sled",
    }
}

/// Opens the KV backend in store directory `dir` (created if missing). Fails with a clear
/// message if the directory was created with another backend.
pub fn open(
    dir: &Path,
    backend: Backend,
    cache_size: Option<usize>,
) -> Result<Box<dyn Kv>, KvError> {
    fs::create_dir_all(dir).map_err(|e| {
        KvError(format!(
            "cannot create store directory {}: {e}",
            dir.display()
        ))
    })?;
    let wanted = backend_name(backend);
    let marker = dir.join(MARKER_FILE);
    match fs::read_to_string(&marker) {
        Ok(found) => {
            let found = found.trim();
            if found != wanted {
                let hint = if found == "sled" && cfg!(not(feature = "sled")) {
                    " (this build has no sled support: enable the `sled` feature of fhir-store)"
                } else {
                    ""
                };
                return Err(KvError(format!(
                    "the store in {} was created with the '{found}' backend and cannot be \
                     opened with the '{wanted}' backend{hint}",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A directory with the other backend's data but no marker was not made by us (or
            // the marker was lost): refuse rather than start an empty store beside it.
            let other = match backend {
                Backend::Redb => dir.join(SLED_DIR),
                #[cfg(feature = "sled")]
                Backend::Sled => dir.join(REDB_FILE),
            };
            if other.exists() {
                return Err(KvError(format!(
                    "the store in {} has no {MARKER_FILE} file but contains {}; refusing to \
                     open it with the '{wanted}' backend",
                    dir.display(),
                    other.display()
                )));
            }
            write_marker(dir, &marker, wanted)?;
        }
        Err(e) => {
            return Err(KvError(format!("cannot read {}: {e}", marker.display())));
        }
    }
    match backend {
        Backend::Redb => Ok(Box::new(RedbKv::open(&dir.join(REDB_FILE), cache_size)?)),
        #[cfg(feature = "sled")]
        Backend::Sled => Ok(Box::new(SledKv::open(&dir.join(SLED_DIR), cache_size)?)),
    }
}

fn write_marker(dir: &Path, marker: &Path, name: &str) -> Result<(), KvError> {
    let io = |e: std::io::Error| KvError(format!("cannot write {}: {e}", marker.display()));
    let tmp = dir.join(format!("{MARKER_FILE}.tmp"));
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(format!("{name}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, marker).map_err(io)?;
    // The rename is only durable once the directory entry is.
    if let Ok(d) = fs::File::open(dir) {
        d.sync_all().map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(kv: &dyn Kv) {
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(vec![1, i], vec![i]);
        }
        b.put(vec![2], vec![0]);
        kv.commit(b).unwrap();
        let mut b = WriteBatch::new();
        b.delete(vec![1, 3]);
        b.put(vec![1, 4], vec![44]);
        kv.commit(b).unwrap();
        assert_eq!(kv.get(&[1, 4]).unwrap(), Some(vec![44]));
        assert_eq!(kv.get(&[1, 3]).unwrap(), None);
        let end = prefix_end(&[1]).unwrap();
        let fwd = kv
            .scan(
                Bound::Included(&[1]),
                Bound::Excluded(&end),
                Direction::Forward,
                3,
            )
            .unwrap();
        assert_eq!(
            fwd.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        let rev = kv
            .scan(
                Bound::Included(&[1]),
                Bound::Excluded(&end),
                Direction::Reverse,
                3,
            )
            .unwrap();
        assert_eq!(
            rev.iter().map(|(k, _)| k[1]).collect::<Vec<_>>(),
            vec![9, 8, 7]
        );
        let all = kv
            .iter(Bound::Unbounded, Bound::Unbounded, Direction::Forward)
            .unwrap()
            .count();
        assert_eq!(all, 10);
        let empty = kv
            .scan(
                Bound::Included(&[5]),
                Bound::Excluded(&[4]),
                Direction::Forward,
                9,
            )
            .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn redb_kv_basics() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path(), Backend::Redb, None).unwrap();
        exercise(kv.as_ref());
    }

    #[cfg(feature = "sled")]
    #[test]
    fn sled_kv_basics() {
        let dir = tempfile::tempdir().unwrap();
        let kv = open(dir.path(), Backend::Sled, None).unwrap();
        exercise(kv.as_ref());
    }

    #[test]
    fn prefix_end_works() {
        assert_eq!(prefix_end(&[1, 2]), Some(vec![1, 3]));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255]), None);
    }
}
