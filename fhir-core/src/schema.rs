//! The FHIR R4 structure, loaded from the official StructureDefinitions.
//!
//! `data/r4-schema.json` is derived from `profiles-types.json`, `profiles-resources.json` and the
//! spec's value sets by `tools/gen_schema.py` (committed, so the crate builds from this repository
//! alone). It holds, per resource, data type and backbone element, the elements with their
//! cardinality and types, and per primitive type its JSON kind and the spec's regex.

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::json::{self, Json};

static SCHEMA_JSON: &str = include_str!("../data/r4-schema.json");

/// How a primitive is written in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonKind {
    /// `true`/`false`
    Boolean,
    /// a JSON number (integer, decimal, positiveInt, unsignedInt)
    Number,
    /// a JSON string (everything else)
    String,
}

/// A primitive data type such as `date` or `decimal`.
#[derive(Debug)]
pub struct PrimitiveDef {
    /// Type name, e.g. `dateTime`.
    pub name: String,
    /// How it appears in JSON.
    pub json: JsonKind,
    /// The spec's lexical rule, anchored at both ends.
    pub regex: Option<Regex>,
}

/// What kind of structure a [`TypeDef`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// A concrete resource such as `Observation`.
    Resource,
    /// `Resource` or `DomainResource`.
    AbstractResource,
    /// A complex data type such as `Quantity`.
    Complex,
    /// An inline backbone element such as `Observation.component`.
    Backbone,
}

/// One element of a structure.
#[derive(Debug)]
pub struct ElementDef {
    /// JSON/XML name without the `[x]` of a choice element.
    pub name: String,
    /// Minimum cardinality.
    pub min: u32,
    /// Maximum cardinality; `None` means `*`.
    pub max: Option<u32>,
    /// Allowed type names: primitives, complex types, `Resource`, or a backbone path.
    pub types: Vec<String>,
    /// A choice element (`value[x]`): the JSON name is `name` + the capitalised type.
    pub choice: bool,
    /// Written as an XML attribute (`Element.id`, `Extension.url`); never has `_name` extensions.
    pub xml_attr: bool,
    /// Part of the `_summary=true` view.
    pub summary: bool,
    /// For `code` elements bound `required` to an enumerable value set: the allowed codes.
    pub codes: Option<Vec<String>>,
}

impl ElementDef {
    /// Whether the element repeats (JSON array).
    pub fn is_array(&self) -> bool {
        self.max != Some(1)
    }

    /// The JSON member name for this element holding a value of `type_name`.
    pub fn json_name(&self, type_name: &str) -> String {
        if self.choice {
            format!("{}{}", self.name, capitalise(type_name))
        } else {
            self.name.clone()
        }
    }
}

/// A resource, complex data type or backbone element with its elements.
#[derive(Debug)]
pub struct TypeDef {
    /// `Observation`, `Quantity`, `Observation.component` …
    pub name: String,
    /// What it is.
    pub kind: TypeKind,
    /// Elements in the order the spec defines (the XML order).
    pub elements: Vec<ElementDef>,
    by_json_name: HashMap<String, (usize, usize)>,
}

impl TypeDef {
    /// The element called `name` (without `[x]`).
    pub fn element(&self, name: &str) -> Option<&ElementDef> {
        self.elements.iter().find(|e| e.name == name)
    }

    /// Resolves a JSON member name (`valueQuantity`, `status`) to its element and the type it
    /// holds. A leading `_` (primitive extension) is not stripped here.
    pub fn resolve_json_name(&self, key: &str) -> Option<(&ElementDef, &str)> {
        let &(e, t) = self.by_json_name.get(key)?;
        let el = &self.elements[e];
        Some((el, el.types[t].as_str()))
    }

    /// Position of an element in the spec order, for serialising in canonical order.
    pub fn element_index(&self, name: &str) -> Option<usize> {
        self.elements.iter().position(|e| e.name == name)
    }
}

/// The whole R4 structure.
#[derive(Debug)]
pub struct Schema {
    types: HashMap<String, TypeDef>,
    primitives: HashMap<String, PrimitiveDef>,
    resource_types: Vec<String>,
}

/// `dateTime` → `DateTime`, `Quantity` → `Quantity`.
pub fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

impl Schema {
    /// The schema, loaded once on first use.
    pub fn get() -> &'static Schema {
        static SCHEMA: OnceLock<Schema> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            // The embedded file is generated and tested; failing to load it is a build defect.
            Schema::load(SCHEMA_JSON).expect("embedded R4 schema is valid")
        })
    }

    fn load(text: &str) -> Result<Schema, String> {
        let root = json::parse(text.as_bytes()).map_err(|e| e.to_string())?;
        let mut primitives = HashMap::new();
        let prims = root
            .get("primitives")
            .and_then(Json::as_object)
            .ok_or("no primitives")?;
        for (name, def) in prims.iter() {
            let json = match def.get("json").and_then(Json::as_str) {
                Some("boolean") => JsonKind::Boolean,
                Some("number") => JsonKind::Number,
                _ => JsonKind::String,
            };
            let regex = match def.get("regex").and_then(Json::as_str) {
                Some(r) => {
                    Some(Regex::new(&format!("^(?:{r})$")).map_err(|e| format!("{name}: {e}"))?)
                }
                None => None,
            };
            primitives.insert(
                name.to_string(),
                PrimitiveDef {
                    name: name.to_string(),
                    json,
                    regex,
                },
            );
        }
        let mut types = HashMap::new();
        let mut resource_types = Vec::new();
        let tys = root
            .get("types")
            .and_then(Json::as_object)
            .ok_or("no types")?;
        for (name, def) in tys.iter() {
            let kind = match def.get("kind").and_then(Json::as_str) {
                Some("resource") => TypeKind::Resource,
                Some("abstract") => TypeKind::AbstractResource,
                Some("complex") => TypeKind::Complex,
                _ => TypeKind::Backbone,
            };
            if kind == TypeKind::Resource {
                resource_types.push(name.to_string());
            }
            let mut elements = Vec::new();
            let mut by_json_name = HashMap::new();
            for (i, e) in def
                .get("elements")
                .and_then(Json::as_array)
                .ok_or("no elements")?
                .iter()
                .enumerate()
            {
                let name = e.get("n").and_then(Json::as_str).ok_or("no n")?.to_string();
                let num = |k: &str| -> i64 {
                    e.get(k)
                        .and_then(Json::as_number)
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0)
                };
                let flag = |k: &str| e.get(k).and_then(Json::as_bool).unwrap_or(false);
                let types: Vec<String> = e
                    .get("t")
                    .and_then(Json::as_array)
                    .ok_or("no t")?
                    .iter()
                    .filter_map(|t| t.as_str().map(str::to_string))
                    .collect();
                let codes = e.get("codes").and_then(Json::as_array).map(|a| {
                    a.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect()
                });
                let max = num("max");
                let el = ElementDef {
                    name,
                    min: num("min") as u32,
                    max: if max < 0 { None } else { Some(max as u32) },
                    types,
                    choice: flag("choice"),
                    xml_attr: flag("attr"),
                    summary: flag("summary"),
                    codes,
                };
                for (t, ty) in el.types.iter().enumerate() {
                    by_json_name.insert(el.json_name(ty), (i, t));
                }
                elements.push(el);
            }
            types.insert(
                name.to_string(),
                TypeDef {
                    name: name.to_string(),
                    kind,
                    elements,
                    by_json_name,
                },
            );
        }
        resource_types.sort();
        Ok(Schema {
            types,
            primitives,
            resource_types,
        })
    }

    /// A resource, complex type or backbone element by name.
    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    /// A primitive type by name.
    pub fn primitive(&self, name: &str) -> Option<&PrimitiveDef> {
        self.primitives.get(name)
    }

    /// Whether `name` is a primitive type.
    pub fn is_primitive(&self, name: &str) -> bool {
        self.primitives.contains_key(name)
    }

    /// All concrete resource type names, sorted.
    pub fn resource_types(&self) -> &[String] {
        &self.resource_types
    }

    /// Whether `name` is a concrete resource type.
    pub fn is_resource_type(&self, name: &str) -> bool {
        matches!(self.types.get(name), Some(t) if t.kind == TypeKind::Resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_all_r4_resources_and_primitives() {
        let s = Schema::get();
        assert_eq!(s.resource_types().len(), 147);
        assert!(s.is_resource_type("Observation"));
        assert!(!s.is_resource_type("DomainResource"));
        assert!(s.primitive("dateTime").unwrap().regex.is_some());
        assert_eq!(s.primitive("decimal").unwrap().json, JsonKind::Number);
    }

    #[test]
    fn resolves_choice_and_backbone_elements() {
        let s = Schema::get();
        let obs = s.type_def("Observation").unwrap();
        let (el, ty) = obs.resolve_json_name("valueQuantity").unwrap();
        assert_eq!((el.name.as_str(), ty), ("value", "Quantity"));
        let (el, ty) = obs.resolve_json_name("effectiveDateTime").unwrap();
        assert_eq!((el.name.as_str(), ty), ("effective", "dateTime"));
        let (el, ty) = obs.resolve_json_name("component").unwrap();
        assert!(el.is_array());
        assert_eq!(ty, "Observation.component");
        assert_eq!(obs.element("status").unwrap().min, 1);
        assert!(
            obs.element("status")
                .unwrap()
                .codes
                .as_ref()
                .unwrap()
                .contains(&"final".to_string())
        );
        let q = s.type_def("Questionnaire.item").unwrap();
        assert_eq!(q.resolve_json_name("item").unwrap().1, "Questionnaire.item");
        let ext = s.type_def("Extension").unwrap();
        assert!(ext.element("url").unwrap().xml_attr);
    }
}
