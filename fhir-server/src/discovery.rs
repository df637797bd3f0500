//! SMART App Launch discovery: `/fhir/{tenant}/.well-known/smart-configuration` and the
//! CapabilityStatement's `rest.security`.
//!
//! The values come from an optional top-level `[smart]` table of the auth configuration file
//! (the `[auth]` table is [`crate::auth::AuthConfig`]'s); what it leaves out is taken from the
//! first `[[auth.issuer]]` (`issuer`, `jwks_url`):
//!
//! ```toml
//! [smart]
//! issuer = "https://helseid-sts.nhn.no"
//! jwks_uri = "https://helseid-sts.nhn.no/.well-known/openid-configuration/jwks"
//! authorization_endpoint = "https://helseid-sts.nhn.no/connect/authorize"
//! token_endpoint = "https://helseid-sts.nhn.no/connect/token"
//! ```

use std::path::Path;

use fhir_core::{Json, Map};
use serde::Deserialize;

use crate::auth::AuthConfig;

/// The authorization server described to clients.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmartDiscovery {
    /// The token issuer (`iss`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Where its signing keys are published.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// OAuth 2.0 authorization endpoint (user-facing launches).
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    /// OAuth 2.0 token endpoint.
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// Token revocation endpoint.
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    /// Token introspection endpoint.
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    /// Scopes to advertise (`scopes_supported`); empty: not advertised.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
}

#[derive(Deserialize)]
struct File {
    smart: Option<SmartDiscovery>,
}

/// The SMART capabilities this server implements.
pub const CAPABILITIES: &[&str] = &[
    "client-confidential-asymmetric",
    "context-standalone-patient",
    "launch-standalone",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
];

impl SmartDiscovery {
    /// Reads the `[smart]` table of the TOML file at `path` (absent: all defaults).
    pub fn from_file(path: impl AsRef<Path>) -> Result<SmartDiscovery, String> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        SmartDiscovery::from_toml_str(&text)
    }

    /// [`SmartDiscovery::from_file`] on a string.
    pub fn from_toml_str(text: &str) -> Result<SmartDiscovery, String> {
        let file: File = toml::from_str(text).map_err(|e| format!("[smart]: {e}"))?;
        Ok(file.smart.unwrap_or_default())
    }

    /// Fills `issuer` and `jwks_uri` from the first configured issuer when not given.
    pub fn with_defaults_from(mut self, auth: &AuthConfig) -> SmartDiscovery {
        if let Some(first) = auth.issuers.first() {
            self.issuer.get_or_insert_with(|| first.issuer.clone());
            if self.jwks_uri.is_none() {
                self.jwks_uri = first.jwks_url.clone();
            }
        }
        self
    }

    /// The `.well-known/smart-configuration` document.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k, Json::str(v.clone()));
            }
        };
        put("issuer", &self.issuer);
        put("jwks_uri", &self.jwks_uri);
        put("authorization_endpoint", &self.authorization_endpoint);
        put("token_endpoint", &self.token_endpoint);
        put("revocation_endpoint", &self.revocation_endpoint);
        put("introspection_endpoint", &self.introspection_endpoint);
        let strs = |v: &[&str]| Json::Array(v.iter().map(|s| Json::str(*s)).collect());
        m.insert(
            "grant_types_supported",
            strs(&["authorization_code", "client_credentials"]),
        );
        m.insert(
            "token_endpoint_auth_methods_supported",
            strs(&["private_key_jwt"]),
        );
        m.insert(
            "token_endpoint_auth_signing_alg_values_supported",
            strs(&["RS256", "PS256", "ES256"]),
        );
        m.insert("code_challenge_methods_supported", strs(&["S256"]));
        m.insert("capabilities", strs(CAPABILITIES));
        if !self.scopes_supported.is_empty() {
            m.insert(
                "scopes_supported",
                Json::Array(
                    self.scopes_supported
                        .iter()
                        .map(|s| Json::str(s.clone()))
                        .collect(),
                ),
            );
        }
        Json::Object(m)
    }

    /// `CapabilityStatement.rest.security`: the SMART service coding and `oauth-uris`.
    pub fn security(&self) -> Json {
        let mut uris = Vec::new();
        for (name, v) in [
            ("authorize", &self.authorization_endpoint),
            ("token", &self.token_endpoint),
            ("revoke", &self.revocation_endpoint),
            ("introspect", &self.introspection_endpoint),
        ] {
            if let Some(v) = v {
                let mut e = Map::new();
                e.insert("url", Json::str(name));
                e.insert("valueUri", Json::str(v.clone()));
                uris.push(Json::Object(e));
            }
        }
        let mut ext = Map::new();
        ext.insert(
            "url",
            Json::str("http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"),
        );
        ext.insert("extension", Json::Array(uris));
        let mut coding = Map::new();
        coding.insert(
            "system",
            Json::str("http://terminology.hl7.org/CodeSystem/restful-security-service"),
        );
        coding.insert("code", Json::str("SMART-on-FHIR"));
        let mut service = Map::new();
        service.insert("coding", Json::Array(vec![Json::Object(coding)]));
        service.insert("text", Json::str("OAuth2 using SMART-on-FHIR profile"));
        let mut sec = Map::new();
        sec.insert("cors", Json::Bool(false));
        sec.insert("service", Json::Array(vec![Json::Object(service)]));
        sec.insert("extension", Json::Array(vec![Json::Object(ext)]));
        sec.insert(
            "description",
            Json::str(
                "Access tokens (JWT, Bearer or DPoP) from the issuer named in \
                 .well-known/smart-configuration; SMART v1/v2 scopes; tenant bound by token.",
            ),
        );
        Json::Object(sec)
    }
}
