//! An optional typed view of a resource as fhirbolt's R4 model structs (feature `fhirbolt`).
//!
//! This exists for Rust embedders who prefer structs to a JSON tree. The server itself never
//! uses it: requests are parsed, validated, stored and served as the JSON tree of
//! [`crate::json`], so enabling the feature changes nothing on the request path.
//!
//! fhirbolt 0.4.0 is unmaintained, so the conversion leans on as little of it as possible: it
//! does not hand fhirbolt JSON text to parse but builds fhirbolt's generic element model
//! straight from our tree — the R4 schema says which members are primitives, which are
//! resources and which are attributes — and lets fhirbolt only type the elements. Decimals reach
//! fhirbolt as their exact text, whatever `serde_json` would make of them.
//!
//! Enabling the feature turns on `serde_json`'s `arbitrary_precision` for the whole build
//! (fhirbolt requires it); this crate's own JSON parser does not use `serde_json`.

use fhirbolt::FhirReleases;
use fhirbolt::element::{Element, Primitive, Value};

use crate::error::FhirError;
use crate::json::{Json, Map};
use crate::outcome::{Issue, IssueType};
use crate::resource::Resource;
use crate::schema::{ElementDef, JsonKind, Schema, TypeDef};

type R4Element = Element<{ FhirReleases::R4 }>;
type R4Value = Value<{ FhirReleases::R4 }>;

/// Converts a validated resource into fhirbolt's typed R4 model
/// (`fhirbolt::model::r4::Resource`, an enum with one variant per resource type).
///
/// This is an optional view for embedders and is never used on the server's request path. It
/// goes through fhirbolt's generic element model rather than its JSON parser. What fhirbolt
/// cannot type is reported as [`FhirError::Invalid`] with a `structure` issue.
pub fn to_fhirbolt(resource: &Resource) -> Result<fhirbolt::model::r4::Resource, FhirError> {
    let rt = resource.resource_type();
    let element = resource_element(resource.json(), rt.as_str())?;
    fhirbolt::element::from_element::<{ FhirReleases::R4 }, fhirbolt::model::r4::Resource>(
        element, None,
    )
    .map_err(|e| {
        FhirError::Invalid(vec![Issue::at(
            IssueType::Structure,
            rt.as_str(),
            format!("fhirbolt could not type the resource: {e}"),
        )])
    })
}

fn structure(path: &str, msg: impl Into<String>) -> FhirError {
    FhirError::Invalid(vec![Issue::at(IssueType::Structure, path, msg)])
}

fn resource_element(m: &Map, path: &str) -> Result<R4Element, FhirError> {
    let schema = Schema::get();
    let rt = m
        .get("resourceType")
        .and_then(Json::as_str)
        .ok_or_else(|| structure(path, "missing 'resourceType'"))?;
    let td = schema
        .type_def(rt)
        .filter(|_| schema.is_resource_type(rt))
        .ok_or_else(|| structure(path, format!("unknown resource type '{rt}'")))?;
    let mut out = R4Element::with_capacity(m.len());
    // fhirbolt reads `resourceType` first to pick the struct.
    out.insert(
        "resourceType".to_string(),
        Value::Primitive(Primitive::String(rt.to_string())),
    );
    members(m, td, path, true, &mut out)?;
    Ok(out)
}

fn members(
    m: &Map,
    td: &'static TypeDef,
    path: &str,
    is_resource: bool,
    out: &mut R4Element,
) -> Result<(), FhirError> {
    for (key, _) in m.iter() {
        if is_resource && key == "resourceType" {
            continue;
        }
        let base = key.strip_prefix('_').unwrap_or(key);
        // `name` and `_name` become one element; handle the pair once.
        if base != key && m.contains_key(base) {
            continue;
        }
        let p = format!("{path}.{base}");
        let (el, ty) = td
            .resolve_json_name(base)
            .ok_or_else(|| structure(&p, format!("unknown element '{key}' in {}", td.name)))?;
        let value = m.get(base);
        let under = m.get(&format!("_{base}"));
        out.insert(base.to_string(), element_value(el, ty, value, under, &p)?);
    }
    Ok(())
}

fn element_value(
    el: &ElementDef,
    ty: &str,
    value: Option<&Json>,
    under: Option<&Json>,
    path: &str,
) -> Result<R4Value, FhirError> {
    let schema = Schema::get();
    if el.xml_attr {
        // `Element.id` and `Extension.url` are plain strings in fhirbolt's model.
        return match value {
            Some(Json::String(s)) => Ok(Value::Primitive(Primitive::String(s.clone()))),
            _ => Err(structure(path, "expected a string")),
        };
    }
    if let Some(prim) = schema.primitive(ty) {
        let kind = prim.json;
        if el.is_array() {
            let values = items(value, path)?;
            let unders = items(under, path)?;
            let seq = (0..values.len().max(unders.len()))
                .map(|i| {
                    primitive_element(
                        ty,
                        kind,
                        values.get(i),
                        unders.get(i),
                        &format!("{path}[{i}]"),
                    )
                })
                .collect::<Result<_, _>>()?;
            return Ok(Value::Sequence(seq));
        }
        return primitive_element(ty, kind, value, under, path).map(Value::Element);
    }
    let Some(value) = value else {
        return Err(structure(path, "extensions are only allowed on primitives"));
    };
    let one = |v: &Json, p: &str| -> Result<R4Element, FhirError> {
        let Json::Object(m) = v else {
            return Err(structure(
                p,
                format!("expected an object, found {}", v.kind()),
            ));
        };
        if ty == "Resource" {
            return resource_element(m, p);
        }
        complex_element(m, ty, p)
    };
    if el.is_array() {
        let list = items(Some(value), path)?;
        let seq = list
            .iter()
            .enumerate()
            .map(|(i, v)| one(v, &format!("{path}[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(Value::Sequence(seq))
    } else {
        one(value, path).map(Value::Element)
    }
}

fn complex_element(m: &Map, ty: &str, path: &str) -> Result<R4Element, FhirError> {
    let td = Schema::get()
        .type_def(ty)
        .ok_or_else(|| structure(path, format!("no definition for type '{ty}'")))?;
    let mut out = R4Element::with_capacity(m.len());
    members(m, td, path, false, &mut out)?;
    Ok(out)
}

/// A primitive is an element of its own in fhirbolt's model: `value`, `id` and `extension`.
fn primitive_element(
    ty: &str,
    kind: JsonKind,
    value: Option<&Json>,
    under: Option<&Json>,
    path: &str,
) -> Result<R4Element, FhirError> {
    let mut out = R4Element::new();
    match (kind, value) {
        (_, None | Some(Json::Null)) => {}
        (JsonKind::Boolean, Some(Json::Bool(b))) => {
            out.insert("value".into(), Value::Primitive(Primitive::Bool(*b)));
        }
        (JsonKind::Number, Some(Json::Number(n))) if ty == "decimal" => {
            out.insert(
                "value".into(),
                Value::Primitive(Primitive::Decimal(n.clone())),
            );
        }
        (JsonKind::Number, Some(Json::Number(n))) => {
            let i: i64 = n
                .parse()
                .map_err(|_| structure(path, format!("'{n}' is not an integer")))?;
            let i = i32::try_from(i)
                .map_err(|_| structure(path, format!("'{n}' is out of the 32-bit range")))?;
            out.insert("value".into(), Value::Primitive(Primitive::Integer(i)));
        }
        (JsonKind::String, Some(Json::String(s))) => {
            out.insert(
                "value".into(),
                Value::Primitive(Primitive::String(s.clone())),
            );
        }
        (_, Some(other)) => {
            return Err(structure(
                path,
                format!("a {ty} cannot be a JSON {}", other.kind()),
            ));
        }
    }
    match under {
        None | Some(Json::Null) => {}
        Some(Json::Object(u)) => {
            for (k, v) in u.iter() {
                match (k, v) {
                    ("id", Json::String(s)) => {
                        out.insert("id".into(), Value::Primitive(Primitive::String(s.clone())));
                    }
                    ("extension", Json::Array(list)) => {
                        let seq = list
                            .iter()
                            .enumerate()
                            .map(|(i, x)| match x {
                                Json::Object(xm) => complex_element(
                                    xm,
                                    "Extension",
                                    &format!("{path}.extension[{i}]"),
                                ),
                                other => Err(structure(
                                    path,
                                    format!("expected an extension object, found {}", other.kind()),
                                )),
                            })
                            .collect::<Result<_, _>>()?;
                        out.insert("extension".into(), Value::Sequence(seq));
                    }
                    _ => {
                        return Err(structure(
                            &format!("{path}.{k}"),
                            format!("unexpected member '{k}' in a primitive's extensions"),
                        ));
                    }
                }
            }
        }
        Some(other) => {
            return Err(structure(
                path,
                format!("expected an object, found {}", other.kind()),
            ));
        }
    }
    Ok(out)
}

fn items<'j>(v: Option<&'j Json>, path: &str) -> Result<&'j [Json], FhirError> {
    match v {
        None => Ok(&[]),
        Some(Json::Array(a)) => Ok(a),
        Some(other) => Err(structure(
            path,
            format!("expected an array, found {}", other.kind()),
        )),
    }
}
