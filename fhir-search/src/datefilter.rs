//! Date comparisons (`date=ge…`, `lt…`, `ne…`, `ap…`) checked per candidate document on fast
//! columns instead of as term ranges.
//!
//! Why: the ends of date intervals are indexed as terms `k␟hex(instant)`, and almost every
//! instant is different, so a range such as "starts before 2026-09-01" covers about as many
//! terms as there are resources with that parameter. Tantivy answers a term range by walking
//! every term in it and ORing each posting list into a bitset of the whole segment — so
//! `patient=…&code=…&date=ge…&date=lt…` cost time proportional to *all* Observations, not to the
//! patient's few hundred (on 120,000 Observations, about 80 % of a 15 ms search was spent in
//! that walk: term-dictionary streaming, posting-list opening, bitset inserts).
//!
//! So each date interval's ends are also written to multi-valued fast columns
//! (`dates.s_k`, `dates.e_k`; see `fields.rs`), and a date clause becomes one
//! [`DocPredicateQuery`]: the intersection is driven by the other clauses' posting lists and only
//! asks this predicate about the documents they propose ("does doc `d` match?" is a point lookup
//! in two columns, see `DocPredicateDocSet::seek_danger`). The answer is the same as the term
//! ranges': a start-range matches when any indexed start of the parameter lies in it, which is
//! exactly when one of its `k␟hex` terms does, because the hex encoding keeps numeric order.
//! Where a column cannot be read as `i64` the exact term-range query is used instead. The
//! columns are written for exactly the intervals that get terms (`DocBuilder::date`), so an
//! index without them is of an older format and is rebuilt (`tenant.rs`, `FORMAT`).

use std::fmt;
use std::ops::Bound;

use tantivy::columnar::Column;
use tantivy::query::doc_predicate_query::{
    ConstOrVariableSegmentPredicate, DocPredicate, DocPredicateQuery, SegmentDocPredicate,
};
use tantivy::query::{AllScorer, EnableScoring, Query, Weight};
use tantivy::{DocId, DocSet, Searcher, SegmentReader};

use crate::error::SearchError;

/// Which end of the intervals a range is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    Start,
    End,
}

/// A boolean combination of ranges over one parameter's interval ends.
#[derive(Debug, Clone)]
pub(crate) enum Cond {
    /// The given end of at least one of the document's intervals lies between the bounds.
    Range(End, Bound<i64>, Bound<i64>),
    Any(Vec<Cond>),
    All(Vec<Cond>),
}

fn in_range(v: i64, lo: &Bound<i64>, hi: &Bound<i64>) -> bool {
    (match lo {
        Bound::Included(x) => v >= *x,
        Bound::Excluded(x) => v > *x,
        Bound::Unbounded => true,
    }) && (match hi {
        Bound::Included(x) => v <= *x,
        Bound::Excluded(x) => v < *x,
        Bound::Unbounded => true,
    })
}

impl Cond {
    fn eval(&self, starts: Option<&Column<i64>>, ends: Option<&Column<i64>>, doc: DocId) -> bool {
        match self {
            Cond::Range(which, lo, hi) => {
                let col = match which {
                    End::Start => starts,
                    End::End => ends,
                };
                col.is_some_and(|c| c.values_for_doc(doc).any(|v| in_range(v, lo, hi)))
            }
            Cond::Any(cs) => cs.iter().any(|c| c.eval(starts, ends, doc)),
            Cond::All(cs) => cs.iter().all(|c| c.eval(starts, ends, doc)),
        }
    }
}

/// Whether parameter key `key` has date columns: its characters must be usable as one JSON
/// path segment (no `.`, which tantivy splits paths at), and its terms must not be cut short.
pub(crate) fn has_columns(key: &str) -> bool {
    !key.is_empty()
        && key.len() + 1 + 16 <= crate::terms::MAX_TERM_BYTES
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The column paths (inside the `dates` JSON field) of `key`'s interval starts and ends.
pub(crate) fn column_paths(key: &str) -> (String, String) {
    (format!("s_{key}"), format!("e_{key}"))
}

/// A date clause on parameter `key` evaluated on the fast columns.
struct DatePredicate {
    starts: String,
    ends: String,
    cond: Cond,
    /// The same clause as term ranges: used for a segment whose columns cannot be read as
    /// `i64`, so that the answer never depends on the columns being there.
    exact: Box<dyn Weight>,
}

impl fmt::Debug for DatePredicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatePredicate")
            .field("starts", &self.starts)
            .field("ends", &self.ends)
            .field("cond", &self.cond)
            .finish_non_exhaustive()
    }
}

/// The columns of one segment and the condition on them.
pub(crate) struct SegColumns {
    starts: Option<Column<i64>>,
    ends: Option<Column<i64>>,
    cond: Cond,
}

/// The per-segment form of [`DatePredicate`]: the columns, or `None` where every document of
/// the necessary condition (the exact term-range scorer) matches.
pub(crate) struct SegDatePredicate(Option<Box<SegColumns>>);

impl SegmentDocPredicate for SegDatePredicate {
    fn eval(&mut self, doc: DocId) -> bool {
        match &self.0 {
            Some(c) => c.cond.eval(c.starts.as_ref(), c.ends.as_ref(), doc),
            None => true,
        }
    }

    fn cost(&self) -> u64 {
        match self.0 {
            // A couple of column lookups per document; high enough that a posting list of the
            // other clauses always drives the intersection.
            Some(_) => 20,
            None => 1,
        }
    }
}

impl DatePredicate {
    /// The `i64` column at `path` in `reader`; `Err(())` if something is stored there that is
    /// not readable as `i64` (never written by this version, but then the columns cannot be
    /// trusted to answer).
    fn column(
        reader: &SegmentReader,
        path: &str,
    ) -> tantivy::Result<Result<Option<Column<i64>>, ()>> {
        let ff = reader.fast_fields();
        if let Some(c) = ff.column_opt::<i64>(path)? {
            return Ok(Ok(Some(c)));
        }
        if ff.dynamic_column_handles(path)?.is_empty() {
            // No document of the segment has a value: no interval end to match.
            Ok(Ok(None))
        } else {
            Ok(Err(()))
        }
    }
}

impl DocPredicate for DatePredicate {
    type SegmentDocPredicate = SegDatePredicate;

    fn doc_predicate(
        &self,
        reader: &SegmentReader,
    ) -> tantivy::Result<ConstOrVariableSegmentPredicate<SegDatePredicate>> {
        let starts = Self::column(reader, &format!("dates.{}", self.starts))?;
        let ends = Self::column(reader, &format!("dates.{}", self.ends))?;
        Ok(match (starts, ends) {
            (Ok(None), Ok(None)) => ConstOrVariableSegmentPredicate::Const(false),
            (Ok(starts), Ok(ends)) => ConstOrVariableSegmentPredicate::Variable {
                predicate: SegDatePredicate(Some(Box::new(SegColumns {
                    starts,
                    ends,
                    cond: self.cond.clone(),
                }))),
                necessary_condition: Box::new(AllScorer::new(reader.max_doc())),
            },
            _ => {
                let scorer = self.exact.scorer(reader, 1.0)?;
                let necessary_condition: Box<dyn DocSet> = Box::new(scorer);
                ConstOrVariableSegmentPredicate::Variable {
                    predicate: SegDatePredicate(None),
                    necessary_condition,
                }
            }
        })
    }
}

/// `cond` on the date columns of `key`, with `exact` (the same condition as term ranges) for
/// segments whose columns cannot answer it.
pub(crate) fn query(
    searcher: &Searcher,
    key: &str,
    cond: Cond,
    exact: Box<dyn Query>,
) -> Result<Box<dyn Query>, SearchError> {
    let (starts, ends) = column_paths(key);
    let exact = exact.weight(EnableScoring::disabled_from_searcher(searcher))?;
    Ok(Box::new(DocPredicateQuery::from(DatePredicate {
        starts,
        ends,
        cond,
        exact,
    })))
}
