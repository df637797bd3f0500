//! Turning a [`SearchRequest`]'s clauses into a tantivy query over one searcher.
//!
//! Chains and `_has` are answered by running their inner search on the same searcher first,
//! so a search and all of its pages see one snapshot.

use std::collections::BTreeSet;
use std::ops::Bound;

use fhir_core::ResourceType;
use tantivy::query::{
    AllQuery, BooleanQuery, EmptyQuery, Occur, Query, RangeQuery, RegexQuery, TermQuery,
    TermSetQuery,
};
use tantivy::schema::{Field, IndexRecordOption};
use tantivy::{Searcher, Term};

use crate::collect::{Hit, TopCollector, keys_and_versions, references};
use crate::datefilter::{self, Cond, End};
use crate::dates::unit_term;
use crate::error::SearchError;
use crate::fields::Fields;
use crate::request::{Clause, Prefix, RefQ, SearchRequest, StrQ, TokenQ, UnitQ, UriQ};
use crate::terms::{SEP, hex_f64, hex_i64, prefix, term};

/// Limits on the inner searches of chains and `_has`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Most resources a chain's inner search may match.
    pub chain: usize,
}

pub(crate) struct Compiler<'a> {
    pub f: &'a Fields,
    pub searcher: &'a Searcher,
    pub limits: Limits,
    /// "Now" for `ap` on dates, in microseconds.
    pub now_micros: i64,
}

fn text_term(field: Field, s: &str) -> Term {
    Term::from_field_text(field, s)
}

fn term_q(field: Field, s: &str) -> Box<dyn Query> {
    Box::new(TermQuery::new(
        text_term(field, s),
        IndexRecordOption::Basic,
    ))
}

/// Every term starting with `p`. `0xFF` never occurs in UTF-8, so `p + 0xFF` is above every
/// term that starts with `p` and below every other term above them.
fn prefix_q(field: Field, p: &str) -> Box<dyn Query> {
    let mut upper = text_term(field, p);
    upper.append_bytes(&[0xFF]);
    Box::new(RangeQuery::new(
        Bound::Included(text_term(field, p)),
        Bound::Excluded(upper),
    ))
}

/// Terms `p + x` for `x` between `lo` and `hi` (fixed-width encodings, so text order is value
/// order).
fn range_q(field: Field, p: &str, lo: Bound<String>, hi: Bound<String>) -> Box<dyn Query> {
    let at = |x: &str| text_term(field, &format!("{p}{x}"));
    let lower = match lo {
        Bound::Included(x) => Bound::Included(at(&x)),
        Bound::Excluded(x) => Bound::Excluded(at(&x)),
        Bound::Unbounded => Bound::Included(text_term(field, p)),
    };
    let upper = match hi {
        Bound::Included(x) => Bound::Included(at(&x)),
        Bound::Excluded(x) => Bound::Excluded(at(&x)),
        Bound::Unbounded => {
            let mut t = text_term(field, p);
            t.append_bytes(&[0xFF]);
            Bound::Excluded(t)
        }
    };
    Box::new(RangeQuery::new(lower, upper))
}

fn any(mut qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    match qs.len() {
        0 => Box::new(EmptyQuery),
        1 => qs.pop().unwrap_or_else(|| Box::new(EmptyQuery)),
        _ => Box::new(BooleanQuery::union(qs)),
    }
}

fn all(mut qs: Vec<Box<dyn Query>>) -> Box<dyn Query> {
    match qs.len() {
        0 => Box::new(AllQuery),
        1 => qs.pop().unwrap_or_else(|| Box::new(AllQuery)),
        _ => Box::new(BooleanQuery::intersection(qs)),
    }
}

fn not(q: Box<dyn Query>) -> Box<dyn Query> {
    Box::new(BooleanQuery::new(vec![
        (Occur::Must, Box::new(AllQuery)),
        (Occur::MustNot, q),
    ]))
}

fn lt(x: String) -> (Bound<String>, Bound<String>) {
    (Bound::Unbounded, Bound::Excluded(x))
}
fn le(x: String) -> (Bound<String>, Bound<String>) {
    (Bound::Unbounded, Bound::Included(x))
}
fn gt(x: String) -> (Bound<String>, Bound<String>) {
    (Bound::Excluded(x), Bound::Unbounded)
}
fn ge(x: String) -> (Bound<String>, Bound<String>) {
    (Bound::Included(x), Bound::Unbounded)
}

impl Compiler<'_> {
    /// The whole search: any of its per-type branches.
    pub fn request(&self, req: &SearchRequest) -> Result<Box<dyn Query>, SearchError> {
        let mut qs = Vec::with_capacity(req.branches.len());
        for (ty, clauses) in &req.branches {
            qs.push(self.branch(*ty, clauses)?);
        }
        Ok(any(qs))
    }

    /// Resources of `ty` matching every clause.
    pub fn branch(
        &self,
        ty: ResourceType,
        clauses: &[Clause],
    ) -> Result<Box<dyn Query>, SearchError> {
        let mut qs = vec![term_q(self.f.ty, ty.as_str())];
        // Date clauses answered on the columns go last: tantivy positions an intersection with
        // its first clause, and the others are then only asked about its candidates.
        let mut predicates = Vec::new();
        for c in clauses {
            match self.column_date(c) {
                Some((key, cond)) => predicates.push(self.date_query(&key, cond)?),
                None => qs.push(self.clause(ty, c)?),
            }
        }
        qs.extend(predicates);
        Ok(all(qs))
    }

    fn clause(&self, ty: ResourceType, c: &Clause) -> Result<Box<dyn Query>, SearchError> {
        let f = self.f;
        Ok(match c {
            Clause::Any(cs) => {
                let mut qs = Vec::with_capacity(cs.len());
                for c in cs {
                    qs.push(self.clause(ty, c)?);
                }
                any(qs)
            }
            Clause::Not(c) => not(self.clause(ty, c)?),
            Clause::Present { code, present } => {
                let q = term_q(f.has, &crate::terms::clean(code));
                if *present { q } else { not(q) }
            }
            Clause::Token { key, q } => {
                let t = match q {
                    TokenQ::Code(c) => term(key, &["c", c]),
                    TokenQ::SystemCode(s, c) => term(key, &["s", s, c]),
                    TokenQ::NoSystem(c) => term(key, &["n", c]),
                    TokenQ::System(s) => term(key, &["S", s]),
                    TokenQ::OfType(ts, tc, v) => term(key, &["t", ts, tc, v]),
                };
                term_q(f.tok, &t)
            }
            Clause::Str { key, q } => match q {
                StrQ::Prefix(s) | StrQ::Words(s) => prefix_q(f.string, &format!("{key}{SEP}{s}")),
                StrQ::Exact(s) => term_q(f.exact, &term(key, &[s])),
                StrQ::Contains(s) => {
                    let pattern = format!(
                        "{}.*{}.*",
                        regex::escape(&format!("{key}{SEP}")),
                        regex::escape(s)
                    );
                    Box::new(RegexQuery::from_pattern(&pattern, f.string).map_err(|e| {
                        SearchError::invalid(&format!("{key}:contains"), e.to_string())
                    })?)
                }
            },
            Clause::Number {
                key,
                prefix: p,
                value,
            } => self.number(&prefix(key, &[]), *p, value.value, value.low, value.high),
            Clause::Quantity {
                key,
                prefix: p,
                value,
                unit,
            } => {
                let pre = match unit {
                    UnitQ::Any => prefix(key, &["*"]),
                    UnitQ::System(s, c) => prefix(key, &["s", s, c]),
                    UnitQ::Code(c) => prefix(key, &["c", c]),
                };
                self.number(&pre, *p, value.value, value.low, value.high)
            }
            Clause::Date {
                key,
                prefix: p,
                start,
                end,
                precision,
            } => self.date(key, *p, *start, *end, *precision)?,
            Clause::Ref { key, q } => {
                let t = match q {
                    RefQ::Typed(t) => term(key, &["T", t]),
                    RefQ::Id(id) => term(key, &["I", id]),
                    RefQ::Url(u) => term(key, &["U", u]),
                    RefQ::Identifier(TokenQ::Code(v)) => term(key, &["ic", v]),
                    RefQ::Identifier(TokenQ::SystemCode(s, v)) => term(key, &["is", s, v]),
                    RefQ::Identifier(TokenQ::NoSystem(v)) => term(key, &["in", v]),
                    RefQ::Identifier(TokenQ::System(s)) => term(key, &["iS", s]),
                    RefQ::Identifier(TokenQ::OfType(..)) => return Ok(Box::new(EmptyQuery)),
                };
                term_q(f.reference, &t)
            }
            Clause::Uri { key, q } => match q {
                UriQ::Exact(u) => term_q(f.uri, &term(key, &[u])),
                UriQ::Below(u) => prefix_q(f.uri, &format!("{key}{SEP}{u}")),
                UriQ::Above(u) => any(uri_ancestors(u)
                    .into_iter()
                    .map(|a| term_q(f.uri, &term(key, &[a])))
                    .collect()),
            },
            Clause::Chain { key, targets } => {
                let mut terms = Vec::new();
                for (target, inner) in targets {
                    let q = self.branch(*target, std::slice::from_ref(inner))?;
                    for hit in self.matches(&q, "chained search")? {
                        terms.push(text_term(f.reference, &term(key, &["T", &hit.key])));
                    }
                }
                if terms.is_empty() {
                    Box::new(EmptyQuery)
                } else {
                    Box::new(TermSetQuery::new(terms))
                }
            }
            Clause::Has { source, key, inner } => {
                let q = self.branch(*source, std::slice::from_ref(inner.as_ref()))?;
                let (total, addrs) = self
                    .searcher
                    .search(&q, &TopCollector::new(&[], self.limits.chain + 1))?;
                if total as usize > self.limits.chain {
                    return Err(too_costly("_has", total));
                }
                let wanted = format!("{key}{SEP}{ty}/");
                let mut targets = BTreeSet::new();
                for refs in references(self.searcher, &addrs)? {
                    for r in refs {
                        if let Some(rest) = r.strip_prefix(&wanted) {
                            targets.insert(format!("{ty}/{rest}"));
                        }
                    }
                }
                if targets.is_empty() {
                    Box::new(EmptyQuery)
                } else {
                    Box::new(TermSetQuery::new(
                        targets.iter().map(|k| text_term(f.key, k)),
                    ))
                }
            }
        })
    }

    /// The keys of every match of `q`, if there are not too many.
    fn matches(&self, q: &dyn Query, what: &str) -> Result<Vec<Hit>, SearchError> {
        let (total, addrs) = self
            .searcher
            .search(q, &TopCollector::new(&[], self.limits.chain + 1))?;
        if total as usize > self.limits.chain {
            return Err(too_costly(what, total));
        }
        keys_and_versions(self.searcher, &addrs)
    }

    /// A number compared with `prefix`, as FHIR defines: `eq` and `ne` use the search value's
    /// implicit range `[low, high)` (its precision), the others its exact value.
    fn number(&self, pre: &str, p: Prefix, value: f64, low: f64, high: f64) -> Box<dyn Query> {
        let f = self.f.num;
        let r = |(lo, hi): (Bound<String>, Bound<String>)| range_q(f, pre, lo, hi);
        let h = hex_f64;
        match p {
            Prefix::Eq => range_q(f, pre, Bound::Included(h(low)), Bound::Excluded(h(high))),
            Prefix::Ne => any(vec![r(lt(h(low))), r(ge(h(high)))]),
            Prefix::Gt | Prefix::Sa => r(gt(h(value))),
            Prefix::Lt | Prefix::Eb => r(lt(h(value))),
            Prefix::Ge => r(ge(h(value))),
            Prefix::Le => r(le(h(value))),
            Prefix::Ap => {
                // Within 10 % of the value (at least its implicit range).
                let d = (value.abs() * 0.1).max((high - low) / 2.0);
                range_q(
                    f,
                    pre,
                    Bound::Included(h(value - d)),
                    Bound::Included(h(value + d)),
                )
            }
        }
    }

    /// A date interval `[ps, pe]` compared with each indexed interval `[rs, re]` (R4 search,
    /// "date"): eq `ps ≤ rs ∧ re ≤ pe` · ne `rs < ps ∨ re > pe` · gt `re > pe` · lt `rs < ps` ·
    /// ge `re > pe ∨ rs ≥ ps` · le `rs < ps ∨ re ≤ pe` · sa `rs > pe` · eb `re < ps` · ap: the
    /// intervals overlap once the search value is widened by 10 % of its distance from now.
    ///
    /// Every form but `eq` and `ap` is a disjunction of conditions on one end, so it is exact
    /// even for a resource with several intervals; `eq` is exact through the calendar-unit
    /// terms (see [`crate::dates`]) except for search values with fractions of a second, which
    /// (like `ap`) test the two ends of possibly different intervals of one resource.
    fn date(
        &self,
        key: &str,
        p: Prefix,
        ps: i64,
        pe: i64,
        precision: crate::dates::Precision,
    ) -> Result<Box<dyn Query>, SearchError> {
        if p == Prefix::Eq
            && let Some(unit) = unit_term(ps, precision)
        {
            // One term: cheap however many resources have dates.
            return Ok(term_q(self.f.dunit, &term(key, &[&unit])));
        }
        let cond = self.date_cond(p, ps, pe);
        self.date_query(key, cond)
    }

    /// The comparison of [`Compiler::date`] (other than `eq` by calendar unit) as conditions on
    /// the intervals' ends.
    fn date_cond(&self, p: Prefix, ps: i64, pe: i64) -> Cond {
        use Bound::{Excluded as X, Included as I, Unbounded as U};
        let start = |lo, hi| Cond::Range(End::Start, lo, hi);
        let end = |lo, hi| Cond::Range(End::End, lo, hi);
        match p {
            Prefix::Eq => Cond::All(vec![start(I(ps), U), end(U, I(pe))]),
            Prefix::Ne => Cond::Any(vec![start(U, X(ps)), end(X(pe), U)]),
            Prefix::Gt => end(X(pe), U),
            Prefix::Lt => start(U, X(ps)),
            Prefix::Ge => Cond::Any(vec![end(X(pe), U), start(I(ps), U)]),
            Prefix::Le => Cond::Any(vec![start(U, X(ps)), end(U, I(pe))]),
            Prefix::Sa => start(X(pe), U),
            Prefix::Eb => end(U, X(ps)),
            Prefix::Ap => {
                let mid = ps / 2 + pe / 2;
                let d = (self.now_micros.saturating_sub(mid)).saturating_abs() / 10;
                Cond::All(vec![
                    start(U, I(pe.saturating_add(d))),
                    end(I(ps.saturating_sub(d)), U),
                ])
            }
        }
    }

    /// `cond` on parameter `key`: per candidate document on the date columns where the key has
    /// them (see [`crate::datefilter`] for why), else as term ranges.
    fn date_query(&self, key: &str, cond: Cond) -> Result<Box<dyn Query>, SearchError> {
        let exact = self.date_terms(&prefix(key, &[]), &cond);
        if datefilter::has_columns(key) {
            datefilter::query(self.searcher, key, cond, exact)
        } else {
            Ok(exact)
        }
    }

    /// `cond` as term ranges over the `dstart`/`dend` terms under `pre` (exact, but each range
    /// walks every term in it).
    fn date_terms(&self, pre: &str, cond: &Cond) -> Box<dyn Query> {
        match cond {
            Cond::Range(which, lo, hi) => {
                let field = match which {
                    End::Start => self.f.dstart,
                    End::End => self.f.dend,
                };
                let h = |b: &Bound<i64>| match b {
                    Bound::Included(x) => Bound::Included(hex_i64(*x)),
                    Bound::Excluded(x) => Bound::Excluded(hex_i64(*x)),
                    Bound::Unbounded => Bound::Unbounded,
                };
                range_q(field, pre, h(lo), h(hi))
            }
            Cond::Any(cs) => any(cs.iter().map(|c| self.date_terms(pre, c)).collect()),
            Cond::All(cs) => all(cs.iter().map(|c| self.date_terms(pre, c)).collect()),
        }
    }

    /// If `c` is a date clause that [`Compiler::date_query`] answers on the columns, or an OR
    /// of such clauses on one parameter: its key and condition (so that `date=ge…,lt…` is one
    /// predicate instead of a union that would scan).
    fn column_date(&self, c: &Clause) -> Option<(String, Cond)> {
        match c {
            Clause::Date {
                key,
                prefix: p,
                start,
                end,
                precision,
            } => {
                if !datefilter::has_columns(key)
                    || (*p == Prefix::Eq && unit_term(*start, *precision).is_some())
                {
                    return None;
                }
                Some((key.clone(), self.date_cond(*p, *start, *end)))
            }
            Clause::Any(cs) if !cs.is_empty() => {
                let mut key = None;
                let mut conds = Vec::with_capacity(cs.len());
                for c in cs {
                    let (k, cond) = self.column_date(c)?;
                    if key.as_ref().is_some_and(|key| *key != k) {
                        return None;
                    }
                    key = Some(k);
                    conds.push(cond);
                }
                Some((key?, Cond::Any(conds)))
            }
            _ => None,
        }
    }
}

fn too_costly(what: &str, total: u64) -> SearchError {
    SearchError::TooCostly(format!(
        "the {what} matches {total} resources, more than this server follows; narrow it down"
    ))
}

/// `u` and each of its ancestors at `/` boundaries after the authority:
/// `http://a.no/fhir/ValueSet/x` → itself, `http://a.no/fhir/ValueSet`, `http://a.no/fhir`,
/// `http://a.no`.
fn uri_ancestors(u: &str) -> Vec<&str> {
    let mut out = vec![u];
    let body_start = u.find("://").map_or(0, |i| i + 3);
    let mut end = u.len();
    while let Some(i) = u[body_start..end].rfind('/') {
        let cut = body_start + i;
        if cut == body_start {
            break;
        }
        out.push(&u[..cut]);
        end = cut;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::date_document;
    use tantivy::collector::DocSetCollector;
    use tantivy::{DocAddress, Index};

    /// The date columns must answer every comparison exactly as the term ranges do, also for
    /// resources with several intervals, open ends and (invalid, but stored) periods that end
    /// before they start, over several segments.
    #[test]
    fn date_columns_answer_like_the_term_ranges() {
        let schema = Fields::new_schema();
        let f = Fields::of(&schema).expect("schema");
        let index = Index::create_in_ram(schema);
        let mut writer = index
            .writer_with_num_threads(1, 15_000_000)
            .expect("writer");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        // Instants on a small grid, so that search bounds often fall on indexed values.
        const GRID: i64 = 1_000_000;
        for segment in 0..3 {
            for _ in 0..400 {
                let mut intervals = Vec::new();
                for _ in 0..next(4) {
                    let a = (next(60) as i64) * GRID;
                    let b = a + (next(10) as i64 - 2) * GRID; // sometimes before `a`
                    let start = (next(8) != 0).then_some(a);
                    let end = (next(8) != 0).then_some(b);
                    intervals.push((start, end));
                }
                let ty = if next(3) == 0 {
                    "Patient"
                } else {
                    "Observation"
                };
                let key = if next(5) == 0 { "other" } else { "date" };
                writer
                    .add_document(date_document(&f, ty, key, &intervals))
                    .expect("add");
            }
            if segment == 1 {
                // A segment without any date.
                writer
                    .add_document(date_document(&f, "Observation", "date", &[]))
                    .expect("add");
            }
            writer.commit().expect("commit");
        }
        let searcher = index.reader().expect("reader").searcher();
        let c = Compiler {
            f: &f,
            searcher: &searcher,
            limits: Limits { chain: 1000 },
            now_micros: 30 * GRID,
        };
        let docs = |q: &dyn Query| -> Vec<DocAddress> {
            let mut v: Vec<_> = searcher
                .search(q, &DocSetCollector)
                .expect("search")
                .into_iter()
                .collect();
            v.sort();
            v
        };
        let prefixes = [
            Prefix::Eq,
            Prefix::Ne,
            Prefix::Gt,
            Prefix::Lt,
            Prefix::Ge,
            Prefix::Le,
            Prefix::Sa,
            Prefix::Eb,
            Prefix::Ap,
        ];
        let mut nonempty = 0;
        for round in 0..40 {
            let ps = (next(64) as i64 - 2) * GRID + if round % 4 == 0 { 1 } else { 0 };
            let pe = ps + (next(5) as i64) * GRID + GRID - 1;
            for p in prefixes {
                let cond = c.date_cond(p, ps, pe);
                let exact = c.date_terms(&prefix("date", &[]), &cond);
                let columns = datefilter::query(&searcher, "date", cond.clone(), exact.box_clone())
                    .expect("query");
                let want = docs(&*exact);
                assert_eq!(docs(&*columns), want, "{p:?} {ps} {pe}");
                nonempty += usize::from(!want.is_empty());
                // Driven by another clause, as in a search.
                let ty = || term_q(f.ty, "Observation");
                let exact_and = all(vec![ty(), exact.box_clone()]);
                let columns_and = all(vec![ty(), columns]);
                assert_eq!(
                    docs(&*columns_and),
                    docs(&*exact_and),
                    "{p:?} {ps} {pe} with type"
                );
            }
        }
        assert!(
            nonempty > 100,
            "the comparisons must not all be empty: {nonempty}"
        );
    }

    #[test]
    fn ancestors_of_a_url() {
        assert_eq!(
            uri_ancestors("http://a.no/fhir/ValueSet/x"),
            [
                "http://a.no/fhir/ValueSet/x",
                "http://a.no/fhir/ValueSet",
                "http://a.no/fhir",
                "http://a.no"
            ]
        );
        assert_eq!(uri_ancestors("urn:oid:1.2"), ["urn:oid:1.2"]);
    }
}
