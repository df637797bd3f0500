//! JSON Patch (RFC 6902) over [`Json`] trees, and patching FHIR resources with it.
//!
//! A patch is applied to a copy, so a failing operation leaves the document as it was (RFC 6902
//! §5: the whole patch fails). Pointers follow RFC 6901 (`~0` is `~`, `~1` is `/`; `-` appends
//! to an array in `add`). Numbers are compared numerically by `test` (`72.50` equals `72.5`),
//! as RFC 6902 §4.6 asks, while the patched document keeps every decimal's text.
//!
//! [`patch_resource`] also refuses a change of `resourceType` or `id` and validates the result
//! against the R4 definitions, so a patch can never store what a create could not.
//!
//! ```
//! use fhir_core::{json, patch};
//! let doc = json::parse(br#"{"resourceType":"Observation","id":"o1","status":"preliminary",
//!     "code":{"text":"pulse"}}"#).unwrap();
//! let ops = json::parse(br#"[{"op":"test","path":"/status","value":"preliminary"},
//!     {"op":"replace","path":"/status","value":"final"}]"#).unwrap();
//! let r = patch::patch_resource(&doc, &ops).unwrap();
//! assert_eq!(r.json().get("status").and_then(|s| s.as_str()), Some("final"));
//! ```

use crate::error::FhirError;
use crate::json::Json;
use crate::outcome::{Issue, IssueType};
use crate::resource::Resource;

/// Why a patch could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatchError {
    /// The patch document is not an array of operation objects.
    #[error("a JSON Patch must be an array of operations: {0}")]
    NotAPatch(String),
    /// Operation `index` is malformed (unknown `op`, missing `path`/`value`/`from`, bad pointer).
    #[error("JSON Patch operation {index} ({op}) is malformed: {message}")]
    Malformed {
        /// Position of the operation in the patch (0-based).
        index: usize,
        /// Its `op`, as given.
        op: String,
        /// What is wrong.
        message: String,
    },
    /// Operation `index` cannot be applied to this document (e.g. its path does not exist).
    #[error("JSON Patch operation {index} ({op}) failed: {message}")]
    Failed {
        /// Position of the operation in the patch (0-based).
        index: usize,
        /// Its `op`.
        op: String,
        /// What went wrong.
        message: String,
    },
    /// A `test` operation found a different value.
    #[error("JSON Patch operation {index} (test) failed: the value at '{path}' differs")]
    TestFailed {
        /// Position of the operation in the patch (0-based).
        index: usize,
        /// The tested pointer.
        path: String,
    },
    /// The patch would change `resourceType` or `id`.
    #[error("a patch must not change the resource's {0}")]
    ChangesIdentity(&'static str),
    /// The patched resource is not valid FHIR.
    #[error("the patched resource is invalid: {}", .0.first().map(|i| i.diagnostics.as_str()).unwrap_or("invalid"))]
    InvalidResult(Vec<Issue>),
}

impl PatchError {
    /// Whether the patch itself is wrong (as opposed to not applying to this resource): an
    /// HTTP server answers 400 for these and 422 for the others.
    pub fn is_malformed(&self) -> bool {
        matches!(
            self,
            PatchError::NotAPatch(_) | PatchError::Malformed { .. }
        )
    }

    /// The issues to report in an OperationOutcome.
    pub fn issues(&self) -> Vec<Issue> {
        match self {
            PatchError::InvalidResult(issues) => issues.clone(),
            PatchError::TestFailed { .. } => {
                vec![Issue::error(IssueType::Conflict, self.to_string())]
            }
            PatchError::Failed { .. } => vec![Issue::error(IssueType::Invalid, self.to_string())],
            PatchError::ChangesIdentity(_) => {
                vec![Issue::error(IssueType::Invalid, self.to_string())]
            }
            PatchError::NotAPatch(_) | PatchError::Malformed { .. } => {
                vec![Issue::error(IssueType::Structure, self.to_string())]
            }
        }
    }
}

/// One step of a JSON pointer, unescaped.
fn parse_pointer(p: &str) -> Result<Vec<String>, String> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("the pointer '{}' must start with '/'", shorten(p)));
    };
    rest.split('/')
        .map(|t| {
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => {
                            return Err(format!(
                                "the pointer '{}' has a '~' not followed by 0 or 1",
                                shorten(p)
                            ));
                        }
                    }
                } else {
                    out.push(c);
                }
            }
            Ok(out)
        })
        .collect()
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(100).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// An array index token: digits without leading zeros (RFC 6901 §4).
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || (token.len() > 1 && token.starts_with('0')) {
        return None;
    }
    if !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
}

fn get<'a>(doc: &'a Json, tokens: &[String]) -> Result<&'a Json, String> {
    let mut cur = doc;
    for (depth, t) in tokens.iter().enumerate() {
        cur = match cur {
            Json::Object(m) => m.get(t),
            Json::Array(a) => array_index(t).and_then(|i| a.get(i)),
            _ => None,
        }
        .ok_or_else(|| format!("'{}' does not exist", display_pointer(&tokens[..=depth])))?;
    }
    Ok(cur)
}

fn get_mut<'a>(doc: &'a mut Json, tokens: &[String]) -> Result<&'a mut Json, String> {
    let mut cur = doc;
    for (depth, t) in tokens.iter().enumerate() {
        cur = match cur {
            Json::Object(m) => m.get_mut(t),
            Json::Array(a) => array_index(t).and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("'{}' does not exist", display_pointer(&tokens[..=depth])))?;
    }
    Ok(cur)
}

fn display_pointer(tokens: &[String]) -> String {
    let mut s = String::new();
    for t in tokens {
        s.push('/');
        s.push_str(&t.replace('~', "~0").replace('/', "~1"));
    }
    shorten(&s)
}

fn add(doc: &mut Json, tokens: &[String], value: Json) -> Result<(), String> {
    let Some((last, parent)) = tokens.split_last() else {
        *doc = value;
        return Ok(());
    };
    match get_mut(doc, parent)? {
        Json::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Json::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                array_index(last).filter(|i| *i <= a.len()).ok_or_else(|| {
                    format!(
                        "'{}' is not an index of the array (length {})",
                        display_pointer(tokens),
                        a.len()
                    )
                })?
            };
            a.insert(i, value);
            Ok(())
        }
        other => Err(format!(
            "'{}' is a {}, not an object or array",
            display_pointer(parent),
            other.kind()
        )),
    }
}

fn remove(doc: &mut Json, tokens: &[String]) -> Result<Json, String> {
    let Some((last, parent)) = tokens.split_last() else {
        return Err("the whole document cannot be removed".into());
    };
    let missing = || format!("'{}' does not exist", display_pointer(tokens));
    match get_mut(doc, parent)? {
        Json::Object(m) => m.remove(last).ok_or_else(missing),
        Json::Array(a) => match array_index(last).filter(|i| *i < a.len()) {
            Some(i) => Ok(a.remove(i)),
            None => Err(missing()),
        },
        _ => Err(missing()),
    }
}

/// JSON equality with numbers compared by value.
fn json_eq(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            x == y || matches!((x.parse::<f64>(), y.parse::<f64>()), (Ok(x), Ok(y)) if x == y)
        }
        (Json::Array(x), Json::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Applies the JSON Patch `patch` to a copy of `doc` and returns the result. Either every
/// operation applies, or the first failing one is reported and nothing changes.
pub fn apply(doc: &Json, patch: &Json) -> Result<Json, PatchError> {
    let Json::Array(ops) = patch else {
        return Err(PatchError::NotAPatch(format!("found {}", patch.kind())));
    };
    let mut out = doc.clone();
    for (index, op) in ops.iter().enumerate() {
        apply_one(&mut out, index, op)?;
    }
    Ok(out)
}

fn apply_one(doc: &mut Json, index: usize, op: &Json) -> Result<(), PatchError> {
    let Json::Object(m) = op else {
        return Err(PatchError::Malformed {
            index,
            op: String::new(),
            message: format!("an operation must be an object, not {}", op.kind()),
        });
    };
    let name = m
        .get("op")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string();
    let malformed = |message: String| PatchError::Malformed {
        index,
        op: name.clone(),
        message,
    };
    let failed = |message: String| PatchError::Failed {
        index,
        op: name.clone(),
        message,
    };
    let pointer = |member: &str| -> Result<(String, Vec<String>), PatchError> {
        let text = m
            .get(member)
            .and_then(Json::as_str)
            .ok_or_else(|| malformed(format!("'{member}' (a JSON pointer string) is required")))?;
        let tokens = parse_pointer(text).map_err(&malformed)?;
        Ok((text.to_string(), tokens))
    };
    let value = || {
        m.get("value")
            .cloned()
            .ok_or_else(|| malformed("'value' is required".into()))
    };
    match name.as_str() {
        "add" => {
            let (_, path) = pointer("path")?;
            add(doc, &path, value()?).map_err(failed)
        }
        "remove" => {
            let (_, path) = pointer("path")?;
            remove(doc, &path).map(|_| ()).map_err(failed)
        }
        "replace" => {
            let (_, path) = pointer("path")?;
            let v = value()?;
            let slot = get_mut(doc, &path).map_err(&failed)?;
            *slot = v;
            Ok(())
        }
        "move" => {
            let (_, from) = pointer("from")?;
            let (_, path) = pointer("path")?;
            if path.len() > from.len() && path.starts_with(&from) {
                return Err(failed(
                    "a value cannot be moved into one of its own children".into(),
                ));
            }
            let v = remove(doc, &from).map_err(&failed)?;
            add(doc, &path, v).map_err(failed)
        }
        "copy" => {
            let (_, from) = pointer("from")?;
            let (_, path) = pointer("path")?;
            let v = get(doc, &from).map_err(&failed)?.clone();
            add(doc, &path, v).map_err(failed)
        }
        "test" => {
            let (text, path) = pointer("path")?;
            let expected = value()?;
            match get(doc, &path) {
                Ok(actual) if json_eq(actual, &expected) => Ok(()),
                _ => Err(PatchError::TestFailed {
                    index,
                    path: shorten(&text),
                }),
            }
        }
        "" => Err(malformed("'op' is required".into())),
        other => Err(malformed(format!(
            "unknown op '{}'; use add, remove, replace, move, copy or test",
            shorten(other)
        ))),
    }
}

/// Applies `patch` to the resource `current` (its JSON tree) and validates the result as a
/// resource. `resourceType` and `id` must stay as they are.
pub fn patch_resource(current: &Json, patch: &Json) -> Result<Resource, PatchError> {
    let patched = apply(current, patch)?;
    if patched.get("resourceType") != current.get("resourceType") {
        return Err(PatchError::ChangesIdentity("resourceType"));
    }
    if patched.get("id") != current.get("id") {
        return Err(PatchError::ChangesIdentity("id"));
    }
    Resource::from_json(patched).map_err(|e| match e {
        FhirError::Invalid(issues) => PatchError::InvalidResult(issues),
        other => PatchError::InvalidResult(other.issues()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse;

    fn run(doc: &str, patch: &str) -> Result<Json, PatchError> {
        apply(
            &parse(doc.as_bytes()).unwrap(),
            &parse(patch.as_bytes()).unwrap(),
        )
    }

    fn ok(doc: &str, patch: &str, expected: &str) {
        let got = run(doc, patch).unwrap_or_else(|e| panic!("{patch}: {e}"));
        assert_eq!(got, parse(expected.as_bytes()).unwrap(), "{patch}");
    }

    #[test]
    fn rfc6902_appendix_a_examples() {
        ok(
            r#"{"foo":"bar"}"#,
            r#"[{"op":"add","path":"/baz","value":"qux"}]"#,
            r#"{"foo":"bar","baz":"qux"}"#,
        );
        ok(
            r#"{"foo":["bar","baz"]}"#,
            r#"[{"op":"add","path":"/foo/1","value":"qux"}]"#,
            r#"{"foo":["bar","qux","baz"]}"#,
        );
        ok(
            r#"{"baz":"qux","foo":"bar"}"#,
            r#"[{"op":"remove","path":"/baz"}]"#,
            r#"{"foo":"bar"}"#,
        );
        ok(
            r#"{"foo":["bar","qux","baz"]}"#,
            r#"[{"op":"remove","path":"/foo/1"}]"#,
            r#"{"foo":["bar","baz"]}"#,
        );
        ok(
            r#"{"baz":"qux","foo":"bar"}"#,
            r#"[{"op":"replace","path":"/baz","value":"boo"}]"#,
            r#"{"baz":"boo","foo":"bar"}"#,
        );
        ok(
            r#"{"foo":{"bar":"baz","waldo":"fred"},"qux":{"corge":"grault"}}"#,
            r#"[{"op":"move","from":"/foo/waldo","path":"/qux/thud"}]"#,
            r#"{"foo":{"bar":"baz"},"qux":{"corge":"grault","thud":"fred"}}"#,
        );
        ok(
            r#"{"foo":["all","grass","cows","eat"]}"#,
            r#"[{"op":"move","from":"/foo/1","path":"/foo/3"}]"#,
            r#"{"foo":["all","cows","eat","grass"]}"#,
        );
        ok(
            r#"{"foo":["bar"]}"#,
            r#"[{"op":"add","path":"/foo/-","value":["abc","def"]}]"#,
            r#"{"foo":["bar",["abc","def"]]}"#,
        );
        ok(
            r#"{"/":1,"~":2}"#,
            r#"[{"op":"copy","from":"/~1","path":"/~0x"}]"#,
            r#"{"/":1,"~":2,"~x":1}"#,
        );
        ok(
            r#"{"a":1}"#,
            r#"[{"op":"add","path":"","value":[1]}]"#,
            r#"[1]"#,
        );
        ok(
            r#"{"n":72.50}"#,
            r#"[{"op":"test","path":"/n","value":72.5},{"op":"add","path":"/m","value":1.10}]"#,
            r#"{"n":72.50,"m":1.10}"#,
        );
    }

    #[test]
    fn errors_name_the_operation_and_change_nothing() {
        let doc = parse(br#"{"a":[1,2]}"#).unwrap();
        let patch =
            parse(br#"[{"op":"add","path":"/b","value":1},{"op":"remove","path":"/c"}]"#).unwrap();
        let e = apply(&doc, &patch).unwrap_err();
        assert!(
            matches!(&e, PatchError::Failed { index: 1, op, .. } if op == "remove"),
            "{e}"
        );
        assert!(e.to_string().contains("'/c' does not exist"), "{e}");
        assert_eq!(doc, parse(br#"{"a":[1,2]}"#).unwrap());

        for (p, index) in [
            (r#"{"op":"add"}"#, 0),
            (r#"[{"op":"jump","path":"/a"}]"#, 0),
            (
                r#"[{"op":"test","path":"/a"},{"op":"add","path":"a","value":1}]"#,
                0,
            ),
            (
                r#"[{"op":"add","path":"/x","value":1},{"op":"add","path":"/~2","value":1}]"#,
                1,
            ),
            (r#"[{"path":"/a"}]"#, 0),
        ] {
            let e = run(r#"{"a":[1,2]}"#, p).unwrap_err();
            assert!(e.is_malformed(), "{p}: {e}");
            if let PatchError::Malformed { index: i, .. } = e {
                assert_eq!(i, index, "{p}");
            }
        }
        for p in [
            r#"[{"op":"add","path":"/a/3","value":1}]"#,
            r#"[{"op":"add","path":"/a/01","value":1}]"#,
            r#"[{"op":"replace","path":"/zz","value":1}]"#,
            r#"[{"op":"move","from":"/a","path":"/a/0"}]"#,
            r#"[{"op":"add","path":"/missing/x","value":1}]"#,
        ] {
            let e = run(r#"{"a":[1,2]}"#, p).unwrap_err();
            assert!(matches!(e, PatchError::Failed { .. }), "{p}: {e}");
        }
        let e = run(
            r#"{"a":[1,2]}"#,
            r#"[{"op":"test","path":"/a","value":[2,1]}]"#,
        )
        .unwrap_err();
        assert_eq!(
            e,
            PatchError::TestFailed {
                index: 0,
                path: "/a".into()
            }
        );
    }

    #[test]
    fn resources_keep_identity_and_validity() {
        let cur = parse(br#"{"resourceType":"Patient","id":"p1","gender":"female"}"#).unwrap();
        let p = |s: &str| parse(s.as_bytes()).unwrap();
        let r = patch_resource(
            &cur,
            &p(r#"[{"op":"add","path":"/birthDate","value":"1970-01-01"}]"#),
        )
        .unwrap();
        assert_eq!(
            r.json().get("birthDate").and_then(Json::as_str),
            Some("1970-01-01")
        );
        assert_eq!(
            patch_resource(&cur, &p(r#"[{"op":"replace","path":"/id","value":"p2"}]"#))
                .unwrap_err(),
            PatchError::ChangesIdentity("id")
        );
        assert_eq!(
            patch_resource(
                &cur,
                &p(r#"[{"op":"replace","path":"/resourceType","value":"Group"}]"#)
            )
            .unwrap_err(),
            PatchError::ChangesIdentity("resourceType")
        );
        let e = patch_resource(
            &cur,
            &p(r#"[{"op":"replace","path":"/gender","value":"unknown-code"}]"#),
        )
        .unwrap_err();
        match e {
            PatchError::InvalidResult(issues) => {
                assert_eq!(issues[0].expression.as_deref(), Some("Patient.gender"));
            }
            other => panic!("{other}"),
        }
    }
}
