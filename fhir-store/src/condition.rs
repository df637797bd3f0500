//! Conditions of conditional create, update and delete (`If-None-Exist`, `PUT Type?…`,
//! `DELETE Type?…`) and of conditional references (`Patient?identifier=…`).
//!
//! The store evaluates `_id` and `identifier` itself, from keys it maintains in every commit
//! (current pointers and the identifier index), so such a conditional write is a few key
//! lookups inside the writer. Other search criteria need a search index, which the store does
//! not have (`fhir-store` knows nothing of `fhir-search`): a caller that has one searches first
//! and hands the store the result as a [`Condition::resolved`] condition — the ids that matched
//! and the versions the search saw. The writer then re-checks that result atomically with the
//! write: a match deleted since no longer matches, and a match changed since fails the
//! operation with [`StoreError::VersionConflict`] (the search's verdict may no longer hold), so
//! a conditional write never acts on a stale search.

use std::collections::{BTreeSet, HashMap};

use fhir_core::search_escape::{split_unescaped, unescape};
use fhir_core::{ResourceId, ResourceType, TenantId, VersionId};

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
    /// Criteria a search resolved before the write: what matched, in the versions the search
    /// saw. `criteria` is the normalised query ([`normalize_criteria`]), which names the
    /// criteria when entries of one Bundle are compared.
    Searched {
        criteria: String,
        matches: Vec<(ResourceId, VersionId)>,
    },
    /// Criteria still to be resolved by a search (the Bundle processor puts these in and
    /// replaces them before anything reaches the writer; the writer refuses them).
    Unresolved { criteria: String },
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
    /// Anything else is [`StoreError::InvalidCondition`]: such criteria need a search, whose
    /// result [`Condition::resolved`] hands to the store.
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
                    "the modifier ':{}' on '{}' is not supported by the store alone (only _id \
                     and identifier without modifiers are; other criteria need a search index)",
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
                        "the search parameter '{}' is not supported by the store alone (only \
                         _id and identifier are; other criteria need a search index)",
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

    /// The result of a search for `criteria` (a URL query, normalised with
    /// [`normalize_criteria`]), made before the write: the resources that matched and the
    /// version of each that the search saw. No matches means "matches nothing".
    ///
    /// The store cannot evaluate such criteria itself; it re-checks the search's result when it
    /// applies the condition, atomically with the write: a resource of `matches` that is
    /// deleted by then no longer matches, and one with another current version fails the
    /// operation with [`StoreError::VersionConflict`] (it may no longer match). A resource
    /// created after the search that would match is not seen; callers serialise conditional
    /// operations on the same criteria to exclude that among themselves (as
    /// `fhir_search::SearchIndex` does).
    ///
    /// ```
    /// use fhir_core::{ResourceId, VersionId};
    /// use fhir_store::Condition;
    /// let id = ResourceId::new("p1").unwrap();
    /// let c = Condition::resolved("name=Ola&birthdate=1970-01-01", [(id, VersionId(1))]);
    /// assert_eq!(c.searched_criteria(), Some("birthdate=1970-01-01&name=Ola"));
    /// ```
    pub fn resolved(
        criteria: &str,
        matches: impl IntoIterator<Item = (ResourceId, VersionId)>,
    ) -> Condition {
        let mut matches: Vec<(ResourceId, VersionId)> = matches.into_iter().collect();
        matches.sort();
        matches.dedup();
        Condition {
            criteria: vec![Criterion::Searched {
                criteria: normalize_criteria(criteria),
                matches,
            }],
        }
    }

    /// Criteria that only a search can resolve; the Bundle processor replaces it with
    /// [`Condition::resolved`] before the write.
    pub(crate) fn unresolved(criteria: &str) -> Condition {
        Condition {
            criteria: vec![Criterion::Unresolved {
                criteria: normalize_criteria(criteria),
            }],
        }
    }

    /// The normalised criteria of a condition made by [`Condition::resolved`] (`None` for
    /// conditions the store evaluates itself).
    pub fn searched_criteria(&self) -> Option<&str> {
        match self.criteria.as_slice() {
            [Criterion::Searched { criteria, .. }] => Some(criteria),
            _ => None,
        }
    }

    /// The criteria of a condition made by [`Condition::unresolved`].
    pub(crate) fn unresolved_criteria(&self) -> Option<&str> {
        match self.criteria.as_slice() {
            [Criterion::Unresolved { criteria }] => Some(criteria),
            _ => None,
        }
    }

    /// Counts `id` (at `version`) as a match of resolved criteria too: a resource created for
    /// the same criteria by an earlier entry of the same batch, which the search could not see.
    pub(crate) fn add_match(&mut self, id: &ResourceId, version: VersionId) {
        for c in &mut self.criteria {
            if let Criterion::Searched { matches, .. } = c
                && !matches.iter().any(|(m, _)| m == id)
            {
                matches.push((id.clone(), version));
                matches.sort();
            }
        }
    }
}

/// A URL query as a key for comparing criteria: `_format`/`_pretty` dropped, the parameters
/// sorted, encoded canonically. `b=2&a=1` and `a=1&b=%32` give the same key; the key parses
/// to the same parameters as the query (repeated parameters are AND-ed, so their order does
/// not matter).
///
/// ```
/// use fhir_store::normalize_criteria;
/// assert_eq!(normalize_criteria("?name=Ola&birthdate=1970"), normalize_criteria("birthdate=1970&name=Ola"));
/// ```
pub fn normalize_criteria(query: &str) -> String {
    let query = query.strip_prefix('?').unwrap_or(query);
    let mut params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .filter(|(k, _)| !matches!(k.as_str(), "_format" | "_pretty"))
        .collect();
    params.sort();
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

/// Conditional references (`Patient?name=Ola&birthdate=1970-01-01`) whose criteria a search
/// resolved before a transaction or batch, by the reference as written. The writer resolves a
/// conditional reference found here with its [`Condition::resolved`] condition (plus, in a
/// transaction, the entries whose own `ifNoneExist` or conditional-update criteria are the
/// same), and any other with [`Condition::parse`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvedReferences {
    map: HashMap<String, Condition>,
}

impl ResolvedReferences {
    /// None yet.
    pub fn new() -> ResolvedReferences {
        ResolvedReferences::default()
    }

    /// Resolves `reference` (as written, e.g. `Patient?name=Ola`) with `cond`.
    pub fn insert(&mut self, reference: impl Into<String>, cond: Condition) {
        self.map.insert(reference.into(), cond);
    }

    /// The condition for `reference`, if there is one.
    pub fn get(&self, reference: &str) -> Option<&Condition> {
        self.map.get(reference)
    }

    /// How many references there are.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// [`Condition::add_match`] on every condition with these criteria.
    pub(crate) fn add_match(&mut self, criteria: &str, id: &ResourceId, version: VersionId) {
        for c in self.map.values_mut() {
            if c.searched_criteria() == Some(criteria) {
                c.add_match(id, version);
            }
        }
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
            // A resource that is not written yet was not there for the search to see.
            Criterion::Searched { .. } | Criterion::Unresolved { .. } => false,
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
             by the store alone (it needs a search index)",
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
            Criterion::Searched { matches, .. } => {
                let mut set = BTreeSet::new();
                for (id, seen) in matches {
                    match src.pointer(t, ty, id)? {
                        // Gone since the search: it matches nothing any more.
                        None => {}
                        Some(p) if p.deleted => {}
                        Some(p) if p.version == *seen => {
                            set.insert(id.clone());
                        }
                        // Changed since the search: whether it still matches is unknown here,
                        // so acting on the search's verdict could be wrong.
                        Some(p) => {
                            return Err(StoreError::VersionConflict {
                                expected: *seen,
                                actual: Some(p.version),
                            });
                        }
                    }
                }
                set
            }
            Criterion::Unresolved { criteria } => {
                return Err(invalid(format!(
                    "the criteria '{}' need a search index; the store alone evaluates only \
                     _id and identifier",
                    shorten(criteria)
                )));
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
    fn resolved_conditions_name_their_criteria_canonically() {
        let a = ResourceId::new("a").unwrap();
        let b = ResourceId::new("b").unwrap();
        let one = Condition::resolved(
            "?name=Ola&birthdate=1970",
            [(b.clone(), VersionId(2)), (a.clone(), VersionId(1))],
        );
        let two = Condition::resolved(
            "birthdate=1970&_format=json&name=%4Fla",
            [(a.clone(), VersionId(1)), (b.clone(), VersionId(2))],
        );
        assert_eq!(one, two);
        assert_eq!(one.searched_criteria(), Some("birthdate=1970&name=Ola"));
        // Conditions the store evaluates itself have none.
        assert_eq!(Condition::id(&a).searched_criteria(), None);
        assert_eq!(Condition::unresolved("name=Ola").searched_criteria(), None);
        assert_eq!(
            Condition::unresolved("name=Ola").unresolved_criteria(),
            Some("name=Ola")
        );
        // A resource created for the same criteria later counts as a match, once.
        let mut c = Condition::resolved("name=Ola", []);
        c.add_match(&a, VersionId(1));
        c.add_match(&a, VersionId(1));
        assert_eq!(c, Condition::resolved("name=Ola", [(a, VersionId(1))]));
    }

    #[test]
    fn resolved_conditions_never_match_unwritten_resources() {
        let id = ResourceId::new("a").unwrap();
        let c = Condition::resolved("name=Ola", [(id.clone(), VersionId(1))]);
        assert!(!c.matches(Some(&id), &[]));
        assert!(!Condition::unresolved("name=Ola").matches(Some(&id), &[]));
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
