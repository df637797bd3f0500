//! Parsing a FHIR search (`name=value` pairs) into a [`SearchRequest`]: typed criteria per
//! resource type, result-control parameters, and warnings for what was ignored.

use std::fmt;

use fhir_core::search_param::{
    DecimalValue, SearchParam, SearchParamRegistry, SearchParamType, date_bounds,
    patient_compartment_params,
};
use fhir_core::{Issue, IssueType, ResourceId, ResourceType};

use crate::dates::Precision;
use crate::error::SearchError;
use fhir_core::search_escape::{split_unescaped, unescape};

use crate::terms::{clean, composite_key, normalize, shorten};

/// Where a search looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `GET [base]/Type?…`
    Type(ResourceType),
    /// `GET [base]?_type=A,B&…`: the types of `_type`, or every type.
    System,
    /// `GET [base]/Patient/{id}/Type?…`: resources of `resource_type` in the patient's
    /// compartment.
    Compartment {
        /// The patient.
        patient: ResourceId,
        /// The type searched.
        resource_type: ResourceType,
    },
}

/// What to do with parameters the server does not know or support (`Prefer: handling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Handling {
    /// Ignore them and report each in a warning (the default).
    #[default]
    Lenient,
    /// Fail the search (`Prefer: handling=strict`).
    Strict,
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Total {
    /// No total.
    None,
    /// An estimate (this server always counts exactly).
    Estimate,
    /// The exact number of matches (the default).
    #[default]
    Accurate,
}

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Summary {
    /// The whole resource (the default).
    #[default]
    False,
    /// Only the elements marked "summary" in the specification.
    True,
    /// `text`, `id`, `meta` and the required elements.
    Text,
    /// Everything but `text`.
    Data,
    /// Only the total.
    Count,
}

/// One `_sort` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// The parameter's code.
    pub code: String,
    /// Its type, which decides how its values compare.
    pub kind: SearchParamType,
    /// `-code`
    pub descending: bool,
}

/// One `_include` or `_revinclude`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    /// The type holding the reference; `None` for `*`.
    pub source: Option<ResourceType>,
    /// The reference parameter; `None` for `*` (every reference parameter).
    pub param: Option<String>,
    /// Only targets of this type.
    pub target: Option<ResourceType>,
    /// `:iterate` (or R3's `:recurse`): also applies to included resources.
    pub iterate: bool,
}

/// A search prefix (`eq`, `gt` …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

impl Prefix {
    /// Splits a leading prefix off `value`.
    fn split(value: &str) -> (Prefix, &str) {
        let p = match value.get(..2) {
            Some("eq") => Prefix::Eq,
            Some("ne") => Prefix::Ne,
            Some("gt") => Prefix::Gt,
            Some("lt") => Prefix::Lt,
            Some("ge") => Prefix::Ge,
            Some("le") => Prefix::Le,
            Some("sa") => Prefix::Sa,
            Some("eb") => Prefix::Eb,
            Some("ap") => Prefix::Ap,
            _ => return (Prefix::Eq, value),
        };
        (p, &value[2..])
    }
}

/// How a token is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TokenQ {
    /// `code`: any system.
    Code(String),
    /// `system|code`
    SystemCode(String, String),
    /// `|code`: no system.
    NoSystem(String),
    /// `system|`: any code of the system.
    System(String),
    /// `:of-type` `typesystem|typecode|value`
    OfType(String, String, String),
}

/// How a string is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StrQ {
    /// Normalised value starts with (the default).
    Prefix(String),
    /// Exactly as written (`:exact`).
    Exact(String),
    /// Normalised value contains (`:contains`).
    Contains(String),
    /// A word of the normalised text starts with (`:text`, `_text`).
    Words(String),
}

/// Which quantities a quantity search value names by unit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum UnitQ {
    /// No unit given.
    Any,
    /// `system|code`
    System(String, String),
    /// `|code`: code or unit text, any system.
    Code(String),
}

/// How a reference is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RefQ {
    /// `Type/id` (also from an absolute URL, or `:Type` with an id).
    Typed(String),
    /// `id`: any type.
    Id(String),
    /// As written: `urn:uuid:…`, a canonical URL, an absolute URL.
    Url(String),
    /// `:identifier`
    Identifier(TokenQ),
}

/// How a URI is asked for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum UriQ {
    Exact(String),
    /// `:below`: starts with.
    Below(String),
    /// `:above`: the value starts with the indexed URI.
    Above(String),
}

/// One criterion; a search is the AND of its clauses.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Clause {
    /// Matches if any of these does (`,`).
    Any(Vec<Clause>),
    /// Matches if this does not (`:not`).
    Not(Box<Clause>),
    /// `:missing` (`present` is the negation of the value).
    Present {
        code: String,
        present: bool,
    },
    Token {
        key: String,
        q: TokenQ,
    },
    Str {
        key: String,
        q: StrQ,
    },
    Number {
        key: String,
        prefix: Prefix,
        value: DecimalValue,
    },
    Quantity {
        key: String,
        prefix: Prefix,
        value: DecimalValue,
        unit: UnitQ,
    },
    Date {
        key: String,
        prefix: Prefix,
        start: i64,
        end: i64,
        precision: Precision,
    },
    Ref {
        key: String,
        q: RefQ,
    },
    Uri {
        key: String,
        q: UriQ,
    },
    /// `key.rest`: references (by `key`) to resources that match the clause of their type.
    Chain {
        key: String,
        targets: Vec<(ResourceType, Clause)>,
    },
    /// `_has:source:key:rest`: resources that a `source` resource matching `inner` refers to
    /// by `key`.
    Has {
        source: ResourceType,
        key: String,
        inner: Box<Clause>,
    },
}

/// A parsed search.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRequest {
    /// The types searched with their criteria (one for a type-level search).
    pub(crate) branches: Vec<(ResourceType, Vec<Clause>)>,
    /// `_sort`, most significant first.
    pub sort: Vec<SortKey>,
    /// `_count` as asked (the index caps it).
    pub count: Option<usize>,
    /// `_total`
    pub total: Total,
    /// `_summary`
    pub summary: Summary,
    /// `_elements`
    pub elements: Vec<String>,
    /// `_include`
    pub include: Vec<Include>,
    /// `_revinclude`
    pub revinclude: Vec<Include>,
    /// Parameters that were ignored, as warnings for an OperationOutcome entry.
    pub warnings: Vec<Issue>,
}

impl SearchRequest {
    /// The resource types searched.
    pub fn types(&self) -> impl Iterator<Item = ResourceType> + '_ {
        self.branches.iter().map(|(t, _)| *t)
    }
}

/// Parameters FHIR defines that this server does not offer.
const UNSUPPORTED_PARAMS: &[&str] = &[
    "_contained",
    "_containedType",
    "_list",
    "_filter",
    "_query",
    "_content",
    "_graph",
    "_offset",
];

struct Parser<'r> {
    reg: &'r SearchParamRegistry,
    handling: Handling,
    warnings: Vec<Issue>,
    /// Why the parameter being parsed is known but not supported, if it is.
    unsupported: Option<String>,
}

fn bool_value(param: &str, v: &str) -> Result<bool, SearchError> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(SearchError::invalid(
            param,
            format!("must be true or false, not '{}'", shorten(other)),
        )),
    }
}

impl SearchRequest {
    /// Parses the query parameters of a search (decoded `name=value` pairs, in order; a
    /// parameter may repeat) against `registry` (the tenant's parameters).
    ///
    /// Malformed values, unsupported modifiers and impossible result controls are errors;
    /// unknown parameters are warnings (errors with [`Handling::Strict`]).
    pub fn parse(
        registry: &SearchParamRegistry,
        scope: &Scope,
        params: &[(String, String)],
        handling: Handling,
    ) -> Result<SearchRequest, SearchError> {
        let mut p = Parser {
            reg: registry,
            handling,
            warnings: Vec::new(),
            unsupported: None,
        };
        let types: Vec<ResourceType> = match scope {
            Scope::Type(t)
            | Scope::Compartment {
                resource_type: t, ..
            } => vec![*t],
            Scope::System => {
                let mut types = Vec::new();
                for (k, v) in params.iter().filter(|(k, _)| k == "_type") {
                    for name in v.split(',').filter(|n| !n.is_empty()) {
                        let t = ResourceType::parse(name.trim()).ok_or_else(|| {
                            SearchError::invalid(
                                k,
                                format!("'{}' is not a resource type", shorten(name)),
                            )
                        })?;
                        if !types.contains(&t) {
                            types.push(t);
                        }
                    }
                }
                if types.is_empty() {
                    ResourceType::all().collect()
                } else {
                    types
                }
            }
        };
        let scope_name = match scope {
            Scope::System if types.len() > 1 => "the types searched".to_string(),
            _ => types.first().map(|t| t.to_string()).unwrap_or_default(),
        };

        let mut branches: Vec<(ResourceType, Vec<Clause>)> =
            types.iter().map(|t| (*t, Vec::new())).collect();
        if let Scope::Compartment {
            patient,
            resource_type,
        } = scope
        {
            let codes = patient_compartment_params(*resource_type);
            if codes.is_empty() {
                return Err(SearchError::NotSupported(format!(
                    "{resource_type} resources are not in the Patient compartment"
                )));
            }
            let target = format!("Patient/{patient}");
            let any = codes
                .iter()
                .map(|c| Clause::Ref {
                    key: c.clone(),
                    q: RefQ::Typed(target.clone()),
                })
                .collect();
            branches[0].1.push(Clause::Any(any));
        }

        let mut req = SearchRequest {
            branches: Vec::new(),
            sort: Vec::new(),
            count: None,
            total: Total::default(),
            summary: Summary::default(),
            elements: Vec::new(),
            include: Vec::new(),
            revinclude: Vec::new(),
            warnings: Vec::new(),
        };

        for (name, value) in params {
            let (base, modifier) = match name.split_once(':') {
                Some((b, m)) => (b, Some(m)),
                None => (name.as_str(), None),
            };
            match base {
                "_format" | "_pretty" | "_type" => continue,
                "_count" => {
                    req.count = Some(value.trim().parse().map_err(|_| {
                        SearchError::invalid(name, "must be a whole number of 0 or more")
                    })?);
                    continue;
                }
                "_total" => {
                    req.total = match value.as_str() {
                        "none" => Total::None,
                        "estimate" => Total::Estimate,
                        "accurate" => Total::Accurate,
                        other => {
                            return Err(SearchError::invalid(
                                name,
                                format!(
                                    "must be none, estimate or accurate, not '{}'",
                                    shorten(other)
                                ),
                            ));
                        }
                    };
                    continue;
                }
                "_summary" => {
                    req.summary = match value.as_str() {
                        "true" => Summary::True,
                        "false" => Summary::False,
                        "text" => Summary::Text,
                        "data" => Summary::Data,
                        "count" => Summary::Count,
                        other => {
                            return Err(SearchError::invalid(
                                name,
                                format!(
                                    "must be true, false, text, data or count, not '{}'",
                                    shorten(other)
                                ),
                            ));
                        }
                    };
                    continue;
                }
                "_elements" => {
                    for e in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                        // `Observation.status` is accepted for `status`.
                        let e = e.rsplit('.').next().unwrap_or(e);
                        if !req.elements.iter().any(|x| x == e) {
                            req.elements.push(e.to_string());
                        }
                    }
                    continue;
                }
                "_sort" => {
                    for key in value.split(',').map(str::trim).filter(|k| !k.is_empty()) {
                        let (descending, code) = match key.strip_prefix('-') {
                            Some(c) => (true, c),
                            None => (false, key),
                        };
                        let param = types.iter().find_map(|t| p.reg.get(*t, code)).ok_or_else(|| {
                            SearchError::invalid(
                                name,
                                format!("cannot sort by '{}': no such search parameter for {scope_name}", shorten(code)),
                            )
                        })?;
                        let sortable = !matches!(
                            param.kind,
                            SearchParamType::Composite | SearchParamType::Special
                        ) && crate::fields::sort_paths(code).is_some()
                            && code != "_text";
                        if !sortable {
                            return Err(SearchError::NotSupported(format!(
                                "cannot sort by '{}' ({} parameter)",
                                shorten(code),
                                param.kind.as_str()
                            )));
                        }
                        req.sort.push(SortKey {
                            code: code.to_string(),
                            kind: param.kind,
                            descending,
                        });
                    }
                    continue;
                }
                "_include" | "_revinclude" => {
                    let iterate = match modifier {
                        None => false,
                        Some("iterate") | Some("recurse") => true,
                        Some(m) => {
                            return Err(SearchError::NotSupported(format!(
                                "the modifier ':{}' is not supported on {base}",
                                shorten(m)
                            )));
                        }
                    };
                    let inc = p.include(name, value, iterate)?;
                    if base == "_include" {
                        req.include.push(inc);
                    } else {
                        req.revinclude.push(inc);
                    }
                    continue;
                }
                _ => {}
            }
            if UNSUPPORTED_PARAMS.contains(&base) {
                p.ignore(SearchError::NotSupported(format!(
                    "the parameter '{}' is not supported",
                    shorten(name)
                )))?;
                continue;
            }
            if value.is_empty() {
                p.warnings.push(Issue::warning(
                    IssueType::Value,
                    format!(
                        "the parameter '{}' has no value and was ignored",
                        shorten(name)
                    ),
                ));
                continue;
            }
            check_size(name, value)?;
            // The parameter applies to every type it is known for; in a search over several
            // types, a type without it cannot match.
            p.unsupported = None;
            let mut accepted = vec![false; branches.len()];
            for (i, (ty, clauses)) in branches.iter_mut().enumerate() {
                if let Some(c) = p.criterion(*ty, name, value)? {
                    accepted[i] = true;
                    clauses.push(c);
                }
            }
            if !accepted.contains(&true) {
                let e = match p.unsupported.take() {
                    Some(msg) => SearchError::NotSupported(msg),
                    None => SearchError::UnknownParameter {
                        param: shorten(name),
                        scope: scope_name.clone(),
                    },
                };
                p.ignore(e)?;
            } else if branches.len() > 1 {
                let mut keep = accepted.into_iter();
                branches.retain(|_| keep.next().unwrap_or(false));
            }
        }
        req.branches = branches;
        req.warnings = p.warnings;
        Ok(req)
    }
}

/// Most links of a chain or nested `_has`: each link is a search of its own.
const MAX_CHAIN: usize = 4;
/// Longest value of one parameter, in bytes.
const MAX_VALUE_BYTES: usize = 4096;
/// Most `,`-separated values of one parameter.
const MAX_OR_VALUES: usize = 1000;

/// Refuses parameters whose evaluation would be unreasonably large (and whose nesting would
/// otherwise recurse without bound).
fn check_size(name: &str, value: &str) -> Result<(), SearchError> {
    let links = name.matches('.').count() + name.matches("_has:").count();
    if links > MAX_CHAIN {
        return Err(SearchError::TooCostly(format!(
            "'{}' chains {links} searches; at most {MAX_CHAIN} are allowed",
            shorten(name)
        )));
    }
    if value.len() > MAX_VALUE_BYTES {
        return Err(SearchError::invalid(
            name,
            format!("the value is longer than {MAX_VALUE_BYTES} bytes"),
        ));
    }
    if value.matches(',').count() >= MAX_OR_VALUES {
        return Err(SearchError::TooCostly(format!(
            "'{}' has more than {MAX_OR_VALUES} values",
            shorten(name)
        )));
    }
    Ok(())
}

/// The base code of a parameter name (before any modifier or chain).
fn base_code(name: &str) -> &str {
    if name.starts_with("_has:") {
        return "_has";
    }
    let end = name.find([':', '.']).unwrap_or(name.len());
    &name[..end]
}

impl Parser<'_> {
    /// A parameter that is ignored: a warning, or the error in strict mode.
    fn ignore(&mut self, e: SearchError) -> Result<(), SearchError> {
        match self.handling {
            Handling::Strict => Err(e),
            Handling::Lenient => {
                self.warnings.push(Issue::warning(
                    IssueType::NotSupported,
                    format!("{e}; it was ignored"),
                ));
                Ok(())
            }
        }
    }

    fn include(&self, name: &str, value: &str, iterate: bool) -> Result<Include, SearchError> {
        if value == "*" {
            return Ok(Include {
                source: None,
                param: None,
                target: None,
                iterate,
            });
        }
        let parts: Vec<&str> = value.split(':').collect();
        let (src, code, target) = match parts.as_slice() {
            [s, c] => (*s, *c, None),
            [s, c, t] => (*s, *c, Some(*t)),
            _ => {
                return Err(SearchError::invalid(
                    name,
                    format!(
                        "expected Type:parameter[:targetType] or *, not '{}'",
                        shorten(value)
                    ),
                ));
            }
        };
        let source = ResourceType::parse(src).ok_or_else(|| {
            SearchError::invalid(name, format!("'{}' is not a resource type", shorten(src)))
        })?;
        let target = target
            .map(|t| {
                ResourceType::parse(t).ok_or_else(|| {
                    SearchError::invalid(name, format!("'{}' is not a resource type", shorten(t)))
                })
            })
            .transpose()?;
        let param = if code == "*" {
            None
        } else {
            match self.reg.get(source, code) {
                Some(p) if p.kind == SearchParamType::Reference => Some(code.to_string()),
                Some(_) => {
                    return Err(SearchError::invalid(
                        name,
                        format!("'{source}:{}' is not a reference parameter", shorten(code)),
                    ));
                }
                None => {
                    return Err(SearchError::invalid(
                        name,
                        format!("{source} has no search parameter '{}'", shorten(code)),
                    ));
                }
            }
        };
        Ok(Include {
            source: Some(source),
            param,
            target,
            iterate,
        })
    }

    /// The clause of `name=value` on `ty`; `None` if the parameter is unknown for `ty`.
    fn criterion(
        &mut self,
        ty: ResourceType,
        name: &str,
        value: &str,
    ) -> Result<Option<Clause>, SearchError> {
        if let Some(rest) = name.strip_prefix("_has:") {
            return self.has(name, rest, value).map(Some);
        }
        if let Some((left, rest)) = name.split_once('.') {
            return self.chain(ty, name, left, rest, value);
        }
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name, None),
        };
        let Some(param) = self.reg.get(ty, code) else {
            return Ok(None);
        };
        let param = param.clone();
        if param.kind == SearchParamType::Special
            || (param.expression.is_none() && param.code != "_text")
        {
            self.unsupported = Some(format!(
                "the search parameter '{}' is not supported",
                shorten(code)
            ));
            return Ok(None);
        }
        self.param_clause(&param, name, modifier, value).map(Some)
    }

    fn has(&mut self, name: &str, rest: &str, value: &str) -> Result<Clause, SearchError> {
        let mut parts = rest.splitn(3, ':');
        let (Some(src), Some(code), Some(inner_name)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(SearchError::invalid(
                name,
                "expected _has:Type:referenceParameter:parameter",
            ));
        };
        let source = ResourceType::parse(src).ok_or_else(|| {
            SearchError::invalid(name, format!("'{}' is not a resource type", shorten(src)))
        })?;
        match self.reg.get(source, code) {
            Some(p) if p.kind == SearchParamType::Reference => {}
            _ => {
                return Err(SearchError::invalid(
                    name,
                    format!("{source} has no reference parameter '{}'", shorten(code)),
                ));
            }
        }
        let inner = self.criterion(source, inner_name, value)?.ok_or_else(|| {
            SearchError::invalid(
                name,
                format!("{source} has no search parameter '{}'", shorten(inner_name)),
            )
        })?;
        Ok(Clause::Has {
            source,
            key: code.to_string(),
            inner: Box::new(inner),
        })
    }

    fn chain(
        &mut self,
        ty: ResourceType,
        name: &str,
        left: &str,
        rest: &str,
        value: &str,
    ) -> Result<Option<Clause>, SearchError> {
        let (code, modifier) = match left.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (left, None),
        };
        let Some(param) = self.reg.get(ty, code) else {
            return Ok(None);
        };
        if param.kind != SearchParamType::Reference {
            return Err(SearchError::invalid(
                name,
                format!(
                    "'{}' is not a reference parameter, so it cannot be chained",
                    shorten(code)
                ),
            ));
        }
        let candidates: Vec<ResourceType> = match modifier {
            Some(m) => {
                let t = ResourceType::parse(m).ok_or_else(|| {
                    SearchError::NotSupported(format!(
                        "the modifier ':{}' is not supported in a chain (only a resource type is)",
                        shorten(m)
                    ))
                })?;
                vec![t]
            }
            None => param
                .targets
                .iter()
                .filter_map(|t| ResourceType::parse(t))
                .collect(),
        };
        let inner_code = base_code(rest);
        let mut targets = Vec::new();
        for t in candidates {
            if inner_code != "_has" && self.reg.get(t, inner_code).is_none() {
                continue;
            }
            if let Some(c) = self.criterion(t, rest, value)? {
                targets.push((t, c));
            }
        }
        if targets.is_empty() {
            return Err(SearchError::invalid(
                name,
                format!(
                    "no target type of '{}' has a search parameter '{}'",
                    shorten(code),
                    shorten(inner_code)
                ),
            ));
        }
        Ok(Some(Clause::Chain {
            key: code.to_string(),
            targets,
        }))
    }

    fn param_clause(
        &mut self,
        param: &SearchParam,
        name: &str,
        modifier: Option<&str>,
        value: &str,
    ) -> Result<Clause, SearchError> {
        let code = param.code.as_str();
        let kind = param.kind;
        if modifier == Some("missing") {
            let missing = bool_value(name, value)?;
            return Ok(Clause::Present {
                code: code.to_string(),
                present: !missing,
            });
        }
        let unsupported = |m: &str| {
            SearchError::NotSupported(format!(
                "the modifier ':{}' is not supported on the {} parameter '{code}'",
                shorten(m),
                kind.as_str()
            ))
        };
        // Modifiers that need a terminology server.
        if let Some(m @ ("in" | "not-in" | "above" | "below")) = modifier
            && kind == SearchParamType::Token
        {
            return Err(SearchError::NotSupported(format!(
                "the token modifier ':{m}' needs terminology support, which this server does not \
                 have yet"
            )));
        }
        let values: Vec<String> = split_unescaped(value, ',');
        let mut any = Vec::with_capacity(values.len());
        let mut negate = false;
        for raw in &values {
            if raw.is_empty() {
                continue;
            }
            let c = match kind {
                SearchParamType::Token => match modifier {
                    None => Clause::Token {
                        key: code.to_string(),
                        q: token(name, raw)?,
                    },
                    Some("not") => {
                        negate = true;
                        Clause::Token {
                            key: code.to_string(),
                            q: token(name, raw)?,
                        }
                    }
                    Some("text") => Clause::Str {
                        key: format!("{code}:text"),
                        q: StrQ::Words(normalize(&unescape(raw))),
                    },
                    Some("of-type") => {
                        let parts = split_unescaped(raw, '|');
                        let [ts, tc, v] = parts.as_slice() else {
                            return Err(SearchError::invalid(
                                name,
                                "expected typesystem|typecode|value",
                            ));
                        };
                        let (ts, tc, v) = (unescape(ts), unescape(tc), unescape(v));
                        if ts.is_empty() || tc.is_empty() || v.is_empty() {
                            return Err(SearchError::invalid(
                                name,
                                "expected typesystem|typecode|value, all three given",
                            ));
                        }
                        Clause::Token {
                            key: code.to_string(),
                            q: TokenQ::OfType(clean(&ts), clean(&tc), clean(&v)),
                        }
                    }
                    Some(m) => return Err(unsupported(m)),
                },
                SearchParamType::String => {
                    let v = unescape(raw);
                    let q = match modifier {
                        _ if code == "_text" && modifier.is_none() => StrQ::Words(normalize(&v)),
                        None => StrQ::Prefix(normalize(&v)),
                        Some("exact") => StrQ::Exact(clean(&v)),
                        Some("contains") => StrQ::Contains(normalize(&v)),
                        Some(m) => return Err(unsupported(m)),
                    };
                    Clause::Str {
                        key: code.to_string(),
                        q,
                    }
                }
                SearchParamType::Number => {
                    if let Some(m) = modifier {
                        return Err(unsupported(m));
                    }
                    let (prefix, value) = number(name, raw)?;
                    Clause::Number {
                        key: code.to_string(),
                        prefix,
                        value,
                    }
                }
                SearchParamType::Quantity => {
                    if let Some(m) = modifier {
                        return Err(unsupported(m));
                    }
                    quantity(name, code, raw)?
                }
                SearchParamType::Date => {
                    if let Some(m) = modifier {
                        return Err(unsupported(m));
                    }
                    date(name, code, raw)?
                }
                SearchParamType::Reference => Clause::Ref {
                    key: code.to_string(),
                    q: reference(name, raw, modifier, param)?,
                },
                SearchParamType::Uri => {
                    let v = clean(&unescape(raw));
                    let q = match modifier {
                        None => UriQ::Exact(v),
                        Some("below") => UriQ::Below(v),
                        Some("above") => UriQ::Above(v),
                        Some(m) => return Err(unsupported(m)),
                    };
                    Clause::Uri {
                        key: code.to_string(),
                        q,
                    }
                }
                SearchParamType::Composite => {
                    if let Some(m) = modifier {
                        return Err(unsupported(m));
                    }
                    self.composite(name, param, raw)?
                }
                SearchParamType::Special => {
                    return Err(SearchError::NotSupported(format!(
                        "the search parameter '{code}' is not supported"
                    )));
                }
            };
            any.push(c);
        }
        if any.is_empty() {
            return Err(SearchError::invalid(name, "no value given"));
        }
        let clause = if any.len() == 1 {
            any.pop().unwrap_or(Clause::Any(Vec::new()))
        } else {
            Clause::Any(any)
        };
        Ok(if negate {
            Clause::Not(Box::new(clause))
        } else {
            clause
        })
    }

    fn composite(
        &mut self,
        name: &str,
        param: &SearchParam,
        raw: &str,
    ) -> Result<Clause, SearchError> {
        let kinds: Vec<SearchParamType> = param
            .components
            .iter()
            .map(|c| c.kind)
            .collect::<Option<_>>()
            .ok_or_else(|| {
                SearchError::NotSupported(format!(
                    "the composite parameter '{}' has a component this server does not know",
                    param.code
                ))
            })?;
        let parts = split_unescaped(raw, '$');
        if parts.len() != kinds.len() {
            return Err(SearchError::invalid(
                name,
                format!(
                    "a value of '{}' has {} parts separated by '$', not {}",
                    param.code,
                    kinds.len(),
                    parts.len()
                ),
            ));
        }
        let mut forms = Vec::new();
        for (kind, part) in kinds.iter().zip(&parts).take(kinds.len() - 1) {
            forms.push(component_form(name, *kind, part)?);
        }
        let refs: Vec<&str> = forms.iter().map(String::as_str).collect();
        let key = composite_key(&param.code, &refs);
        let last = parts.last().map(String::as_str).unwrap_or("");
        let last_kind = kinds[kinds.len() - 1];
        Ok(match last_kind {
            SearchParamType::Token => Clause::Token {
                key,
                q: token(name, last)?,
            },
            SearchParamType::String => Clause::Str {
                key,
                q: StrQ::Prefix(normalize(&unescape(last))),
            },
            SearchParamType::Number => {
                let (prefix, value) = number(name, last)?;
                Clause::Number { key, prefix, value }
            }
            SearchParamType::Quantity => quantity(name, &key, last)?,
            SearchParamType::Date => date(name, &key, last)?,
            SearchParamType::Reference => Clause::Ref {
                key,
                q: reference(name, last, None, param)?,
            },
            SearchParamType::Uri => Clause::Uri {
                key,
                q: UriQ::Exact(clean(&unescape(last))),
            },
            SearchParamType::Composite | SearchParamType::Special => {
                return Err(SearchError::NotSupported(format!(
                    "the composite parameter '{}' is not supported",
                    param.code
                )));
            }
        })
    }
}

/// The composite-key form of a leading component's search value (see
/// [`crate::fields::component_forms`]).
fn component_form(name: &str, kind: SearchParamType, part: &str) -> Result<String, SearchError> {
    Ok(match kind {
        SearchParamType::Token => match token(name, part)? {
            TokenQ::Code(c) => format!("c:{c}"),
            TokenQ::SystemCode(s, c) => format!("s:{s}|{c}"),
            TokenQ::NoSystem(c) => format!("n:{c}"),
            TokenQ::System(_) | TokenQ::OfType(..) => {
                return Err(SearchError::NotSupported(format!(
                    "'system|' without a code is not supported in the composite '{}'",
                    shorten(name)
                )));
            }
        },
        SearchParamType::Reference => {
            let v = unescape(part);
            match fhir_core::fhirpath::parse_reference(&v) {
                Some((t, id, _)) => format!("T:{t}/{}", clean(id)),
                None => format!("U:{}", clean(&v)),
            }
        }
        SearchParamType::String => format!("x:{}", normalize(&unescape(part))),
        SearchParamType::Uri => format!("u:{}", clean(&unescape(part))),
        SearchParamType::Number | SearchParamType::Quantity => {
            let v = unescape(part);
            let d = DecimalValue::parse(v.split('|').next().unwrap_or("")).ok_or_else(|| {
                SearchError::invalid(
                    name,
                    format!(
                        "'{}' is not a number (prefixes are only allowed on the last component)",
                        shorten(&v)
                    ),
                )
            })?;
            format!("d:{}", d.value)
        }
        SearchParamType::Date | SearchParamType::Composite | SearchParamType::Special => {
            return Err(SearchError::NotSupported(format!(
                "a {} component before the last one is not supported in '{}'",
                kind.as_str(),
                shorten(name)
            )));
        }
    })
}

fn token(name: &str, raw: &str) -> Result<TokenQ, SearchError> {
    let parts = split_unescaped(raw, '|');
    Ok(match parts.as_slice() {
        [code] => TokenQ::Code(clean(&unescape(code))),
        [system, code] => {
            let (s, c) = (clean(&unescape(system)), clean(&unescape(code)));
            match (s.is_empty(), c.is_empty()) {
                (true, false) => TokenQ::NoSystem(c),
                (false, false) => TokenQ::SystemCode(s, c),
                (false, true) => TokenQ::System(s),
                (true, true) => return Err(SearchError::invalid(name, "'|' alone is not a token")),
            }
        }
        _ => {
            return Err(SearchError::invalid(
                name,
                format!(
                    "'{}' has more than one unescaped '|'; escape a '|' in a code as '\\|'",
                    shorten(raw)
                ),
            ));
        }
    })
}

fn number(name: &str, raw: &str) -> Result<(Prefix, DecimalValue), SearchError> {
    let (prefix, rest) = Prefix::split(raw);
    let value = DecimalValue::parse(rest).ok_or_else(|| {
        SearchError::invalid(
            name,
            format!(
                "'{}' is not a number with an optional prefix (eq, ne, gt, lt, ge, le, sa, eb, ap)",
                shorten(raw)
            ),
        )
    })?;
    Ok((prefix, value))
}

fn quantity(name: &str, key: &str, raw: &str) -> Result<Clause, SearchError> {
    let parts = split_unescaped(raw, '|');
    let (num, unit) = match parts.as_slice() {
        [n] => (n.as_str(), UnitQ::Any),
        [n, system, code] => {
            let (s, c) = (clean(&unescape(system)), clean(&unescape(code)));
            let unit = match (s.is_empty(), c.is_empty()) {
                (_, true) => UnitQ::Any,
                (true, false) => UnitQ::Code(c),
                (false, false) => UnitQ::System(s, c),
            };
            (n.as_str(), unit)
        }
        _ => {
            return Err(SearchError::invalid(
                name,
                format!(
                    "'{}' is not a quantity: expected [prefix]number, [prefix]number|system|code or [prefix]number||code",
                    shorten(raw)
                ),
            ));
        }
    };
    let (prefix, value) = number(name, num)?;
    Ok(Clause::Quantity {
        key: key.to_string(),
        prefix,
        value,
        unit,
    })
}

fn date(name: &str, key: &str, raw: &str) -> Result<Clause, SearchError> {
    // An unencoded `+` of a zone offset arrives as a space after URL decoding.
    let raw = &raw.replace(' ', "+");
    let (prefix, rest) = Prefix::split(raw);
    let (start, end) = date_bounds(rest).ok_or_else(|| {
        SearchError::invalid(
            name,
            format!(
                "'{}' is not a date with an optional prefix: expected e.g. 2024, 2024-03, \
                 ge2024-03-01 or lt2024-03-01T10:00:00+01:00",
                shorten(raw)
            ),
        )
    })?;
    Ok(Clause::Date {
        key: key.to_string(),
        prefix,
        start,
        end,
        precision: Precision::of(rest),
    })
}

fn reference(
    name: &str,
    raw: &str,
    modifier: Option<&str>,
    param: &SearchParam,
) -> Result<RefQ, SearchError> {
    let v = unescape(raw);
    match modifier {
        None => {}
        Some("identifier") => return Ok(RefQ::Identifier(token(name, raw)?)),
        Some(m) => {
            if let Some(t) = ResourceType::parse(m) {
                // `subject:Patient=123` is `subject=Patient/123`.
                if let Some((pt, id, _)) = fhir_core::fhirpath::parse_reference(&v) {
                    if pt != t.as_str() {
                        return Err(SearchError::invalid(
                            name,
                            format!("'{}' is not a reference to a {t}", shorten(&v)),
                        ));
                    }
                    return Ok(RefQ::Typed(format!("{t}/{}", clean(id))));
                }
                let id =
                    ResourceId::new(&v).map_err(|e| SearchError::invalid(name, e.to_string()))?;
                return Ok(RefQ::Typed(format!("{t}/{id}")));
            }
            return Err(SearchError::NotSupported(format!(
                "the modifier ':{}' is not supported on the reference parameter '{}'",
                shorten(m),
                param.code
            )));
        }
    }
    // `Type/id`, and an absolute URL ending in it: resources are found by type and id,
    // whichever server the URL names.
    if let Some((t, id, _)) = fhir_core::fhirpath::parse_reference(&v) {
        return Ok(RefQ::Typed(format!("{t}/{}", clean(id))));
    }
    if !v.contains('/') && !v.contains(':') && ResourceId::new(&v).is_ok() {
        return Ok(RefQ::Id(v));
    }
    // A canonical's `|version` does not take part in matching.
    let url = v.split('|').next().unwrap_or(&v);
    Ok(RefQ::Url(clean(url)))
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Type(t) => write!(f, "{t}"),
            Scope::System => f.write_str("all types"),
            Scope::Compartment {
                patient,
                resource_type,
            } => write!(f, "Patient/{patient}/{resource_type}"),
        }
    }
}
