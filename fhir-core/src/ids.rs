//! Typed identifiers: which tenant, which resource type, which resource, which version.

use std::fmt;
use std::str::FromStr;

use crate::schema::Schema;

/// A concrete FHIR R4 resource type, e.g. `Observation`. Only the 147 types of the spec exist.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType(&'static str);

impl ResourceType {
    /// The type called `name`, if R4 defines it (case-sensitive, as in URLs and JSON).
    pub fn parse(name: &str) -> Option<ResourceType> {
        let all = Schema::get().resource_types();
        all.binary_search_by(|t| t.as_str().cmp(name))
            .ok()
            .map(|i| ResourceType(all[i].as_str()))
    }

    /// The type's name.
    pub fn as_str(&self) -> &'static str {
        self.0
    }

    /// Every concrete resource type, sorted by name.
    pub fn all() -> impl Iterator<Item = ResourceType> {
        Schema::get()
            .resource_types()
            .iter()
            .map(|t| ResourceType(t.as_str()))
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} '{value}': {rule}")]
pub struct InvalidId {
    /// What kind of identifier.
    pub what: &'static str,
    /// The rejected text (truncated).
    pub value: String,
    /// The rule it breaks.
    pub rule: &'static str,
}

fn invalid(what: &'static str, value: &str, rule: &'static str) -> InvalidId {
    InvalidId {
        what,
        value: value.chars().take(80).collect(),
        rule,
    }
}

/// A logical resource id (FHIR `id`: `[A-Za-z0-9\-\.]{1,64}`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ResourceId(String);

impl ResourceId {
    /// Validates `s` as a FHIR id.
    pub fn new(s: &str) -> Result<ResourceId, InvalidId> {
        if s.is_empty()
            || s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(invalid(
                "resource id",
                s,
                "1 to 64 characters of A-Z a-z 0-9 - .",
            ));
        }
        Ok(ResourceId(s.to_string()))
    }

    /// A fresh server-assigned id (a random UUID).
    pub fn generate() -> ResourceId {
        ResourceId(uuid::Uuid::new_v4().to_string())
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ResourceId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourceId::new(s)
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A resource version (`meta.versionId`): 1 for the first version, +1 for each change.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct VersionId(pub u64);

impl VersionId {
    /// The first version of a resource.
    pub const FIRST: VersionId = VersionId(1);

    /// The version after this one.
    pub fn next(self) -> VersionId {
        VersionId(self.0 + 1)
    }

    /// Parses a version id, also in ETag form (`W/"3"`, `"3"`).
    pub fn parse(s: &str) -> Result<VersionId, InvalidId> {
        let t = s.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        let t = t.trim_matches('"');
        t.parse::<u64>()
            .ok()
            .filter(|v| *v > 0)
            .map(VersionId)
            .ok_or_else(|| invalid("version id", s, "a positive whole number"))
    }

    /// The weak ETag for this version: `W/"n"`.
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.0)
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A tenant (one hospital trust): `[A-Za-z0-9][A-Za-z0-9_-]{0,63}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct TenantId(String);

impl TenantId {
    /// Validates `s` as a tenant id.
    pub fn new(s: &str) -> Result<TenantId, InvalidId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(invalid(
                "tenant id",
                s,
                "1 to 64 characters of A-Z a-z 0-9 - _, starting with a letter or digit",
            ));
        }
        Ok(TenantId(s.to_string()))
    }

    /// The tenant's id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TenantId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TenantId::new(s)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(ResourceId::new("abc-1.2").is_ok());
        assert!(ResourceId::new("").is_err());
        assert!(ResourceId::new("a/b").is_err());
        assert!(ResourceId::new(&"a".repeat(65)).is_err());
        assert_eq!(VersionId::parse("W/\"3\"").unwrap(), VersionId(3));
        assert!(VersionId::parse("0").is_err());
        assert!(TenantId::new("hf-sor_ost1").is_ok());
        assert!(TenantId::new("-x").is_err());
        assert!(TenantId::new("a b").is_err());
        assert_eq!(
            ResourceType::parse("Observation").unwrap().as_str(),
            "Observation"
        );
        assert!(ResourceType::parse("observation").is_none());
        assert!(ResourceType::parse("Resource").is_none());
        assert_eq!(ResourceType::all().count(), 147);
    }
}
