//! FHIR XML, converted to and from the JSON tree with the help of the R4 schema.
//!
//! The server keeps every resource as its JSON tree; XML exists only at the edge, so this module
//! maps <https://hl7.org/fhir/R4/xml.html> onto the JSON representation and back:
//!
//! * repeating elements become arrays and primitives take their JSON kind from the schema, so
//!   `<value value="72.50"/>` in a `decimal` becomes the number `72.50` with its text kept;
//! * a primitive's `id` attribute and `<extension>` children go to the `_name` member (aligned
//!   arrays with `null` placeholders for repeating primitives);
//! * `Element.id` and `Extension.url` are attributes;
//! * resources inside `contained`, `Bundle.entry.resource` … are wrapped in an element named by
//!   their type;
//! * `Narrative.div` is XHTML and travels as its exact serialisation.
//!
//! XML is untrusted input: DOCTYPEs (and so entity declarations) are refused, nesting is bounded
//! and no input makes the parser panic.

use quick_xml::NsReader;
use quick_xml::XmlVersion;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, QName, ResolveResult};

use crate::error::FhirError;
use crate::json::{self, Json, Map};
use crate::outcome::{Issue, IssueType};
use crate::schema::{ElementDef, JsonKind, Schema, TypeDef};

/// The FHIR namespace; every FHIR element is in it.
pub const FHIR_NS: &str = "http://hl7.org/fhir";
/// The XHTML namespace of `Narrative.div`.
pub const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";
/// `xsi:schemaLocation` and friends appear on many published examples; they carry no content.
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// Elements nested deeper than this are rejected, so hostile input cannot exhaust the stack.
pub const MAX_DEPTH: usize = 128;

/// Parses a FHIR XML resource into the equivalent FHIR JSON tree (not yet validated).
///
/// Malformed XML, a DOCTYPE, a root outside the FHIR namespace or nesting deeper than
/// [`MAX_DEPTH`] give [`FhirError::Xml`]; XML that is well-formed but does not map onto the R4
/// structure (unknown elements, a `value` that is not a number where the type is numeric, …)
/// gives [`FhirError::Invalid`] with the element's path.
pub fn from_xml(bytes: &[u8]) -> Result<Json, FhirError> {
    // Some Windows clients send a byte order mark; it is not content.
    let bytes = bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes);
    let src = std::str::from_utf8(bytes).map_err(|e| {
        FhirError::Xml(format!(
            "FHIR XML must be UTF-8; invalid byte at offset {}",
            e.valid_up_to()
        ))
    })?;
    Parser::new(src).document()
}

/// Serialises a FHIR JSON resource tree as FHIR XML.
///
/// Elements are written in the order of the R4 definitions (which XML requires), whatever the
/// order of the JSON members. `pretty` indents with two spaces. Members that have no XML form
/// (unknown names, wrong JSON kinds) are reported as [`FhirError::Invalid`] rather than dropped.
pub fn to_xml(resource: &Json, pretty: bool) -> Result<Vec<u8>, FhirError> {
    let Json::Object(root) = resource else {
        return Err(FhirError::NotAResource(format!(
            "a resource must be a JSON object, not {}",
            resource.kind()
        )));
    };
    let mut w = Writer {
        out: String::with_capacity(1024),
        pretty,
        schema: Schema::get(),
    };
    w.out.push_str(r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    w.resource(root, None, 0)?;
    if pretty {
        w.out.push('\n');
    }
    Ok(w.out.into_bytes())
}

/// Parses stored (or client) JSON bytes and serialises them as FHIR XML.
pub fn json_bytes_to_xml(json: &[u8], pretty: bool) -> Result<Vec<u8>, FhirError> {
    to_xml(&json::parse(json)?, pretty)
}

fn structure(path: &str, msg: impl Into<String>) -> FhirError {
    FhirError::Invalid(vec![Issue::at(IssueType::Structure, path, msg)])
}

fn bad_value(path: &str, msg: impl Into<String>) -> FhirError {
    FhirError::Invalid(vec![Issue::at(IssueType::Value, path, msg)])
}

fn is_xml_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// The JSON number grammar (RFC 8259), which is what FHIR's numeric primitives use.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            while matches!(b.get(i), Some(b'0'..=b'9')) {
                i += 1;
            }
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return false;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !matches!(b.get(i), Some(b'0'..=b'9')) {
            return false;
        }
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
    }
    i == b.len()
}

/// Without a DTD only the five predefined entities and character references are defined.
fn is_known_reference(r: &quick_xml::events::BytesRef<'_>) -> bool {
    if r.is_char_ref() {
        matches!(r.resolve_char_ref(), Ok(Some(_)))
    } else {
        matches!(&**r, "lt" | "gt" | "amp" | "apos" | "quot")
    }
}

/// Which namespace an element name resolved to, without allocating for the expected ones.
#[derive(Debug, PartialEq)]
enum Ns {
    Fhir,
    Xhtml,
    Xsi,
    None,
    Other(String),
}

impl Ns {
    fn of(r: ResolveResult<'_>) -> Ns {
        match r {
            ResolveResult::Bound(Namespace(FHIR_NS)) => Ns::Fhir,
            ResolveResult::Bound(Namespace(XHTML_NS)) => Ns::Xhtml,
            ResolveResult::Bound(Namespace(XSI_NS)) => Ns::Xsi,
            ResolveResult::Bound(Namespace(other)) => Ns::Other(other.to_string()),
            ResolveResult::Unbound => Ns::None,
            ResolveResult::Unknown(prefix) => Ns::Other(format!("undeclared prefix '{prefix}'")),
        }
    }

    fn describe(&self) -> String {
        match self {
            Ns::Fhir => FHIR_NS.to_string(),
            Ns::Xhtml => XHTML_NS.to_string(),
            Ns::Xsi => XSI_NS.to_string(),
            Ns::None => "no namespace".to_string(),
            Ns::Other(s) => s.clone(),
        }
    }
}

/// The values collected for one JSON member while its XML elements are read.
struct Slot {
    key: String,
    array: bool,
    primitive: bool,
    values: Vec<Option<Json>>,
    exts: Vec<Option<Map>>,
}

struct Parser<'a> {
    src: &'a str,
    reader: NsReader<&'a [u8]>,
    /// Where the most recently read event began; `Narrative.div` is copied from there.
    event_start: usize,
    schema: &'static Schema,
}

impl<'a> Parser<'a> {
    fn new(src: &'a str) -> Parser<'a> {
        let mut reader = NsReader::from_reader(src.as_bytes());
        let config = reader.config_mut();
        config.check_end_names = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Parser {
            src,
            reader,
            event_start: 0,
            schema: Schema::get(),
        }
    }

    fn line_col(&self, pos: usize) -> (usize, usize) {
        let upto = &self.src.as_bytes()[..pos.min(self.src.len())];
        let line = upto.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = upto.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
        (line, column)
    }

    fn xml_error(&self, pos: usize, msg: impl std::fmt::Display) -> FhirError {
        let (line, column) = self.line_col(pos);
        FhirError::Xml(format!("{msg} at line {line} column {column}"))
    }

    fn next(&mut self) -> Result<Event<'a>, FhirError> {
        self.event_start = usize::try_from(self.reader.buffer_position()).unwrap_or(usize::MAX);
        match self.reader.read_event() {
            Ok(Event::DocType(_)) => Err(self.xml_error(
                self.event_start,
                "DOCTYPE declarations are not allowed in FHIR XML",
            )),
            Ok(ev) => Ok(ev),
            Err(e) => {
                let pos = usize::try_from(self.reader.error_position()).unwrap_or(usize::MAX);
                Err(self.xml_error(pos, e))
            }
        }
    }

    fn element_ns(&self, name: QName<'_>) -> Ns {
        Ns::of(self.reader.resolver().resolve_element(name).0)
    }

    fn attribute_ns(&self, name: QName<'_>) -> Ns {
        Ns::of(self.reader.resolver().resolve_attribute(name).0)
    }

    fn document(mut self) -> Result<Json, FhirError> {
        let root = loop {
            match self.next()? {
                Event::Decl(d) => {
                    if let Some(enc) = d.encoding() {
                        let enc = enc.map_err(|e| self.xml_error(self.event_start, e))?;
                        if !enc.eq_ignore_ascii_case("utf-8") {
                            return Err(self.xml_error(
                                self.event_start,
                                format!("unsupported encoding '{enc}'; FHIR XML must be UTF-8"),
                            ));
                        }
                    }
                }
                Event::Comment(_) | Event::PI(_) => {}
                Event::Text(t) if is_xml_whitespace(&t) => {}
                Event::Start(e) => break self.resource(&e, false, None, 1)?,
                Event::Empty(e) => break self.resource(&e, true, None, 1)?,
                Event::Eof => return Err(FhirError::Xml("no root element".into())),
                _ => {
                    return Err(self.xml_error(self.event_start, "content before the root element"));
                }
            }
        };
        loop {
            match self.next()? {
                Event::Eof => return Ok(root),
                Event::Comment(_) | Event::PI(_) => {}
                Event::Text(t) if is_xml_whitespace(&t) => {}
                _ => {
                    return Err(self.xml_error(self.event_start, "content after the root element"));
                }
            }
        }
    }

    /// Reads a resource element (the root, or the child of `contained`, `resource` …). `path`
    /// is the wrapper's path for a nested resource.
    fn resource(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        path: Option<&str>,
        depth: usize,
    ) -> Result<Json, FhirError> {
        let ns = self.element_ns(e.name());
        let local = e.local_name().into_inner().to_string();
        let here = path.map_or_else(|| local.clone(), str::to_string);
        if ns != Ns::Fhir {
            let msg = format!(
                "resource element <{local}> must be in the FHIR namespace {FHIR_NS}, not {}",
                ns.describe()
            );
            return Err(match path {
                None => self.xml_error(self.event_start, msg),
                Some(p) => structure(p, msg),
            });
        }
        if !self.schema.is_resource_type(&local) {
            return Err(match path {
                None => FhirError::UnknownResourceType(local),
                Some(p) => structure(p, format!("unknown resource type '{local}'")),
            });
        }
        self.no_attributes(e, &here)?;
        let td = self
            .schema
            .type_def(&local)
            .ok_or_else(|| structure(&here, format!("no definition for '{local}'")))?;
        let mut m = Map::new();
        m.insert("resourceType", Json::String(local));
        if !empty {
            for (k, v) in self.children(td, &here, depth)? {
                m.insert(k, v);
            }
        }
        Ok(Json::Object(m))
    }

    /// Namespace declarations and `xsi:` attributes are all a resource or wrapper may carry.
    fn no_attributes(&self, e: &BytesStart<'_>, path: &str) -> Result<(), FhirError> {
        for a in e.attributes() {
            let a = a.map_err(|err| self.xml_error(self.event_start, err))?;
            if a.key.as_namespace_binding().is_some() {
                continue;
            }
            if self.attribute_ns(a.key) == Ns::Xsi {
                continue;
            }
            return Err(structure(
                path,
                format!("unexpected attribute '{}'", a.key.into_inner()),
            ));
        }
        Ok(())
    }

    /// Reads the children of a resource, data type or backbone element up to its end tag.
    fn children(
        &mut self,
        td: &'static TypeDef,
        path: &str,
        depth: usize,
    ) -> Result<Vec<(String, Json)>, FhirError> {
        let mut slots: Vec<Slot> = Vec::new();
        loop {
            match self.next()? {
                Event::Start(e) => self.child(td, &e, false, path, depth + 1, &mut slots)?,
                Event::Empty(e) => self.child(td, &e, true, path, depth + 1, &mut slots)?,
                Event::End(_) => break,
                Event::Comment(_) | Event::PI(_) => {}
                Event::Text(t) if is_xml_whitespace(&t) => {}
                Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                    return Err(structure(path, "text content is not allowed here"));
                }
                Event::Eof => {
                    return Err(self.xml_error(
                        self.src.len(),
                        format!("unexpected end of document inside {path}"),
                    ));
                }
                Event::Decl(_) | Event::DocType(_) => {
                    return Err(self.xml_error(self.event_start, "misplaced declaration"));
                }
            }
        }
        Ok(build_members(slots))
    }

    fn child(
        &mut self,
        td: &'static TypeDef,
        e: &BytesStart<'_>,
        empty: bool,
        path: &str,
        depth: usize,
        slots: &mut Vec<Slot>,
    ) -> Result<(), FhirError> {
        if depth > MAX_DEPTH {
            return Err(self.xml_error(
                self.event_start,
                format!("elements nested deeper than {MAX_DEPTH}"),
            ));
        }
        let ns = self.element_ns(e.name());
        let local = e.local_name().into_inner();
        let Some((el, ty)) = td.resolve_json_name(local).filter(|(el, _)| !el.xml_attr) else {
            return Err(structure(
                &format!("{path}.{local}"),
                format!("unknown element '{local}' in {}", td.name),
            ));
        };
        let wanted = if ty == "xhtml" { Ns::Xhtml } else { Ns::Fhir };
        if ns != wanted {
            return Err(structure(
                &format!("{path}.{local}"),
                format!(
                    "element '{local}' must be in the namespace {}, not {}",
                    wanted.describe(),
                    ns.describe()
                ),
            ));
        }
        let primitive = self.schema.is_primitive(ty);
        let idx = match slots.iter().position(|s| s.key == local) {
            Some(i) => i,
            None => {
                slots.push(Slot {
                    key: local.to_string(),
                    array: el.is_array(),
                    primitive,
                    values: Vec::new(),
                    exts: Vec::new(),
                });
                slots.len() - 1
            }
        };
        let count = slots[idx].values.len();
        if !el.is_array() && count > 0 {
            return Err(structure(
                &format!("{path}.{local}"),
                format!("element '{local}' occurs more than once but may appear only once"),
            ));
        }
        let child_path = if el.is_array() {
            format!("{path}.{local}[{count}]")
        } else {
            format!("{path}.{local}")
        };
        let (value, ext) = if ty == "xhtml" {
            (
                Some(Json::String(self.div(e, empty, &child_path, depth)?)),
                None,
            )
        } else if primitive {
            let kind = self
                .schema
                .primitive(ty)
                .map_or(JsonKind::String, |p| p.json);
            self.primitive(e, empty, kind, &child_path, depth)?
        } else if ty == "Resource" {
            (
                Some(self.wrapped_resource(e, empty, &child_path, depth)?),
                None,
            )
        } else {
            let ctd = self
                .schema
                .type_def(ty)
                .ok_or_else(|| structure(&child_path, format!("no definition for type '{ty}'")))?;
            (Some(self.complex(e, empty, ctd, &child_path, depth)?), None)
        };
        let slot = &mut slots[idx];
        slot.values.push(value);
        slot.exts.push(ext);
        Ok(())
    }

    /// A data type or backbone element: `Element.id` / `Extension.url` attributes and children.
    fn complex(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        td: &'static TypeDef,
        path: &str,
        depth: usize,
    ) -> Result<Json, FhirError> {
        let mut m = Map::new();
        for a in e.attributes() {
            let a = a.map_err(|err| self.xml_error(self.event_start, err))?;
            if a.key.as_namespace_binding().is_some() {
                continue;
            }
            let name = a.key.into_inner();
            let is_attr_element =
                a.key.prefix().is_none() && td.element(name).is_some_and(|el| el.xml_attr);
            if !is_attr_element {
                if self.attribute_ns(a.key) == Ns::Xsi {
                    continue;
                }
                return Err(structure(path, format!("unexpected attribute '{name}'")));
            }
            let v = a.normalized_value(XmlVersion::Implicit1_0).map_err(|err| {
                self.xml_error(self.event_start, format!("in attribute '{name}': {err}"))
            })?;
            m.insert(name, Json::String(v.into_owned()));
        }
        if !empty {
            for (k, v) in self.children(td, path, depth)? {
                m.insert(k, v);
            }
        }
        Ok(Json::Object(m))
    }

    /// A primitive element: its `value` and `id` attributes and `<extension>` children. Returns
    /// the JSON value and the `_name` object.
    fn primitive(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        kind: JsonKind,
        path: &str,
        depth: usize,
    ) -> Result<(Option<Json>, Option<Map>), FhirError> {
        let mut value = None;
        let mut ext = Map::new();
        for a in e.attributes() {
            let a = a.map_err(|err| self.xml_error(self.event_start, err))?;
            if a.key.as_namespace_binding().is_some() {
                continue;
            }
            let name = a.key.into_inner();
            if a.key.prefix().is_some() || !matches!(name, "value" | "id") {
                if self.attribute_ns(a.key) == Ns::Xsi {
                    continue;
                }
                return Err(structure(path, format!("unexpected attribute '{name}'")));
            }
            let text = a.normalized_value(XmlVersion::Implicit1_0).map_err(|err| {
                self.xml_error(self.event_start, format!("in attribute '{name}': {err}"))
            })?;
            if name == "id" {
                ext.insert("id", Json::String(text.into_owned()));
                continue;
            }
            value = Some(match kind {
                JsonKind::String => Json::String(text.into_owned()),
                JsonKind::Boolean => match &*text {
                    "true" => Json::Bool(true),
                    "false" => Json::Bool(false),
                    _ => {
                        return Err(bad_value(
                            path,
                            format!("'{text}' is not a valid boolean (true or false)"),
                        ));
                    }
                },
                JsonKind::Number if is_json_number(&text) => Json::Number(text.into_owned()),
                JsonKind::Number => {
                    return Err(bad_value(path, format!("'{text}' is not a valid number")));
                }
            });
        }
        if !empty {
            let ext_td = self
                .schema
                .type_def("Extension")
                .ok_or_else(|| structure(path, "no definition for Extension"))?;
            let mut extensions = Vec::new();
            loop {
                let (c, c_empty) = match self.next()? {
                    Event::Start(c) => (c, false),
                    Event::Empty(c) => (c, true),
                    Event::End(_) => break,
                    Event::Comment(_) | Event::PI(_) => continue,
                    Event::Text(t) if is_xml_whitespace(&t) => continue,
                    Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                        return Err(structure(
                            path,
                            "text content is not allowed in a primitive; use the value attribute",
                        ));
                    }
                    Event::Eof => {
                        return Err(self.xml_error(
                            self.src.len(),
                            format!("unexpected end of document inside {path}"),
                        ));
                    }
                    Event::Decl(_) | Event::DocType(_) => {
                        return Err(self.xml_error(self.event_start, "misplaced declaration"));
                    }
                };
                if depth + 1 > MAX_DEPTH {
                    return Err(self.xml_error(
                        self.event_start,
                        format!("elements nested deeper than {MAX_DEPTH}"),
                    ));
                }
                let local = c.local_name().into_inner();
                if local != "extension" || self.element_ns(c.name()) != Ns::Fhir {
                    return Err(structure(
                        &format!("{path}.{local}"),
                        format!(
                            "unknown element '{local}' in a primitive (only 'extension' is allowed)"
                        ),
                    ));
                }
                let p = format!("{path}.extension[{}]", extensions.len());
                extensions.push(self.complex(&c, c_empty, ext_td, &p, depth + 1)?);
            }
            if !extensions.is_empty() {
                ext.insert("extension", Json::Array(extensions));
            }
        }
        if value.is_none() && ext.is_empty() {
            return Err(structure(
                path,
                "a primitive element needs a value attribute, an id or extensions",
            ));
        }
        Ok((value, (!ext.is_empty()).then_some(ext)))
    }

    /// `<contained>`, `<resource>` …: a wrapper holding exactly one resource element.
    fn wrapped_resource(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        path: &str,
        depth: usize,
    ) -> Result<Json, FhirError> {
        self.no_attributes(e, path)?;
        if empty {
            return Err(structure(path, "expected a resource inside this element"));
        }
        let mut found = None;
        loop {
            let (inner, inner_empty) = match self.next()? {
                Event::Start(c) => (c, false),
                Event::Empty(c) => (c, true),
                Event::End(_) => break,
                Event::Comment(_) | Event::PI(_) => continue,
                Event::Text(t) if is_xml_whitespace(&t) => continue,
                Event::Text(_) | Event::CData(_) | Event::GeneralRef(_) => {
                    return Err(structure(path, "text content is not allowed here"));
                }
                Event::Eof => {
                    return Err(self.xml_error(
                        self.src.len(),
                        format!("unexpected end of document inside {path}"),
                    ));
                }
                Event::Decl(_) | Event::DocType(_) => {
                    return Err(self.xml_error(self.event_start, "misplaced declaration"));
                }
            };
            if found.is_some() {
                return Err(structure(path, "only one resource may appear here"));
            }
            if depth + 1 > MAX_DEPTH {
                return Err(self.xml_error(
                    self.event_start,
                    format!("elements nested deeper than {MAX_DEPTH}"),
                ));
            }
            found = Some(self.resource(&inner, inner_empty, Some(path), depth + 1)?);
        }
        found.ok_or_else(|| structure(path, "expected a resource inside this element"))
    }

    /// `Narrative.div`: returns its XHTML serialisation.
    ///
    /// When the div declares the XHTML namespace itself and uses no prefixes (as FHIR
    /// recommends and as [`to_xml`] writes it), the source text is copied verbatim, so that JSON
    /// → XML → JSON keeps the string exactly. Otherwise a namespace-normalised copy is built.
    fn div(
        &mut self,
        e: &BytesStart<'_>,
        empty: bool,
        path: &str,
        depth: usize,
    ) -> Result<String, FhirError> {
        let start = self.event_start;
        if e.local_name().into_inner() != "div" {
            return Err(structure(
                path,
                format!("expected <div>, found <{}>", e.name().into_inner()),
            ));
        }
        let mut verbatim = e.name().prefix().is_none();
        let mut declares_xhtml = false;
        let mut copy = String::from("<div xmlns=\"");
        copy.push_str(XHTML_NS);
        copy.push('"');
        self.copy_attributes(e, &mut copy, &mut verbatim, Some(&mut declares_xhtml))?;
        verbatim &= declares_xhtml;
        if empty {
            copy.push_str("/>");
        } else {
            copy.push('>');
            let mut level = 0usize;
            loop {
                match self.next()? {
                    Event::Start(c) => {
                        level += 1;
                        if depth + level > MAX_DEPTH {
                            return Err(self.xml_error(
                                self.event_start,
                                format!("elements nested deeper than {MAX_DEPTH}"),
                            ));
                        }
                        verbatim &= c.name().prefix().is_none();
                        copy.push('<');
                        copy.push_str(c.local_name().into_inner());
                        self.copy_attributes(&c, &mut copy, &mut verbatim, None)?;
                        copy.push('>');
                    }
                    Event::Empty(c) => {
                        verbatim &= c.name().prefix().is_none();
                        copy.push('<');
                        copy.push_str(c.local_name().into_inner());
                        self.copy_attributes(&c, &mut copy, &mut verbatim, None)?;
                        copy.push_str("/>");
                    }
                    Event::End(c) => {
                        copy.push_str("</");
                        copy.push_str(c.local_name().into_inner());
                        copy.push('>');
                        if level == 0 {
                            break;
                        }
                        level -= 1;
                    }
                    Event::Text(t) => copy.push_str(&t.into_inner()),
                    Event::CData(c) => {
                        copy.push_str("<![CDATA[");
                        copy.push_str(&c.into_inner());
                        copy.push_str("]]>");
                    }
                    Event::GeneralRef(r) => {
                        if !is_known_reference(&r) {
                            let name = &*r;
                            return Err(self.xml_error(
                                self.event_start,
                                format!(
                                    "undefined entity '&{name};' (XHTML in FHIR may only use the XML entities and character references)"
                                ),
                            ));
                        }
                        copy.push('&');
                        copy.push_str(&r);
                        copy.push(';');
                    }
                    Event::Comment(_) | Event::PI(_) => {}
                    Event::Eof => {
                        return Err(self.xml_error(
                            self.src.len(),
                            "unexpected end of document inside Narrative.div",
                        ));
                    }
                    Event::Decl(_) | Event::DocType(_) => {
                        return Err(self.xml_error(self.event_start, "misplaced declaration"));
                    }
                }
            }
        }
        let end = usize::try_from(self.reader.buffer_position()).unwrap_or(usize::MAX);
        match self.src.get(start..end) {
            Some(raw) if verbatim => Ok(raw.to_string()),
            _ => Ok(copy),
        }
    }

    /// Appends an XHTML element's attributes (without namespace declarations) to `out`, and
    /// clears `verbatim` when an attribute relies on a prefix declared outside the div.
    fn copy_attributes(
        &self,
        e: &BytesStart<'_>,
        out: &mut String,
        verbatim: &mut bool,
        mut declares_xhtml: Option<&mut bool>,
    ) -> Result<(), FhirError> {
        for a in e.attributes() {
            let a = a.map_err(|err| self.xml_error(self.event_start, err))?;
            if let Some(binding) = a.key.as_namespace_binding() {
                if let Some(flag) = declares_xhtml.as_deref_mut()
                    && binding == quick_xml::name::PrefixDeclaration::Default
                    && a.value == XHTML_NS
                {
                    *flag = true;
                }
                continue;
            }
            if a.key.prefix().is_some_and(|p| p.into_inner() != "xml") {
                *verbatim = false;
            }
            out.push(' ');
            out.push_str(a.key.into_inner());
            out.push_str("=\"");
            // Raw values keep their references; only a quote needs escaping when the source
            // used single quotes.
            out.push_str(&a.value.replace('"', "&quot;"));
            out.push('"');
        }
        Ok(())
    }
}

/// Turns the collected slots into JSON members: `name` then `_name` for primitives.
fn build_members(slots: Vec<Slot>) -> Vec<(String, Json)> {
    let mut out = Vec::with_capacity(slots.len());
    for slot in slots {
        if slot.primitive {
            let has_values = slot.values.iter().any(Option::is_some);
            let has_exts = slot.exts.iter().any(Option::is_some);
            let under = format!("_{}", slot.key);
            if slot.array {
                if has_values {
                    let values = slot
                        .values
                        .into_iter()
                        .map(|v| v.unwrap_or(Json::Null))
                        .collect();
                    out.push((slot.key.clone(), Json::Array(values)));
                }
                if has_exts {
                    let exts = slot
                        .exts
                        .into_iter()
                        .map(|x| x.map_or(Json::Null, Json::Object))
                        .collect();
                    out.push((under, Json::Array(exts)));
                }
            } else {
                if let Some(Some(v)) = slot.values.into_iter().next() {
                    out.push((slot.key.clone(), v));
                }
                if let Some(Some(x)) = slot.exts.into_iter().next() {
                    out.push((under, Json::Object(x)));
                }
            }
        } else {
            let mut values = slot.values.into_iter().flatten();
            if slot.array {
                out.push((slot.key, Json::Array(values.collect())));
            } else if let Some(v) = values.next() {
                out.push((slot.key, v));
            }
        }
    }
    out
}

struct Writer {
    out: String,
    pretty: bool,
    schema: &'static Schema,
}

fn escape_attr(out: &mut String, s: &str, path: &str) -> Result<(), FhirError> {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            // Character references, because attribute-value normalisation would turn the
            // literal characters into spaces.
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                return Err(bad_value(
                    path,
                    format!("character U+{:04X} cannot be represented in XML", c as u32),
                ));
            }
            c => out.push(c),
        }
    }
    Ok(())
}

impl Writer {
    fn newline(&mut self, level: usize) {
        if self.pretty {
            self.out.push('\n');
            for _ in 0..level {
                self.out.push_str("  ");
            }
        }
    }

    /// Writes `<name` … `>` children `</name>`, or `/>` when `children` wrote nothing. The
    /// start tag must already be open (`<name` plus attributes).
    fn close(
        &mut self,
        name: &str,
        level: usize,
        children: impl FnOnce(&mut Writer) -> Result<(), FhirError>,
    ) -> Result<(), FhirError> {
        self.out.push('>');
        let mark = self.out.len();
        children(self)?;
        if self.out.len() == mark {
            self.out.pop();
            self.out.push_str("/>");
        } else {
            self.newline(level);
            self.out.push_str("</");
            self.out.push_str(name);
            self.out.push('>');
        }
        Ok(())
    }

    /// A resource element. `path` is `None` for the root (which declares the namespace) and
    /// the wrapper's path for a nested resource.
    fn resource(&mut self, m: &Map, path: Option<&str>, level: usize) -> Result<(), FhirError> {
        let here = path.unwrap_or("");
        let rt = match m.get("resourceType") {
            Some(Json::String(s)) => s.as_str(),
            Some(_) => {
                return Err(structure(here, "'resourceType' must be a string"));
            }
            None if path.is_none() => {
                return Err(FhirError::NotAResource("missing 'resourceType'".into()));
            }
            None => return Err(structure(here, "missing 'resourceType'")),
        };
        if !self.schema.is_resource_type(rt) {
            return Err(match path {
                None => FhirError::UnknownResourceType(rt.to_string()),
                Some(p) => structure(p, format!("unknown resource type '{rt}'")),
            });
        }
        let td = self
            .schema
            .type_def(rt)
            .ok_or_else(|| structure(here, format!("no definition for '{rt}'")))?;
        let here = path.map_or_else(|| rt.to_string(), str::to_string);
        self.newline(level);
        self.out.push('<');
        self.out.push_str(rt);
        if path.is_none() {
            self.out.push_str(" xmlns=\"");
            self.out.push_str(FHIR_NS);
            self.out.push('"');
        }
        self.close(rt, level, |w| w.members(m, td, &here, level + 1, true))
    }

    /// Writes the child elements of an object in the order of its definition.
    fn members(
        &mut self,
        m: &Map,
        td: &'static TypeDef,
        path: &str,
        level: usize,
        is_resource: bool,
    ) -> Result<(), FhirError> {
        // Every member must have an XML form; refusing beats silently dropping data. Members
        // are then written in the order of the definition, which XML requires.
        let mut order: Vec<(usize, usize, &str, &ElementDef, &str)> = Vec::with_capacity(m.len());
        for (k, _) in m.iter() {
            if is_resource && k == "resourceType" {
                continue;
            }
            let (base, under) = match k.strip_prefix('_') {
                Some(b) => (b, true),
                None => (k, false),
            };
            let Some((el, ty)) = td.resolve_json_name(base) else {
                return Err(structure(
                    &format!("{path}.{k}"),
                    format!("unknown element '{k}' in {}", td.name),
                ));
            };
            if under && (el.xml_attr || !self.schema.is_primitive(ty)) {
                return Err(structure(
                    &format!("{path}.{k}"),
                    format!("'{k}' is not allowed: '{base}' is not a primitive element"),
                ));
            }
            // Attributes are written with the start tag; `_name` goes with `name`.
            if el.xml_attr || (under && m.contains_key(base)) {
                continue;
            }
            let ei = td
                .elements
                .iter()
                .position(|e| std::ptr::eq(e, el))
                .unwrap_or(usize::MAX);
            let ti = el.types.iter().position(|t| t == ty).unwrap_or(0);
            order.push((ei, ti, base, el, ty));
        }
        order.sort_unstable_by_key(|&(ei, ti, ..)| (ei, ti));
        for (_, _, name, el, ty) in order {
            let value = m.get(name);
            let under = m.get(&format!("_{name}"));
            let p = format!("{path}.{name}");
            if ty == "xhtml" {
                if under.is_some() {
                    return Err(structure(
                        &p,
                        "extensions on Narrative.div cannot be represented in XML",
                    ));
                }
                match value {
                    Some(Json::String(s)) => self.div(s, &p, level)?,
                    Some(other) => {
                        return Err(structure(
                            &p,
                            format!("expected a string, found {}", other.kind()),
                        ));
                    }
                    None => {}
                }
            } else if self.schema.is_primitive(ty) {
                if el.is_array() {
                    let values = array_of(value, &p)?;
                    let unders = array_of(under, &format!("{path}._{name}"))?;
                    for i in 0..values.len().max(unders.len()) {
                        let v = values.get(i).filter(|v| !matches!(v, Json::Null));
                        let u = unders.get(i).filter(|u| !matches!(u, Json::Null));
                        self.primitive(name, v, u, &format!("{p}[{i}]"), level)?;
                    }
                } else {
                    let v = value.filter(|v| !matches!(v, Json::Null));
                    let u = under.filter(|u| !matches!(u, Json::Null));
                    self.primitive(name, v, u, &p, level)?;
                }
            } else if let Some(value) = value {
                if under.is_some() {
                    return Err(structure(
                        &format!("{path}._{name}"),
                        format!("'_{name}' is not allowed: '{name}' is not a primitive"),
                    ));
                }
                if el.is_array() {
                    let items = array_of(Some(value), &p)?;
                    for (i, item) in items.iter().enumerate() {
                        self.complex_or_resource(name, ty, item, &format!("{p}[{i}]"), level)?;
                    }
                } else if let Json::Array(_) = value {
                    return Err(structure(&p, "expected a single value, found an array"));
                } else {
                    self.complex_or_resource(name, ty, value, &p, level)?;
                }
            }
        }
        Ok(())
    }

    fn complex_or_resource(
        &mut self,
        name: &str,
        ty: &str,
        value: &Json,
        path: &str,
        level: usize,
    ) -> Result<(), FhirError> {
        let Json::Object(m) = value else {
            return Err(structure(
                path,
                format!("expected an object, found {}", value.kind()),
            ));
        };
        self.newline(level);
        self.out.push('<');
        self.out.push_str(name);
        if ty == "Resource" {
            return self.close(name, level, |w| w.resource(m, Some(path), level + 1));
        }
        let td = self
            .schema
            .type_def(ty)
            .ok_or_else(|| structure(path, format!("no definition for type '{ty}'")))?;
        for el in td.elements.iter().filter(|el| el.xml_attr) {
            match m.get(&el.name) {
                Some(Json::String(s)) => {
                    self.out.push(' ');
                    self.out.push_str(&el.name);
                    self.out.push_str("=\"");
                    escape_attr(&mut self.out, s, &format!("{path}.{}", el.name))?;
                    self.out.push('"');
                }
                Some(other) => {
                    return Err(structure(
                        &format!("{path}.{}", el.name),
                        format!("expected a string, found {}", other.kind()),
                    ));
                }
                None => {}
            }
        }
        self.close(name, level, |w| w.members(m, td, path, level + 1, false))
    }

    /// `<name id=".." value="..">` plus the `extension` children from `_name`.
    fn primitive(
        &mut self,
        name: &str,
        value: Option<&Json>,
        under: Option<&Json>,
        path: &str,
        level: usize,
    ) -> Result<(), FhirError> {
        let mut id = None;
        let mut extensions: &[Json] = &[];
        match under {
            None => {}
            Some(Json::Object(u)) => {
                for (k, v) in u.iter() {
                    match (k, v) {
                        ("id", Json::String(s)) => id = Some(s.as_str()),
                        ("extension", Json::Array(items)) => extensions = items,
                        _ => {
                            return Err(structure(
                                &format!("{path}.{k}"),
                                format!(
                                    "unexpected member '{k}' ({}) in a primitive's extensions",
                                    v.kind()
                                ),
                            ));
                        }
                    }
                }
            }
            Some(other) => {
                return Err(structure(
                    path,
                    format!(
                        "expected an object for the primitive's extensions, found {}",
                        other.kind()
                    ),
                ));
            }
        }
        if value.is_none() && id.is_none() && extensions.is_empty() {
            return Ok(());
        }
        self.newline(level);
        self.out.push('<');
        self.out.push_str(name);
        if let Some(id) = id {
            self.out.push_str(" id=\"");
            escape_attr(&mut self.out, id, path)?;
            self.out.push('"');
        }
        match value {
            None => {}
            Some(Json::String(s)) => {
                self.out.push_str(" value=\"");
                escape_attr(&mut self.out, s, path)?;
                self.out.push('"');
            }
            Some(Json::Number(n)) => {
                self.out.push_str(" value=\"");
                // Parsed numbers need no escaping, but a tree built in code could hold anything.
                escape_attr(&mut self.out, n, path)?;
                self.out.push('"');
            }
            Some(Json::Bool(b)) => {
                self.out.push_str(if *b {
                    " value=\"true\""
                } else {
                    " value=\"false\""
                });
            }
            Some(other) => {
                return Err(structure(
                    path,
                    format!("expected a primitive value, found {}", other.kind()),
                ));
            }
        }
        self.close(name, level, |w| {
            for (i, x) in extensions.iter().enumerate() {
                let p = format!("{path}.extension[{i}]");
                w.complex_or_resource("extension", "Extension", x, &p, level + 1)?;
            }
            Ok(())
        })
    }

    /// Writes the div's XHTML as it is, after checking it is one well-formed `<div>` element
    /// (so a bad string cannot break the document) and declaring the XHTML namespace if the
    /// string forgot to.
    fn div(&mut self, s: &str, path: &str, level: usize) -> Result<(), FhirError> {
        let needs_ns = check_div(s).map_err(|msg| structure(path, msg))?;
        self.newline(level);
        match (needs_ns, s.strip_prefix("<div")) {
            (true, Some(rest)) => {
                self.out.push_str("<div xmlns=\"");
                self.out.push_str(XHTML_NS);
                self.out.push('"');
                self.out.push_str(rest);
            }
            _ => self.out.push_str(s),
        }
        Ok(())
    }
}

fn array_of<'j>(v: Option<&'j Json>, path: &str) -> Result<&'j [Json], FhirError> {
    match v {
        None => Ok(&[]),
        Some(Json::Array(items)) => Ok(items),
        Some(other) => Err(structure(
            path,
            format!("expected an array, found {}", other.kind()),
        )),
    }
}

/// Checks that `s` is a single well-formed `<div>` element in the XHTML namespace. Returns
/// whether the start tag lacks the namespace declaration.
fn check_div(s: &str) -> Result<bool, String> {
    const SINGLE: &str = "Narrative.div must be a single <div> element";
    if !s.starts_with("<div") {
        return Err(SINGLE.into());
    }
    let mut reader = quick_xml::Reader::from_str(s);
    reader.config_mut().check_end_names = true;
    let mut level = 0usize;
    let mut needs_ns = false;
    let mut done = false;
    loop {
        let ev = reader
            .read_event()
            .map_err(|e| format!("Narrative.div is not well-formed XHTML: {e}"))?;
        let is_start = matches!(ev, Event::Start(_));
        match ev {
            Event::Eof => break,
            Event::Text(t) if level == 0 && is_xml_whitespace(&t) => {}
            _ if done || (level == 0 && !matches!(ev, Event::Start(_) | Event::Empty(_))) => {
                return Err(SINGLE.into());
            }
            Event::Start(e) | Event::Empty(e) => {
                if level == 0 {
                    if e.name().into_inner() != "div" {
                        return Err(SINGLE.into());
                    }
                    needs_ns = true;
                    for a in e.attributes() {
                        let a =
                            a.map_err(|e| format!("Narrative.div is not well-formed XHTML: {e}"))?;
                        if a.key.into_inner() == "xmlns" {
                            if a.value != XHTML_NS {
                                return Err(format!(
                                    "Narrative.div must be in the namespace {XHTML_NS}"
                                ));
                            }
                            needs_ns = false;
                        }
                    }
                }
                if is_start {
                    level += 1;
                } else if level == 0 {
                    done = true;
                }
            }
            Event::End(_) => {
                level = level.saturating_sub(1);
                done = level == 0;
            }
            Event::GeneralRef(r) => {
                if !is_known_reference(&r) {
                    return Err(format!(
                        "Narrative.div uses an undefined entity '&{};'",
                        &*r
                    ));
                }
            }
            Event::Text(_) | Event::CData(_) | Event::Comment(_) => {}
            Event::Decl(_) | Event::DocType(_) | Event::PI(_) => {
                return Err("Narrative.div must not contain declarations".into());
            }
        }
    }
    if !done {
        return Err("Narrative.div must be a single complete <div> element".into());
    }
    Ok(needs_ns)
}
