//! SMART on FHIR resource scopes (App Launch v2 §"Scopes and launch context", with the v1
//! forms) and the decision which FHIR interaction they allow.
//!
//! Grammar: `(patient|user|system)/(Type|*).(cruds-letters | read | write | *)[?param=value&…]`.
//! v2 letters must appear in the order `c r u d s`, each at most once; v1 `read` means `rs`,
//! `write` means `cud`, `*` means `cruds`. Write does not imply read.
//!
//! | interaction | needs |
//! |---|---|
//! | create | `c` |
//! | read, vread, history-instance | `r` |
//! | update, patch | `u` |
//! | delete | `d` |
//! | search-type, history-type | `s` |
//! | search-system, history-system | `s` on a `*` scope |
//! | capabilities | nothing |
//! | operation | `cruds` (the server should check known operations as their underlying interactions) |

use std::fmt;

/// Whom a scope speaks for (the part before `/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    /// `patient/`: limited to the compartment of the token's patient context.
    Patient,
    /// `user/`: whatever the authenticated user may see.
    User,
    /// `system/`: a backend service, no user.
    System,
}

impl ScopeContext {
    fn as_str(self) -> &'static str {
        match self {
            ScopeContext::Patient => "patient",
            ScopeContext::User => "user",
            ScopeContext::System => "system",
        }
    }
}

/// A set of the SMART v2 permission letters `c r u d s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions {
    /// `c`: create.
    pub create: bool,
    /// `r`: read, vread, history of an instance.
    pub read: bool,
    /// `u`: update, patch.
    pub update: bool,
    /// `d`: delete.
    pub delete: bool,
    /// `s`: search, type-level history.
    pub search: bool,
}

impl Permissions {
    /// All five letters (`cruds`).
    pub const ALL: Permissions = Permissions {
        create: true,
        read: true,
        update: true,
        delete: true,
        search: true,
    };
    /// No letter.
    pub const NONE: Permissions = Permissions {
        create: false,
        read: false,
        update: false,
        delete: false,
        search: false,
    };

    /// Whether every letter of `needed` is in `self`.
    pub fn contains(self, needed: Permissions) -> bool {
        (self.create || !needed.create)
            && (self.read || !needed.read)
            && (self.update || !needed.update)
            && (self.delete || !needed.delete)
            && (self.search || !needed.search)
    }

    /// Parses v2 letters (`cruds` order, no repeats, at least one) or the v1 words `read`,
    /// `write`, `*`.
    pub fn parse(s: &str) -> Option<Permissions> {
        match s {
            "read" => {
                return Some(Permissions {
                    read: true,
                    search: true,
                    ..Permissions::NONE
                });
            }
            "write" => {
                return Some(Permissions {
                    create: true,
                    update: true,
                    delete: true,
                    ..Permissions::NONE
                });
            }
            "*" => return Some(Permissions::ALL),
            _ => {}
        }
        if s.is_empty() {
            return None;
        }
        let mut p = Permissions::NONE;
        // Position in "cruds" of the last letter seen, so out-of-order or repeated letters
        // (which the spec lets servers reject) are refused.
        let mut last: Option<usize> = None;
        for ch in s.chars() {
            let pos = "cruds".find(ch)?;
            if last.is_some_and(|l| pos <= l) {
                return None;
            }
            last = Some(pos);
            match ch {
                'c' => p.create = true,
                'r' => p.read = true,
                'u' => p.update = true,
                'd' => p.delete = true,
                _ => p.search = true,
            }
        }
        Some(p)
    }

    /// The letters in `cruds` order.
    pub fn letters(self) -> String {
        let mut s = String::new();
        for (on, c) in [
            (self.create, 'c'),
            (self.read, 'r'),
            (self.update, 'u'),
            (self.delete, 'd'),
            (self.search, 's'),
        ] {
            if on {
                s.push(c);
            }
        }
        s
    }
}

/// One SMART resource scope, normalised to the v2 form.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SmartScope {
    /// `patient`, `user` or `system`.
    pub context: ScopeContext,
    /// The resource type, or `None` for `*`.
    pub resource_type: Option<String>,
    /// The granted letters.
    pub permissions: Permissions,
    /// `?param=value` filters (decoded as `application/x-www-form-urlencoded`), all of which a
    /// resource must match. Empty when the scope is unfiltered.
    pub filters: Vec<(String, String)>,
}

/// Why a text that looks like a resource scope is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SMART scope '{scope}': {reason}")]
pub struct ScopeError {
    /// The scope text.
    pub scope: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl SmartScope {
    /// Parses one scope.
    ///
    /// Returns `Ok(None)` for scopes that are not resource scopes (`openid`, `fhirUser`,
    /// `launch/patient`, `offline_access`, API names such as `nhn:fhir-dho/read`), and an error
    /// for text that starts with `patient/`, `user/` or `system/` but is malformed (including
    /// out-of-order letters such as `.dus`).
    pub fn parse(scope: &str) -> Result<Option<SmartScope>, ScopeError> {
        let Some((ctx, rest)) = scope.split_once('/') else {
            return Ok(None);
        };
        let context = match ctx {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return Ok(None),
        };
        let err = |reason| ScopeError {
            scope: super::error::clip(scope),
            reason,
        };
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (ty, perms) = body
            .split_once('.')
            .ok_or_else(|| err("expected Type.permissions"))?;
        let resource_type = if ty == "*" {
            None
        } else if is_type_name(ty) {
            Some(ty.to_string())
        } else {
            return Err(err("the resource type must be a type name or *"));
        };
        let permissions = Permissions::parse(perms).ok_or_else(|| {
            err("permissions must be letters of 'cruds' in that order, or read, write, *")
        })?;
        let mut filters = Vec::new();
        if let Some(q) = query {
            if q.is_empty() {
                return Err(err("empty filter after '?'"));
            }
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                if k.is_empty() {
                    return Err(err("a filter has no parameter name"));
                }
                filters.push((k.into_owned(), v.into_owned()));
            }
        }
        Ok(Some(SmartScope {
            context,
            resource_type,
            permissions,
            filters,
        }))
    }

    /// Whether this scope covers `resource_type` (`None` = all types, matched only by `*`).
    pub fn covers_type(&self, resource_type: Option<&str>) -> bool {
        match (&self.resource_type, resource_type) {
            (None, _) => true,
            (Some(mine), Some(t)) => mine == t,
            (Some(_), None) => false,
        }
    }
}

impl fmt::Display for SmartScope {
    /// The canonical v2 form, e.g. `patient/Observation.rs?category=laboratory`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}.{}",
            self.context.as_str(),
            self.resource_type.as_deref().unwrap_or("*"),
            self.permissions.letters()
        )?;
        if !self.filters.is_empty() {
            let q = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(self.filters.iter())
                .finish();
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// FHIR resource type names are ASCII letters and digits starting with an upper-case letter.
fn is_type_name(s: &str) -> bool {
    s.len() <= 64
        && s.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
        && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// A FHIR RESTful interaction, as the server asks about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    /// `POST [base]/[type]`.
    Create,
    /// `GET [base]/[type]/[id]`.
    Read,
    /// `GET [base]/[type]/[id]/_history/[vid]`.
    Vread,
    /// `PUT [base]/[type]/[id]`.
    Update,
    /// `PATCH [base]/[type]/[id]`.
    Patch,
    /// `DELETE [base]/[type]/[id]`.
    Delete,
    /// `GET [base]/[type]/[id]/_history`.
    HistoryInstance,
    /// `GET [base]/[type]/_history`.
    HistoryType,
    /// `GET [base]/_history`.
    HistorySystem,
    /// `GET [base]/[type]?…`.
    SearchType,
    /// `GET [base]?…`.
    SearchSystem,
    /// `GET [base]/metadata`.
    Capabilities,
    /// `[base]/…/$operation`.
    Operation,
}

impl Interaction {
    /// The letters the interaction needs.
    pub fn needs(self) -> Permissions {
        let one = |f: fn(&mut Permissions)| {
            let mut p = Permissions::NONE;
            f(&mut p);
            p
        };
        match self {
            Interaction::Create => one(|p| p.create = true),
            Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => {
                one(|p| p.read = true)
            }
            Interaction::Update | Interaction::Patch => one(|p| p.update = true),
            Interaction::Delete => one(|p| p.delete = true),
            Interaction::HistoryType
            | Interaction::HistorySystem
            | Interaction::SearchType
            | Interaction::SearchSystem => one(|p| p.search = true),
            Interaction::Capabilities => Permissions::NONE,
            Interaction::Operation => Permissions::ALL,
        }
    }

    /// Whether the interaction spans all types, so only `*` scopes can grant it.
    pub fn is_system_level(self) -> bool {
        matches!(self, Interaction::HistorySystem | Interaction::SearchSystem)
    }

    /// The interaction's name as in the FHIR `TypeRestfulInteraction` value set.
    pub fn as_str(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::HistorySystem => "history-system",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::Capabilities => "capabilities",
            Interaction::Operation => "operation",
        }
    }
}

/// One way in which access is granted but limited; a resource is accessible when it meets all
/// the conditions of at least one restriction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Restriction {
    /// The resource must be in this patient's compartment (from a `patient/` scope).
    pub patient: Option<String>,
    /// The resource must match every one of these search parameters (from `?param=value`).
    pub filters: Vec<(String, String)>,
}

/// The answer to "may this principal do this interaction on this type?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// No granted scope allows it.
    Denied,
    /// A `user/` or `system/` scope without filters allows it.
    Unrestricted,
    /// Allowed only for resources that satisfy one of the restrictions (patient compartment
    /// and/or filters); the server must enforce them.
    Restricted(Vec<Restriction>),
}

impl Access {
    /// Whether anything is allowed.
    pub fn is_allowed(&self) -> bool {
        !matches!(self, Access::Denied)
    }
}

/// Decides access from `scopes`; `patient` is the token's patient context, without which
/// `patient/` scopes grant nothing.
pub(crate) fn decide(
    scopes: &[SmartScope],
    patient: Option<&str>,
    interaction: Interaction,
    resource_type: &str,
) -> Access {
    if interaction == Interaction::Capabilities {
        return Access::Unrestricted;
    }
    let ty = if interaction.is_system_level() || resource_type.is_empty() || resource_type == "*" {
        None
    } else {
        Some(resource_type)
    };
    let needed = interaction.needs();
    let mut restrictions: Vec<Restriction> = Vec::new();
    for scope in scopes {
        if !scope.covers_type(ty) || !scope.permissions.contains(needed) {
            continue;
        }
        let patient = match scope.context {
            ScopeContext::Patient => match patient {
                Some(p) => Some(p.to_string()),
                // SMART requires a patient context for patient/ scopes; without one the
                // compartment is unknown, so the scope cannot be honoured safely.
                None => continue,
            },
            ScopeContext::User | ScopeContext::System => None,
        };
        if patient.is_none() && scope.filters.is_empty() {
            return Access::Unrestricted;
        }
        let r = Restriction {
            patient,
            filters: scope.filters.clone(),
        };
        if !restrictions.contains(&r) {
            restrictions.push(r);
        }
    }
    if restrictions.is_empty() {
        Access::Denied
    } else {
        Access::Restricted(restrictions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> SmartScope {
        match SmartScope::parse(text) {
            Ok(Some(s)) => s,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn v1_forms_map_to_v2() {
        assert_eq!(s("patient/Observation.read").permissions.letters(), "rs");
        assert_eq!(s("user/Observation.write").permissions.letters(), "cud");
        assert_eq!(s("system/*.*").permissions.letters(), "cruds");
        assert_eq!(s("system/*.*").resource_type, None);
    }

    #[test]
    fn v2_letters_in_order_only() {
        assert_eq!(s("user/Patient.cruds").permissions, Permissions::ALL);
        assert_eq!(s("user/Patient.rs").permissions.letters(), "rs");
        assert!(SmartScope::parse("user/Patient.sr").is_err());
        assert!(SmartScope::parse("user/Patient.rr").is_err());
        assert!(SmartScope::parse("user/Patient.").is_err());
        assert!(SmartScope::parse("user/Patient.x").is_err());
        assert!(SmartScope::parse("user/patient.r").is_err());
        assert!(SmartScope::parse("user/Patient").is_err());
    }

    #[test]
    fn non_resource_scopes_are_ignored() {
        for t in [
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "nhn:fhir-dho/read",
            "",
        ] {
            assert_eq!(SmartScope::parse(t), Ok(None), "{t}");
        }
    }

    #[test]
    fn filters_are_parsed_and_displayed() {
        let sc = s(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory",
        );
        assert_eq!(
            sc.filters,
            vec![(
                "category".to_string(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_string()
            )]
        );
        let again = s(&sc.to_string());
        assert_eq!(again, sc);
        assert!(SmartScope::parse("user/Observation.rs?").is_err());
        assert!(SmartScope::parse("user/Observation.rs?=x").is_err());
    }

    #[test]
    fn decisions() {
        let scopes = vec![s("user/Observation.cu"), s("user/Patient.rs")];
        let d = |i, t| decide(&scopes, None, i, t);
        assert_eq!(d(Interaction::Create, "Observation"), Access::Unrestricted);
        assert_eq!(d(Interaction::Read, "Observation"), Access::Denied);
        assert_eq!(d(Interaction::SearchType, "Patient"), Access::Unrestricted);
        assert_eq!(
            d(Interaction::HistoryInstance, "Patient"),
            Access::Unrestricted
        );
        assert_eq!(d(Interaction::SearchSystem, ""), Access::Denied);
        assert_eq!(d(Interaction::Capabilities, ""), Access::Unrestricted);
        assert_eq!(d(Interaction::Operation, "Patient"), Access::Denied);
    }

    #[test]
    fn patient_scopes_need_patient_context() {
        let scopes = vec![s("patient/Observation.rs")];
        assert_eq!(
            decide(&scopes, None, Interaction::Read, "Observation"),
            Access::Denied
        );
        assert_eq!(
            decide(&scopes, Some("p1"), Interaction::Read, "Observation"),
            Access::Restricted(vec![Restriction {
                patient: Some("p1".into()),
                filters: vec![]
            }])
        );
    }
}
