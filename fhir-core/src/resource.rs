//! A validated FHIR resource held as its JSON tree.

use crate::error::FhirError;
use crate::ids::{ResourceId, ResourceType, VersionId};
use crate::json::{self, Json, Map};
use crate::references::{self, RefKind};
use crate::{validate, xml};

/// One `Identifier` of a resource (`system` and `value`, either may be absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identifier {
    /// `Identifier.system`
    pub system: Option<String>,
    /// `Identifier.value`
    pub value: Option<String>,
}

/// A resource that has been parsed and validated against the R4 definitions.
///
/// The JSON tree keeps the client's member order and decimal text; only `id` and `meta` are
/// changed by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    resource_type: ResourceType,
    body: Map,
}

impl Resource {
    /// Parses and validates a JSON resource.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Resource, FhirError> {
        Resource::from_json(json::parse(bytes)?)
    }

    /// Parses and validates an XML resource.
    pub fn from_xml_bytes(bytes: &[u8]) -> Result<Resource, FhirError> {
        Resource::from_json(xml::from_xml(bytes)?)
    }

    /// Validates a JSON tree as a resource.
    pub fn from_json(json: Json) -> Result<Resource, FhirError> {
        let resource_type = resource_type_of(&json)?;
        let issues = validate::validate_resource(&json);
        if !issues.is_empty() {
            return Err(FhirError::Invalid(issues));
        }
        match json {
            Json::Object(body) => Ok(Resource {
                resource_type,
                body,
            }),
            _ => Err(FhirError::NotAResource(
                "a resource must be a JSON object".into(),
            )),
        }
    }

    /// Rebuilds a resource from bytes this server stored earlier, without validating again
    /// (they were validated on write).
    pub fn from_stored_bytes(bytes: &[u8]) -> Result<Resource, FhirError> {
        let json = json::parse(bytes)?;
        let resource_type = resource_type_of(&json)?;
        match json {
            Json::Object(body) => Ok(Resource {
                resource_type,
                body,
            }),
            _ => Err(FhirError::NotAResource(
                "stored resource is not an object".into(),
            )),
        }
    }

    /// The resource's type.
    pub fn resource_type(&self) -> ResourceType {
        self.resource_type
    }

    /// `Resource.id`, if set.
    pub fn id(&self) -> Option<&str> {
        self.body.get("id").and_then(Json::as_str)
    }

    /// Sets `Resource.id` (placed right after `resourceType`).
    pub fn set_id(&mut self, id: &ResourceId) {
        self.body.insert_at(1, "id", Json::str(id.as_str()));
    }

    /// Removes `Resource.id`.
    pub fn clear_id(&mut self) {
        self.body.remove("id");
    }

    /// `meta.versionId`, if set.
    pub fn version_id(&self) -> Option<&str> {
        self.body
            .get("meta")
            .and_then(|m| m.get("versionId"))
            .and_then(Json::as_str)
    }

    /// Sets `meta.versionId` and `meta.lastUpdated` (an `instant`), keeping other meta members.
    pub fn set_meta(&mut self, version: VersionId, last_updated: &str) {
        let pos = if self.body.contains_key("id") { 2 } else { 1 };
        let mut meta = match self.body.remove("meta") {
            Some(Json::Object(m)) => m,
            _ => Map::new(),
        };
        meta.insert_at(0, "versionId", Json::str(version.to_string()));
        meta.insert_at(1, "lastUpdated", Json::str(last_updated));
        self.body.insert_at(pos, "meta", Json::Object(meta));
    }

    /// The resource's top-level `identifier` values.
    pub fn identifiers(&self) -> Vec<Identifier> {
        let one = |v: &Json| -> Option<Identifier> {
            let m = v.as_object()?;
            Some(Identifier {
                system: m.get("system").and_then(Json::as_str).map(str::to_string),
                value: m.get("value").and_then(Json::as_str).map(str::to_string),
            })
        };
        match self.body.get("identifier") {
            Some(Json::Array(items)) => items.iter().filter_map(one).collect(),
            Some(single @ Json::Object(_)) => one(single).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// Calls `f` on every reference in the resource — each `Reference.reference` and each
    /// `uri`/`url`/`canonical` string, including those in extensions, backbone elements and
    /// contained resources — and lets it rewrite them in place. See [`references`].
    pub fn visit_references_mut(&mut self, f: &mut dyn FnMut(RefKind, &mut String)) {
        let mut tree = Json::Object(std::mem::take(&mut self.body));
        references::visit_references_mut(&mut tree, f);
        if let Json::Object(m) = tree {
            self.body = m;
        }
    }

    /// The JSON members.
    pub fn json(&self) -> &Map {
        &self.body
    }

    /// Compact JSON bytes, as stored.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        self.body.to_bytes()
    }

    /// The JSON tree.
    pub fn into_json(self) -> Json {
        Json::Object(self.body)
    }
}

fn resource_type_of(json: &Json) -> Result<ResourceType, FhirError> {
    let Json::Object(m) = json else {
        return Err(FhirError::NotAResource(format!(
            "a resource must be a JSON object, not {}",
            json.kind()
        )));
    };
    let Some(rt) = m.get("resourceType") else {
        return Err(FhirError::NotAResource("missing 'resourceType'".into()));
    };
    let Some(name) = rt.as_str() else {
        return Err(FhirError::NotAResource(
            "'resourceType' must be a string".into(),
        ));
    };
    ResourceType::parse(name).ok_or_else(|| FhirError::UnknownResourceType(name.to_string()))
}
