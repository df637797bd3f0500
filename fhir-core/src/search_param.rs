//! Search parameters: the registry of the 1,378 official R4 SearchParameters (plus custom ones)
//! and the extraction of index-ready values from resources.
//!
//! `data/r4-search-parameters.json` and `data/r4-compartment-patient.json` are derived from the
//! official definitions by `tools/gen_search_params.py` (committed, so the crate builds from
//! this repository alone). The generator corrects one defect of the spec: the
//! DocumentReference `relationship` composite pairs each component definition with the other's
//! expression, so it could never match.
//!
//! ```
//! use fhir_core::search_param::{SearchParamRegistry, SearchValue};
//! use fhir_core::{json, ResourceType};
//! let reg = SearchParamRegistry::r4();
//! let obs = json::parse(br#"{"resourceType":"Observation","status":"final",
//!     "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
//!     "subject":{"reference":"Patient/123"}}"#).unwrap();
//! let obs = obs.as_object().unwrap();
//! let observation = ResourceType::parse("Observation").unwrap();
//! let patient = reg.get(observation, "patient").unwrap();
//! let values = reg.extract_param(patient, obs);
//! assert!(matches!(&values[0], SearchValue::Reference { id: Some(id), .. } if id == "123"));
//! assert_eq!(reg.patient_compartment(obs), ["123"]);
//! ```
//!
//! # Values
//!
//! [`SearchParamRegistry::extract`] evaluates each parameter's FHIRPath
//! expression and turns the resulting elements into [`SearchValue`]s following the R4 search
//! rules (<https://hl7.org/fhir/R4/search.html>); elements of a type a parameter cannot use are
//! skipped. Dates become intervals in microseconds since 1970-01-01T00:00:00Z
//! ([`date_bounds`]): a value with a time zone is converted to UTC; a date without a time
//! (`1970`, `2024-03-01`), which FHIR says is in the server's local time, is taken as UTC, so
//! the interval is the same on every server. `_text` (no expression in R4) yields the
//! narrative's text without markup. Special parameters (`near`, `_query`) and `_content` yield
//! no values: they need the index's own logic.
//!
//! Each parameter's expression is compiled once; for each resource type the registry keeps it
//! restricted to that type's branches, so an Observation's 47 parameters are extracted in about
//! 15 µs (release build).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use crate::fhirpath::{Expr, FhirPathError, Item, Node, parse_reference};
use crate::ids::ResourceType;
use crate::json::{self, Json, Map};
use crate::resource::Resource;

static SEARCH_PARAMS_JSON: &str = include_str!("../data/r4-search-parameters.json");
static COMPARTMENT_JSON: &str = include_str!("../data/r4-compartment-patient.json");

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SearchParamType {
    /// `number`
    Number,
    /// `date`
    Date,
    /// `string`
    String,
    /// `token`
    Token,
    /// `reference`
    Reference,
    /// `composite`
    Composite,
    /// `quantity`
    Quantity,
    /// `uri`
    Uri,
    /// `special`
    Special,
}

impl SearchParamType {
    /// The type called `code` in a SearchParameter (`token`, `date` …).
    pub fn parse(code: &str) -> Option<SearchParamType> {
        Some(match code {
            "number" => SearchParamType::Number,
            "date" => SearchParamType::Date,
            "string" => SearchParamType::String,
            "token" => SearchParamType::Token,
            "reference" => SearchParamType::Reference,
            "composite" => SearchParamType::Composite,
            "quantity" => SearchParamType::Quantity,
            "uri" => SearchParamType::Uri,
            "special" => SearchParamType::Special,
            _ => return None,
        })
    }

    /// The type's code.
    pub fn as_str(&self) -> &'static str {
        match self {
            SearchParamType::Number => "number",
            SearchParamType::Date => "date",
            SearchParamType::String => "string",
            SearchParamType::Token => "token",
            SearchParamType::Reference => "reference",
            SearchParamType::Composite => "composite",
            SearchParamType::Quantity => "quantity",
            SearchParamType::Uri => "uri",
            SearchParamType::Special => "special",
        }
    }

    /// The modifiers R4 defines for this type (`:[type]` of references is not listed).
    pub fn default_modifiers(&self) -> &'static [&'static str] {
        match self {
            SearchParamType::String => &["missing", "exact", "contains"],
            SearchParamType::Token => &[
                "missing", "text", "not", "above", "below", "in", "not-in", "of-type",
            ],
            SearchParamType::Reference => &["missing", "identifier", "above", "below"],
            SearchParamType::Uri => &["missing", "above", "below"],
            _ => &["missing"],
        }
    }
}

/// Why a SearchParameter could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchParamError {
    /// The JSON is not a SearchParameter resource.
    #[error("not a SearchParameter resource")]
    NotASearchParameter,
    /// A required element is missing or has the wrong JSON type.
    #[error("SearchParameter.{0} is missing or invalid")]
    Missing(&'static str),
    /// `type` is not a search parameter type.
    #[error("unknown search parameter type '{0}'")]
    UnknownType(String),
    /// A `base` is not a resource type (nor `Resource`/`DomainResource`).
    #[error("unknown base resource type '{0}'")]
    UnknownBase(String),
    /// An expression is outside the FHIRPath this server evaluates.
    #[error("expression '{expression}': {source}")]
    Expression {
        /// The expression text.
        expression: String,
        /// Why it was rejected.
        source: FhirPathError,
    },
}

/// One component of a composite search parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    /// The canonical URL of the component's own search parameter.
    pub definition: String,
    /// Evaluated on each item of the composite's expression.
    pub expression: Expr,
    /// The type of the definition's parameter, once the registry knows it (a component whose
    /// definition is unknown yields no values, so neither does its composite).
    pub kind: Option<SearchParamType>,
}

/// A search parameter (from the R4 definitions or a custom SearchParameter resource).
#[derive(Debug, Clone, PartialEq)]
pub struct SearchParam {
    /// Canonical URL; identifies the parameter in the registry.
    pub url: String,
    /// The name used in URLs (`code`, `_lastUpdated`).
    pub code: String,
    /// Resource types it applies to (may be `Resource` or `DomainResource`).
    pub base: Vec<String>,
    /// Its type.
    pub kind: SearchParamType,
    /// The compiled FHIRPath expression (absent for `_text`, `_content`, `_query`).
    pub expression: Option<Expr>,
    /// `xpathUsage` when not `normal` (`phonetic`, `nearby`).
    pub xpath_usage: Option<String>,
    /// Resource types a reference parameter may point to.
    pub targets: Vec<String>,
    /// Modifiers listed by the definition (R4's own list none: see
    /// [`SearchParam::supported_modifiers`]).
    pub modifiers: Vec<String>,
    /// Comparators (`eq`, `gt` …) the definition allows.
    pub comparators: Vec<String>,
    /// `multipleOr`, if stated.
    pub multiple_or: Option<bool>,
    /// `multipleAnd`, if stated.
    pub multiple_and: Option<bool>,
    /// Components of a composite parameter.
    pub components: Vec<Component>,
    /// Chained parameter names the definition allows.
    pub chain: Vec<String>,
}

fn strings(m: &Map, key: &str) -> Vec<String> {
    match m.get(key) {
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Json::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

fn compile(expression: &str) -> Result<Expr, SearchParamError> {
    Expr::parse(expression).map_err(|source| SearchParamError::Expression {
        expression: expression.to_string(),
        source,
    })
}

impl SearchParam {
    /// Reads a SearchParameter resource (`url`, `code`, `base`, `type` required; `expression`,
    /// `target`, `modifier`, `comparator`, `multipleOr`, `multipleAnd`, `component`, `chain`
    /// optional) and compiles its expressions.
    pub fn from_resource(resource: &Json) -> Result<SearchParam, SearchParamError> {
        let m = resource
            .as_object()
            .ok_or(SearchParamError::NotASearchParameter)?;
        if m.get("resourceType").and_then(Json::as_str) != Some("SearchParameter") {
            return Err(SearchParamError::NotASearchParameter);
        }
        SearchParam::from_map(m, &[])
    }

    /// `all_targets` stands for `"target":"all"`, the embedded data's short form.
    fn from_map(m: &Map, all_targets: &[String]) -> Result<SearchParam, SearchParamError> {
        let text = |k: &'static str| -> Result<String, SearchParamError> {
            m.get(k)
                .and_then(Json::as_str)
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .ok_or(SearchParamError::Missing(k))
        };
        let url = text("url")?;
        let code = text("code")?;
        let type_code = text("type")?;
        let kind =
            SearchParamType::parse(&type_code).ok_or(SearchParamError::UnknownType(type_code))?;
        let base = strings(m, "base");
        if base.is_empty() {
            return Err(SearchParamError::Missing("base"));
        }
        if let Some(bad) = base.iter().find(|b| !is_base(b)) {
            return Err(SearchParamError::UnknownBase(bad.clone()));
        }
        let expression = match m.get("expression").and_then(Json::as_str) {
            Some(e) if !e.trim().is_empty() => Some(compile(e)?),
            _ => None,
        };
        let targets = match m.get("target") {
            Some(Json::String(s)) if s == "all" => all_targets.to_vec(),
            _ => strings(m, "target"),
        };
        let mut components = Vec::new();
        if let Some(Json::Array(items)) = m.get("component") {
            for c in items {
                let definition = c
                    .get("definition")
                    .and_then(Json::as_str)
                    .ok_or(SearchParamError::Missing("component.definition"))?;
                let expression = c
                    .get("expression")
                    .and_then(Json::as_str)
                    .ok_or(SearchParamError::Missing("component.expression"))?;
                components.push(Component {
                    definition: definition.to_string(),
                    expression: compile(expression)?,
                    kind: None,
                });
            }
        }
        Ok(SearchParam {
            url,
            code,
            base,
            kind,
            expression,
            xpath_usage: m
                .get("xpathUsage")
                .and_then(Json::as_str)
                .filter(|u| *u != "normal")
                .map(str::to_string),
            targets,
            modifiers: strings(m, "modifier"),
            comparators: strings(m, "comparator"),
            multiple_or: m.get("multipleOr").and_then(Json::as_bool),
            multiple_and: m.get("multipleAnd").and_then(Json::as_bool),
            components,
            chain: strings(m, "chain"),
        })
    }

    /// The modifiers this parameter accepts: its own list, or its type's defaults.
    pub fn supported_modifiers(&self) -> Vec<&str> {
        if self.modifiers.is_empty() {
            self.kind.default_modifiers().to_vec()
        } else {
            self.modifiers.iter().map(String::as_str).collect()
        }
    }
}

fn is_base(name: &str) -> bool {
    name == "Resource" || name == "DomainResource" || ResourceType::parse(name).is_some()
}

/// Concrete resource types a base stands for.
fn concrete_types(base: &str) -> Vec<ResourceType> {
    match base {
        "Resource" => ResourceType::all().collect(),
        "DomainResource" => ResourceType::all()
            .filter(|t| !matches!(t.as_str(), "Bundle" | "Binary" | "Parameters"))
            .collect(),
        other => ResourceType::parse(other).into_iter().collect(),
    }
}

/// A value extracted for the search index.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchValue {
    /// From `code`, `boolean`, `string`, `id`, `uri`, `Coding`, `CodeableConcept`,
    /// `Identifier` and `ContactPoint`.
    Token {
        /// `Coding.system`, `Identifier.system`, or `ContactPoint.system` (`phone`, `email`: the
        /// same choice as HAPI, so `telecom=email|a@b.no` works).
        system: Option<String>,
        /// The code, identifier value, contact value or primitive's text.
        code: Option<String>,
        /// What `:text` searches: `Coding.display`, `CodeableConcept.text` (a value of its
        /// own, without code), `Identifier.type.text`.
        text: Option<String>,
        /// For identifiers: the (system, code) of each `Identifier.type` coding, for `:of-type`.
        of_type: Vec<(Option<String>, Option<String>)>,
    },
    /// The raw text of a string, markdown, or a part of a `HumanName` or `Address`;
    /// normalisation (case, accents) is the index's business.
    String(String),
    /// An interval in microseconds since 1970-01-01T00:00:00Z, both ends inclusive; `None` is
    /// unbounded (an open `Period`).
    Date {
        /// First instant covered.
        start: Option<i64>,
        /// Last instant covered.
        end: Option<i64>,
    },
    /// A decimal or integer.
    Number(DecimalValue),
    /// A `Quantity` (or `Age`, `Duration`, `Distance`, `Count`, `Money`, `Range`).
    Quantity {
        /// The number.
        value: DecimalValue,
        /// `Quantity.system` (`urn:iso:std:iso:4217` for `Money`).
        system: Option<String>,
        /// `Quantity.code` (the currency for `Money`).
        code: Option<String>,
        /// `Quantity.unit`.
        unit: Option<String>,
    },
    /// A `Reference`, a `canonical`/`uri` pointing at a resource, or an embedded resource
    /// (`Bundle.entry[0].resource`).
    Reference {
        /// The reference as written (`Patient/123`, an absolute URL, `urn:uuid:…`, `#id`); a
        /// canonical's URL without its `|version`. `None` for a logical reference with only an
        /// identifier.
        reference: Option<String>,
        /// The target's type: from the reference text, else `Reference.type`, else (for `#id`)
        /// the contained resource.
        resource_type: Option<ResourceType>,
        /// The target's id when the reference ends in `Type/id`.
        id: Option<String>,
        /// `_history` version, or a canonical's `|version`.
        version: Option<String>,
        /// `Reference.identifier` (system, value), for `:identifier`.
        identifier: Option<(Option<String>, Option<String>)>,
    },
    /// A `uri`, `url`, `canonical`, `oid` or `uuid`.
    Uri(String),
    /// One row of a composite parameter: per component (in definition order) the values it
    /// has in this row, e.g. `[[code tokens], [the quantity]]` for one `Observation.component`.
    Composite(Vec<Vec<SearchValue>>),
}

/// A number as written, as `f64`, and the interval its precision implies.
#[derive(Debug, Clone, PartialEq)]
pub struct DecimalValue {
    /// The exact text (`100`, `72.50`, `1e2`).
    pub text: String,
    /// The value.
    pub value: f64,
    /// Lower bound of the implied interval (inclusive): `99.5` for `100`.
    pub low: f64,
    /// Upper bound of the implied interval (exclusive): `100.5` for `100`.
    pub high: f64,
}

impl DecimalValue {
    /// Parses a JSON/FHIR number. The interval is ± half a unit of the last written digit
    /// (`100` → [99.5, 100.5), `100.00` → [99.995, 100.005), `1e2` → [50, 150)).
    pub fn parse(text: &str) -> Option<DecimalValue> {
        let value: f64 = text.parse().ok()?;
        if !value.is_finite() {
            return None;
        }
        let (mantissa, exponent) = match text.find(['e', 'E']) {
            Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
            None => (text, 0),
        };
        let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len()) as i32;
        let half = 0.5 * 10f64.powi(exponent.saturating_sub(decimals));
        Some(DecimalValue {
            text: text.to_string(),
            value,
            low: value - half,
            high: value + half,
        })
    }
}

const MICROS_PER_SECOND: i64 = 1_000_000;

/// The interval a FHIR `date`, `dateTime` or `instant` stands for, in microseconds since
/// 1970-01-01T00:00:00Z, both ends inclusive: `2024` is 2024-01-01T00:00:00 to
/// 2024-12-31T23:59:59.999999, `2024-03-01T10:00:00+01:00` is 09:00:00 to 09:00:00.999999 UTC.
/// A time zone is applied; a value without one is taken as UTC. `None` if the text is no date.
pub fn date_bounds(text: &str) -> Option<(i64, i64)> {
    use chrono::NaiveDate;
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<u32> {
        let s = b.get(from..from + len)?;
        s.iter().all(u8::is_ascii_digit).then_some(())?;
        std::str::from_utf8(s).ok()?.parse().ok()
    };
    let micros = |d: NaiveDate| {
        d.and_hms_opt(0, 0, 0)
            .map(|t| t.and_utc().timestamp_micros())
    };
    let year = num(0, 4)? as i32;
    if b.len() == 4 {
        let start = micros(NaiveDate::from_ymd_opt(year, 1, 1)?)?;
        return Some((start, micros(NaiveDate::from_ymd_opt(year + 1, 1, 1)?)? - 1));
    }
    (b.get(4) == Some(&b'-')).then_some(())?;
    let month = num(5, 2)?;
    if b.len() == 7 {
        let start = micros(NaiveDate::from_ymd_opt(year, month, 1)?)?;
        let next = if month == 12 {
            NaiveDate::from_ymd_opt(year + 1, 1, 1)?
        } else {
            NaiveDate::from_ymd_opt(year, month + 1, 1)?
        };
        return Some((start, micros(next)? - 1));
    }
    (b.get(7) == Some(&b'-')).then_some(())?;
    let day = NaiveDate::from_ymd_opt(year, month, num(8, 2)?)?;
    let day_start = micros(day)?;
    if b.len() == 10 {
        return Some((day_start, day_start + 86_400 * MICROS_PER_SECOND - 1));
    }
    (b.get(10) == Some(&b'T')).then_some(())?;
    let hour = num(11, 2)?;
    (b.get(13) == Some(&b':')).then_some(())?;
    let minute = num(14, 2)?;
    let mut pos = 16;
    // Seconds are required by FHIR, but `hh:mm` is common enough to accept at minute precision.
    let (second, mut unit) = if b.get(pos) == Some(&b':') {
        let s = num(pos + 1, 2)?;
        pos += 3;
        (s, MICROS_PER_SECOND)
    } else {
        (0, 60 * MICROS_PER_SECOND)
    };
    let mut fraction = 0i64;
    if unit == MICROS_PER_SECOND && b.get(pos) == Some(&b'.') {
        pos += 1;
        let start = pos;
        while b.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        let digits = &text[start..pos];
        if digits.is_empty() {
            return None;
        }
        // Precision beyond microseconds is truncated to them.
        let kept = &digits[..digits.len().min(6)];
        let scale = 10i64.pow(6 - kept.len() as u32);
        fraction = kept.parse::<i64>().ok()? * scale;
        unit = scale;
    }
    let offset_seconds: i64 = match b.get(pos) {
        None => 0,
        Some(b'Z') if pos + 1 == b.len() => 0,
        Some(sign @ (b'+' | b'-')) if pos + 6 == b.len() && b.get(pos + 3) == Some(&b':') => {
            let h = num(pos + 1, 2)? as i64;
            let m = num(pos + 4, 2)? as i64;
            if h > 14 || m > 59 {
                return None;
            }
            let s = (h * 60 + m) * 60;
            if *sign == b'-' { -s } else { s }
        }
        _ => return None,
    };
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    // A leap second (`:60`) is placed at the end of second 59.
    let second = second.min(59) as i64;
    let local = day_start
        + ((hour as i64 * 60 + minute as i64) * 60 + second) * MICROS_PER_SECOND
        + fraction;
    let start = local - offset_seconds * MICROS_PER_SECOND;
    Some((start, start + unit - 1))
}

/// The value of an element that a parameter's expression selected, converted per the type.
fn convert(kind: SearchParamType, item: &Item<'_>, root: &Map, out: &mut Vec<SearchValue>) {
    let node = match item {
        Item::Node(n) => n,
        Item::Bool(b) if kind == SearchParamType::Token => {
            out.push(token(None, Some(if *b { "true" } else { "false" }), None));
            return;
        }
        Item::String(s) if kind == SearchParamType::String => {
            out.push(SearchValue::String(s.to_string()));
            return;
        }
        _ => return,
    };
    if node.type_name() == "Extension" {
        // A custom parameter may select the extension itself; its value is what counts.
        for v in extension_values(node, root) {
            convert(kind, &v, root, out);
        }
        return;
    }
    match kind {
        SearchParamType::Token => token_values(node, out),
        SearchParamType::String => string_values(node, out),
        SearchParamType::Date => out.extend(date_value(node)),
        SearchParamType::Number => out.extend(number_value(node)),
        SearchParamType::Quantity => out.extend(quantity_value(node)),
        SearchParamType::Reference => out.extend(reference_value(node, root)),
        SearchParamType::Uri => {
            if let Some(s) = node.as_str() {
                out.push(SearchValue::Uri(s.to_string()));
            }
        }
        SearchParamType::Composite | SearchParamType::Special => {}
    }
}

fn extension_values<'a>(node: &Node<'a>, root: &'a Map) -> Vec<Item<'a>> {
    static VALUE: OnceLock<Option<Expr>> = OnceLock::new();
    match VALUE.get_or_init(|| Expr::parse("value").ok()) {
        Some(e) => e.evaluate_on(Item::Node(*node), root),
        None => Vec::new(),
    }
}

fn owned(s: Option<&str>) -> Option<String> {
    s.filter(|s| !s.is_empty()).map(str::to_string)
}

fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> SearchValue {
    SearchValue::Token {
        system: owned(system),
        code: owned(code),
        text: owned(text),
        of_type: Vec::new(),
    }
}

fn member_str<'a>(m: &'a Map, key: &str) -> Option<&'a str> {
    m.get(key).and_then(Json::as_str)
}

fn objects<'a>(m: &'a Map, key: &str) -> impl Iterator<Item = &'a Map> {
    let (one, many): (Option<&Json>, &[Json]) = match m.get(key) {
        Some(Json::Array(a)) => (None, a.as_slice()),
        Some(v) => (Some(v), &[]),
        None => (None, &[]),
    };
    one.into_iter().chain(many).filter_map(Json::as_object)
}

fn str_values<'a>(m: &'a Map, key: &str) -> impl Iterator<Item = &'a str> {
    let (one, many): (Option<&Json>, &[Json]) = match m.get(key) {
        Some(Json::Array(a)) => (None, a.as_slice()),
        Some(v) => (Some(v), &[]),
        None => (None, &[]),
    };
    one.into_iter().chain(many).filter_map(Json::as_str)
}

fn coding_token(c: &Map) -> Option<SearchValue> {
    let v = token(
        member_str(c, "system"),
        member_str(c, "code"),
        member_str(c, "display"),
    );
    match &v {
        SearchValue::Token {
            system: None,
            code: None,
            text: None,
            ..
        } => None,
        _ => Some(v),
    }
}

fn token_values(node: &Node<'_>, out: &mut Vec<SearchValue>) {
    if let Some(p) = node.primitive() {
        let code = match p {
            Json::String(s) => s.as_str(),
            Json::Bool(true) => "true",
            Json::Bool(false) => "false",
            Json::Number(n) => n.as_str(),
            _ => return,
        };
        out.push(token(None, Some(code), None));
        return;
    }
    let Some(m) = node.object() else {
        return;
    };
    match node.type_name() {
        "Coding" => out.extend(coding_token(m)),
        "CodeableConcept" => {
            out.extend(objects(m, "coding").filter_map(coding_token));
            if let Some(text) = member_str(m, "text").filter(|t| !t.is_empty()) {
                out.push(token(None, None, Some(text)));
            }
        }
        "Identifier" => {
            let ty = m.get("type").and_then(Json::as_object);
            let of_type = ty
                .map(|t| {
                    objects(t, "coding")
                        .map(|c| (owned(member_str(c, "system")), owned(member_str(c, "code"))))
                        .collect()
                })
                .unwrap_or_default();
            let system = member_str(m, "system");
            let value = member_str(m, "value");
            if system.is_some() || value.is_some() {
                out.push(SearchValue::Token {
                    system: owned(system),
                    code: owned(value),
                    text: owned(ty.and_then(|t| member_str(t, "text"))),
                    of_type,
                });
            }
        }
        "ContactPoint" => {
            if let Some(value) = member_str(m, "value") {
                out.push(token(member_str(m, "system"), Some(value), None));
            }
        }
        _ => {}
    }
}

fn string_values(node: &Node<'_>, out: &mut Vec<SearchValue>) {
    let mut push = |s: &str| {
        if !s.trim().is_empty() {
            out.push(SearchValue::String(s.to_string()));
        }
    };
    if let Some(s) = node.as_str() {
        push(s);
        return;
    }
    let Some(m) = node.object() else {
        return;
    };
    let parts: &[&str] = match node.type_name() {
        "HumanName" => &["family", "given", "prefix", "suffix", "text"],
        "Address" => &[
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
            "text",
        ],
        "Annotation" => &["text"],
        "Coding" => &["display"],
        "CodeableConcept" => {
            for c in objects(m, "coding") {
                str_values(c, "display").for_each(&mut push);
            }
            &["text"]
        }
        _ => &[],
    };
    for part in parts {
        str_values(m, part).for_each(&mut push);
    }
}

fn date_value(node: &Node<'_>) -> Option<SearchValue> {
    if let Some(s) = node.as_str() {
        let (start, end) = date_bounds(s)?;
        return Some(SearchValue::Date {
            start: Some(start),
            end: Some(end),
        });
    }
    let m = node.object()?;
    let (start, end) = match node.type_name() {
        "Period" => period_bounds(m)?,
        "Timing" => {
            // Only the outer limits of a schedule count (R4 search, "date").
            let mut spans: Vec<(Option<i64>, Option<i64>)> = str_values(m, "event")
                .filter_map(date_bounds)
                .map(|(s, e)| (Some(s), Some(e)))
                .collect();
            if let Some(bounds) = m
                .get("repeat")
                .and_then(|r| r.get("boundsPeriod"))
                .and_then(Json::as_object)
            {
                spans.extend(period_bounds(bounds));
            }
            if spans.is_empty() {
                return None;
            }
            let start = spans
                .iter()
                .map(|s| s.0)
                .try_fold(i64::MAX, |acc, s| s.map(|s| acc.min(s)));
            let end = spans
                .iter()
                .map(|s| s.1)
                .try_fold(i64::MIN, |acc, e| e.map(|e| acc.max(e)));
            (start, end)
        }
        _ => return None,
    };
    Some(SearchValue::Date { start, end })
}

/// A Period's interval: from the start of `start` to the end of `end`; a missing end is open.
fn period_bounds(m: &Map) -> Option<(Option<i64>, Option<i64>)> {
    let start = member_str(m, "start").and_then(date_bounds).map(|b| b.0);
    let end = member_str(m, "end").and_then(date_bounds).map(|b| b.1);
    (start.is_some() || end.is_some()).then_some((start, end))
}

fn number_text(v: Option<&Json>) -> Option<DecimalValue> {
    DecimalValue::parse(v?.as_number()?)
}

fn number_value(node: &Node<'_>) -> Option<SearchValue> {
    if let Some(p) = node.primitive() {
        return number_text(Some(p)).map(SearchValue::Number);
    }
    let m = node.object()?;
    match node.type_name() {
        "Range" => range_value(m).map(|(v, ..)| SearchValue::Number(v)),
        t if is_quantity(t) => number_text(m.get("value")).map(SearchValue::Number),
        _ => None,
    }
}

fn is_quantity(type_name: &str) -> bool {
    matches!(
        type_name,
        "Quantity" | "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity" | "MoneyQuantity"
    )
}

/// A Range as one value: text `low..high`, the midpoint (or the bound there is), and the
/// interval from the low bound's lower edge to the high bound's upper edge (open if missing).
/// Also returns the unit fields of whichever bound has them.
fn range_value(m: &Map) -> Option<(DecimalValue, Option<&Map>)> {
    let low_q = m.get("low").and_then(Json::as_object);
    let high_q = m.get("high").and_then(Json::as_object);
    let low = number_text(low_q.and_then(|q| q.get("value")));
    let high = number_text(high_q.and_then(|q| q.get("value")));
    let value = match (&low, &high) {
        (Some(l), Some(h)) => (l.value + h.value) / 2.0,
        (Some(l), None) => l.value,
        (None, Some(h)) => h.value,
        (None, None) => return None,
    };
    let text = format!(
        "{}..{}",
        low.as_ref().map_or("", |l| l.text.as_str()),
        high.as_ref().map_or("", |h| h.text.as_str())
    );
    let unit_source = low_q.filter(|_| low.is_some()).or(high_q);
    Some((
        DecimalValue {
            text,
            value,
            low: low.map_or(f64::NEG_INFINITY, |l| l.low),
            high: high.map_or(f64::INFINITY, |h| h.high),
        },
        unit_source,
    ))
}

fn quantity_value(node: &Node<'_>) -> Option<SearchValue> {
    let m = node.object()?;
    let units = |q: Option<&Map>| {
        let get = |k| owned(q.and_then(|q| member_str(q, k)));
        (get("system"), get("code"), get("unit"))
    };
    let (value, (system, code, unit)) = match node.type_name() {
        "Money" => (
            number_text(m.get("value"))?,
            (
                Some("urn:iso:std:iso:4217".to_string()),
                owned(member_str(m, "currency")),
                None,
            ),
        ),
        "Range" => {
            let (v, q) = range_value(m)?;
            (v, units(q))
        }
        t if is_quantity(t) => (number_text(m.get("value"))?, units(Some(m))),
        _ => return None,
    };
    Some(SearchValue::Quantity {
        value,
        system,
        code,
        unit,
    })
}

fn reference_value(node: &Node<'_>, root: &Map) -> Option<SearchValue> {
    if let Some(text) = node.as_str() {
        // canonical / uri: the URL without version, type and id when it ends in `Type/id`.
        let (url, version) = match text.split_once('|') {
            Some((u, v)) => (u, owned(Some(v))),
            None => (text, None),
        };
        let parsed = parse_reference(url);
        return Some(SearchValue::Reference {
            reference: Some(url.to_string()),
            resource_type: parsed.and_then(|p| ResourceType::parse(p.0)),
            id: parsed.map(|p| p.1.to_string()),
            version,
            identifier: None,
        });
    }
    let m = node.object()?;
    if node.ty().is_resource() {
        // An embedded resource (`Bundle.entry[0].resource`) stands for itself.
        let rt = ResourceType::parse(node.type_name());
        let id = member_str(m, "id");
        return Some(SearchValue::Reference {
            reference: id.zip(rt).map(|(id, rt)| format!("{rt}/{id}")),
            resource_type: rt,
            id: owned(id),
            version: None,
            identifier: None,
        });
    }
    if node.type_name() != "Reference" {
        return None;
    }
    let reference = member_str(m, "reference").filter(|r| !r.is_empty());
    let identifier = m
        .get("identifier")
        .and_then(Json::as_object)
        .map(|i| {
            (
                owned(member_str(i, "system")),
                owned(member_str(i, "value")),
            )
        })
        .filter(|(s, v)| s.is_some() || v.is_some());
    if reference.is_none() && identifier.is_none() {
        return None;
    }
    let parsed = reference.and_then(parse_reference);
    let declared = member_str(m, "type").and_then(|t| {
        ResourceType::parse(
            t.strip_prefix("http://hl7.org/fhir/StructureDefinition/")
                .unwrap_or(t),
        )
    });
    let contained = reference
        .and_then(|r| r.strip_prefix('#'))
        .and_then(|id| objects(root, "contained").find(|c| member_str(c, "id") == Some(id)))
        .and_then(|c| member_str(c, "resourceType"))
        .and_then(ResourceType::parse);
    Some(SearchValue::Reference {
        reference: reference.map(str::to_string),
        resource_type: parsed
            .and_then(|p| ResourceType::parse(p.0))
            .or(declared)
            .or(contained),
        id: parsed.map(|p| p.1.to_string()),
        version: parsed.and_then(|p| owned(p.2)),
        identifier,
    })
}

/// The narrative's text for `_text`: the XHTML with tags dropped, the common entities decoded
/// and white space collapsed.
fn narrative_text(root: &Map) -> Option<String> {
    let div = root.get("text")?.get("div")?.as_str()?;
    let mut plain = String::with_capacity(div.len());
    let mut rest = div;
    while let Some(i) = rest.find(['<', '&']) {
        plain.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with('<') {
            rest = rest.find('>').map_or("", |j| &rest[j + 1..]);
            plain.push(' ');
        } else {
            let end = rest.find(';').filter(|&j| j <= 10);
            let decoded = end.and_then(|j| match &rest[1..j] {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                e => e
                    .strip_prefix("#x")
                    .and_then(|h| u32::from_str_radix(h, 16).ok())
                    .or_else(|| e.strip_prefix('#').and_then(|d| d.parse().ok()))
                    .and_then(char::from_u32),
            });
            match (decoded, end) {
                (Some(c), Some(j)) => {
                    plain.push(c);
                    rest = &rest[j + 1..];
                }
                _ => {
                    plain.push('&');
                    rest = &rest[1..];
                }
            }
        }
    }
    plain.push_str(rest);
    let text = plain.split_whitespace().collect::<Vec<_>>().join(" ");
    (!text.is_empty()).then_some(text)
}

/// A parameter as it applies to one resource type: the expression keeps only the union
/// branches for that type (see [`Expr::for_resource_type`]).
#[derive(Debug, Clone)]
struct Entry {
    param: Arc<SearchParam>,
    expr: Option<Arc<Expr>>,
}

#[derive(Debug, Clone, Default)]
struct TypeParams {
    entries: Vec<Entry>,
    by_code: HashMap<String, usize>,
}

/// The search parameters known to a server (or tenant): the R4 ones plus custom ones.
///
/// Cloning is cheap (parameters and expressions are shared), so a tenant can start from
/// [`SearchParamRegistry::r4`]`().clone()` and [`add`](SearchParamRegistry::add) its own.
#[derive(Debug, Clone, Default)]
pub struct SearchParamRegistry {
    params: Vec<Arc<SearchParam>>,
    by_url: HashMap<String, usize>,
    by_type: HashMap<ResourceType, TypeParams>,
}

impl SearchParamRegistry {
    /// The 1,378 R4 search parameters, loaded once from the embedded data.
    pub fn r4() -> &'static SearchParamRegistry {
        static R4: OnceLock<SearchParamRegistry> = OnceLock::new();
        R4.get_or_init(|| {
            // The embedded file is generated and tested; failing to load it is a build defect.
            SearchParamRegistry::load(SEARCH_PARAMS_JSON)
                .expect("embedded R4 search parameters are valid")
        })
    }

    fn load(text: &str) -> Result<SearchParamRegistry, String> {
        let root = json::parse(text.as_bytes()).map_err(|e| e.to_string())?;
        let all_targets = root
            .as_object()
            .map(|m| strings(m, "allTargets"))
            .unwrap_or_default();
        let items = root
            .get("searchParameters")
            .and_then(Json::as_array)
            .ok_or("no searchParameters")?;
        let mut params = Vec::with_capacity(items.len());
        for item in items {
            let m = item
                .as_object()
                .ok_or("a search parameter is not an object")?;
            params.push(SearchParam::from_map(m, &all_targets).map_err(|e| e.to_string())?);
        }
        // Components name other parameters, which may come later in the file.
        let kinds: HashMap<String, SearchParamType> =
            params.iter().map(|p| (p.url.clone(), p.kind)).collect();
        let mut reg = SearchParamRegistry::default();
        for mut p in params {
            for c in &mut p.components {
                c.kind = kinds.get(&c.definition).copied();
            }
            reg.add(p).map_err(|e| e.to_string())?;
        }
        Ok(reg)
    }

    /// Adds a parameter, replacing one with the same URL, and, for each of its resource types,
    /// one with the same code (so a custom parameter can override an official one).
    /// Component types are looked up among the parameters already known.
    pub fn add(&mut self, mut param: SearchParam) -> Result<(), SearchParamError> {
        if let Some(bad) = param.base.iter().find(|b| !is_base(b)) {
            return Err(SearchParamError::UnknownBase(bad.clone()));
        }
        for c in &mut param.components {
            if c.kind.is_none() {
                c.kind = self.by_url.get(&c.definition).map(|&i| self.params[i].kind);
            }
        }
        let param = Arc::new(param);
        if let Some(&old) = self.by_url.get(&param.url) {
            let old = Arc::clone(&self.params[old]);
            for tp in self.by_type.values_mut() {
                if let Some(&i) = tp.by_code.get(&old.code)
                    && Arc::ptr_eq(&tp.entries[i].param, &old)
                {
                    tp.entries.remove(i);
                    tp.by_code = tp
                        .entries
                        .iter()
                        .enumerate()
                        .map(|(i, e)| (e.param.code.clone(), i))
                        .collect();
                }
            }
        }
        let mut types: Vec<ResourceType> =
            param.base.iter().flat_map(|b| concrete_types(b)).collect();
        types.sort();
        types.dedup();
        for rt in types {
            let expr = param
                .expression
                .as_ref()
                .and_then(|e| e.for_resource_type(rt.as_str()))
                .map(Arc::new);
            let entry = Entry {
                param: Arc::clone(&param),
                expr,
            };
            let tp = self.by_type.entry(rt).or_default();
            match tp.by_code.get(&param.code) {
                Some(&i) => tp.entries[i] = entry,
                None => {
                    tp.by_code.insert(param.code.clone(), tp.entries.len());
                    tp.entries.push(entry);
                }
            }
        }
        match self.by_url.get(&param.url) {
            Some(&i) => self.params[i] = param,
            None => {
                self.by_url.insert(param.url.clone(), self.params.len());
                self.params.push(param);
            }
        }
        Ok(())
    }

    /// Number of distinct parameters.
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// Whether the registry has no parameters.
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Every parameter, in the order they were added.
    pub fn all(&self) -> impl Iterator<Item = &SearchParam> {
        self.params.iter().map(|p| p.as_ref())
    }

    /// The parameter with canonical URL `url`.
    pub fn by_url(&self, url: &str) -> Option<&SearchParam> {
        self.by_url.get(url).map(|&i| self.params[i].as_ref())
    }

    /// The parameters that apply to `resource_type`, including the `Resource` and
    /// `DomainResource` ones (`_id`, `_lastUpdated` …).
    pub fn params_for(&self, resource_type: ResourceType) -> impl Iterator<Item = &SearchParam> {
        self.by_type
            .get(&resource_type)
            .into_iter()
            .flat_map(|tp| tp.entries.iter().map(|e| e.param.as_ref()))
    }

    /// The parameter `code` of `resource_type`.
    pub fn get(&self, resource_type: ResourceType, code: &str) -> Option<&SearchParam> {
        let tp = self.by_type.get(&resource_type)?;
        tp.by_code.get(code).map(|&i| tp.entries[i].param.as_ref())
    }

    /// The values of every parameter of the resource's type that has any, in registry order.
    /// Parameters without values are left out (`:missing` is their absence).
    pub fn extract(&self, resource: &Map) -> Vec<(&SearchParam, Vec<SearchValue>)> {
        let Some(tp) = resource
            .get("resourceType")
            .and_then(Json::as_str)
            .and_then(ResourceType::parse)
            .and_then(|rt| self.by_type.get(&rt))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in &tp.entries {
            let values = values_of(&entry.param, entry.expr.as_deref(), resource);
            if !values.is_empty() {
                out.push((entry.param.as_ref(), values));
            }
        }
        out
    }

    /// [`extract`](SearchParamRegistry::extract) for a validated [`Resource`].
    pub fn extract_resource(&self, resource: &Resource) -> Vec<(&SearchParam, Vec<SearchValue>)> {
        self.extract(resource.json())
    }

    /// The values of one parameter on a resource (e.g. to reindex after adding a parameter).
    pub fn extract_param(&self, param: &SearchParam, resource: &Map) -> Vec<SearchValue> {
        values_of(param, param.expression.as_ref(), resource)
    }

    /// The ids of the patients whose compartment the resource is in: the `Patient/…` targets
    /// of the parameters [`patient_compartment_params`] lists for its type, and for a Patient
    /// its own id. Sorted, without duplicates. References are taken by their `Type/id` tail,
    /// whatever server an absolute reference names.
    pub fn patient_compartment(&self, resource: &Map) -> Vec<String> {
        let Some(rt) = resource
            .get("resourceType")
            .and_then(Json::as_str)
            .and_then(ResourceType::parse)
        else {
            return Vec::new();
        };
        let mut ids = Vec::new();
        if rt.as_str() == "Patient"
            && let Some(id) = member_str(resource, "id")
        {
            ids.push(id.to_string());
        }
        for code in patient_compartment_params(rt) {
            let Some(param) = self.get(rt, code) else {
                continue;
            };
            for v in self.extract_param(param, resource) {
                if let SearchValue::Reference {
                    resource_type: Some(t),
                    id: Some(id),
                    ..
                } = v
                    && t.as_str() == "Patient"
                {
                    ids.push(id);
                }
            }
        }
        ids.sort();
        ids.dedup();
        ids
    }
}

fn values_of(param: &SearchParam, expr: Option<&Expr>, resource: &Map) -> Vec<SearchValue> {
    let mut out = Vec::new();
    let Some(expr) = expr else {
        if param.code == "_text" && param.expression.is_none() {
            out.extend(narrative_text(resource).map(SearchValue::String));
        }
        return out;
    };
    match param.kind {
        SearchParamType::Special => {}
        SearchParamType::Composite => {
            let kinds: Option<Vec<SearchParamType>> =
                param.components.iter().map(|c| c.kind).collect();
            let Some(kinds) = kinds else {
                return out;
            };
            let mut items: Vec<Vec<Item<'_>>> = vec![Vec::new(); kinds.len()];
            'rows: for item in expr.evaluate(resource) {
                // All components are evaluated before any is converted: most rows lack one
                // (an Observation without value[x] for `code-value-quantity`), and a composite
                // matches only when every component does.
                for (c, found) in param.components.iter().zip(&mut items) {
                    found.clear();
                    c.expression.evaluate_on_into(item, resource, found);
                    if found.is_empty() {
                        continue 'rows;
                    }
                }
                let mut row = Vec::with_capacity(kinds.len());
                for (&kind, found) in kinds.iter().zip(&items) {
                    let mut values = Vec::new();
                    for v in found {
                        convert(kind, v, resource, &mut values);
                    }
                    if values.is_empty() {
                        continue 'rows;
                    }
                    row.push(values);
                }
                out.push(SearchValue::Composite(row));
            }
        }
        kind => {
            for item in expr.evaluate(resource) {
                convert(kind, &item, resource, &mut out);
            }
        }
    }
    out
}

/// The codes of the parameters that put a resource of `resource_type` in a patient's
/// compartment (R4 CompartmentDefinition `patient`); empty for types never in it.
pub fn patient_compartment_params(resource_type: ResourceType) -> &'static [String] {
    static COMPARTMENT: OnceLock<HashMap<String, Vec<String>>> = OnceLock::new();
    let map = COMPARTMENT.get_or_init(|| {
        // Generated and tested like the parameters themselves.
        let root = json::parse(COMPARTMENT_JSON.as_bytes())
            .expect("embedded compartment definition is valid");
        root.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, _)| (k.to_string(), strings(m, k)))
                    .collect()
            })
            .unwrap_or_default()
    });
    map.get(resource_type.as_str()).map_or(&[], Vec::as_slice)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = MICROS_PER_SECOND;

    #[test]
    fn date_bounds_follow_precision_and_zone() {
        let y2024 = 1_704_067_200 * SECOND; // 2024-01-01T00:00:00Z
        assert_eq!(
            date_bounds("2024"),
            Some((y2024, 1_735_689_600 * SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-02"),
            Some((1_706_745_600 * SECOND, 1_709_251_200 * SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-12"),
            Some((1_733_011_200 * SECOND, 1_735_689_600 * SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-01-01"),
            Some((y2024, y2024 + 86_400 * SECOND - 1))
        );
        let nine = y2024 + 9 * 3600 * SECOND;
        assert_eq!(
            date_bounds("2024-01-01T10:00:00+01:00"),
            Some((nine, nine + SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-01-01T09:00:00Z"),
            Some((nine, nine + SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-01-01T04:30:00-04:30"),
            Some((nine, nine + SECOND - 1))
        );
        assert_eq!(
            date_bounds("2024-01-01T09:00:00.5Z"),
            Some((nine + 500_000, nine + 599_999))
        );
        assert_eq!(
            date_bounds("2024-01-01T09:00:00.123456789Z"),
            Some((nine + 123_456, nine + 123_456))
        );
        assert_eq!(
            date_bounds("2024-01-01T09:00Z"),
            Some((nine, nine + 60 * SECOND - 1))
        );
        assert_eq!(
            date_bounds("2016-12-31T23:59:60Z").map(|b| b.1 - b.0),
            Some(SECOND - 1)
        );
        assert_eq!(date_bounds("1969-12-31"), Some((-86_400 * SECOND, -1)));
        for bad in [
            "",
            "24",
            "2024-13",
            "2024-02-30",
            "2024-01-01T",
            "2024-01-01T25:00:00Z",
            "2024-01-01T10:00:00+1",
            "2024/01",
            "2024-01-01T09:00:00.Z",
            "2024-01-01T09:00:00Zx",
            "２０２４",
        ] {
            assert_eq!(date_bounds(bad), None, "{bad}");
        }
    }

    #[test]
    fn decimals_keep_text_and_precision() {
        let d = DecimalValue::parse("100").unwrap();
        assert_eq!(
            (d.text.as_str(), d.value, d.low, d.high),
            ("100", 100.0, 99.5, 100.5)
        );
        let d = DecimalValue::parse("72.50").unwrap();
        assert!((d.low - 72.495).abs() < 1e-9 && (d.high - 72.505).abs() < 1e-9);
        let d = DecimalValue::parse("1e2").unwrap();
        assert_eq!((d.value, d.low, d.high), (100.0, 50.0, 150.0));
        let d = DecimalValue::parse("-0.5E-1").unwrap();
        assert!((d.value + 0.05).abs() < 1e-12 && (d.high - d.low - 0.01).abs() < 1e-12);
        assert!(DecimalValue::parse("abc").is_none());
        assert!(DecimalValue::parse("1e999").is_none());
    }

    #[test]
    fn narrative_text_drops_markup() {
        let m = match json::parse(
            br#"{"resourceType":"Patient","text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Kari &amp; Ola<br/>Nordmann&#229;</p> &bogus</div>"}}"#,
        ) {
            Ok(Json::Object(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            narrative_text(&m).as_deref(),
            Some("Kari & Ola Nordmannå &bogus")
        );
        let reg = SearchParamRegistry::r4();
        let patient = ResourceType::parse("Patient").unwrap();
        let text = reg.get(patient, "_text").unwrap();
        assert_eq!(
            reg.extract_param(text, &m),
            [SearchValue::String("Kari & Ola Nordmannå &bogus".into())]
        );
    }
}
