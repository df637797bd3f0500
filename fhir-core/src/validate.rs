//! Validation of a JSON tree against the R4 StructureDefinitions.
//!
//! What is checked: the rules of the R4 JSON format (<https://hl7.org/fhir/R4/json.html>:
//! arrays for repeating elements, `_name` primitive extensions and their alignment, no `null`, no
//! empty strings, arrays or objects), the element names, cardinalities and types of the official
//! definitions as captured in [`crate::schema`], the lexical rules of the primitive types (with
//! real calendar dates and 32-bit integers), required bindings to enumerable value sets, and the
//! invariants every resource carries: ext-1 and dom-1/2/4/5.
//!
//! What is not: profiles, other FHIRPath invariants, terminology beyond the enumerable required
//! bindings, references, and the XHTML content of narratives beyond its outer `<div>`.

use std::fmt::Write as _;
use std::ptr;

use crate::json::{Json, Map};
use crate::outcome::{Issue, IssueType};
use crate::schema::{ElementDef, JsonKind, PrimitiveDef, Schema, TypeDef, TypeKind};

/// At most this many issues are reported (plus one saying that validation stopped): a client
/// cannot act on more, and a hostile body must not make the server build a huge outcome.
pub const MAX_ISSUES: usize = 100;

/// Nesting of objects beyond this is reported instead of followed. The JSON parser already caps
/// depth, but trees can also be built in code or converted from XML.
const MAX_DEPTH: usize = crate::json::MAX_DEPTH;

/// FHIR: "strings SHALL NOT exceed 1MB in size".
const MAX_STRING_BYTES: usize = 1024 * 1024;

/// How many allowed codes an error message lists before it abbreviates.
const CODES_SHOWN: usize = 10;

/// Checks a resource (a JSON object with `resourceType`) against the R4 definitions and returns
/// every problem found, each with the FHIRPath of the offending element. Empty means valid.
///
/// Paths index arrays (`Observation.component[1].valueQuantity.value`), name choice elements by
/// their JSON name, and place the extensions of a primitive under the primitive itself
/// (`Patient.birthDate.extension[0]`, not `Patient._birthDate`). Elements of a resource nested
/// in another continue its path (`Bundle.entry[0].resource.name[0]`). At most [`MAX_ISSUES`]
/// issues are returned, followed by one saying that validation stopped.
pub fn validate_resource(resource: &Json) -> Vec<Issue> {
    let schema = Schema::get();
    let mut v = Validator {
        schema,
        extension: schema.type_def("Extension"),
        issues: Vec::new(),
        path: String::with_capacity(128),
        depth: 0,
        stopped: false,
    };
    v.root(resource);
    v.issues
}

struct Validator {
    schema: &'static Schema,
    /// Supplies the element definitions of `id` and `extension` for `_name` objects, which have
    /// no type of their own in the schema.
    extension: Option<&'static TypeDef>,
    issues: Vec<Issue>,
    /// The FHIRPath of the value being checked; extended and truncated as the walk goes, so
    /// that a path string is only allocated when an issue is reported.
    path: String,
    depth: usize,
    stopped: bool,
}

impl Validator {
    // ---- reporting and paths ----

    fn push(&mut self, issue: Issue) {
        if self.issues.len() < MAX_ISSUES {
            self.issues.push(issue);
        } else if !self.stopped {
            self.stopped = true;
            self.issues.push(Issue::error(
                IssueType::TooCosts,
                format!("validation stopped after {MAX_ISSUES} issues"),
            ));
        }
    }

    /// An issue at the current path (none at a root whose type is unknown).
    fn report(&mut self, code: IssueType, diagnostics: String) {
        let issue = if self.path.is_empty() {
            Issue::error(code, diagnostics)
        } else {
            Issue::at(code, self.path.clone(), diagnostics)
        };
        self.push(issue);
    }

    /// An issue at member `name` of the current object.
    fn report_child(&mut self, code: IssueType, name: &str, diagnostics: String) {
        let expression = if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        };
        self.push(Issue::at(code, expression, diagnostics));
    }

    fn enter(&mut self, name: &str) -> usize {
        let mark = self.path.len();
        if !self.path.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(name);
        mark
    }

    fn enter_index(&mut self, index: usize) -> usize {
        let mark = self.path.len();
        // Writing to a String cannot fail.
        let _ = write!(self.path, "[{index}]");
        mark
    }

    fn leave(&mut self, mark: usize) {
        self.path.truncate(mark);
    }

    // ---- resources ----

    fn root(&mut self, value: &Json) {
        let Some(map) = value.as_object() else {
            self.report(
                IssueType::Structure,
                format!("a resource must be a JSON object, not {}", value.kind()),
            );
            return;
        };
        let Some(td) = self.resource_def(map) else {
            return;
        };
        self.path.push_str(&td.name);
        self.resource_body(map, td, false);
    }

    /// A resource inside another one (`contained`, `Bundle.entry.resource`, …).
    fn nested_resource(&mut self, value: &Json, contained: bool) {
        let Some(map) = value.as_object() else {
            self.report(
                IssueType::Structure,
                format!(
                    "expected a resource (a JSON object with 'resourceType'), found {}",
                    value.kind()
                ),
            );
            return;
        };
        if let Some(td) = self.resource_def(map) {
            self.resource_body(map, td, contained);
        }
    }

    fn resource_def(&mut self, map: &Map) -> Option<&'static TypeDef> {
        let diagnostics = match map.get("resourceType") {
            None => "missing 'resourceType'".to_string(),
            Some(Json::String(name)) => match self.schema.type_def(name) {
                Some(td) if td.kind == TypeKind::Resource => return Some(td),
                Some(_) => format!("'{name}' is not a concrete resource type"),
                None => format!("unknown resource type '{}'", excerpt(name)),
            },
            Some(other) => format!("'resourceType' must be a string, not {}", other.kind()),
        };
        self.report(IssueType::Structure, diagnostics);
        None
    }

    fn resource_body(&mut self, map: &Map, td: &'static TypeDef, contained: bool) {
        if contained {
            self.contained_rules(map);
        }
        self.members(map, td, true);
    }

    /// The dom-* invariants on contained resources, which keep them from living a life of their
    /// own inside their container.
    fn contained_rules(&mut self, map: &Map) {
        if map.contains_key("contained") {
            self.report_child(
                IssueType::Invalid,
                "contained",
                "a contained resource must not contain other resources (dom-2)".into(),
            );
        }
        if map.contains_key("text") {
            self.report_child(
                IssueType::Invalid,
                "text",
                "a contained resource must not have a narrative (dom-1)".into(),
            );
        }
        if let Some(meta) = map.get("meta").and_then(Json::as_object) {
            for (name, rule) in [
                ("versionId", "dom-4"),
                ("lastUpdated", "dom-4"),
                ("security", "dom-5"),
            ] {
                if meta.contains_key(name) {
                    let mark = self.enter("meta");
                    self.report_child(
                        IssueType::Invalid,
                        name,
                        format!("a contained resource must not have meta.{name} ({rule})"),
                    );
                    self.leave(mark);
                }
            }
        }
    }

    // ---- objects ----

    /// Checks the members of a resource, complex type or backbone element `td` at the current
    /// path.
    fn members(&mut self, map: &Map, td: &'static TypeDef, resource_root: bool) {
        if self.depth >= MAX_DEPTH {
            self.report(IssueType::Structure, "content nested too deeply".into());
            return;
        }
        self.depth += 1;
        // Which variant of each choice element was seen, to reject a second one. Few objects have
        // choice elements, and an empty Vec does not allocate.
        let mut choices: Vec<(&'static ElementDef, &str)> = Vec::new();
        for (key, value) in map.iter() {
            if self.stopped {
                break;
            }
            if key == "resourceType" {
                if !resource_root {
                    self.report_child(
                        IssueType::Structure,
                        key,
                        "'resourceType' is only allowed at the root of a resource".into(),
                    );
                }
                continue;
            }
            if let Some(base) = key.strip_prefix('_') {
                self.primitive_extension(map, td, key, base, value, &mut choices);
                continue;
            }
            let Some((el, ty)) = td.resolve_json_name(key) else {
                self.unknown(td, key);
                continue;
            };
            if el.choice {
                self.note_choice(&mut choices, el, key);
            }
            self.element(map, key, value, el, ty, td);
        }
        if !self.stopped {
            self.required(map, td);
            if td.name == "Extension" {
                self.ext_1(map);
            }
        }
        self.depth -= 1;
    }

    fn unknown(&mut self, td: &TypeDef, key: &str) {
        let base = key.strip_prefix('_').unwrap_or(key);
        let hint = td
            .elements
            .iter()
            .filter(|e| e.choice)
            .find_map(|e| {
                let rest = base.strip_prefix(e.name.as_str())?;
                Some(if rest.is_empty() {
                    format!(
                        "; {0}[x] is written with its type, e.g. '{1}'",
                        e.name,
                        e.types.first().map(|t| e.json_name(t)).unwrap_or_default()
                    )
                } else {
                    format!("; {}[x] does not allow type '{}'", e.name, excerpt(rest))
                })
            })
            .unwrap_or_default();
        self.report_child(
            IssueType::Structure,
            key,
            format!("unknown element '{}'{hint}", excerpt(key)),
        );
    }

    fn note_choice<'a>(
        &mut self,
        choices: &mut Vec<(&'static ElementDef, &'a str)>,
        el: &'static ElementDef,
        json_name: &'a str,
    ) {
        match choices.iter().find(|(e, _)| ptr::eq(*e, el)) {
            Some((_, first)) if *first != json_name => {
                let first = *first;
                self.report_child(
                    IssueType::Structure,
                    json_name,
                    format!(
                        "only one type of {}[x] may be present, found '{first}' and '{json_name}'",
                        el.name
                    ),
                );
            }
            Some(_) => {}
            None => choices.push((el, json_name)),
        }
    }

    fn required(&mut self, map: &Map, td: &TypeDef) {
        for el in td.elements.iter().filter(|e| e.min >= 1) {
            // `_name` alone counts: a primitive may carry only extensions, e.g. a data-absent-reason.
            let present = map.iter().any(|(k, _)| {
                let base = k.strip_prefix('_').unwrap_or(k);
                base.starts_with(el.name.as_str())
                    && td
                        .resolve_json_name(base)
                        .is_some_and(|(e, _)| ptr::eq(e, el))
            });
            if !present {
                let suffix = if el.choice { "[x]" } else { "" };
                self.report_child(
                    IssueType::Required,
                    &el.name,
                    format!("missing required element '{}{suffix}'", el.name),
                );
            }
        }
    }

    /// ext-1: an extension has either a value or nested extensions, never both or neither.
    fn ext_1(&mut self, map: &Map) {
        let has_value = map
            .iter()
            .any(|(k, _)| k.strip_prefix('_').unwrap_or(k).starts_with("value"));
        let has_extension = map.contains_key("extension");
        if has_value && has_extension {
            self.report(
                IssueType::Invalid,
                "an extension must have either a value or nested extensions, not both (ext-1)"
                    .into(),
            );
        } else if !has_value && !has_extension {
            self.report(
                IssueType::Invalid,
                "an extension must have either a value or nested extensions (ext-1)".into(),
            );
        }
    }

    // ---- elements ----

    /// Member `key` of `map` holding element `el` of type `ty`, defined on `owner`.
    fn element(
        &mut self,
        map: &Map,
        key: &str,
        value: &Json,
        el: &'static ElementDef,
        ty: &'static str,
        owner: &'static TypeDef,
    ) {
        if let Json::Null = value {
            self.report_child(
                IssueType::Structure,
                key,
                "null is not allowed; omit the element instead".into(),
            );
            return;
        }
        let mark = self.enter(key);
        match (el.is_array(), value) {
            (true, Json::Array(items)) => {
                self.array_length(key, items.len(), el);
                for (i, item) in items.iter().enumerate() {
                    if self.stopped {
                        break;
                    }
                    let m = self.enter_index(i);
                    if let Json::Null = item {
                        self.null_item(map, key, i, ty);
                    } else {
                        self.item(item, el, ty, owner);
                    }
                    self.leave(m);
                }
            }
            (true, other) => self.report(
                IssueType::Structure,
                format!(
                    "'{key}' repeats, so it must be a JSON array, not {}",
                    other.kind()
                ),
            ),
            (false, Json::Array(_)) => self.report(
                IssueType::Structure,
                format!("'{key}' does not repeat, so it must not be a JSON array"),
            ),
            (false, other) => self.item(other, el, ty, owner),
        }
        self.leave(mark);
    }

    fn array_length(&mut self, key: &str, len: usize, el: &ElementDef) {
        if len == 0 {
            self.report(
                IssueType::Structure,
                format!("'{key}' must not be an empty array; omit the element instead"),
            );
            return;
        }
        if let Some(max) = el.max
            && len > max as usize
        {
            self.report(
                IssueType::Structure,
                format!("'{key}' has {len} items but at most {max} are allowed"),
            );
        }
        if len < el.min as usize {
            self.report(
                IssueType::Required,
                format!(
                    "'{key}' has {len} items but at least {} are required",
                    el.min
                ),
            );
        }
    }

    /// `null` in an array is only a placeholder that keeps a primitive array aligned with its
    /// `_name` array, so it needs extensions at the same position.
    fn null_item(&mut self, map: &Map, key: &str, index: usize, ty: &str) {
        if self.schema.is_primitive(ty) {
            let has_extensions = map
                .get(&format!("_{key}"))
                .and_then(Json::as_array)
                .and_then(|a| a.get(index))
                .is_some_and(|x| x.as_object().is_some());
            if !has_extensions {
                self.report(
                    IssueType::Structure,
                    format!(
                        "null in '{key}' is only allowed where '_{key}' has extensions at the same position"
                    ),
                );
            }
        } else {
            self.report(
                IssueType::Structure,
                "null is not allowed; omit the item instead".into(),
            );
        }
    }

    /// One value (not an array) of element `el` of type `ty` at the current path.
    fn item(&mut self, value: &Json, el: &'static ElementDef, ty: &'static str, owner: &TypeDef) {
        if let Some(p) = self.schema.primitive(ty) {
            self.primitive(value, el, p, owner);
            return;
        }
        if ty == "Resource" {
            self.nested_resource(
                value,
                owner.kind == TypeKind::Resource && el.name == "contained",
            );
            return;
        }
        let Some(td) = self.schema.type_def(ty) else {
            // The schema is generated with every referenced type; this is a defect, not bad input.
            self.report(
                IssueType::Exception,
                format!("no definition for type '{ty}'"),
            );
            return;
        };
        match value {
            Json::Object(m) if m.is_empty() => self.report(
                IssueType::Structure,
                "must not be an empty object; omit the element instead".into(),
            ),
            Json::Object(m) => self.members(m, td, false),
            other => self.report(
                IssueType::Structure,
                format!("expected a JSON object ({ty}), found {}", other.kind()),
            ),
        }
    }

    // ---- primitive extensions (`_name`) ----

    fn primitive_extension<'a>(
        &mut self,
        map: &Map,
        td: &'static TypeDef,
        key: &'a str,
        base: &'a str,
        value: &Json,
        choices: &mut Vec<(&'static ElementDef, &'a str)>,
    ) {
        let Some((el, ty)) = td.resolve_json_name(base) else {
            self.unknown(td, key);
            return;
        };
        let refusal = if !self.schema.is_primitive(ty) {
            Some("it is not a primitive element")
        } else if el.xml_attr || ty == "xhtml" {
            Some("it cannot have extensions")
        } else {
            None
        };
        if let Some(why) = refusal {
            self.report_child(
                IssueType::Structure,
                key,
                format!("'{key}' is not allowed: {why} ('{base}')"),
            );
            return;
        }
        if el.choice {
            self.note_choice(choices, el, base);
        }
        let mark = self.enter(base);
        match (el.is_array(), value) {
            (_, Json::Null) => self.report(
                IssueType::Structure,
                format!("'{key}' must not be null; omit it instead"),
            ),
            (true, Json::Array(items)) => {
                self.extension_array(map, key, base, items);
            }
            (true, other) => self.report(
                IssueType::Structure,
                format!(
                    "'{key}' must be an array aligned with '{base}', not {}",
                    other.kind()
                ),
            ),
            (false, Json::Array(_)) => self.report(
                IssueType::Structure,
                format!("'{key}' must be an object, not an array ('{base}' does not repeat)"),
            ),
            (false, other) => self.primitive_element(other, key),
        }
        self.leave(mark);
    }

    fn extension_array(&mut self, map: &Map, key: &str, base: &str, items: &[Json]) {
        if items.is_empty() {
            self.report(
                IssueType::Structure,
                format!("'{key}' must not be an empty array; omit it instead"),
            );
            return;
        }
        match map.get(base) {
            Some(Json::Array(values)) if values.len() != items.len() => self.report(
                IssueType::Structure,
                format!(
                    "'{key}' has {} items but '{base}' has {}; the arrays must be aligned",
                    items.len(),
                    values.len()
                ),
            ),
            None if items.iter().all(|i| matches!(i, Json::Null)) => self.report(
                IssueType::Structure,
                format!("'{key}' holds only nulls; omit it instead"),
            ),
            _ => {}
        }
        for (i, item) in items.iter().enumerate() {
            if self.stopped {
                break;
            }
            if let Json::Null = item {
                // Alignment placeholder for a value without extensions.
                continue;
            }
            let m = self.enter_index(i);
            self.primitive_element(item, key);
            self.leave(m);
        }
    }

    /// The object of a `_name` member: the primitive's `id` and `extension`.
    fn primitive_element(&mut self, value: &Json, key: &str) {
        let map = match value {
            Json::Object(m) if m.is_empty() => {
                self.report(
                    IssueType::Structure,
                    format!("'{key}' must not be an empty object; omit it instead"),
                );
                return;
            }
            Json::Object(m) => m,
            other => {
                self.report(
                    IssueType::Structure,
                    format!(
                        "'{key}' must be an object with 'id' and/or 'extension', not {}",
                        other.kind()
                    ),
                );
                return;
            }
        };
        let Some(ext) = self.extension else {
            return;
        };
        for (k, v) in map.iter() {
            if self.stopped {
                break;
            }
            match k {
                "id" | "extension" => {
                    if let Some((el, ty)) = ext.resolve_json_name(k) {
                        self.element(map, k, v, el, ty, ext);
                    }
                }
                _ => self.report_child(
                    IssueType::Structure,
                    k,
                    format!(
                        "unknown element '{}' in '{key}' (only 'id' and 'extension' are allowed)",
                        excerpt(k)
                    ),
                ),
            }
        }
    }

    // ---- primitive values ----

    fn primitive(&mut self, value: &Json, el: &ElementDef, p: &PrimitiveDef, owner: &TypeDef) {
        match (p.json, value) {
            (JsonKind::Boolean, Json::Bool(_)) => {}
            (JsonKind::Number, Json::Number(text)) => self.number(text, p),
            (JsonKind::String, Json::String(s)) => self.string(s, el, p, owner),
            (JsonKind::Number, Json::String(s)) => self.report(
                IssueType::Structure,
                format!(
                    "{} must be a JSON number, not a string (write {1}, not \"{1}\")",
                    p.name,
                    excerpt(s)
                ),
            ),
            (kind, other) => {
                let expected = match kind {
                    JsonKind::Boolean => "a JSON boolean",
                    JsonKind::Number => "a JSON number",
                    JsonKind::String => "a JSON string",
                };
                self.report(
                    IssueType::Structure,
                    format!("{} must be {expected}, not {}", p.name, other.kind()),
                );
            }
        }
    }

    fn number(&mut self, text: &str, p: &PrimitiveDef) {
        if let Some(re) = &p.regex
            && !re.is_match(text)
        {
            self.report(
                IssueType::Value,
                format!("'{}' is not a valid {}", excerpt(text), p.name),
            );
            return;
        }
        let min = match p.name.as_str() {
            "integer" => i64::from(i32::MIN),
            "unsignedInt" => 0,
            "positiveInt" => 1,
            _ => return,
        };
        match text.parse::<i64>() {
            Ok(n) if n >= min && n <= i64::from(i32::MAX) => {}
            Ok(n) if n < min && min >= 0 => self.report(
                IssueType::Value,
                format!("{} must be at least {min}, found {n}", p.name),
            ),
            _ => self.report(
                IssueType::Value,
                format!(
                    "'{}' is out of range for {} (32-bit)",
                    excerpt(text),
                    p.name
                ),
            ),
        }
    }

    fn string(&mut self, s: &str, el: &ElementDef, p: &PrimitiveDef, owner: &TypeDef) {
        if s.is_empty() {
            self.report(
                IssueType::Value,
                "must not be an empty string; omit the element instead".into(),
            );
            return;
        }
        match p.name.as_str() {
            // The spec's regex for these, `[ \r\n\t\S]+`, was written for Java, where `\S` is
            // ASCII-only; the regex crate's Unicode `\S` would reject a no-break space.
            "string" | "markdown" => self.fhir_string(s, p),
            "xhtml" => self.xhtml(s),
            _ => {
                if let Some(re) = &p.regex
                    && !re.is_match(s)
                {
                    self.report(
                        IssueType::Value,
                        format!("'{}' is not a valid {}", excerpt(s), p.name),
                    );
                    return;
                }
                if matches!(p.name.as_str(), "date" | "dateTime" | "instant") {
                    self.calendar(s, p);
                }
            }
        }
        if let Some(codes) = &el.codes
            && !codes.iter().any(|c| c == s)
        {
            let mut list = codes
                .iter()
                .take(CODES_SHOWN)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ");
            if codes.len() > CODES_SHOWN {
                let _ = write!(list, ", … ({} codes)", codes.len());
            }
            self.report(
                IssueType::Value,
                format!(
                    "'{}' is not a valid code for {}.{}; expected one of {list}",
                    excerpt(s),
                    owner.name,
                    el.name
                ),
            );
        }
    }

    fn fhir_string(&mut self, s: &str, p: &PrimitiveDef) {
        if s.len() > MAX_STRING_BYTES {
            self.report(
                IssueType::TooLong,
                format!("{} is longer than 1 MB ({} bytes)", p.name, s.len()),
            );
        } else if s.trim().is_empty() {
            self.report(
                IssueType::Value,
                format!("{} must not consist of white space only", p.name),
            );
        } else if let Some(c) = s
            .chars()
            .find(|&c| c < ' ' && !matches!(c, '\t' | '\r' | '\n'))
        {
            self.report(
                IssueType::Value,
                format!(
                    "{} must not contain control character U+{:04X}",
                    p.name, c as u32
                ),
            );
        }
    }

    fn xhtml(&mut self, s: &str) {
        let t = s.trim();
        let opens_div = t
            .strip_prefix("<div")
            .and_then(|rest| rest.chars().next())
            .is_some_and(|c| c == '>' || c == '/' || c.is_ascii_whitespace());
        if !opens_div || !t.ends_with('>') {
            self.report(
                IssueType::Value,
                "narrative must be a single XHTML <div> element".into(),
            );
        }
    }

    /// The regexes accept 2023-02-29 and 2024-04-31; only a calendar knows better.
    fn calendar(&mut self, s: &str, p: &PrimitiveDef) {
        let num = |r: std::ops::Range<usize>| s.get(r).and_then(|t| t.parse::<u32>().ok());
        let (Some(year), Some(month), Some(day)) = (num(0..4), num(5..7), num(8..10)) else {
            return;
        };
        let last = match month {
            2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        if day > last {
            self.report(
                IssueType::Value,
                format!(
                    "'{}' is not a valid {}: {year:04}-{month:02} has {last} days",
                    excerpt(s),
                    p.name
                ),
            );
        }
    }
}

/// `s` shortened for a message, so that a huge value does not make a huge outcome.
fn excerpt(s: &str) -> String {
    const MAX_CHARS: usize = 64;
    match s.char_indices().nth(MAX_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json;
    use crate::outcome::Severity;

    fn check(text: &str) -> Vec<Issue> {
        validate_resource(&json::parse(text.as_bytes()).expect("test JSON parses"))
    }

    fn assert_valid(text: &str) {
        let issues = check(text);
        assert!(issues.is_empty(), "expected no issues, got {issues:#?}");
    }

    /// Asserts that `text` has exactly one issue, at `expression` with `code`, and returns it.
    fn single(text: &str, expression: &str, code: IssueType) -> Issue {
        let issues = check(text);
        assert_eq!(issues.len(), 1, "expected one issue, got {issues:#?}");
        let issue = issues.into_iter().next().expect("one issue");
        assert_eq!(issue.expression.as_deref(), Some(expression), "{issue:#?}");
        assert_eq!(issue.code, code, "{issue:#?}");
        assert_eq!(issue.severity, Severity::Error);
        issue
    }

    fn expressions(issues: &[Issue]) -> Vec<&str> {
        issues
            .iter()
            .map(|i| i.expression.as_deref().unwrap_or(""))
            .collect()
    }

    /// A minimal valid Observation with `extra` members added.
    fn obs(extra: &str) -> String {
        let sep = if extra.is_empty() { "" } else { "," };
        format!(
            r#"{{"resourceType":"Observation","status":"final","code":{{"text":"pulse"}}{sep}{extra}}}"#
        )
    }

    const BLOOD_PRESSURE: &str = r#"{
      "resourceType": "Observation",
      "id": "blood-pressure",
      "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]},
      "text": {
        "status": "generated",
        "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">BP 120.50/80 mmHg</div>"
      },
      "identifier": [{"system": "urn:ietf:rfc:3986",
                      "value": "urn:uuid:187e0c12-8dd2-67e2-99b2-bf273c878281"}],
      "status": "final",
      "_status": {"extension": [{"url": "http://example.org/fhir/StructureDefinition/status-note",
                                 "valueString": "verified by nurse"}]},
      "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                "code": "vital-signs", "display": "Vital Signs"}]}],
      "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
                           "display": "Blood pressure panel with all children optional"}],
               "text": "Blood pressure systolic & diastolic"},
      "subject": {"reference": "Patient/example"},
      "effectiveDateTime": "2024-03-01T10:00:00+01:00",
      "performer": [{"reference": "Practitioner/example"}],
      "bodySite": {"coding": [{"system": "http://snomed.info/sct", "code": "368209003",
                               "display": "Right arm"}]},
      "component": [
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6",
                              "display": "Systolic blood pressure"}]},
         "valueQuantity": {"value": 120.50, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                           "code": "mm[Hg]"}},
        {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4",
                              "display": "Diastolic blood pressure"}]},
         "valueQuantity": {"value": 80, "unit": "mmHg", "system": "http://unitsofmeasure.org",
                           "code": "mm[Hg]"}}
      ]
    }"#;

    const PATIENT: &str = r#"{
      "resourceType": "Patient",
      "id": "pat-1",
      "meta": {"versionId": "1", "lastUpdated": "2024-03-01T09:00:00.000+01:00"},
      "text": {"status": "generated",
               "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>Kari Nordmann</p></div>"},
      "identifier": [{"use": "official", "system": "urn:oid:2.16.578.1.12.4.1.4.1",
                      "value": "13031353453"}],
      "active": true,
      "name": [{"use": "official", "family": "Nordmann", "given": ["Kari", "Anne"]}],
      "telecom": [{"system": "phone", "value": "+47 22 00 00 00", "use": "home"},
                  {"system": "email", "value": "kari@example.no"}],
      "gender": "female",
      "birthDate": "1953-03-13",
      "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                    "valueDateTime": "1953-03-13T14:35:00+01:00"}]},
      "address": [{"use": "home", "line": ["Storgata 1"], "city": "Oslo", "postalCode": "0155",
                   "country": "NO", "period": {"start": "2001-01-01"}}],
      "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "nb"}]},
                         "preferred": true}]
    }"#;

    const QUESTIONNAIRE: &str = r#"{
      "resourceType": "Questionnaire",
      "id": "lifestyle",
      "url": "http://example.org/Questionnaire/lifestyle",
      "status": "active",
      "title": "Lifestyle",
      "item": [{
        "linkId": "1", "text": "About you", "type": "group",
        "item": [
          {"linkId": "1.1", "text": "Age", "type": "integer", "required": true},
          {"linkId": "1.2", "text": "Do you smoke?", "type": "choice",
           "answerOption": [{"valueCoding": {"system": "http://snomed.info/sct", "code": "77176002",
                                             "display": "Smoker"}},
                            {"valueString": "No"}]},
          {"linkId": "1.3", "text": "Pack years", "type": "decimal",
           "enableWhen": [{"question": "1.2", "operator": "exists", "answerBoolean": true}],
           "item": [{"linkId": "1.3.1", "text": "Comment", "type": "string", "maxLength": 200}]}
        ]
      }]
    }"#;

    const QUESTIONNAIRE_RESPONSE: &str = r#"{
      "resourceType": "QuestionnaireResponse",
      "questionnaire": "http://example.org/Questionnaire/lifestyle",
      "status": "completed",
      "subject": {"reference": "Patient/pat-1"},
      "authored": "2024-03-01T10:15:00Z",
      "item": [{"linkId": "1", "item": [
        {"linkId": "1.1", "answer": [{"valueInteger": 70}]},
        {"linkId": "1.2", "answer": [{"valueCoding": {"system": "http://snomed.info/sct",
                                                      "code": "77176002"}}]},
        {"linkId": "1.3", "answer": [{"valueDecimal": 12.5,
          "item": [{"linkId": "1.3.1", "answer": [{"valueString": "Quit in 2010"}]}]}]}
      ]}]
    }"#;

    const CARE_PLAN: &str = r#"{
      "resourceType": "CarePlan",
      "status": "active",
      "intent": "plan",
      "subject": {"reference": "Patient/pat-1"},
      "period": {"start": "2024-03-01", "end": "2024-06-01"},
      "activity": [{"detail": {
        "kind": "ServiceRequest",
        "code": {"text": "Blood pressure check"},
        "status": "scheduled",
        "scheduledTiming": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "wk"}},
        "performer": [{"reference": "Practitioner/example"}],
        "description": "Weekly blood pressure check"
      }}]
    }"#;

    const BUNDLE: &str = r##"{
      "resourceType": "Bundle",
      "type": "transaction",
      "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
         "resource": {"resourceType": "Patient",
                      "contained": [{"resourceType": "Organization", "id": "org1",
                                     "name": "Legekontoret"}],
                      "name": [{"family": "Nordmann"}],
                      "managingOrganization": {"reference": "#org1"}},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                      "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                      "valueQuantity": {"value": 72, "unit": "/min"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": "Patient/old"}}
      ]
    }"##;

    const FIXTURES: [&str; 7] = [
        BLOOD_PRESSURE,
        PATIENT,
        QUESTIONNAIRE,
        QUESTIONNAIRE_RESPONSE,
        CARE_PLAN,
        BUNDLE,
        r#"{"resourceType":"Parameters","parameter":[{"name":"a","valueBoolean":true},
            {"name":"b","resource":{"resourceType":"Patient","gender":"other"}},
            {"name":"c","part":[{"name":"d","valueInteger":-3}]}]}"#,
    ];

    #[test]
    fn valid_blood_pressure_observation() {
        assert_valid(BLOOD_PRESSURE);
    }

    #[test]
    fn valid_patient_with_fodselsnummer_and_birth_time() {
        assert_valid(PATIENT);
    }

    #[test]
    fn valid_questionnaire_with_nested_items() {
        assert_valid(QUESTIONNAIRE);
    }

    #[test]
    fn valid_questionnaire_response() {
        assert_valid(QUESTIONNAIRE_RESPONSE);
    }

    #[test]
    fn valid_care_plan_with_activity_detail() {
        assert_valid(CARE_PLAN);
    }

    #[test]
    fn valid_transaction_bundle_with_contained_resources() {
        assert_valid(BUNDLE);
    }

    #[test]
    fn valid_parameters_with_resource_and_parts() {
        assert_valid(FIXTURES[6]);
    }

    #[test]
    fn unknown_element_is_reported_at_its_path() {
        let i = single(
            &obs(r#""fooBar":1"#),
            "Observation.fooBar",
            IssueType::Structure,
        );
        assert_eq!(i.diagnostics, "unknown element 'fooBar'");
        single(
            &obs(r#""component":[{"code":{"text":"a"}},{"code":{"text":"b","colour":"red"}}]"#),
            "Observation.component[1].code.colour",
            IssueType::Structure,
        );
        single(
            &obs(r#""_fooBar":{"id":"a"}"#),
            "Observation._fooBar",
            IssueType::Structure,
        );
        let i = single(
            &obs(r#""value":"x""#),
            "Observation.value",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("valueQuantity"), "{}", i.diagnostics);
        let i = single(
            &obs(r#""valueFoo":"x""#),
            "Observation.valueFoo",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("'Foo'"), "{}", i.diagnostics);
    }

    #[test]
    fn wrong_json_kind_for_primitives() {
        let i = single(
            r#"{"resourceType":"Observation","status":1,"code":{"text":"x"}}"#,
            "Observation.status",
            IssueType::Structure,
        );
        assert_eq!(i.diagnostics, "code must be a JSON string, not number");
        let i = single(
            &obs(r#""valueQuantity":{"value":"72.5","unit":"/min"}"#),
            "Observation.valueQuantity.value",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("JSON number"), "{}", i.diagnostics);
        single(
            &obs(
                r#""component":[{"code":{"text":"a"}},{"code":{"text":"b"},"valueBoolean":"true"}]"#,
            ),
            "Observation.component[1].valueBoolean",
            IssueType::Structure,
        );
        single(
            &obs(r#""subject":"Patient/1""#),
            "Observation.subject",
            IssueType::Structure,
        );
    }

    #[test]
    fn missing_required_elements() {
        let issues = check(r#"{"resourceType":"Observation"}"#);
        assert_eq!(
            expressions(&issues),
            ["Observation.status", "Observation.code"],
            "{issues:#?}"
        );
        assert!(issues.iter().all(|i| i.code == IssueType::Required));
        assert_eq!(issues[0].diagnostics, "missing required element 'status'");
        // Extensions alone make a primitive present (e.g. a data-absent-reason).
        assert_valid(
            r#"{"resourceType":"Observation","code":{"text":"x"},"_status":{"extension":[
                {"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"unknown"}]}}"#,
        );
        single(
            &obs(r#""component":[{"valueString":"x"}]"#),
            "Observation.component[0].code",
            IssueType::Required,
        );
        let i = single(
            r#"{"resourceType":"MedicationRequest","status":"active","intent":"order","subject":{"reference":"Patient/1"}}"#,
            "MedicationRequest.medication",
            IssueType::Required,
        );
        assert_eq!(i.diagnostics, "missing required element 'medication[x]'");
    }

    #[test]
    fn invalid_dates_are_rejected() {
        for bad in [
            "2024-13-01",
            "not-a-date",
            "2023-02-29",
            "2024-04-31",
            "2024-3-1",
        ] {
            let i = single(
                &obs(&format!(r#""effectiveDateTime":"{bad}""#)),
                "Observation.effectiveDateTime",
                IssueType::Value,
            );
            assert!(i.diagnostics.contains(bad), "{}", i.diagnostics);
        }
        single(
            r#"{"resourceType":"Patient","birthDate":"2023-02-29"}"#,
            "Patient.birthDate",
            IssueType::Value,
        );
        single(
            &obs(r#""issued":"2024-03-01T10:00:00""#),
            "Observation.issued",
            IssueType::Value,
        );
        single(
            &obs(r#""issued":"2023-02-29T10:00:00Z""#),
            "Observation.issued",
            IssueType::Value,
        );
        for good in ["2024", "2024-02", "2024-02-29", "2000-02-29T23:59:60.123Z"] {
            assert_valid(&obs(&format!(r#""effectiveDateTime":"{good}""#)));
        }
        single(
            r#"{"resourceType":"Patient","birthDate":"1900-02-29"}"#,
            "Patient.birthDate",
            IssueType::Value,
        );
    }

    #[test]
    fn invalid_id_is_rejected() {
        let i = single(&obs(r#""id":"a b""#), "Observation.id", IssueType::Value);
        assert_eq!(i.diagnostics, "'a b' is not a valid id");
        single(
            &obs(&format!(r#""id":"{}""#, "a".repeat(65))),
            "Observation.id",
            IssueType::Value,
        );
        assert_valid(&obs(&format!(r#""id":"{}""#, "A-1.z".repeat(12))));
    }

    #[test]
    fn invalid_required_code_is_rejected() {
        let i = single(
            r#"{"resourceType":"Observation","status":"bogus","code":{"text":"x"}}"#,
            "Observation.status",
            IssueType::Value,
        );
        assert!(
            i.diagnostics.starts_with(
                "'bogus' is not a valid code for Observation.status; expected one of "
            ),
            "{}",
            i.diagnostics
        );
        assert!(i.diagnostics.contains("final"), "{}", i.diagnostics);
        single(
            &obs(r#""valueQuantity":{"value":1,"comparator":"=="}"#),
            "Observation.valueQuantity.comparator",
            IssueType::Value,
        );
        // Long code lists are abbreviated.
        let i = single(
            r#"{"resourceType":"CarePlan","status":"active","intent":"plan","subject":{"reference":"Patient/1"},
                "activity":[{"detail":{"status":"scheduled","kind":"Patient"}}]}"#,
            "CarePlan.activity[0].detail.kind",
            IssueType::Value,
        );
        assert!(
            i.diagnostics.contains("CarePlan.activity.detail.kind"),
            "{}",
            i.diagnostics
        );
    }

    #[test]
    fn empty_values_are_rejected() {
        let i = single(&obs(r#""id":"""#), "Observation.id", IssueType::Value);
        assert!(i.diagnostics.contains("empty string"), "{}", i.diagnostics);
        single(
            r#"{"resourceType":"Patient","name":[{"family":""}]}"#,
            "Patient.name[0].family",
            IssueType::Value,
        );
        let i = single(
            &obs(r#""category":[]"#),
            "Observation.category",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("empty array"), "{}", i.diagnostics);
        let i = single(
            &obs(r#""subject":{}"#),
            "Observation.subject",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("empty object"), "{}", i.diagnostics);
        single(
            &obs(r#""_status":{}"#),
            "Observation.status",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","name":[{"family":"  \t "}]}"#,
            "Patient.name[0].family",
            IssueType::Value,
        );
    }

    #[test]
    fn strings_follow_fhir_rather_than_unicode_whitespace_rules() {
        // A no-break space is content, not white space, for FHIR strings; the spec's regex
        // would say otherwise under the regex crate's Unicode `\S`.
        let nbsp = "van\u{a0}Dijk";
        let string = Schema::get().primitive("string").expect("string type");
        assert!(!string.regex.as_ref().expect("regex").is_match(nbsp));
        assert_valid(&format!(
            r#"{{"resourceType":"Patient","name":[{{"family":"{nbsp}"}}]}}"#
        ));
        assert_valid(r#"{"resourceType":"Patient","name":[{"text":"line 1\nline 2\ttab"}]}"#);
        single(
            r#"{"resourceType":"Patient","name":[{"family":"a\u0007b"}]}"#,
            "Patient.name[0].family",
            IssueType::Value,
        );
    }

    #[test]
    fn two_choice_variants_are_rejected() {
        let i = single(
            &obs(r#""valueQuantity":{"value":1},"valueString":"one""#),
            "Observation.valueString",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("value[x]"), "{}", i.diagnostics);
        // A value and its own extensions are one variant; extensions of another are a second.
        assert_valid(&obs(r#""valueString":"x","_valueString":{"id":"a"}"#));
        single(
            &obs(r#""valueString":"x","_valueBoolean":{"id":"a"}"#),
            "Observation.valueBoolean",
            IssueType::Structure,
        );
    }

    #[test]
    fn primitive_extension_arrays_must_align() {
        let i = single(
            &obs(r#""_status":[{"id":"a"}]"#),
            "Observation.status",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("'_status'"), "{}", i.diagnostics);
        let i = single(
            r#"{"resourceType":"Patient","name":[{"given":["Kari","Anne"],"_given":[{"id":"g1"}]}]}"#,
            "Patient.name[0].given",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("aligned"), "{}", i.diagnostics);
        assert_valid(
            r#"{"resourceType":"Patient","name":[{"given":["Kari",null],"_given":[null,{"extension":[
                {"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"masked"}]}]}]}"#,
        );
        single(
            r#"{"resourceType":"Patient","name":[{"given":["Kari",null],"_given":[{"id":"a"},null]}]}"#,
            "Patient.name[0].given[1]",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","name":[{"given":["Kari"],"_given":{"id":"a"}}]}"#,
            "Patient.name[0].given",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","_birthDate":{"extension":[{"url":"x"}]}}"#,
            "Patient.birthDate.extension[0]",
            IssueType::Invalid,
        );
        single(
            r#"{"resourceType":"Patient","_birthDate":{"colour":"red"}}"#,
            "Patient.birthDate.colour",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","birthDate":"2000-01-01","_birthDate":{"extension":[{"url":"x","valueString":""}]}}"#,
            "Patient.birthDate.extension[0].valueString",
            IssueType::Value,
        );
    }

    #[test]
    fn primitive_extensions_only_on_primitives() {
        single(
            &obs(r#""_code":{"id":"a"}"#),
            "Observation._code",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","extension":[{"url":"http://x","_url":{"id":"a"},"valueString":"x"}]}"#,
            "Patient.extension[0]._url",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","text":{"status":"generated","div":"<div>x</div>","_div":{"id":"a"}}}"#,
            "Patient.text._div",
            IssueType::Structure,
        );
    }

    #[test]
    fn null_is_rejected_where_not_allowed() {
        let i = single(
            &obs(r#""subject":null"#),
            "Observation.subject",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("null"), "{}", i.diagnostics);
        single(
            &obs(r#""category":[null]"#),
            "Observation.category[0]",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Patient","name":[{"given":[null]}]}"#,
            "Patient.name[0].given[0]",
            IssueType::Structure,
        );
        single(
            &obs(r#""_status":null"#),
            "Observation.status",
            IssueType::Structure,
        );
    }

    #[test]
    fn cardinality_of_arrays() {
        let i = single(
            &obs(r#""subject":[{"reference":"Patient/1"}]"#),
            "Observation.subject",
            IssueType::Structure,
        );
        assert!(
            i.diagnostics.contains("must not be a JSON array"),
            "{}",
            i.diagnostics
        );
        let i = single(
            &obs(r#""category":{"text":"x"}"#),
            "Observation.category",
            IssueType::Structure,
        );
        assert!(
            i.diagnostics.contains("must be a JSON array"),
            "{}",
            i.diagnostics
        );
    }

    #[test]
    fn integers_are_32_bit_and_in_range() {
        let base = |item: &str| {
            format!(
                r#"{{"resourceType":"Questionnaire","status":"draft","item":[{{"linkId":"1","type":"string",{item}}}]}}"#
            )
        };
        assert_valid(&base(r#""maxLength":2147483647"#));
        assert_valid(&base(r#""maxLength":-2147483648"#));
        single(
            &base(r#""maxLength":2147483648"#),
            "Questionnaire.item[0].maxLength",
            IssueType::Value,
        );
        single(
            &base(r#""maxLength":1.5"#),
            "Questionnaire.item[0].maxLength",
            IssueType::Value,
        );
        single(
            &base(r#""maxLength":1e3"#),
            "Questionnaire.item[0].maxLength",
            IssueType::Value,
        );
        let timing = |repeat: &str| {
            format!(
                r#"{{"resourceType":"CarePlan","status":"active","intent":"plan","subject":{{"reference":"Patient/1"}},
                    "activity":[{{"detail":{{"status":"scheduled","scheduledTiming":{{"repeat":{{{repeat}}}}}}}}}]}}"#
            )
        };
        assert_valid(&timing(r#""frequency":1,"frequencyMax":2,"offset":0"#));
        single(
            &timing(r#""frequency":0"#),
            "CarePlan.activity[0].detail.scheduledTiming.repeat.frequency",
            IssueType::Value,
        );
        single(
            &timing(r#""offset":-1"#),
            "CarePlan.activity[0].detail.scheduledTiming.repeat.offset",
            IssueType::Value,
        );
        single(
            &timing(r#""offset":4294967296"#),
            "CarePlan.activity[0].detail.scheduledTiming.repeat.offset",
            IssueType::Value,
        );
    }

    #[test]
    fn narrative_div_must_be_a_div() {
        let text = |div: &str| {
            format!(r#"{{"resourceType":"Patient","text":{{"status":"generated","div":"{div}"}}}}"#)
        };
        assert_valid(&text(
            "<div xmlns=\\\"http://www.w3.org/1999/xhtml\\\">x</div>",
        ));
        single(&text("<p>x</p>"), "Patient.text.div", IssueType::Value);
        single(
            &text("<divx>x</divx>"),
            "Patient.text.div",
            IssueType::Value,
        );
        single(&text(""), "Patient.text.div", IssueType::Value);
        single(
            r#"{"resourceType":"Patient","text":{"status":"generated"}}"#,
            "Patient.text.div",
            IssueType::Required,
        );
    }

    #[test]
    fn extensions_follow_ext_1() {
        single(
            r#"{"resourceType":"Patient","extension":[{"url":"http://x","valueString":"a",
                "extension":[{"url":"y","valueBoolean":true}]}]}"#,
            "Patient.extension[0]",
            IssueType::Invalid,
        );
        single(
            r#"{"resourceType":"Patient","extension":[{"url":"http://x"}]}"#,
            "Patient.extension[0]",
            IssueType::Invalid,
        );
        single(
            r#"{"resourceType":"Patient","modifierExtension":[{"valueString":"a"}]}"#,
            "Patient.modifierExtension[0].url",
            IssueType::Required,
        );
        assert_valid(
            r#"{"resourceType":"Patient","extension":[{"url":"http://x","extension":[
                {"url":"a","valueCodeableConcept":{"text":"x"}},{"url":"b","_valueCode":{"id":"q"}}]}]}"#,
        );
    }

    #[test]
    fn nested_resources_are_checked_as_resources() {
        let i = single(
            &obs(r#""contained":[{"resourceType":"Patient"},{"resourceType":"Foo"}]"#),
            "Observation.contained[1]",
            IssueType::Structure,
        );
        assert_eq!(i.diagnostics, "unknown resource type 'Foo'");
        single(
            &obs(r#""contained":[{"resourceType":"DomainResource"}]"#),
            "Observation.contained[0]",
            IssueType::Structure,
        );
        single(
            &obs(r#""contained":[{"id":"p"}]"#),
            "Observation.contained[0]",
            IssueType::Structure,
        );
        single(
            &obs(r#""contained":[{"resourceType":"Patient","gender":"f"}]"#),
            "Observation.contained[0].gender",
            IssueType::Value,
        );
        single(
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient","name":[{"given":[1]}]}}]}"#,
            "Bundle.entry[0].resource.name[0].given[0]",
            IssueType::Structure,
        );
        single(
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":"Patient/1"}]}"#,
            "Bundle.entry[0].resource",
            IssueType::Structure,
        );
    }

    #[test]
    fn contained_resources_follow_dom_rules() {
        single(
            &obs(
                r#""contained":[{"resourceType":"Patient","contained":[{"resourceType":"Patient"}]}]"#,
            ),
            "Observation.contained[0].contained",
            IssueType::Invalid,
        );
        single(
            &obs(r#""contained":[{"resourceType":"Patient","meta":{"versionId":"1"}}]"#),
            "Observation.contained[0].meta.versionId",
            IssueType::Invalid,
        );
        single(
            &obs(
                r#""contained":[{"resourceType":"Patient","text":{"status":"empty","div":"<div/>"}}]"#,
            ),
            "Observation.contained[0].text",
            IssueType::Invalid,
        );
        // A Bundle entry is not contained, so it may have its own contained resources and meta.
        assert_valid(
            r#"{"resourceType":"Bundle","type":"collection","entry":[{"resource":{"resourceType":"Patient",
                "meta":{"versionId":"3"},"contained":[{"resourceType":"Patient"}]}}]}"#,
        );
    }

    #[test]
    fn resource_type_only_at_resource_roots() {
        let i = single(
            &obs(r#""subject":{"resourceType":"Patient","reference":"Patient/1"}"#),
            "Observation.subject.resourceType",
            IssueType::Structure,
        );
        assert!(i.diagnostics.contains("root"), "{}", i.diagnostics);
    }

    #[test]
    fn root_must_be_a_known_resource_object() {
        let issues = validate_resource(&Json::Array(vec![]));
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].expression, None);
        assert_eq!(check(r#"{"resourceType":"Resource"}"#).len(), 1);
        assert_eq!(check(r#"{"resourceType":7}"#).len(), 1);
        assert_eq!(check(r#"{}"#).len(), 1);
    }

    #[test]
    fn issues_are_capped() {
        let members: Vec<String> = (0..150).map(|i| format!(r#""x{i}":1"#)).collect();
        let issues = check(&obs(&members.join(",")));
        assert_eq!(issues.len(), MAX_ISSUES + 1);
        assert_eq!(issues[MAX_ISSUES].code, IssueType::TooCosts);
        assert_eq!(issues[0].expression.as_deref(), Some("Observation.x0"));
    }

    #[test]
    fn deep_nesting_is_reported_not_followed() {
        let mut ext = Json::Object(
            [
                ("url".to_string(), Json::str("x")),
                ("valueString".to_string(), Json::str("v")),
            ]
            .into_iter()
            .collect(),
        );
        for _ in 0..1000 {
            ext = Json::Object(
                [
                    ("url".to_string(), Json::str("x")),
                    ("extension".to_string(), Json::Array(vec![ext])),
                ]
                .into_iter()
                .collect(),
            );
        }
        let patient: Json = Json::Object(
            [
                ("resourceType".to_string(), Json::str("Patient")),
                ("extension".to_string(), Json::Array(vec![ext])),
            ]
            .into_iter()
            .collect(),
        );
        let issues = validate_resource(&patient);
        assert_eq!(issues.len(), 1, "{:?}", expressions(&issues));
        assert!(issues[0].diagnostics.contains("deeply"));
    }

    #[test]
    fn every_resource_type_minimal_has_only_required_issues() {
        let schema = Schema::get();
        assert_eq!(schema.resource_types().len(), 147);
        for t in schema.resource_types() {
            let mut root = Map::new();
            root.insert("resourceType", Json::str(t.clone()));
            let issues = validate_resource(&Json::Object(root));
            for i in &issues {
                assert_eq!(i.code, IssueType::Required, "{t}: {i:#?}");
                let e = i.expression.as_deref().unwrap_or("");
                assert!(e.starts_with(&format!("{t}.")), "{t}: {i:#?}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Key(String),
        Index(usize),
    }

    fn all_paths(j: &Json, cur: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        out.push(cur.clone());
        match j {
            Json::Object(m) => {
                for (k, v) in m.iter() {
                    cur.push(Step::Key(k.to_string()));
                    all_paths(v, cur, out);
                    cur.pop();
                }
            }
            Json::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    cur.push(Step::Index(i));
                    all_paths(v, cur, out);
                    cur.pop();
                }
            }
            _ => {}
        }
    }

    fn at_mut<'a>(j: &'a mut Json, path: &[Step]) -> &'a mut Json {
        match path.split_first() {
            None => j,
            Some((Step::Key(k), rest)) => {
                at_mut(j.as_object_mut().unwrap().get_mut(k).unwrap(), rest)
            }
            Some((Step::Index(i), rest)) => match j {
                Json::Array(a) => at_mut(&mut a[*i], rest),
                _ => unreachable!(),
            },
        }
    }

    /// Replaces every node of every valid fixture by values of other kinds: never a panic, and
    /// `null`, `[]` and `{}` are invalid wherever they land.
    #[test]
    fn mutated_fixtures_never_panic() {
        let replacements = [
            ("null", true),
            ("[]", true),
            ("{}", true),
            ("\"\"", true),
            ("[null]", false),
            ("0", false),
            ("-1.5e3", false),
            ("true", false),
            ("\"x\"", false),
            ("{\"resourceType\":\"Patient\"}", false),
            ("[{\"id\":\"a\"}]", false),
        ];
        for fixture in FIXTURES {
            let original = json::parse(fixture.as_bytes()).unwrap();
            let mut paths = Vec::new();
            all_paths(&original, &mut Vec::new(), &mut paths);
            for path in &paths {
                for (text, always_invalid) in replacements {
                    let mut doc = original.clone();
                    *at_mut(&mut doc, path) = json::parse(text.as_bytes()).unwrap();
                    let issues = validate_resource(&doc);
                    if always_invalid {
                        assert!(!issues.is_empty(), "{text} at {path:?} accepted");
                    }
                    assert!(issues.iter().all(|i| !i.diagnostics.is_empty()));
                }
            }
        }
    }
}
