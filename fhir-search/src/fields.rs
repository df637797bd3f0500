//! The tantivy schema of a tenant's index and the document made for one resource version.
//!
//! One document per current, non-deleted resource. Parameters are not schema fields: a tenant
//! can add parameters at run time, so each *kind* of value has one field and every term starts
//! with the parameter's code (see [`crate::terms`]):
//!
//! | field | holds (per parameter `k`) |
//! |---|---|
//! | `type` | the resource type |
//! | `key` | `Type/id` (fast: read back for hits; indexed: deletes and `_id`-style lookups) |
//! | `ver` | the indexed version (fast), so that pages are served by vread of that version |
//! | `tok` | tokens: `k␟c␟code`, `k␟s␟system␟code`, `k␟n␟code` (no system), `k␟S␟system`, `k␟t␟typesystem␟typecode␟value` (`:of-type`) |
//! | `str` | strings, normalised: `k␟text` (prefix and `:contains` queries), and word suffixes under `k:text` (token `:text`) and `_text` |
//! | `exact` | strings as written: `k␟Text` (`:exact`) |
//! | `num` | numbers `k␟hex`, quantities `k␟*␟hex`, `k␟s␟system␟code␟hex`, `k␟c␟code-or-unit␟hex` |
//! | `dstart`, `dend` | each date interval's first and last microsecond: `k␟hex` |
//! | `dunit` | the calendar units (UTC year, month, day, minute, second) that contain a whole interval: `k␟D2024-03-01` (for `eq`) |
//! | `ref` | references: `k␟T␟Type/id`, `k␟I␟id`, `k␟U␟as written`, `k␟i…` identifier tokens, and `*␟T␟Type/id` (`_revinclude=*`) |
//! | `refs` | fast, not indexed: `k␟Type/id` per reference, read back for `_include` and `_has` |
//! | `uri` | `k␟uri` |
//! | `has` | `k` for every parameter with a value (`:missing`) |
//! | `sort` | a JSON fast field: `l_k`/`h_k`, the lowest and highest value of `k` (`_sort`) |
//! | `dates` | a JSON fast field: `s_k`/`e_k`, every date interval's first and last microsecond (the `dstart`/`dend` values as numbers), so that a date range is checked per candidate document instead of by walking its terms (see `datefilter.rs`) |

use std::collections::BTreeMap;

use fhir_core::ResourceType;
use fhir_core::json::Map;
use fhir_core::search_param::{SearchParam, SearchParamRegistry, SearchParamType, SearchValue};
use tantivy::TantivyDocument;
use tantivy::schema::{FAST, Field, JsonObjectOptions, OwnedValue, STRING, Schema, TextOptions};

use crate::datefilter::{column_paths, has_columns};
use crate::dates::unit_terms;
use crate::terms::{
    MAX_TERM_BYTES, clean, composite_key, cut, hex_f64, hex_i64, normalize, term, token_forms,
    word_suffixes,
};

/// The fields of the index schema.
#[derive(Debug, Clone)]
pub(crate) struct Fields {
    pub ty: Field,
    pub key: Field,
    pub ver: Field,
    pub tok: Field,
    pub string: Field,
    pub exact: Field,
    pub num: Field,
    pub dstart: Field,
    pub dend: Field,
    pub dunit: Field,
    pub reference: Field,
    pub refs: Field,
    pub uri: Field,
    pub has: Field,
    pub sort: Field,
    pub dates: Field,
}

impl Fields {
    /// The schema of a new index.
    pub fn new_schema() -> Schema {
        let mut b = Schema::builder();
        b.add_text_field("type", STRING);
        b.add_text_field("key", STRING | FAST);
        b.add_u64_field("ver", FAST);
        for name in [
            "tok", "str", "exact", "num", "dstart", "dend", "dunit", "ref", "uri", "has",
        ] {
            b.add_text_field(name, STRING);
        }
        b.add_text_field("refs", TextOptions::default().set_fast("raw"));
        b.add_json_field("sort", JsonObjectOptions::default().set_fast("raw"));
        // Numbers only (the tokenizer is never used); fast, not indexed: the terms are in
        // `dstart`/`dend`.
        b.add_json_field("dates", JsonObjectOptions::default().set_fast("raw"));
        b.build()
    }

    /// The fields of `schema`; `None` if it is not this version's schema.
    pub fn of(schema: &Schema) -> Option<Fields> {
        if *schema != Fields::new_schema() {
            return None;
        }
        let f = |name: &str| schema.get_field(name).ok();
        Some(Fields {
            ty: f("type")?,
            key: f("key")?,
            ver: f("ver")?,
            tok: f("tok")?,
            string: f("str")?,
            exact: f("exact")?,
            num: f("num")?,
            dstart: f("dstart")?,
            dend: f("dend")?,
            dunit: f("dunit")?,
            reference: f("ref")?,
            refs: f("refs")?,
            uri: f("uri")?,
            has: f("has")?,
            sort: f("sort")?,
            dates: f("dates")?,
        })
    }
}

/// `Type/id`: the key of a resource in the index.
pub(crate) fn doc_key(ty: ResourceType, id: &str) -> String {
    format!("{ty}/{id}")
}

/// The JSON paths of a parameter's sort values, if its code can be a path segment.
pub(crate) fn sort_paths(code: &str) -> Option<(String, String)> {
    code.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        .then(|| (format!("l_{code}"), format!("h_{code}")))
}

/// One sortable value.
#[derive(Debug, Clone, PartialEq)]
enum SortValue {
    Int(i64),
    Float(f64),
    Str(String),
}

impl SortValue {
    fn less(&self, other: &SortValue) -> bool {
        match (self, other) {
            (SortValue::Int(a), SortValue::Int(b)) => a < b,
            (SortValue::Float(a), SortValue::Float(b)) => a < b,
            (SortValue::Str(a), SortValue::Str(b)) => a < b,
            _ => false,
        }
    }

    fn into_owned(self) -> OwnedValue {
        match self {
            SortValue::Int(i) => OwnedValue::I64(i),
            SortValue::Float(f) => OwnedValue::F64(f),
            SortValue::Str(s) => OwnedValue::Str(s),
        }
    }
}

/// Builds the document of one resource version.
pub(crate) struct DocBuilder<'a> {
    f: &'a Fields,
    doc: TantivyDocument,
    /// Terms already added: the same value often arrives through several paths (a display
    /// that is also the CodeableConcept's text, a unit equal to its code, the `code` and
    /// `combo-code` parameters), and each extra copy costs indexing time for nothing.
    added: std::collections::HashSet<(Field, String)>,
    /// Per sortable parameter: lowest and highest value.
    sort: BTreeMap<String, (SortValue, SortValue)>,
    /// Per date key with columns: every interval's start and end.
    dates: BTreeMap<String, (Vec<i64>, Vec<i64>)>,
}

impl<'a> DocBuilder<'a> {
    fn new(f: &'a Fields) -> DocBuilder<'a> {
        DocBuilder {
            f,
            doc: TantivyDocument::default(),
            added: std::collections::HashSet::new(),
            sort: BTreeMap::new(),
            dates: BTreeMap::new(),
        }
    }

    fn add(&mut self, field: Field, text: String) {
        if self.added.insert((field, text.clone())) {
            self.doc.add_text(field, text);
        }
    }

    fn sortable(&mut self, code: &str, lo: SortValue, hi: SortValue) {
        match self.sort.get_mut(code) {
            Some((l, h)) => {
                if lo.less(l) {
                    *l = lo;
                }
                if h.less(&hi) {
                    *h = hi;
                }
            }
            None => {
                self.sort.insert(code.to_string(), (lo, hi));
            }
        }
    }

    fn token(&mut self, key: &str, system: Option<&str>, code: Option<&str>) {
        let tok = self.f.tok;
        if let Some(c) = code {
            let c = clean(c);
            self.add(tok, term(key, &["c", &c]));
            match system {
                Some(s) => self.add(tok, term(key, &["s", &clean(s), &c])),
                None => self.add(tok, term(key, &["n", &c])),
            }
        }
        if let Some(s) = system {
            self.add(tok, term(key, &["S", &clean(s)]));
        }
    }

    fn words(&mut self, key: &str, text: &str) {
        let norm = normalize(text);
        for w in word_suffixes(&norm) {
            self.add(self.f.string, term(key, &[w]));
        }
    }

    fn string(&mut self, key: &str, text: &str) {
        let norm = normalize(text);
        if norm.is_empty() {
            return;
        }
        self.add(self.f.string, term(key, &[&norm]));
        self.add(self.f.exact, term(key, &[&clean(text)]));
    }

    fn number(&mut self, key: &str, value: f64) {
        self.add(self.f.num, term(key, &[&hex_f64(value)]));
    }

    fn quantity(
        &mut self,
        key: &str,
        value: f64,
        system: Option<&str>,
        code: Option<&str>,
        unit: Option<&str>,
    ) {
        let h = hex_f64(value);
        let num = self.f.num;
        self.add(num, term(key, &["*", &h]));
        if let (Some(s), Some(c)) = (system, code) {
            self.add(num, term(key, &["s", &clean(s), &clean(c), &h]));
        }
        for u in [code, unit].into_iter().flatten() {
            self.add(num, term(key, &["c", &clean(u), &h]));
        }
    }

    fn date(&mut self, key: &str, start: Option<i64>, end: Option<i64>) {
        let start = start.unwrap_or(i64::MIN);
        let end = end.unwrap_or(i64::MAX);
        self.add(self.f.dstart, term(key, &[&hex_i64(start)]));
        self.add(self.f.dend, term(key, &[&hex_i64(end)]));
        for unit in unit_terms(start, end) {
            self.add(self.f.dunit, term(key, &[&unit]));
        }
        // Every interval that got terms above, so that the columns answer exactly what the
        // terms would.
        if has_columns(key) {
            let (starts, ends) = self.dates.entry(key.to_string()).or_default();
            starts.push(start);
            ends.push(end);
        }
    }

    fn reference(&mut self, key: &str, v: &SearchValue, store_refs: bool) {
        let SearchValue::Reference {
            reference,
            resource_type,
            id,
            identifier,
            ..
        } = v
        else {
            return;
        };
        let r = self.f.reference;
        if let (Some(t), Some(id)) = (resource_type, id) {
            let target = format!("{t}/{}", clean(id));
            self.add(r, term(key, &["T", &target]));
            if store_refs {
                self.add(r, term("*", &["T", &target]));
                self.add(self.f.refs, term(key, &[&target]));
            }
        }
        if let Some(id) = id {
            self.add(r, term(key, &["I", &clean(id)]));
        }
        if let Some(raw) = reference {
            self.add(r, term(key, &["U", &clean(raw)]));
        }
        if let Some((system, value)) = identifier {
            let (system, value) = (system.as_deref(), value.as_deref());
            if let Some(v) = value {
                let v = clean(v);
                self.add(r, term(key, &["ic", &v]));
                match system {
                    Some(s) => self.add(r, term(key, &["is", &clean(s), &v])),
                    None => self.add(r, term(key, &["in", &v])),
                }
            }
            if let Some(s) = system {
                self.add(r, term(key, &["iS", &clean(s)]));
            }
        }
    }

    /// The terms of one value of a parameter of `kind` under `key`. `own` is the parameter's
    /// code when `v` is one of its own values (not a composite's component): only those have
    /// sort values and stored reference targets.
    fn value(&mut self, kind: SearchParamType, key: &str, v: &SearchValue, own: Option<&str>) {
        let sort_code = own.filter(|c| *c != "_text");
        match (kind, v) {
            (
                SearchParamType::Token,
                SearchValue::Token {
                    system,
                    code,
                    text,
                    of_type,
                },
            ) => {
                self.token(key, system.as_deref(), code.as_deref());
                if let Some(t) = text {
                    self.words(&format!("{key}:text"), t);
                }
                if let Some(value) = code {
                    for (ts, tc) in of_type {
                        if let (Some(ts), Some(tc)) = (ts, tc) {
                            self.add(
                                self.f.tok,
                                term(key, &["t", &clean(ts), &clean(tc), &clean(value)]),
                            );
                        }
                    }
                }
                if let (Some(sc), Some(c)) = (sort_code, code) {
                    let c = cut(c, 100).to_string();
                    self.sortable(sc, SortValue::Str(c.clone()), SortValue::Str(c));
                }
            }
            (SearchParamType::String, SearchValue::String(s)) => {
                if key == "_text" {
                    self.words(key, s);
                } else {
                    self.string(key, s);
                }
                if let Some(sc) = sort_code {
                    let n = cut(&normalize(s), 100).to_string();
                    self.sortable(sc, SortValue::Str(n.clone()), SortValue::Str(n));
                }
            }
            (SearchParamType::Number, SearchValue::Number(d)) => {
                self.number(key, d.value);
                if let Some(sc) = sort_code {
                    self.sortable(sc, SortValue::Float(d.value), SortValue::Float(d.value));
                }
            }
            (
                SearchParamType::Quantity,
                SearchValue::Quantity {
                    value,
                    system,
                    code,
                    unit,
                },
            ) => {
                self.quantity(
                    key,
                    value.value,
                    system.as_deref(),
                    code.as_deref(),
                    unit.as_deref(),
                );
                if let Some(sc) = sort_code {
                    self.sortable(
                        sc,
                        SortValue::Float(value.value),
                        SortValue::Float(value.value),
                    );
                }
            }
            (SearchParamType::Date, SearchValue::Date { start, end }) => {
                self.date(key, *start, *end);
                if let Some(sc) = sort_code {
                    self.sortable(
                        sc,
                        SortValue::Int(start.unwrap_or(i64::MIN)),
                        SortValue::Int(end.unwrap_or(i64::MAX)),
                    );
                }
            }
            (SearchParamType::Reference, SearchValue::Reference { reference, .. }) => {
                self.reference(key, v, own.is_some());
                if let (Some(sc), Some(r)) = (sort_code, reference) {
                    let r = cut(r, 100).to_string();
                    self.sortable(sc, SortValue::Str(r.clone()), SortValue::Str(r));
                }
            }
            (SearchParamType::Uri, SearchValue::Uri(u)) => {
                self.add(self.f.uri, term(key, &[&clean(u)]));
                if let Some(sc) = sort_code {
                    let u = cut(u, 100).to_string();
                    self.sortable(sc, SortValue::Str(u.clone()), SortValue::Str(u));
                }
            }
            // A canonical or uri element of a reference parameter, or a token from a uri.
            (SearchParamType::Token, SearchValue::Uri(u)) => self.token(key, None, Some(u)),
            _ => {}
        }
    }

    fn composite(&mut self, param: &SearchParam, rows: &[SearchValue]) {
        let kinds: Option<Vec<SearchParamType>> = param.components.iter().map(|c| c.kind).collect();
        let Some(kinds) = kinds else {
            return;
        };
        let Some((last_kind, head_kinds)) = kinds.split_last() else {
            return;
        };
        for row in rows {
            let SearchValue::Composite(cols) = row else {
                continue;
            };
            if cols.len() != kinds.len() {
                continue;
            }
            // Every combination of the leading components' forms prefixes the last one.
            let mut keys = vec![Vec::<String>::new()];
            for (kind, values) in head_kinds.iter().zip(cols) {
                let forms: Vec<String> = values
                    .iter()
                    .flat_map(|v| component_forms(*kind, v))
                    .collect();
                keys = keys
                    .iter()
                    .flat_map(|k| {
                        forms.iter().map(move |f| {
                            let mut k = k.clone();
                            k.push(f.clone());
                            k
                        })
                    })
                    .collect();
                if keys.len() > 64 {
                    keys.truncate(64);
                }
            }
            let Some(last_values) = cols.last() else {
                continue;
            };
            for k in &keys {
                let refs: Vec<&str> = k.iter().map(String::as_str).collect();
                let key = composite_key(&param.code, &refs);
                if key.len() > MAX_TERM_BYTES / 2 {
                    continue;
                }
                for v in last_values {
                    self.value(*last_kind, &key, v, None);
                }
            }
        }
    }

    fn finish(mut self) -> TantivyDocument {
        if !self.sort.is_empty() {
            let mut obj = BTreeMap::new();
            for (code, (lo, hi)) in std::mem::take(&mut self.sort) {
                if let Some((l, h)) = sort_paths(&code) {
                    obj.insert(l, lo.into_owned());
                    obj.insert(h, hi.into_owned());
                }
            }
            self.doc.add_object(self.f.sort, obj);
        }
        if !self.dates.is_empty() {
            let mut obj = BTreeMap::new();
            for (key, (starts, ends)) in std::mem::take(&mut self.dates) {
                let (s, e) = column_paths(&key);
                let list =
                    |v: Vec<i64>| OwnedValue::Array(v.into_iter().map(OwnedValue::I64).collect());
                obj.insert(s, list(starts));
                obj.insert(e, list(ends));
            }
            self.doc.add_object(self.f.dates, obj);
        }
        self.doc
    }
}

/// The exact forms of a leading composite component's value (see [`token_forms`]).
pub(crate) fn component_forms(kind: SearchParamType, v: &SearchValue) -> Vec<String> {
    match (kind, v) {
        (SearchParamType::Token, SearchValue::Token { system, code, .. }) => {
            token_forms(system.as_deref(), code.as_deref())
        }
        (SearchParamType::Token, SearchValue::Uri(u)) => token_forms(None, Some(u)),
        (
            SearchParamType::Reference,
            SearchValue::Reference {
                resource_type,
                id,
                reference,
                ..
            },
        ) => {
            let mut out = Vec::new();
            if let (Some(t), Some(id)) = (resource_type, id) {
                out.push(format!("T:{t}/{}", clean(id)));
            }
            if let Some(r) = reference {
                out.push(format!("U:{}", clean(r)));
            }
            out
        }
        (SearchParamType::String, SearchValue::String(s)) => vec![format!("x:{}", normalize(s))],
        (SearchParamType::Uri, SearchValue::Uri(u)) => vec![format!("u:{}", clean(u))],
        (SearchParamType::Number, SearchValue::Number(d)) => vec![format!("d:{}", d.value)],
        (SearchParamType::Quantity, SearchValue::Quantity { value, .. }) => {
            vec![format!("d:{}", value.value)]
        }
        _ => Vec::new(),
    }
}

/// The document of resource `ty/id` at `version`, with the values of every parameter the
/// registry knows for its type.
pub(crate) fn document(
    f: &Fields,
    registry: &SearchParamRegistry,
    ty: ResourceType,
    id: &str,
    version: u64,
    resource: &Map,
) -> TantivyDocument {
    let mut b = DocBuilder::new(f);
    b.add(f.ty, ty.as_str().to_string());
    b.add(f.key, doc_key(ty, id));
    b.doc.add_u64(f.ver, version);
    for (param, values) in registry.extract(resource) {
        if param.kind == SearchParamType::Special {
            continue;
        }
        b.add(f.has, clean(&param.code));
        if param.kind == SearchParamType::Composite {
            b.composite(param, &values);
            continue;
        }
        for v in &values {
            b.value(param.kind, &param.code, v, Some(param.code.as_str()));
        }
    }
    b.finish()
}

/// A document of type `ty` with only date intervals under `key` (for tests of the date
/// queries against each other).
#[cfg(test)]
pub(crate) fn date_document(
    f: &Fields,
    ty: &str,
    key: &str,
    intervals: &[(Option<i64>, Option<i64>)],
) -> TantivyDocument {
    let mut b = DocBuilder::new(f);
    b.add(f.ty, ty.to_string());
    for (start, end) in intervals {
        b.date(key, *start, *end);
    }
    b.finish()
}
