//! The FHIRPath subset that search-parameter expressions use, evaluated over our [`Json`] tree
//! with the R4 [`Schema`] for types.
//!
//! An [`Expr`] is parsed once and evaluated many times; evaluation never fails and never
//! panics (where FHIRPath would raise an error, such as `as` applied to several items, the
//! evaluator is lenient and keeps the items that qualify, or returns empty).
//!
//! ```
//! use fhir_core::fhirpath::Expr;
//! use fhir_core::json;
//! let obs = json::parse(br#"{"resourceType":"Observation","status":"final",
//!     "subject":{"reference":"Patient/123"},"valueQuantity":{"value":72.5,"unit":"/min"}}"#)
//!     .unwrap();
//! let obs = obs.as_object().unwrap();
//! let expr = Expr::parse("(Observation.value as Quantity).unit").unwrap();
//! let out = expr.evaluate(obs);
//! assert_eq!(out[0].as_str(), Some("/min"));
//! let expr = Expr::parse("Observation.subject.where(resolve() is Patient)").unwrap();
//! assert_eq!(expr.evaluate(obs).len(), 1);
//! ```
//!
//! # Supported
//!
//! * paths over elements, with choice elements found by their base name (`Observation.value`
//!   finds `valueQuantity`, `valueString` …) and primitive extensions (`birthDate.extension`
//!   reads `_birthDate`); a leading type name (`Observation.code`) selects the focus if it is
//!   of that type (`Resource` and `DomainResource` match every resource);
//! * literals: strings, integers, decimals, `true`/`false`, `{}`; `$this`; `%resource`,
//!   `%rootResource`, `%context`, `%ucum`, `%sct`, `%loinc`;
//! * operators `|`, `=`, `!=`, `~`, `!~`, `<`, `<=`, `>`, `>=` (numbers and strings), `and`,
//!   `or`, `xor`, `implies`, `in`, `contains`, `is`, `as`, unary minus on number literals,
//!   indexers with an integer literal (`entry[0]`);
//! * functions `where`, `select`, `exists` (with or without criteria), `all`, `empty`, `not`,
//!   `first`, `last`, `tail`, `skip(n)`, `take(n)`, `count`, `distinct`, `ofType`, `as`, `is`,
//!   `resolve`, `extension(url)`, `hasValue`.
//!
//! Type tests know the R4 type hierarchy (`Age` is a `Quantity`, `code` a `string`, every
//! resource a `Resource`) and accept System type names for FHIR primitives (`as(DateTime)`
//! matches a `dateTime`, as the official `code-value-date` composite needs).
//!
//! `resolve()` never fetches anything: a local reference `#id` yields the contained resource;
//! any other reference yields a placeholder that only knows the target's type (from the
//! reference text or `Reference.type`), which is what `resolve() is Patient` needs.
//!
//! # Not supported
//!
//! Arithmetic and string concatenation (`+ - * / div mod &`), date/time and quantity literals,
//! string, math, conversion and tree functions (`substring`, `matches`, `toString`,
//! `descendants`, `repeat`, `iif`, …), `$index`/`$total`, other `%` constants, `memberOf`.
//! [`Expr::parse`] rejects them with [`FhirPathError::Unsupported`] rather than guessing. None
//! of the 1,378 R4 search expressions needs them.

mod eval;
mod parser;

use std::fmt;

use crate::json::{Json, Map};
use crate::schema::{PrimitiveDef, Schema, TypeDef, TypeKind};

pub(crate) use parser::Ex;

/// Why an expression could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirPathError {
    /// Not valid FHIRPath.
    #[error("FHIRPath syntax error at {pos}: {message}")]
    Syntax {
        /// Byte offset in the expression.
        pos: usize,
        /// What is wrong.
        message: String,
    },
    /// Valid FHIRPath outside the supported subset.
    #[error("unsupported FHIRPath at {pos}: {what}")]
    Unsupported {
        /// Byte offset in the expression.
        pos: usize,
        /// The construct.
        what: String,
    },
}

/// A compiled FHIRPath expression.
#[derive(Clone, PartialEq)]
pub struct Expr {
    source: String,
    ex: Ex,
}

impl fmt::Debug for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Expr({:?})", self.source)
    }
}

impl Expr {
    /// Compiles `source`.
    pub fn parse(source: &str) -> Result<Expr, FhirPathError> {
        Ok(Expr {
            source: source.to_string(),
            ex: parser::Parser::parse(source)?,
        })
    }

    /// The expression text it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression on a resource (`$this`, `%resource` and `%context` are the
    /// resource).
    pub fn evaluate<'a>(&'a self, resource: &'a Map) -> Vec<Item<'a>> {
        let root = Item::resource(resource);
        let mut out = Vec::new();
        eval::eval(&self.ex, &root, &eval::Env::new(root, root), &mut out);
        out
    }

    /// Evaluates the expression with `focus` as `$this` and `%context`, inside `resource`
    /// (`%resource`, and where `#id` references are resolved). Composite search parameters
    /// evaluate their components this way on each item of the parameter's own expression.
    pub fn evaluate_on<'a>(&'a self, focus: Item<'a>, resource: &'a Map) -> Vec<Item<'a>> {
        let mut out = Vec::new();
        self.evaluate_on_into(focus, resource, &mut out);
        out
    }

    /// As [`Expr::evaluate_on`], appending to `out` (so a caller can reuse one buffer).
    pub fn evaluate_on_into<'a>(
        &'a self,
        focus: Item<'a>,
        resource: &'a Map,
        out: &mut Vec<Item<'a>>,
    ) {
        let root = Item::resource(resource);
        eval::eval(&self.ex, &focus, &eval::Env::new(root, focus), out);
    }

    /// The expression restricted to what can apply to a resource of type `resource_type`.
    ///
    /// Expressions shared by several resource types are unions with one branch per type
    /// (`AllergyIntolerance.patient | CarePlan.subject.where(…) | …`, 30 branches for
    /// `clinical-patient`). Dropping the branches that start with another resource type gives
    /// the same result on `resource_type` and is evaluated without testing each branch.
    /// Returns `None` when no branch is left.
    pub fn for_resource_type(&self, resource_type: &str) -> Option<Expr> {
        let keep = |ex: &Ex| match eval::root_type(ex) {
            Some(t) => eval::type_is(resource_type, t, true),
            None => true,
        };
        let ex = match &self.ex {
            Ex::Union(branches) => {
                let kept: Vec<Ex> = branches.iter().filter(|b| keep(b)).cloned().collect();
                match kept.len() {
                    0 => return None,
                    1 => kept.into_iter().next()?,
                    _ => Ex::Union(kept),
                }
            }
            other if keep(other) => other.clone(),
            _ => return None,
        };
        Some(Expr {
            source: self.source.clone(),
            ex,
        })
    }
}

/// The type of a node, from the schema.
#[derive(Clone, Copy)]
pub enum Ty {
    /// A resource, complex data type or backbone element.
    Complex(&'static TypeDef),
    /// A primitive type.
    Primitive(&'static PrimitiveDef),
    /// Content the schema does not describe (e.g. a contained resource without a known
    /// `resourceType`); navigated by member name without types.
    Unknown,
}

impl Ty {
    /// The type's name (`Quantity`, `Observation.component`, `dateTime`; empty if unknown).
    pub fn name(&self) -> &'static str {
        match self {
            Ty::Complex(t) => t.name.as_str(),
            Ty::Primitive(p) => p.name.as_str(),
            Ty::Unknown => "",
        }
    }

    /// Whether this is a concrete resource type.
    pub fn is_resource(&self) -> bool {
        matches!(self, Ty::Complex(t) if t.kind == TypeKind::Resource)
    }

    /// The type called `name`.
    pub fn named(name: &str) -> Ty {
        let schema = Schema::get();
        if let Some(t) = schema.type_def(name) {
            Ty::Complex(t)
        } else if let Some(p) = schema.primitive(name) {
            Ty::Primitive(p)
        } else {
            Ty::Unknown
        }
    }
}

impl fmt::Debug for Ty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An element of a resource together with its type.
#[derive(Clone, Copy, Debug)]
pub struct Node<'a> {
    value: Option<&'a Json>,
    object: Option<&'a Map>,
    /// The `_name` sibling of a primitive (its `id` and `extension`).
    shadow: Option<&'a Json>,
    ty: Ty,
}

impl<'a> Node<'a> {
    /// The element's type.
    pub fn ty(&self) -> Ty {
        self.ty
    }

    /// The element's type name, e.g. `CodeableConcept` or `dateTime`.
    pub fn type_name(&self) -> &'static str {
        self.ty.name()
    }

    /// The members of a complex element.
    pub fn object(&self) -> Option<&'a Map> {
        self.object
    }

    /// The JSON value of a primitive (`None` if it only has extensions).
    pub fn primitive(&self) -> Option<&'a Json> {
        match self.value {
            Some(Json::Object(_)) | None => None,
            v => v,
        }
    }

    /// A primitive's string value.
    pub fn as_str(&self) -> Option<&'a str> {
        self.primitive().and_then(Json::as_str)
    }

    /// A member of a complex element as a string (`Coding.system`).
    pub fn str_member(&self, key: &str) -> Option<&'a str> {
        self.object?.get(key)?.as_str()
    }
}

/// One item of a FHIRPath collection.
#[derive(Clone, Copy, Debug)]
pub enum Item<'a> {
    /// An element of the resource.
    Node(Node<'a>),
    /// A boolean computed by the expression (e.g. `Patient.deceased.exists() and …`).
    Bool(bool),
    /// An integer literal or count.
    Integer(i64),
    /// A decimal literal, as written.
    Decimal(&'a str),
    /// A string literal.
    String(&'a str),
    /// The result of `resolve()` on a reference to another resource: only its type is known.
    Resolved(&'static str),
}

impl<'a> Item<'a> {
    /// The item for a whole resource, typed by its `resourceType`.
    pub fn resource(resource: &'a Map) -> Item<'a> {
        let ty = resource
            .get("resourceType")
            .and_then(Json::as_str)
            .map(Ty::named)
            .unwrap_or(Ty::Unknown);
        Item::Node(Node {
            value: None,
            object: Some(resource),
            shadow: None,
            ty,
        })
    }

    /// The node, if this is an element of the resource.
    pub fn as_node(&self) -> Option<&Node<'a>> {
        match self {
            Item::Node(n) => Some(n),
            _ => None,
        }
    }

    /// The string value of a string literal or a string primitive.
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Item::String(s) => Some(s),
            Item::Node(n) => n.as_str(),
            _ => None,
        }
    }

    /// The type name: the schema's for nodes, the System type for computed values.
    pub fn type_name(&self) -> &'static str {
        match self {
            Item::Node(n) => n.type_name(),
            Item::Bool(_) => "Boolean",
            Item::Integer(_) => "Integer",
            Item::Decimal(_) => "Decimal",
            Item::String(_) => "String",
            Item::Resolved(t) => t,
        }
    }
}

/// Splits a reference into the target's resource type, id and version: `Patient/123`,
/// `Patient/123/_history/2`, `https://host/fhir/Patient/123` and canonical URLs
/// (`http://example.org/Questionnaire/q1|2.0`) all work. `None` when the text does not end in
/// `Type/id` with an R4 resource type and a valid id (`urn:uuid:…`, `#contained`, conditional
/// references).
pub fn parse_reference(reference: &str) -> Option<(&'static str, &str, Option<&str>)> {
    let (path, mut version) = match reference.split_once('|') {
        Some((p, v)) => (p, Some(v)),
        None => (reference, None),
    };
    let path = match path.split_once("/_history/") {
        Some((p, v)) => {
            version = Some(v);
            p
        }
        None => path,
    };
    let mut segments = path.rsplitn(3, '/');
    let id = segments.next()?;
    let ty = segments.next()?;
    let valid_id = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid_id {
        return None;
    }
    let ty = crate::ResourceType::parse(ty)?;
    Some((ty.as_str(), id, version.filter(|v| !v.is_empty())))
}

#[cfg(test)]
mod tests;
