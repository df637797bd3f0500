//! Collecting matches: the count, and the first `limit` documents in `_sort` order (several
//! keys, each ascending or descending, missing values last, ties broken by document address so
//! that the order is total and the same every time on one searcher — which is what makes paging
//! over a kept searcher stable).

use std::cmp::Ordering;
use std::sync::Arc;

use fhir_core::search_param::SearchParamType;
use tantivy::collector::{Collector, SegmentCollector};
use tantivy::columnar::{Column, StrColumn};
use tantivy::{DocAddress, DocId, Score, Searcher, SegmentOrdinal, SegmentReader};

use crate::error::SearchError;
use crate::fields::sort_paths;
use crate::request::SortKey;

/// How the values of a sort column compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Int,
    Float,
    Str,
}

/// One sort key as a fast-field column.
#[derive(Debug, Clone)]
struct Key {
    column: String,
    kind: KeyKind,
    descending: bool,
}

/// A value of a sort key in one segment: strings as their segment-local ordinals (ordinal
/// order is string order), turned into strings only for the documents a segment keeps.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SegValue {
    Missing,
    Int(i64),
    Float(f64),
    Ord(u64),
    Str(String),
}

fn cmp_value(a: &SegValue, b: &SegValue, descending: bool) -> Ordering {
    use SegValue::*;
    let ord = match (a, b) {
        // Missing values come last whatever the direction.
        (Missing, Missing) => return Ordering::Equal,
        (Missing, _) => return Ordering::Greater,
        (_, Missing) => return Ordering::Less,
        (Int(x), Int(y)) => x.cmp(y),
        (Float(x), Float(y)) => x.total_cmp(y),
        (Ord(x), Ord(y)) => x.cmp(y),
        (Str(x), Str(y)) => x.cmp(y),
        _ => Ordering::Equal,
    };
    if descending { ord.reverse() } else { ord }
}

fn cmp_values(keys: &[Key], a: &[SegValue], b: &[SegValue]) -> Ordering {
    for (k, (x, y)) in keys.iter().zip(a.iter().zip(b)) {
        match cmp_value(x, y, k.descending) {
            Ordering::Equal => continue,
            other => return other,
        }
    }
    Ordering::Equal
}

/// Counts the matches and keeps the first `limit` in sort order.
pub(crate) struct TopCollector {
    keys: Arc<Vec<Key>>,
    limit: usize,
}

impl TopCollector {
    /// `sort` in priority order; `limit` documents are kept.
    pub fn new(sort: &[SortKey], limit: usize) -> TopCollector {
        let keys = sort
            .iter()
            .filter_map(|k| {
                let (lo, hi) = sort_paths(&k.code)?;
                // Ascending order looks at each resource's lowest value, descending at its
                // highest (a resource with several dates sorts by its earliest or latest).
                let path = if k.descending { hi } else { lo };
                let kind = match k.kind {
                    SearchParamType::Date => KeyKind::Int,
                    SearchParamType::Number | SearchParamType::Quantity => KeyKind::Float,
                    _ => KeyKind::Str,
                };
                Some(Key {
                    column: format!("sort.{path}"),
                    kind,
                    descending: k.descending,
                })
            })
            .collect();
        TopCollector {
            keys: Arc::new(keys),
            limit,
        }
    }
}

enum Col {
    Int(Column<i64>),
    Float(Column<f64>),
    Str(StrColumn),
    None,
}

pub(crate) struct SegTop {
    segment: SegmentOrdinal,
    keys: Arc<Vec<Key>>,
    cols: Vec<Col>,
    limit: usize,
    count: u64,
    entries: Vec<(Vec<SegValue>, DocId)>,
}

impl SegTop {
    fn prune(&mut self) {
        let keys = self.keys.clone();
        self.entries
            .sort_by(|a, b| cmp_values(&keys, &a.0, &b.0).then(a.1.cmp(&b.1)));
        self.entries.truncate(self.limit);
    }
}

impl SegmentCollector for SegTop {
    type Fruit = (u64, Vec<(Vec<SegValue>, DocAddress)>);

    fn collect(&mut self, doc: DocId, _score: Score) {
        self.count += 1;
        if self.limit == 0 {
            return;
        }
        if self.keys.is_empty() {
            // Documents arrive in id order: the first `limit` are the page.
            if self.entries.len() < self.limit {
                self.entries.push((Vec::new(), doc));
            }
            return;
        }
        let values = self
            .cols
            .iter()
            .map(|c| match c {
                Col::Int(c) => c.first(doc).map_or(SegValue::Missing, SegValue::Int),
                Col::Float(c) => c.first(doc).map_or(SegValue::Missing, SegValue::Float),
                Col::Str(c) => c
                    .term_ords(doc)
                    .next()
                    .map_or(SegValue::Missing, SegValue::Ord),
                Col::None => SegValue::Missing,
            })
            .collect();
        self.entries.push((values, doc));
        // Keep memory bounded by the page, not by the number of matches.
        if self.entries.len() >= self.limit.saturating_mul(2).max(1024) {
            self.prune();
        }
    }

    fn harvest(mut self) -> Self::Fruit {
        self.prune();
        let mut buf = String::new();
        let segment = self.segment;
        let entries = std::mem::take(&mut self.entries)
            .into_iter()
            .map(|(values, doc)| {
                let values = values
                    .into_iter()
                    .zip(&self.cols)
                    .map(|(v, c)| match (v, c) {
                        (SegValue::Ord(o), Col::Str(col)) => {
                            buf.clear();
                            match col.ord_to_str(o, &mut buf) {
                                Ok(true) => SegValue::Str(buf.clone()),
                                _ => SegValue::Missing,
                            }
                        }
                        (v, _) => v,
                    })
                    .collect();
                (values, DocAddress::new(segment, doc))
            })
            .collect();
        (self.count, entries)
    }
}

impl Collector for TopCollector {
    /// The number of matches and the kept documents in order.
    type Fruit = (u64, Vec<DocAddress>);
    type Child = SegTop;

    fn for_segment(
        &self,
        segment: SegmentOrdinal,
        reader: &SegmentReader,
    ) -> tantivy::Result<SegTop> {
        let ff = reader.fast_fields();
        let mut cols = Vec::with_capacity(self.keys.len());
        for k in self.keys.iter() {
            // A column that no document of the segment has does not exist: all missing.
            let col = match k.kind {
                KeyKind::Int => ff.column_opt::<i64>(&k.column)?.map(Col::Int),
                KeyKind::Float => ff.column_opt::<f64>(&k.column)?.map(Col::Float),
                KeyKind::Str => ff.str(&k.column)?.map(Col::Str),
            };
            cols.push(col.unwrap_or(Col::None));
        }
        Ok(SegTop {
            segment,
            keys: self.keys.clone(),
            cols,
            limit: self.limit,
            count: 0,
            entries: Vec::new(),
        })
    }

    fn requires_scoring(&self) -> bool {
        false
    }

    fn merge_fruits(
        &self,
        fruits: Vec<(u64, Vec<(Vec<SegValue>, DocAddress)>)>,
    ) -> tantivy::Result<(u64, Vec<DocAddress>)> {
        let mut total = 0;
        let mut all = Vec::new();
        for (count, entries) in fruits {
            total += count;
            all.extend(entries);
        }
        all.sort_by(|a, b| cmp_values(&self.keys, &a.0, &b.0).then(a.1.cmp(&b.1)));
        all.truncate(self.limit);
        Ok((total, all.into_iter().map(|(_, a)| a).collect()))
    }
}

/// A matching document: where it is, which resource, which version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hit {
    pub addr: DocAddress,
    /// `Type/id`
    pub key: String,
    pub version: u64,
}

/// `Type/id` and version of each document, read from the fast fields.
pub(crate) fn keys_and_versions(
    searcher: &Searcher,
    addrs: &[DocAddress],
) -> Result<Vec<Hit>, SearchError> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut cache: Option<(SegmentOrdinal, StrColumn, Column<u64>)> = None;
    let mut buf = String::new();
    for a in addrs {
        if cache.as_ref().is_none_or(|c| c.0 != a.segment_ord) {
            let ff = searcher.segment_reader(a.segment_ord).fast_fields();
            let keys = ff
                .str("key")?
                .ok_or_else(|| SearchError::Index("the key column is missing".into()))?;
            cache = Some((a.segment_ord, keys, ff.u64("ver")?));
        }
        let Some((_, keys, vers)) = &cache else {
            continue;
        };
        buf.clear();
        let found = match keys.term_ords(a.doc_id).next() {
            Some(o) => keys.ord_to_str(o, &mut buf)?,
            None => false,
        };
        if let (true, Some(v)) = (found, vers.first(a.doc_id)) {
            out.push(Hit {
                addr: *a,
                key: buf.clone(),
                version: v,
            });
        }
    }
    Ok(out)
}

/// The stored reference targets (`code␟Type/id`) of each document.
pub(crate) fn references(
    searcher: &Searcher,
    addrs: &[DocAddress],
) -> Result<Vec<Vec<String>>, SearchError> {
    let mut out = Vec::with_capacity(addrs.len());
    let mut cache: Option<(SegmentOrdinal, Option<StrColumn>)> = None;
    let mut buf = String::new();
    for a in addrs {
        if cache.as_ref().is_none_or(|c| c.0 != a.segment_ord) {
            let ff = searcher.segment_reader(a.segment_ord).fast_fields();
            cache = Some((a.segment_ord, ff.str("refs")?));
        }
        let mut refs = Vec::new();
        if let Some((_, Some(col))) = &cache {
            for o in col.term_ords(a.doc_id) {
                buf.clear();
                if col.ord_to_str(o, &mut buf)? {
                    refs.push(buf.clone());
                }
            }
        }
        out.push(refs);
    }
    Ok(out)
}
