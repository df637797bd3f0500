//! Evaluation of compiled expressions. Collections are `Vec<Item>`; items borrow from the
//! resource and the expression, so navigation copies no strings.

use std::cmp::Ordering;

use super::parser::{BinOp, Ex, Step};
use super::{Item, Node, Ty};
use crate::json::{Json, Map};
use crate::schema::{ElementDef, TypeDef};

/// The environment of one evaluation.
pub(crate) struct Env<'a> {
    resource: Item<'a>,
    context: Item<'a>,
}

impl<'a> Env<'a> {
    pub(crate) fn new(resource: Item<'a>, context: Item<'a>) -> Env<'a> {
        Env { resource, context }
    }

    fn root_map(&self) -> Option<&'a Map> {
        self.resource.as_node().and_then(|n| n.object())
    }
}

/// Evaluates `ex` with focus `this`, appending the result to `out`.
pub(crate) fn eval<'a>(ex: &'a Ex, this: &Item<'a>, env: &Env<'a>, out: &mut Vec<Item<'a>>) {
    match ex {
        Ex::Empty => {}
        Ex::Str(s) => out.push(Item::String(s)),
        Ex::Bool(b) => out.push(Item::Bool(*b)),
        Ex::Int(i) => out.push(Item::Integer(*i)),
        Ex::Dec(d) => out.push(Item::Decimal(d)),
        Ex::This => out.push(*this),
        Ex::Resource => out.push(env.resource),
        Ex::Context => out.push(env.context),
        Ex::TypeRoot(name) => {
            if let Item::Node(n) = this
                && n.ty().is_resource()
                && type_is(n.type_name(), name, true)
            {
                out.push(*this);
            }
        }
        Ex::Path(head, steps) => eval_path(head, steps, this, env, out),
        Ex::Union(branches) => {
            let start = out.len();
            for branch in branches {
                let before = out.len();
                eval(branch, this, env, out);
                if before > start && out.len() > before {
                    // Only items of a later branch can repeat an earlier one's.
                    let mut i = before;
                    while i < out.len() {
                        if out[start..before].iter().any(|e| same(e, &out[i])) {
                            out.remove(i);
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
        Ex::Is(e, ty) => {
            let items = collect(e, this, env);
            if let [item] = items.as_slice() {
                out.push(Item::Bool(type_matches(item, ty)));
            }
        }
        Ex::As(e, ty) => {
            let start = out.len();
            eval(e, this, env, out);
            retain_from(out, start, |item| type_matches(item, ty));
        }
        Ex::Bin(op, l, r) => eval_binary(*op, l, r, this, env, out),
    }
}

fn collect<'a>(ex: &'a Ex, this: &Item<'a>, env: &Env<'a>) -> Vec<Item<'a>> {
    let mut v = Vec::new();
    eval(ex, this, env, &mut v);
    v
}

/// Keeps the items of `out[start..]` for which `keep` holds.
fn retain_from<'a>(out: &mut Vec<Item<'a>>, start: usize, mut keep: impl FnMut(&Item<'a>) -> bool) {
    let mut index = 0;
    out.retain(|item| {
        let k = index < start || keep(item);
        index += 1;
        k
    });
}

fn eval_path<'a>(
    head: &'a Ex,
    steps: &'a [Step],
    this: &Item<'a>,
    env: &Env<'a>,
    out: &mut Vec<Item<'a>>,
) {
    // `out[start..]` holds the current collection, so a path costs at most one extra buffer.
    let start = out.len();
    eval(head, this, env, out);
    let mut next = Vec::new();
    for step in steps {
        if out.len() == start
            && !matches!(
                step,
                Step::Exists(_) | Step::Empty | Step::Count | Step::All(_)
            )
        {
            return;
        }
        apply(step, &out[start..], env, &mut next);
        out.truncate(start);
        out.append(&mut next);
    }
}

fn apply<'a>(step: &'a Step, cur: &[Item<'a>], env: &Env<'a>, out: &mut Vec<Item<'a>>) {
    match step {
        Step::Member(name) => {
            for item in cur {
                children(item, name, out);
            }
        }
        Step::Index(i) => out.extend(cur.get(*i).copied()),
        Step::Where(criteria) => {
            for item in cur {
                if is_true(criteria, item, env) {
                    out.push(*item);
                }
            }
        }
        Step::Select(e) => {
            for item in cur {
                eval(e, item, env, out);
            }
        }
        Step::Exists(None) => out.push(Item::Bool(!cur.is_empty())),
        Step::Exists(Some(criteria)) => {
            out.push(Item::Bool(cur.iter().any(|i| is_true(criteria, i, env))));
        }
        Step::All(criteria) => out.push(Item::Bool(cur.iter().all(|i| is_true(criteria, i, env)))),
        Step::Empty => out.push(Item::Bool(cur.is_empty())),
        Step::Not => {
            if let Some(b) = singleton_bool(cur) {
                out.push(Item::Bool(!b));
            }
        }
        Step::First => out.extend(cur.first().copied()),
        Step::Last => out.extend(cur.last().copied()),
        Step::Tail => out.extend(cur.iter().skip(1).copied()),
        Step::Skip(n) => out.extend(cur.iter().skip(*n).copied()),
        Step::Take(n) => out.extend(cur.iter().take(*n).copied()),
        Step::Count => out.push(Item::Integer(cur.len() as i64)),
        Step::Distinct => {
            for item in cur {
                if !out.iter().any(|o| same(o, item)) {
                    out.push(*item);
                }
            }
        }
        Step::OfType(ty) | Step::As(ty) => {
            out.extend(cur.iter().filter(|i| type_matches(i, ty)).copied());
        }
        Step::Is(ty) => {
            if let [item] = cur {
                out.push(Item::Bool(type_matches(item, ty)));
            }
        }
        Step::Resolve => out.extend(cur.iter().filter_map(|i| resolve(i, env))),
        Step::Extension(url) => {
            let start = out.len();
            for item in cur {
                children(item, "extension", out);
            }
            retain_from(out, start, |e| {
                e.as_node().and_then(|n| n.str_member("url")) == Some(url.as_str())
            });
        }
        Step::HasValue => out.push(Item::Bool(matches!(
            cur,
            [Item::Node(n)] if n.primitive().is_some()
        ))),
    }
}

/// Whether `criteria` evaluated on `item` is true (empty counts as false).
fn is_true<'a>(criteria: &'a Ex, item: &Item<'a>, env: &Env<'a>) -> bool {
    singleton_bool(&collect(criteria, item, env)) == Some(true)
}

/// FHIRPath's singleton evaluation of a collection as a Boolean: empty is unknown, one boolean
/// is itself, one other item is true. Several items would be an error; here they are unknown.
fn singleton_bool(items: &[Item<'_>]) -> Option<bool> {
    match items {
        [Item::Bool(b)] => Some(*b),
        [Item::Node(n)] => match n.primitive() {
            Some(Json::Bool(b)) => Some(*b),
            _ => Some(true),
        },
        [_] => Some(true),
        _ => None,
    }
}

fn eval_binary<'a>(
    op: BinOp,
    l: &'a Ex,
    r: &'a Ex,
    this: &Item<'a>,
    env: &Env<'a>,
    out: &mut Vec<Item<'a>>,
) {
    let boolean = |ex: &'a Ex| singleton_bool(&collect(ex, this, env));
    let result = match op {
        BinOp::And => match boolean(l) {
            Some(false) => Some(false),
            a => match (a, boolean(r)) {
                (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
        },
        BinOp::Or => match boolean(l) {
            Some(true) => Some(true),
            a => match (a, boolean(r)) {
                (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
        },
        BinOp::Xor => match (boolean(l), boolean(r)) {
            (Some(a), Some(b)) => Some(a != b),
            _ => None,
        },
        BinOp::Implies => match boolean(l) {
            Some(false) => Some(true),
            a => match (a, boolean(r)) {
                (_, Some(true)) => Some(true),
                (Some(true), b) => b,
                _ => None,
            },
        },
        BinOp::Eq | BinOp::Ne => {
            let (a, b) = (collect(l, this, env), collect(r, this, env));
            if a.is_empty() || b.is_empty() {
                None
            } else {
                let eq = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| equal(x, y));
                Some(eq == (op == BinOp::Eq))
            }
        }
        BinOp::Equiv | BinOp::NotEquiv => {
            let (a, b) = (collect(l, this, env), collect(r, this, env));
            let eq = a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| equivalent(x, y));
            Some(eq == (op == BinOp::Equiv))
        }
        BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => {
            let (a, b) = (collect(l, this, env), collect(r, this, env));
            match (a.as_slice(), b.as_slice()) {
                ([x], [y]) => compare(x, y).map(|o| match op {
                    BinOp::Lt => o == Ordering::Less,
                    BinOp::Le => o != Ordering::Greater,
                    BinOp::Gt => o == Ordering::Greater,
                    _ => o != Ordering::Less,
                }),
                _ => None,
            }
        }
        BinOp::In | BinOp::Contains => {
            let (mut element, mut collection) = (collect(l, this, env), collect(r, this, env));
            if op == BinOp::Contains {
                std::mem::swap(&mut element, &mut collection);
            }
            match element.as_slice() {
                [e] => Some(collection.iter().any(|c| equal(e, c))),
                _ => None,
            }
        }
    };
    if let Some(b) = result {
        out.push(Item::Bool(b));
    }
}

#[derive(PartialEq)]
enum Scalar<'a> {
    Str(&'a str),
    Num(f64),
    Bool(bool),
}

fn scalar<'a>(item: &Item<'a>) -> Option<Scalar<'a>> {
    Some(match item {
        Item::Node(n) => match n.primitive()? {
            Json::String(s) => Scalar::Str(s),
            Json::Number(t) => Scalar::Num(t.parse().ok()?),
            Json::Bool(b) => Scalar::Bool(*b),
            _ => return None,
        },
        Item::String(s) => Scalar::Str(s),
        Item::Integer(i) => Scalar::Num(*i as f64),
        Item::Decimal(d) => Scalar::Num(d.parse().ok()?),
        Item::Bool(b) => Scalar::Bool(*b),
        Item::Resolved(_) => return None,
    })
}

/// FHIRPath `=` on two items.
fn equal(a: &Item<'_>, b: &Item<'_>) -> bool {
    match (scalar(a), scalar(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => match (a, b) {
            (Item::Node(x), Item::Node(y)) => match (x.object(), y.object()) {
                (Some(p), Some(q)) => std::ptr::eq(p, q) || p == q,
                _ => false,
            },
            (Item::Resolved(x), Item::Resolved(y)) => x == y,
            _ => false,
        },
        _ => false,
    }
}

/// FHIRPath `~`: strings compare case-insensitively with white space normalised.
fn equivalent(a: &Item<'_>, b: &Item<'_>) -> bool {
    match (scalar(a), scalar(b)) {
        (Some(Scalar::Str(x)), Some(Scalar::Str(y))) => {
            let norm = |s: &str| {
                s.split_whitespace()
                    .map(str::to_lowercase)
                    .collect::<Vec<_>>()
            };
            norm(x) == norm(y)
        }
        _ => equal(a, b),
    }
}

fn compare(a: &Item<'_>, b: &Item<'_>) -> Option<Ordering> {
    match (scalar(a)?, scalar(b)?) {
        (Scalar::Num(x), Scalar::Num(y)) => x.partial_cmp(&y),
        (Scalar::Str(x), Scalar::Str(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

/// Whether two items are the same element (or equal computed values), for `|` and
/// `distinct()`. Distinct elements with equal content are kept: the search index treats them
/// alike, and deep comparison would cost more than it saves.
fn same(a: &Item<'_>, b: &Item<'_>) -> bool {
    fn ptr<T>(x: Option<&T>, y: Option<&T>) -> bool {
        match (x, y) {
            (Some(x), Some(y)) => std::ptr::eq(x, y),
            (None, None) => true,
            _ => false,
        }
    }
    match (a, b) {
        (Item::Node(x), Item::Node(y)) => {
            ptr(x.value, y.value) && ptr(x.object, y.object) && ptr(x.shadow, y.shadow)
        }
        (Item::Node(_), _) | (_, Item::Node(_)) => false,
        _ => equal(a, b),
    }
}

/// Whether a value of type `actual` is a `target` (`is`, `as`, `ofType`, leading type names).
/// The namespace has been dropped from `target`; System type names (capitalised) match the
/// FHIR primitives that map to them.
pub(crate) fn type_is(actual: &str, target: &str, is_resource: bool) -> bool {
    if actual == target {
        return true;
    }
    match target {
        "Resource" => is_resource,
        "DomainResource" => is_resource && !matches!(actual, "Bundle" | "Binary" | "Parameters"),
        "Quantity" => matches!(
            actual,
            "Age" | "Count" | "Distance" | "Duration" | "SimpleQuantity" | "MoneyQuantity"
        ),
        "string" => matches!(actual, "code" | "id" | "markdown"),
        "uri" => matches!(actual, "url" | "canonical" | "oid" | "uuid"),
        "integer" => matches!(actual, "positiveInt" | "unsignedInt"),
        "String" => matches!(
            actual,
            "string"
                | "code"
                | "id"
                | "markdown"
                | "uri"
                | "url"
                | "canonical"
                | "oid"
                | "uuid"
                | "base64Binary"
                | "xhtml"
        ),
        "Boolean" => actual == "boolean",
        "Integer" => matches!(actual, "integer" | "positiveInt" | "unsignedInt"),
        "Decimal" => actual == "decimal",
        "Date" => actual == "date",
        "DateTime" => matches!(actual, "dateTime" | "instant"),
        "Time" => actual == "time",
        _ => false,
    }
}

fn type_matches(item: &Item<'_>, target: &str) -> bool {
    match item {
        Item::Node(n) => type_is(n.type_name(), target, n.ty().is_resource()),
        Item::Resolved(t) => type_is(t, target, true),
        Item::Bool(_) => matches!(target, "Boolean" | "boolean"),
        Item::Integer(_) => matches!(target, "Integer" | "integer"),
        Item::Decimal(_) => matches!(target, "Decimal" | "decimal"),
        Item::String(_) => matches!(target, "String" | "string"),
    }
}

/// The resource type a branch starts with (`Observation` in `Observation.code.where(…)`).
pub(crate) fn root_type(ex: &Ex) -> Option<&str> {
    match ex {
        Ex::TypeRoot(name) => Some(name),
        Ex::Path(head, _) | Ex::Is(head, _) | Ex::As(head, _) => root_type(head),
        _ => None,
    }
}

/// Appends the children called `name` of `item`.
fn children<'a>(item: &Item<'a>, name: &str, out: &mut Vec<Item<'a>>) {
    let Item::Node(node) = item else {
        return;
    };
    match node.ty {
        Ty::Complex(td) => {
            let (Some(obj), Some(el)) = (node.object, td.element(name)) else {
                return;
            };
            if el.choice {
                choice_children(td, el, obj, out);
            } else {
                let (mut value, mut shadow) = (None, None);
                // One pass finds both `name` and its primitive extensions `_name`.
                for (k, v) in obj.iter() {
                    if k == name {
                        value = Some(v);
                    } else if k.strip_prefix('_') == Some(name) {
                        shadow = Some(v);
                    }
                }
                let ty = el.types.first().map(String::as_str).unwrap_or("");
                push_values(value, shadow, ty, out);
            }
        }
        Ty::Primitive(_) => {
            // A primitive's only children are the `id` and `extension` of its `_name` sibling.
            let Some(sh) = node.shadow.and_then(Json::as_object) else {
                return;
            };
            match name {
                "extension" => push_values(sh.get("extension"), None, "Extension", out),
                "id" => push_values(sh.get("id"), None, "string", out),
                _ => {}
            }
        }
        Ty::Unknown => {
            if let Some(v) = node.object.and_then(|o| o.get(name)) {
                push_values(Some(v), None, "", out);
            }
        }
    }
}

fn choice_children<'a>(
    td: &'static TypeDef,
    el: &'static ElementDef,
    obj: &'a Map,
    out: &mut Vec<Item<'a>>,
) {
    let base = el.name.as_str();
    let is_choice_key = |k: &str| {
        k.len() > base.len() && k.starts_with(base) && k.as_bytes()[base.len()].is_ascii_uppercase()
    };
    for (k, v) in obj.iter() {
        let (key, only_shadow) = match k.strip_prefix('_') {
            // `_valueString` without `valueString`: a primitive that only has extensions.
            Some(plain) if is_choice_key(plain) && !obj.contains_key(plain) => (plain, true),
            Some(_) => continue,
            None if is_choice_key(k) => (k, false),
            None => continue,
        };
        let Some((e, ty)) = td.resolve_json_name(key) else {
            continue;
        };
        if !std::ptr::eq(e, el) {
            continue;
        }
        if only_shadow {
            push_values(None, Some(v), ty, out);
        } else {
            let shadow = obj
                .iter()
                .find(|(s, _)| s.strip_prefix('_') == Some(key))
                .map(|(_, s)| s);
            push_values(Some(v), shadow, ty, out);
        }
    }
}

/// Appends the node(s) of one element's JSON value (repeating or not) of type `ty`.
fn push_values<'a>(
    value: Option<&'a Json>,
    shadow: Option<&'a Json>,
    ty: &str,
    out: &mut Vec<Item<'a>>,
) {
    // `Resource`-typed elements (contained, Bundle.entry.resource) take their type from the
    // content; the lookup happens per item.
    let fixed = if ty == "Resource" || ty.is_empty() {
        None
    } else {
        Some(Ty::named(ty))
    };
    let make = |v: Option<&'a Json>, sh: Option<&'a Json>| -> Option<Item<'a>> {
        let v = v.filter(|v| !matches!(v, Json::Null));
        let sh = sh.filter(|s| matches!(s, Json::Object(_)));
        if v.is_none() && sh.is_none() {
            return None;
        }
        let object = v.and_then(Json::as_object);
        let ty = match fixed {
            Some(t) => t,
            None => object
                .and_then(|o| o.get("resourceType"))
                .and_then(Json::as_str)
                .map(Ty::named)
                .unwrap_or(Ty::Unknown),
        };
        Some(Item::Node(Node {
            value: v,
            object,
            shadow: sh,
            ty,
        }))
    };
    match (value, shadow) {
        (Some(Json::Array(values)), sh) => {
            let shadows = sh.and_then(Json::as_array);
            for (i, v) in values.iter().enumerate() {
                out.extend(make(Some(v), shadows.and_then(|s| s.get(i))));
            }
        }
        (None, Some(Json::Array(shadows))) => {
            for s in shadows {
                out.extend(make(None, Some(s)));
            }
        }
        (v, sh) => out.extend(make(v, sh)),
    }
}

/// `resolve()` without fetching: see the module documentation.
fn resolve<'a>(item: &Item<'a>, env: &Env<'a>) -> Option<Item<'a>> {
    let reference = match item {
        Item::Node(n) if n.type_name() == "Reference" => match n.str_member("reference") {
            Some(r) => r,
            None => {
                return n
                    .str_member("type")
                    .and_then(type_from_uri)
                    .map(Item::Resolved);
            }
        },
        Item::Node(n) => n.as_str()?,
        Item::String(s) => s,
        _ => return None,
    };
    if let Some(id) = reference.strip_prefix('#') {
        if id.is_empty() {
            return Some(env.resource);
        }
        let contained = env.root_map()?.get("contained")?.as_array()?;
        return contained
            .iter()
            .filter_map(Json::as_object)
            .find(|c| c.get("id").and_then(Json::as_str) == Some(id))
            .map(Item::resource);
    }
    if let Some((t, _, _)) = super::parse_reference(reference) {
        return Some(Item::Resolved(t));
    }
    match item {
        Item::Node(n) => n
            .str_member("type")
            .and_then(type_from_uri)
            .map(Item::Resolved),
        _ => None,
    }
}

/// `Reference.type`: `Patient` or `http://hl7.org/fhir/StructureDefinition/Patient`.
fn type_from_uri(t: &str) -> Option<&'static str> {
    let name = t
        .strip_prefix("http://hl7.org/fhir/StructureDefinition/")
        .unwrap_or(t);
    crate::ResourceType::parse(name).map(|r| r.as_str())
}
