//! Finding (and rewriting) every reference in a resource, driven by the R4 structure.
//!
//! A transaction Bundle links its entries with placeholder ids (`urn:uuid:…`) and conditional
//! references (`Patient?identifier=…`) that the server replaces with real `Type/id` references.
//! They may sit anywhere: in `Reference.reference`, but also in `uri`/`url`/`canonical`
//! elements, in extensions (also on primitives, `_birthDate.extension`), in backbone elements
//! and in contained resources. Walking the tree with the schema finds exactly those elements,
//! and nothing else that merely looks like a reference (a `string` or a narrative).

use crate::json::{Json, Map};
use crate::schema::{Schema, TypeDef, TypeKind};

/// What kind of element a visited string is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    /// `Reference.reference`: a literal reference (`Patient/1`, `urn:uuid:…`, `#contained`,
    /// an absolute URL) or a conditional one (`Patient?identifier=…`).
    Reference,
    /// A `uri`, `url` or `canonical` primitive.
    Uri,
}

/// Calls `f` on every `Reference.reference` string and every `uri`/`url`/`canonical` string of
/// `resource` (a JSON resource), in document order, including contained and other nested
/// resources. `f` may change the string in place. Elements the schema does not know (the
/// resource should have been validated) are skipped.
pub fn visit_references_mut(resource: &mut Json, f: &mut dyn FnMut(RefKind, &mut String)) {
    if let Json::Object(m) = resource {
        Walker {
            schema: Schema::get(),
            f,
        }
        .resource(m, 0);
    }
}

struct Walker<'f> {
    schema: &'static Schema,
    f: &'f mut dyn FnMut(RefKind, &mut String),
}

impl Walker<'_> {
    fn resource(&mut self, map: &mut Map, depth: usize) {
        let td = match map.get("resourceType").and_then(Json::as_str) {
            Some(name) => self.schema.type_def(name),
            None => None,
        };
        if let Some(td) = td.filter(|t| t.kind == TypeKind::Resource) {
            self.members(map, td, depth);
        }
    }

    fn members(&mut self, map: &mut Map, td: &'static TypeDef, depth: usize) {
        // Validated resources are bounded by the parser's depth; trees built in code may not be.
        if depth > crate::json::MAX_DEPTH {
            return;
        }
        for (key, value) in map.iter_mut() {
            if key == "resourceType" {
                continue;
            }
            if key.starts_with('_') {
                self.primitive_extensions(value, depth);
                continue;
            }
            let Some((_, ty)) = td.resolve_json_name(key) else {
                continue;
            };
            match value {
                Json::Array(items) => {
                    for item in items {
                        self.value(item, ty, depth);
                    }
                }
                other => self.value(other, ty, depth),
            }
        }
    }

    /// The `_name` companion of a primitive: `{id, extension}` or an array of them.
    fn primitive_extensions(&mut self, value: &mut Json, depth: usize) {
        let Some(ext) = self.schema.type_def("Extension") else {
            return;
        };
        let one = |w: &mut Self, v: &mut Json| {
            if let Some(Json::Array(items)) = v.as_object_mut().and_then(|m| m.get_mut("extension"))
            {
                for item in items {
                    if let Json::Object(m) = item {
                        w.members(m, ext, depth + 1);
                    }
                }
            }
        };
        match value {
            Json::Array(items) => {
                for item in items {
                    one(self, item);
                }
            }
            other => one(self, other),
        }
    }

    fn value(&mut self, value: &mut Json, ty: &str, depth: usize) {
        if self.schema.is_primitive(ty) {
            if matches!(ty, "uri" | "url" | "canonical")
                && let Json::String(s) = value
            {
                (self.f)(RefKind::Uri, s);
            }
            return;
        }
        let Json::Object(m) = value else {
            return;
        };
        if ty == "Resource" {
            self.resource(m, depth + 1);
            return;
        }
        let Some(td) = self.schema.type_def(ty) else {
            return;
        };
        if td.name == "Reference"
            && let Some(Json::String(s)) = m.get_mut("reference")
        {
            (self.f)(RefKind::Reference, s);
        }
        self.members(m, td, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn collect(src: &str) -> Vec<(RefKind, String)> {
        let mut v = parse(src.as_bytes()).unwrap();
        let mut out = Vec::new();
        visit_references_mut(&mut v, &mut |k, s| out.push((k, s.clone())));
        out
    }

    #[test]
    fn finds_references_everywhere_and_nothing_else() {
        let found = collect(
            r##"{"resourceType":"CarePlan","status":"active","intent":"plan",
            "contained":[{"resourceType":"Goal","id":"g","lifecycleStatus":"active",
                "description":{"text":"x"},"subject":{"reference":"urn:uuid:in-contained"}}],
            "extension":[{"url":"http://example.org/ext","valueReference":{"reference":"urn:uuid:in-ext"}}],
            "_status":{"extension":[{"url":"http://example.org/e2","valueReference":{"reference":"urn:uuid:on-primitive"}}]},
            "instantiatesUri":["urn:uuid:uri-array"],
            "subject":{"reference":"Patient?identifier=a|b","display":"urn:uuid:not-a-reference"},
            "goal":[{"reference":"#g"}],
            "activity":[{"detail":{"status":"scheduled","code":{"text":"urn:uuid:text"},
                "performer":[{"reference":"urn:uuid:in-backbone"}]}}]}"##,
        );
        let refs: Vec<&str> = found
            .iter()
            .filter(|(k, _)| *k == RefKind::Reference)
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(
            refs,
            [
                "urn:uuid:in-contained",
                "urn:uuid:in-ext",
                "urn:uuid:on-primitive",
                "Patient?identifier=a|b",
                "#g",
                "urn:uuid:in-backbone"
            ]
        );
        let uris: Vec<&str> = found
            .iter()
            .filter(|(k, _)| *k == RefKind::Uri)
            .map(|(_, s)| s.as_str())
            .collect();
        assert_eq!(
            uris,
            [
                "http://example.org/ext",
                "http://example.org/e2",
                "urn:uuid:uri-array"
            ]
        );
    }

    #[test]
    fn rewrites_in_place() {
        let mut v = parse(
            br#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
            "subject":{"reference":"urn:uuid:1"},"hasMember":[{"reference":"urn:uuid:1"}]}"#,
        )
        .unwrap();
        visit_references_mut(&mut v, &mut |_, s| {
            if s == "urn:uuid:1" {
                *s = "Patient/p".into();
            }
        });
        assert_eq!(
            v.get("subject").unwrap().get("reference").unwrap().as_str(),
            Some("Patient/p")
        );
        assert!(
            v.to_string()
                .contains(r#""hasMember":[{"reference":"Patient/p"}]"#)
        );
    }
}
