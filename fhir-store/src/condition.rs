//! Conditions of conditional create, update and delete (`If-None-Exist`, `PUT Type?…`,
//! `DELETE Type?…`).
//!
//! Only `_id` and `identifier` are supported for now; the full search criteria come with the
//! search crate. Both are answered from keys the store maintains in every commit (current
//! pointers and the identifier index), so a conditional write is a few key lookups.

use std::collections::BTreeSet;

use fhir_core::search_escape::{split_unescaped, unescape};
use fhir_core::{ResourceId, ResourceType, TenantId};

use crate::error::StoreError;
use crate::keys::{self, IndexedIdentifier, SystemSel};
use crate::view::Source;

/// Search criteria for a conditional operation: parameters are AND-ed, the comma-separated
/// values of one parameter are OR-ed.
///
/// ```
/// use fhir_store::Condition;
/// let c = Condition::parse("identifier=urn%3Aoid%3A2.16.578.1.12.4.1.4.1%7C12345678901").unwrap();
/// assert_eq!(c, Condition::identifier(Some("urn:oid:2.16.578.1.12.4.1.4.1"), "12345678901"));
/// assert!(Condition::parse("name=Ola").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    criteria: Vec<Criterion>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Criterion {
    /// `_id=a,b`
    Id(Vec<ResourceId>),
    /// `identifier=s|v,|v,v`
    Identifier(Vec<Token>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Token {
    system: TokenSystem,
    value: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenSystem {
    /// `value`: any system or none.
    Any,
    /// `|value`: no system.
    Absent,
    /// `system|value`.
    Is(String),
}

fn invalid(msg: impl Into<String>) -> StoreError {
    StoreError::InvalidCondition(msg.into())
}

fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

impl Condition {
    /// Parses the URL query form (`a=b&c=d`, percent-encoded; a leading `?` is allowed).
    ///
    /// Supported: `_id=<id>[,<id>…]` and `identifier=<token>[,<token>…]` with tokens
    /// `system|value`, `value` (any system) and `|value` (no system); `\,` `\|` `\\` escape.
    /// Anything else is [`StoreError::InvalidCondition`].
    pub fn parse(query: &str) -> Result<Condition, StoreError> {
        let query = query.strip_prefix('?').unwrap_or(query);
        let mut criteria = Vec::new();
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if name.is_empty() {
                return Err(invalid(format!(
                    "parameter without a name in '{}'",
                    shorten(query)
                )));
            }
            if let Some((base, modifier)) = name.split_once(':') {
                return Err(invalid(format!(
                    "the modifier ':{}' on '{}' is not supported in conditional operations \
                     yet (only _id and identifier without modifiers are)",
                    shorten(modifier),
                    shorten(base)
                )));
            }
            let values = split_unescaped(&value, ',');
            if values.iter().all(|v| v.is_empty()) {
                return Err(invalid(format!(
                    "parameter '{}' has no value",
                    shorten(&name)
                )));
            }
            match name.as_ref() {
                "_id" => {
                    let mut ids = Vec::new();
                    for v in values {
                        let v = unescape(&v);
                        let id = ResourceId::new(&v).map_err(|e| invalid(format!("_id: {e}")))?;
                        ids.push(id);
                    }
                    criteria.push(Criterion::Id(ids));
                }
                "identifier" => {
                    let mut tokens = Vec::new();
                    for v in values {
                        tokens.push(parse_token(&v)?);
                    }
                    criteria.push(Criterion::Identifier(tokens));
                }
                other => {
                    return Err(invalid(format!(
                        "the search parameter '{}' is not supported in conditional operations \
                         yet (only _id and identifier are)",
                        shorten(other)
                    )));
                }
            }
        }
        if criteria.is_empty() {
            return Err(invalid("a condition needs at least one search parameter"));
        }
        Ok(Condition { criteria })
    }

    /// Matches resources that have an identifier with `value` and, if given, `system`
    /// (`None`: any system).
    pub fn identifier(system: Option<&str>, value: &str) -> Condition {
        let system = match system {
            Some(s) => TokenSystem::Is(s.to_string()),
            None => TokenSystem::Any,
        };
        Condition {
            criteria: vec![Criterion::Identifier(vec![Token {
                system,
                value: value.to_string(),
            }])],
        }
    }

    /// Matches the resource with this id.
    pub fn id(id: &ResourceId) -> Condition {
        Condition {
            criteria: vec![Criterion::Id(vec![id.clone()])],
        }
    }

    /// Both this condition and `other` (AND).
    pub fn and(mut self, other: Condition) -> Condition {
        self.criteria.extend(other.criteria);
        self
    }
}

impl Condition {
    /// Whether resource `id` with these indexed identifiers matches (for resources that are not
    /// written yet, e.g. the other entries of a transaction).
    pub(crate) fn matches(
        &self,
        id: Option<&ResourceId>,
        identifiers: &[IndexedIdentifier],
    ) -> bool {
        self.criteria.iter().all(|c| match c {
            Criterion::Id(ids) => id.is_some_and(|id| ids.contains(id)),
            Criterion::Identifier(tokens) => tokens.iter().any(|t| {
                identifiers.iter().any(|i| {
                    i.value == t.value
                        && match &t.system {
                            TokenSystem::Any => true,
                            TokenSystem::Absent => i.system.is_none(),
                            TokenSystem::Is(s) => i.system.as_deref() == Some(s.as_str()),
                        }
                })
            }),
        })
    }
}

fn parse_token(raw: &str) -> Result<Token, StoreError> {
    let parts = split_unescaped(raw, '|');
    let (system, value) = match parts.as_slice() {
        [value] => (TokenSystem::Any, unescape(value)),
        [system, value] if system.is_empty() => (TokenSystem::Absent, unescape(value)),
        [system, value] => (TokenSystem::Is(unescape(system)), unescape(value)),
        _ => {
            return Err(invalid(format!(
                "identifier '{}' has more than one unescaped '|'",
                shorten(raw)
            )));
        }
    };
    if value.is_empty() {
        return Err(invalid(format!(
            "identifier '{}' has no value; 'system|' (any value in a system) is not supported \
             in conditional operations yet",
            shorten(raw)
        )));
    }
    Ok(Token { system, value })
}

/// The current, non-deleted resources of type `ty` that match `cond`, sorted by id.
pub(crate) fn find(
    src: &dyn Source,
    t: &TenantId,
    ty: ResourceType,
    cond: &Condition,
) -> Result<Vec<ResourceId>, StoreError> {
    let mut result: Option<BTreeSet<ResourceId>> = None;
    for criterion in &cond.criteria {
        let matches = match criterion {
            Criterion::Id(ids) => {
                let mut set = BTreeSet::new();
                for id in ids {
                    if let Some(p) = src.pointer(t, ty, id)?
                        && !p.deleted
                    {
                        set.insert(id.clone());
                    }
                }
                set
            }
            Criterion::Identifier(tokens) => {
                let mut set = BTreeSet::new();
                for token in tokens {
                    let sel = match &token.system {
                        TokenSystem::Any => SystemSel::Any,
                        TokenSystem::Absent => SystemSel::Absent,
                        TokenSystem::Is(s) => SystemSel::Is(s),
                    };
                    let prefix = keys::identifier_prefix(t, ty, &token.value, sel);
                    for (_, v) in src.scan_prefix(&prefix, usize::MAX)? {
                        set.insert(keys::decode_index_id(&v)?);
                    }
                }
                set
            }
        };
        result = Some(match result {
            None => matches,
            Some(prev) => prev.intersection(&matches).cloned().collect(),
        });
        if result.as_ref().is_some_and(BTreeSet::is_empty) {
            break;
        }
    }
    Ok(result.unwrap_or_default().into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_supported_forms() {
        let c =
            Condition::parse("identifier=urn%3Aoid%3A2.16.578.1.12.4.1.4.1%7C12345678901&_id=abc")
                .unwrap();
        assert_eq!(
            c,
            Condition::identifier(Some("urn:oid:2.16.578.1.12.4.1.4.1"), "12345678901")
                .and(Condition::id(&ResourceId::new("abc").unwrap()))
        );
        let c = Condition::parse("?identifier=|a,b,s|c\\,d").unwrap();
        assert_eq!(
            c.criteria,
            vec![Criterion::Identifier(vec![
                Token {
                    system: TokenSystem::Absent,
                    value: "a".into()
                },
                Token {
                    system: TokenSystem::Any,
                    value: "b".into()
                },
                Token {
                    system: TokenSystem::Is("s".into()),
                    value: "c,d".into()
                },
            ])]
        );
        let c = Condition::parse("identifier=a%5C%7Cb").unwrap();
        assert_eq!(c, Condition::identifier(None, "a|b"));
    }

    #[test]
    fn rejects_unsupported_forms() {
        for q in [
            "",
            "name=x",
            "identifier:exact=x",
            "identifier=sys|",
            "identifier=",
            "_id=a/b",
            "identifier=a|b|c",
            "=x",
        ] {
            let err = Condition::parse(q).unwrap_err();
            assert!(matches!(err, StoreError::InvalidCondition(_)), "{q}: {err}");
        }
        let msg = Condition::parse("birthdate=2000").unwrap_err().to_string();
        assert!(msg.contains("not supported"), "{msg}");
    }
}
