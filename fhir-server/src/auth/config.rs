//! The `[auth]` section of the server's TOML configuration, with environment overrides.
//!
//! ```toml
//! [auth]
//! mode = "on"                       # "on" | "off" (required; "off" = --no-auth, local use only)
//! realm = "fhir"                    # realm of WWW-Authenticate challenges
//! dpop_algorithms = ["ES256", "PS256", "RS256"]
//! dpop_max_age_secs = 60            # how old a DPoP proof (iat) may be
//! dpop_replay_cache_entries = 200000
//! dpop_nonce = false                # true: proofs must carry a recent server nonce (RFC 9449 §8)
//! dpop_nonce_window_secs = 300      # a nonce is accepted in its window and the next one
//! # dpop_nonce_secret_env = "FHIR_DPOP_NONCE_SECRET"  # shared nonce key (several instances)
//! jwks_fetch_timeout_secs = 10       # time limit of one JWKS fetch or introspection call
//!
//! [auth.org_tenants]                # organisation number -> tenant id, for all issuers
//! "983974899" = "helse-bergen"
//!
//! [[auth.issuer]]
//! issuer = "https://helseid-sts.nhn.no"        # exact `iss`
//! jwks_url = "https://helseid-sts.nhn.no/.well-known/openid-configuration/jwks"
//! # jwks_file = "/etc/fhir/helseid-jwks.json"  # exactly one of jwks_url / jwks_file
//! audiences = ["nhn:fhir-dho"]                 # at least one
//! algorithms = ["RS256", "PS256", "ES256"]     # default; HS* and none are refused
//! token_types = ["at+jwt", "JWT"]              # default
//! dpop = "required"                            # "off" | "optional" (default) | "required"
//! clock_skew_secs = 30                         # default; at most 300
//! jwks_cache_secs = 3600                       # default
//! jwks_min_refresh_secs = 30                   # default; unknown-kid refresh rate limit
//! smart_scopes = false                         # read token scopes as SMART scopes too (default true)
//! tenant_claims = [                            # tried in order; the first claim present decides
//!   { claim = "helseid://claims/client/claims/orgnr_parent", kind = "orgnr" },
//!   { claim = "helseid://claims/client/claims/orgnr_child", kind = "orgnr" },
//! ]
//! # jwks_ca_file = "/etc/fhir/issuer-ca.pem"   # extra CA certificates (PEM) for this issuer's https URLs
//! min_security_level = 4                       # HelseID: users must have logged in at level 4
//! # Opaque (non-JWT) access tokens, RFC 7662; at most one issuer (HelseID's tokens are JWTs):
//! # introspection_url = "https://idp.example/connect/introspect"
//! # introspection_client_id = "fhir-api"
//! # introspection_client_secret_env = "FHIR_INTROSPECTION_SECRET"  # the variable's name, not the secret
//! # introspection_cache_secs = 60              # default; 0 = ask on every request; at most 3600
//! [auth.issuer.scope_map]                      # issuer scope -> SMART scopes
//! "nhn:fhir-dho/read" = ["user/*.rs"]
//! "nhn:fhir-dho/write" = ["user/*.cud"]
//! [auth.issuer.org_tenants]                    # extends/overrides [auth.org_tenants]
//! "974557746" = "helse-fonna"
//! ```
//!
//! # HTTPS
//!
//! `jwks_url` and `introspection_url` must be `https://`, or `http://` to a loopback host
//! (`localhost`, `127.0.0.0/8`, `::1`). Server certificates are verified (host name included)
//! against the operating system's CA store plus the issuer's `jwks_ca_file`, which may hold
//! several PEM certificates (a private CA, or an intermediate). Redirects are not followed,
//! answers are capped (1 MiB for a JWKS) and bounded by `jwks_fetch_timeout_secs`;
//! `HTTPS_PROXY`/`NO_PROXY` are honoured for `https://` URLs. Nothing is fetched at start-up:
//! keys load on the first token, and again on an unknown `kid`. A JWKS or introspection
//! endpoint that cannot be reached or whose certificate is not trusted makes requests fail
//! with 503 (the token could not be checked), not 401.
//!
//! # Opaque tokens (introspection)
//!
//! A bearer token that is not a JWT (not three dot-separated parts) is sent to the issuer with
//! `introspection_url` (RFC 7662, HTTP Basic client authentication with
//! `introspection_client_id` and the secret from the environment variable named by
//! `introspection_client_secret_env`, read at start-up). An answer with `"active": true` is
//! read like JWT claims: `exp` (required), `nbf`, `iat`, `aud` (must name a configured
//! audience), `iss` (if present, must be this issuer), `scope`, `sub`, `client_id`, `jti`,
//! `patient`, the tenant claims, `cnf.jkt` (DPoP binding) and the HelseID claims. Positive
//! answers are reused for `introspection_cache_secs`, never past `exp`; refusals and failures
//! are not cached. An issuer with `introspection_url` needs no JWKS (then its JWTs are
//! refused).
//!
//! # Security level
//!
//! With `min_security_level`, a token that speaks for a user (it has HelseID's `pid`, or a
//! `sub` that is not its `client_id`, RFC 9068 §2.2) must carry
//! `helseid://claims/identity/security_level` of at least that value, or it gets 401 with
//! `error="insufficient_user_authentication"` (RFC 9470 step-up). Client-credentials tokens
//! have no user and are not affected.
//!
//! # DPoP nonces
//!
//! With `dpop_nonce = true` (RFC 9449 §8 and §9) every DPoP proof must carry a `nonce` claim
//! this server issued recently. Every response to a request with `Authorization: DPoP`
//! (success or error) has a `DPoP-Nonce` header with the current nonce; a proof without one, or
//! with a forged or expired one, gets 401 with `WWW-Authenticate: DPoP …,
//! error="use_dpop_nonce"` and that header, and the client signs a new proof with it. Bearer
//! requests are not affected. The setting is for the whole server, not per issuer: a nonce is a
//! property of this resource server and its proofs, and the middleware has to know whether to
//! send `DPoP-Nonce` before it trusts anything the token says about its issuer.
//!
//! Nonces are stateless: an HMAC-SHA256 over a window counter (`dpop_nonce_window_secs`,
//! default 300 s), accepted in their own window and the next, so they live 5–10 minutes by
//! default. The HMAC key is random per process unless `dpop_nonce_secret_env` names an
//! environment variable holding a key of at least 32 bytes (e.g. `openssl rand -base64 32`),
//! read at start-up like the introspection secret. A random key is right for one instance: a
//! restart costs each client one `use_dpop_nonce` round trip. Several instances behind a load
//! balancer need the shared key, or a client may bounce between instances that each refuse the
//! other's nonce.
//!
//! Unknown keys inside `[auth]` are errors (a typo must not silently weaken security); other
//! top-level tables of the file are left to their owners.
//!
//! # Environment overrides
//!
//! [`AuthConfig::with_env_overrides`] applies, after the file:
//!
//! | variable | effect |
//! |---|---|
//! | `FHIR_AUTH_MODE` | `on` / `off` |
//! | `FHIR_AUTH_REALM` | `realm` |
//! | `FHIR_AUTH_DPOP_NONCE` | `dpop_nonce`: `true` / `false` (also `on` / `off`, `1` / `0`) |
//! | `FHIR_AUTH_DPOP_NONCE_SECRET_ENV` | `dpop_nonce_secret_env` (the *name* of the variable holding the nonce key) |
//! | `FHIR_AUTH_ISSUER` | selects the issuer (by `issuer`) that the variables below change; creates it if absent |
//! | `FHIR_AUTH_JWKS_FILE` | that issuer's `jwks_file` (clears `jwks_url`) |
//! | `FHIR_AUTH_JWKS_URL` | that issuer's `jwks_url` (clears `jwks_file`) |
//! | `FHIR_AUTH_AUDIENCES` | that issuer's `audiences`, comma-separated |
//! | `FHIR_AUTH_ALGORITHMS` | that issuer's `algorithms`, comma-separated |
//! | `FHIR_AUTH_DPOP` | that issuer's `dpop` |
//! | `FHIR_AUTH_CLOCK_SKEW_SECS` | that issuer's `clock_skew_secs` |
//! | `FHIR_AUTH_JWKS_CA_FILE` | that issuer's `jwks_ca_file` |
//! | `FHIR_AUTH_MIN_SECURITY_LEVEL` | that issuer's `min_security_level` |
//! | `FHIR_AUTH_INTROSPECTION_URL` | that issuer's `introspection_url` |
//! | `FHIR_AUTH_INTROSPECTION_CLIENT_ID` | that issuer's `introspection_client_id` |
//! | `FHIR_AUTH_INTROSPECTION_CLIENT_SECRET_ENV` | that issuer's `introspection_client_secret_env` (the *name* of the variable holding the secret) |
//! | `FHIR_AUTH_ORG_TENANTS` | entries `orgnr=tenant,…` added to `[auth.org_tenants]` |
//!
//! Without `FHIR_AUTH_ISSUER`, the issuer variables change the only configured issuer, and are
//! an error when there are none or several. A whole configuration can come from the
//! environment alone: [`AuthConfig::from_env`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::jwt::SigningAlg;
use super::scopes::SmartScope;

/// Claim names of HelseID's client organisation numbers.
pub const HELSEID_ORGNR_PARENT: &str = "helseid://claims/client/claims/orgnr_parent";
/// See [`HELSEID_ORGNR_PARENT`].
pub const HELSEID_ORGNR_CHILD: &str = "helseid://claims/client/claims/orgnr_child";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read auth configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or a value has the wrong type; the message names line, column and
    /// key.
    #[error("auth configuration: {0}")]
    Parse(String),
    /// A value is well-formed but not acceptable.
    #[error("auth configuration: {key}: {message}")]
    Invalid {
        /// The offending key, e.g. `auth.issuer[0].audiences`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// An environment variable has a bad value or cannot be applied.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Whether requests are authenticated at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every request is let in as an unrestricted principal (`--no-auth`, local use and tests).
    Off,
    /// Every request needs a valid token.
    On,
}

/// Whether an issuer's tokens are DPoP-bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpopMode {
    /// Only `Bearer`; the `DPoP` scheme is refused, and so are DPoP-bound tokens.
    Off,
    /// `Bearer` for unbound tokens and `DPoP` for bound ones (RFC 9449 §7.2).
    Optional,
    /// Only `DPoP` (HelseID: an API that uses DPoP must not accept Bearer).
    Required,
}

/// How the values of a tenant claim become tenant ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantClaimKind {
    /// Values are organisation numbers, mapped through `org_tenants`; unmapped numbers give no
    /// tenant.
    Orgnr,
    /// Values are tenant ids as they are (the SMART `tenant` launch-context claim).
    Tenant,
}

/// A claim that names the tenant(s) a token is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantClaim {
    /// The claim's name.
    pub claim: String,
    /// How its values are read.
    pub kind: TenantClaimKind,
}

/// The `[auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `on` or `off`; required, so that forgetting the section cannot switch auth off.
    pub mode: AuthMode,
    /// Realm of `WWW-Authenticate` challenges.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Trusted token issuers (`[[auth.issuer]]`).
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// Organisation number → tenant id, shared by all issuers.
    #[serde(default)]
    pub org_tenants: BTreeMap<String, String>,
    /// Algorithms accepted for DPoP proofs.
    #[serde(default = "default_algorithms")]
    pub dpop_algorithms: Vec<SigningAlg>,
    /// How old (seconds, by `iat`) a DPoP proof may be.
    #[serde(default = "default_dpop_max_age")]
    pub dpop_max_age_secs: u64,
    /// How many proof `jti`s are remembered at most; when full of live entries, DPoP requests
    /// get 503 until entries expire.
    #[serde(default = "default_replay_entries")]
    pub dpop_replay_cache_entries: usize,
    /// Server-provided DPoP nonces (RFC 9449 §8): every DPoP proof must carry a `nonce` from a
    /// recent `DPoP-Nonce` response header. See
    /// [the module docs](crate::auth::config#dpop-nonces).
    #[serde(default)]
    pub dpop_nonce: bool,
    /// Length (seconds) of a nonce window; a nonce is accepted in its window and the next.
    #[serde(default = "default_nonce_window")]
    pub dpop_nonce_window_secs: u64,
    /// The name of the environment variable holding the nonce key (at least 32 bytes), for
    /// several instances that must accept each other's nonces; without it each process makes
    /// a random key.
    #[serde(default)]
    pub dpop_nonce_secret_env: Option<String>,
    /// Time limit for fetching a JWKS URL.
    #[serde(default = "default_fetch_timeout")]
    pub jwks_fetch_timeout_secs: u64,
}

/// One `[[auth.issuer]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` value.
    pub issuer: String,
    /// A JWKS file (re-read on refresh).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (`https://`, or `http://` for loopback hosts).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Accepted `aud` values; a token must name at least one.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Accepted token signing algorithms.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<SigningAlg>,
    /// Accepted `typ` header values (compared ignoring case and an `application/` prefix).
    #[serde(default = "default_token_types")]
    pub token_types: Vec<String>,
    /// DPoP use.
    #[serde(default = "default_dpop")]
    pub dpop: DpopMode,
    /// Allowed clock difference (seconds) for `exp`, `nbf`, `iat` and DPoP `iat`.
    #[serde(default = "default_skew")]
    pub clock_skew_secs: u64,
    /// How long fetched keys are used before they are fetched again.
    #[serde(default = "default_jwks_cache")]
    pub jwks_cache_secs: u64,
    /// Fewest seconds between two refreshes caused by unknown `kid`s.
    #[serde(default = "default_min_refresh")]
    pub jwks_min_refresh_secs: u64,
    /// Whether token scopes that are not in `scope_map` are read as SMART scopes.
    #[serde(default = "default_true")]
    pub smart_scopes: bool,
    /// Issuer scope → SMART scopes it grants (for API-named scopes such as HelseID's).
    #[serde(default)]
    pub scope_map: BTreeMap<String, Vec<String>>,
    /// Claims naming the token's tenant(s), tried in order: the first one present decides.
    #[serde(default = "default_tenant_claims")]
    pub tenant_claims: Vec<TenantClaim>,
    /// Organisation number → tenant id for this issuer, over `[auth.org_tenants]`.
    #[serde(default)]
    pub org_tenants: BTreeMap<String, String>,
    /// A PEM file of CA certificates trusted, besides the system's CA store, for this issuer's
    /// `https://` JWKS and introspection endpoints (a private CA). Read at start-up.
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// The issuer's RFC 7662 token introspection endpoint, asked about bearer tokens that are
    /// not JWTs (opaque tokens). At most one issuer may have one.
    #[serde(default)]
    pub introspection_url: Option<String>,
    /// The client id this server authenticates with at `introspection_url` (HTTP Basic).
    #[serde(default)]
    pub introspection_client_id: Option<String>,
    /// The name of the environment variable that holds the client secret for
    /// `introspection_url`; the secret itself never goes into the file.
    #[serde(default)]
    pub introspection_client_secret_env: Option<String>,
    /// How long a positive introspection answer is reused (never past the token's `exp`);
    /// `0` asks the endpoint on every request.
    #[serde(default = "default_introspection_cache")]
    pub introspection_cache_secs: u64,
    /// HelseID: the lowest `helseid://claims/identity/security_level` accepted in tokens that
    /// carry a user (2, 3 or 4; 4 means high assurance such as BankID). Tokens without a user
    /// (client credentials) are not affected.
    #[serde(default)]
    pub min_security_level: Option<u8>,
}

fn default_realm() -> String {
    super::error::DEFAULT_REALM.to_string()
}
fn default_algorithms() -> Vec<SigningAlg> {
    vec![SigningAlg::RS256, SigningAlg::PS256, SigningAlg::ES256]
}
fn default_token_types() -> Vec<String> {
    vec!["at+jwt".into(), "JWT".into()]
}
fn default_dpop() -> DpopMode {
    DpopMode::Optional
}
fn default_skew() -> u64 {
    30
}
fn default_jwks_cache() -> u64 {
    3600
}
fn default_min_refresh() -> u64 {
    30
}
fn default_true() -> bool {
    true
}
fn default_dpop_max_age() -> u64 {
    60
}
fn default_nonce_window() -> u64 {
    300
}
fn default_replay_entries() -> usize {
    200_000
}
fn default_fetch_timeout() -> u64 {
    10
}
fn default_introspection_cache() -> u64 {
    60
}
/// HelseID's organisation claims (parent first: a trust is the parent organisation), then the
/// SMART `tenant` claim.
fn default_tenant_claims() -> Vec<TenantClaim> {
    vec![
        TenantClaim {
            claim: HELSEID_ORGNR_PARENT.into(),
            kind: TenantClaimKind::Orgnr,
        },
        TenantClaim {
            claim: HELSEID_ORGNR_CHILD.into(),
            kind: TenantClaimKind::Orgnr,
        },
        TenantClaim {
            claim: "tenant".into(),
            kind: TenantClaimKind::Tenant,
        },
    ]
}

impl IssuerConfig {
    /// An issuer with every optional key at its default.
    pub fn new(issuer: impl Into<String>) -> IssuerConfig {
        IssuerConfig {
            issuer: issuer.into(),
            jwks_file: None,
            jwks_url: None,
            audiences: Vec::new(),
            algorithms: default_algorithms(),
            token_types: default_token_types(),
            dpop: default_dpop(),
            clock_skew_secs: default_skew(),
            jwks_cache_secs: default_jwks_cache(),
            jwks_min_refresh_secs: default_min_refresh(),
            smart_scopes: true,
            scope_map: BTreeMap::new(),
            tenant_claims: default_tenant_claims(),
            org_tenants: BTreeMap::new(),
            jwks_ca_file: None,
            introspection_url: None,
            introspection_client_id: None,
            introspection_client_secret_env: None,
            introspection_cache_secs: default_introspection_cache(),
            min_security_level: None,
        }
    }
}

impl Default for AuthConfig {
    /// Auth off, no issuers.
    fn default() -> Self {
        AuthConfig::off()
    }
}

#[derive(Deserialize)]
struct File {
    auth: Option<AuthConfig>,
}

/// Most seconds of clock skew accepted; more would make `exp` meaningless.
const MAX_SKEW: u64 = 300;
/// Longest reuse of an introspection answer: a revoked token stays usable this long.
const MAX_INTROSPECTION_CACHE: u64 = 3600;
/// Longest nonce window: a nonce lives up to twice this, and nonces exist to keep proofs
/// short-lived.
const MAX_NONCE_WINDOW: u64 = 3600;

impl AuthConfig {
    /// Auth switched off (`--no-auth`).
    pub fn off() -> AuthConfig {
        AuthConfig {
            mode: AuthMode::Off,
            realm: default_realm(),
            issuers: Vec::new(),
            org_tenants: BTreeMap::new(),
            dpop_algorithms: default_algorithms(),
            dpop_max_age_secs: default_dpop_max_age(),
            dpop_replay_cache_entries: default_replay_entries(),
            dpop_nonce: false,
            dpop_nonce_window_secs: default_nonce_window(),
            dpop_nonce_secret_env: None,
            jwks_fetch_timeout_secs: default_fetch_timeout(),
        }
    }

    /// Parses the `[auth]` table of a TOML document and validates it. A document without
    /// `[auth]` is an error.
    pub fn from_toml_str(toml_text: &str) -> Result<AuthConfig, ConfigError> {
        let file: File =
            toml::from_str(toml_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        let cfg = file
            .auth
            .ok_or_else(|| invalid("auth", "the [auth] table is missing"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file (see [`AuthConfig::from_toml_str`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<AuthConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AuthConfig::from_toml_str(&text)
    }

    /// A configuration from environment variables alone, starting from auth off.
    pub fn from_env() -> Result<AuthConfig, ConfigError> {
        AuthConfig::off().with_env_overrides()
    }

    /// Applies the `FHIR_AUTH_*` variables of the process environment (see the module docs)
    /// and validates the result.
    pub fn with_env_overrides(self) -> Result<AuthConfig, ConfigError> {
        self.with_overrides_from(|name| std::env::var(name).ok())
    }

    /// Like [`AuthConfig::with_env_overrides`], reading variables through `lookup` (for tests
    /// and embedders with their own settings source).
    pub fn with_overrides_from(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<AuthConfig, ConfigError> {
        let get = |var: &'static str| lookup(var).filter(|v| !v.trim().is_empty());
        if let Some(v) = get("FHIR_AUTH_MODE") {
            self.mode = match v.trim().to_ascii_lowercase().as_str() {
                "on" => AuthMode::On,
                "off" => AuthMode::Off,
                _ => {
                    return Err(ConfigError::Env {
                        var: "FHIR_AUTH_MODE",
                        message: "expected on or off".into(),
                    });
                }
            };
        }
        if let Some(v) = get("FHIR_AUTH_REALM") {
            self.realm = v;
        }
        if let Some(v) = get("FHIR_AUTH_DPOP_NONCE") {
            self.dpop_nonce = match v.trim().to_ascii_lowercase().as_str() {
                "true" | "on" | "1" => true,
                "false" | "off" | "0" => false,
                _ => {
                    return Err(ConfigError::Env {
                        var: "FHIR_AUTH_DPOP_NONCE",
                        message: "expected true or false".into(),
                    });
                }
            };
        }
        if let Some(v) = get("FHIR_AUTH_DPOP_NONCE_SECRET_ENV") {
            self.dpop_nonce_secret_env = Some(v.trim().to_string());
        }
        if let Some(v) = get("FHIR_AUTH_ORG_TENANTS") {
            for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let (org, tenant) = pair.split_once('=').ok_or_else(|| ConfigError::Env {
                    var: "FHIR_AUTH_ORG_TENANTS",
                    message: format!("'{pair}' is not orgnr=tenant"),
                })?;
                self.org_tenants
                    .insert(org.trim().to_string(), tenant.trim().to_string());
            }
        }

        const ISSUER_VARS: [&str; 11] = [
            "FHIR_AUTH_JWKS_FILE",
            "FHIR_AUTH_JWKS_URL",
            "FHIR_AUTH_AUDIENCES",
            "FHIR_AUTH_ALGORITHMS",
            "FHIR_AUTH_DPOP",
            "FHIR_AUTH_CLOCK_SKEW_SECS",
            "FHIR_AUTH_JWKS_CA_FILE",
            "FHIR_AUTH_MIN_SECURITY_LEVEL",
            "FHIR_AUTH_INTROSPECTION_URL",
            "FHIR_AUTH_INTROSPECTION_CLIENT_ID",
            "FHIR_AUTH_INTROSPECTION_CLIENT_SECRET_ENV",
        ];
        let chosen = get("FHIR_AUTH_ISSUER");
        let any_issuer_var = ISSUER_VARS.iter().any(|v| get(v).is_some());
        if chosen.is_some() || any_issuer_var {
            let idx = match &chosen {
                Some(iss) => match self.issuers.iter().position(|i| &i.issuer == iss) {
                    Some(i) => i,
                    None => {
                        self.issuers.push(IssuerConfig::new(iss.clone()));
                        self.issuers.len() - 1
                    }
                },
                None if self.issuers.len() == 1 => 0,
                None => {
                    let var = ISSUER_VARS
                        .into_iter()
                        .find(|v| get(v).is_some())
                        .unwrap_or("FHIR_AUTH_ISSUER");
                    return Err(ConfigError::Env {
                        var,
                        message: format!(
                            "{} issuers are configured; set FHIR_AUTH_ISSUER to say which one to change",
                            self.issuers.len()
                        ),
                    });
                }
            };
            let issuer = &mut self.issuers[idx];
            if let Some(v) = get("FHIR_AUTH_JWKS_FILE") {
                issuer.jwks_file = Some(PathBuf::from(v));
                issuer.jwks_url = None;
            }
            if let Some(v) = get("FHIR_AUTH_JWKS_URL") {
                issuer.jwks_url = Some(v);
                issuer.jwks_file = None;
            }
            if let Some(v) = get("FHIR_AUTH_AUDIENCES") {
                issuer.audiences = split_list(&v);
            }
            if let Some(v) = get("FHIR_AUTH_ALGORITHMS") {
                issuer.algorithms = split_list(&v)
                    .iter()
                    .map(|a| a.parse())
                    .collect::<Result<_, String>>()
                    .map_err(|message| ConfigError::Env {
                        var: "FHIR_AUTH_ALGORITHMS",
                        message,
                    })?;
            }
            if let Some(v) = get("FHIR_AUTH_DPOP") {
                issuer.dpop = match v.trim().to_ascii_lowercase().as_str() {
                    "off" => DpopMode::Off,
                    "optional" => DpopMode::Optional,
                    "required" => DpopMode::Required,
                    _ => {
                        return Err(ConfigError::Env {
                            var: "FHIR_AUTH_DPOP",
                            message: "expected off, optional or required".into(),
                        });
                    }
                };
            }
            if let Some(v) = get("FHIR_AUTH_CLOCK_SKEW_SECS") {
                issuer.clock_skew_secs = v.trim().parse().map_err(|_| ConfigError::Env {
                    var: "FHIR_AUTH_CLOCK_SKEW_SECS",
                    message: "expected a whole number of seconds".into(),
                })?;
            }
            if let Some(v) = get("FHIR_AUTH_JWKS_CA_FILE") {
                issuer.jwks_ca_file = Some(PathBuf::from(v));
            }
            if let Some(v) = get("FHIR_AUTH_MIN_SECURITY_LEVEL") {
                issuer.min_security_level =
                    Some(v.trim().parse().map_err(|_| ConfigError::Env {
                        var: "FHIR_AUTH_MIN_SECURITY_LEVEL",
                        message: "expected a level from 1 to 4".into(),
                    })?);
            }
            if let Some(v) = get("FHIR_AUTH_INTROSPECTION_URL") {
                issuer.introspection_url = Some(v);
            }
            if let Some(v) = get("FHIR_AUTH_INTROSPECTION_CLIENT_ID") {
                issuer.introspection_client_id = Some(v);
            }
            if let Some(v) = get("FHIR_AUTH_INTROSPECTION_CLIENT_SECRET_ENV") {
                issuer.introspection_client_secret_env = Some(v);
            }
        }
        self.validate()?;
        Ok(self)
    }

    /// Checks everything serde cannot: required combinations, value ranges, scope syntax,
    /// tenant ids. Errors name the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.realm.is_empty() || !self.realm.bytes().all(|b| (b' '..=b'~').contains(&b)) {
            return Err(invalid("auth.realm", "must be non-empty printable ASCII"));
        }
        if self.dpop_algorithms.is_empty() {
            return Err(invalid("auth.dpop_algorithms", "must not be empty"));
        }
        if !(1..=3600).contains(&self.dpop_max_age_secs) {
            return Err(invalid("auth.dpop_max_age_secs", "must be 1 to 3600"));
        }
        if self.dpop_replay_cache_entries == 0 {
            return Err(invalid(
                "auth.dpop_replay_cache_entries",
                "must be at least 1",
            ));
        }
        if !(1..=MAX_NONCE_WINDOW).contains(&self.dpop_nonce_window_secs) {
            return Err(invalid(
                "auth.dpop_nonce_window_secs",
                format!("must be 1 to {MAX_NONCE_WINDOW}"),
            ));
        }
        if let Some(v) = &self.dpop_nonce_secret_env
            && !is_env_name(v)
        {
            return Err(invalid(
                "auth.dpop_nonce_secret_env",
                "must be the name of an environment variable (A-Z, 0-9, _), not the key",
            ));
        }
        if self.jwks_fetch_timeout_secs == 0 {
            return Err(invalid(
                "auth.jwks_fetch_timeout_secs",
                "must be at least 1",
            ));
        }
        check_org_tenants("auth.org_tenants", &self.org_tenants)?;
        if self.mode == AuthMode::On && self.issuers.is_empty() {
            return Err(invalid(
                "auth.issuer",
                "mode = \"on\" needs at least one [[auth.issuer]]",
            ));
        }
        for (i, iss) in self.issuers.iter().enumerate() {
            let key = |k: &str| format!("auth.issuer[{i}].{k}");
            if iss.issuer.trim().is_empty() {
                return Err(invalid(key("issuer"), "must not be empty"));
            }
            if self.issuers[..i].iter().any(|o| o.issuer == iss.issuer) {
                return Err(invalid(
                    key("issuer"),
                    format!("'{}' is configured twice", iss.issuer),
                ));
            }
            match (&iss.jwks_file, &iss.jwks_url) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        key("jwks_url"),
                        "give either jwks_file or jwks_url, not both",
                    ));
                }
                (None, None) if iss.introspection_url.is_none() => {
                    return Err(invalid(
                        key("jwks_file"),
                        "give jwks_file or jwks_url (or introspection_url for opaque tokens)",
                    ));
                }
                (None, None) => {}
                (None, Some(url)) => {
                    check_jwks_url(url).map_err(|m| invalid(key("jwks_url"), m))?
                }
                (Some(_), None) => {}
            }
            if iss.audiences.is_empty() || iss.audiences.iter().any(|a| a.is_empty()) {
                return Err(invalid(
                    key("audiences"),
                    "at least one non-empty audience is required (tokens for other APIs must be refused)",
                ));
            }
            if iss.algorithms.is_empty() {
                return Err(invalid(key("algorithms"), "must not be empty"));
            }
            if iss.token_types.is_empty() {
                return Err(invalid(key("token_types"), "must not be empty"));
            }
            if iss.clock_skew_secs > MAX_SKEW {
                return Err(invalid(
                    key("clock_skew_secs"),
                    format!("at most {MAX_SKEW} seconds"),
                ));
            }
            if iss.jwks_cache_secs == 0 {
                return Err(invalid(key("jwks_cache_secs"), "must be at least 1"));
            }
            for (from, to) in &iss.scope_map {
                for s in to {
                    match SmartScope::parse(s) {
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            return Err(invalid(
                                format!("auth.issuer[{i}].scope_map.\"{from}\""),
                                format!("'{s}' is not a SMART resource scope"),
                            ));
                        }
                        Err(e) => {
                            return Err(invalid(
                                format!("auth.issuer[{i}].scope_map.\"{from}\""),
                                e.to_string(),
                            ));
                        }
                    }
                }
            }
            if iss.tenant_claims.is_empty() {
                return Err(invalid(
                    key("tenant_claims"),
                    "must not be empty: without a tenant claim no token reaches any tenant",
                ));
            }
            if iss.tenant_claims.iter().any(|c| c.claim.is_empty()) {
                return Err(invalid(key("tenant_claims"), "a claim name is empty"));
            }
            check_org_tenants(&key("org_tenants"), &iss.org_tenants)?;
            if iss
                .jwks_ca_file
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                return Err(invalid(key("jwks_ca_file"), "must not be empty"));
            }
            check_introspection(i, iss, &self.issuers[..i])?;
            if let Some(level) = iss.min_security_level
                && !(1..=4).contains(&level)
            {
                return Err(invalid(
                    key("min_security_level"),
                    "HelseID security levels are 1 to 4",
                ));
            }
        }
        Ok(())
    }
}

fn split_list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

fn check_org_tenants(key: &str, map: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    for (org, tenant) in map {
        if org.trim().is_empty() {
            return Err(invalid(key, "an organisation number is empty"));
        }
        if fhir_core::TenantId::new(tenant).is_err() {
            return Err(invalid(
                format!("{key}.\"{org}\""),
                format!("'{tenant}' is not a valid tenant id"),
            ));
        }
    }
    Ok(())
}

/// `https://…`, or `http://` to a loopback host (tests, sidecars): plain HTTP elsewhere would
/// let anyone on the path substitute the issuer's keys.
fn check_jwks_url(url: &str) -> Result<(), String> {
    super::fetch::check_url(url).map(|_| ())
}

/// The introspection keys come as a set, and only one issuer may have them: an opaque token
/// names no issuer, so with several endpoints one server's tokens would be shown to another.
fn check_introspection(
    i: usize,
    iss: &IssuerConfig,
    earlier: &[IssuerConfig],
) -> Result<(), ConfigError> {
    let key = |k: &str| format!("auth.issuer[{i}].{k}");
    let Some(url) = &iss.introspection_url else {
        for (k, set) in [
            (
                "introspection_client_id",
                iss.introspection_client_id.is_some(),
            ),
            (
                "introspection_client_secret_env",
                iss.introspection_client_secret_env.is_some(),
            ),
        ] {
            if set {
                return Err(invalid(key(k), "only meaningful with introspection_url"));
            }
        }
        return Ok(());
    };
    check_jwks_url(url).map_err(|m| invalid(key("introspection_url"), m))?;
    if earlier.iter().any(|o| o.introspection_url.is_some()) {
        return Err(invalid(
            key("introspection_url"),
            "only one issuer may use introspection: an opaque token does not say which \
             issuer it is from, and must not be shown to another one",
        ));
    }
    if iss
        .introspection_client_id
        .as_deref()
        .is_none_or(|c| c.trim().is_empty())
    {
        return Err(invalid(
            key("introspection_client_id"),
            "introspection_url needs the client id this server authenticates with",
        ));
    }
    match iss.introspection_client_secret_env.as_deref() {
        Some(v) if is_env_name(v) => {}
        Some(_) => {
            return Err(invalid(
                key("introspection_client_secret_env"),
                "must be the name of an environment variable (A-Z, 0-9, _), not the secret",
            ));
        }
        None => {
            return Err(invalid(
                key("introspection_client_secret_env"),
                "introspection_url needs the name of the environment variable holding the \
                 client secret",
            ));
        }
    }
    if iss.introspection_cache_secs > MAX_INTROSPECTION_CACHE {
        return Err(invalid(
            key("introspection_cache_secs"),
            format!("at most {MAX_INTROSPECTION_CACHE} seconds"),
        ));
    }
    Ok(())
}

/// A portable environment variable name: letters, digits and `_`, not starting with a digit.
fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [auth]
        mode = "on"
        [[auth.issuer]]
        issuer = "https://issuer.example"
        jwks_file = "/tmp/jwks.json"
        audiences = ["fhir"]
    "#;

    fn err_key(text: &str) -> String {
        match AuthConfig::from_toml_str(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn examples_parse() {
        let h = AuthConfig::from_toml_str(include_str!("examples/helseid.toml"))
            .expect("helseid example");
        assert_eq!(h.issuers[0].dpop, DpopMode::Required);
        assert!(!h.issuers[0].smart_scopes);
        assert_eq!(h.issuers[0].min_security_level, Some(4));
        assert!(
            h.issuers[0]
                .jwks_url
                .as_deref()
                .is_some_and(|u| u.starts_with("https://"))
        );
        let s =
            AuthConfig::from_toml_str(include_str!("examples/smart.toml")).expect("smart example");
        assert_eq!(s.mode, AuthMode::On);
        let i = &s.issuers[0];
        assert!(i.introspection_url.is_some());
        assert_eq!(
            i.introspection_client_secret_env.as_deref(),
            Some("FHIR_INTROSPECTION_SECRET")
        );
        assert_eq!(i.introspection_cache_secs, 60);
        assert!(h.dpop_nonce, "HelseID example asks for server nonces");
        assert_eq!(h.dpop_nonce_window_secs, 300);
        assert!(!s.dpop_nonce);
    }

    #[test]
    fn dpop_nonce_keys() {
        let c = AuthConfig::from_toml_str(MINIMAL).expect("valid");
        assert!(!c.dpop_nonce, "off by default");
        assert_eq!(c.dpop_nonce_window_secs, 300);
        assert_eq!(c.dpop_nonce_secret_env, None);
        let on = MINIMAL.replace(
            "mode = \"on\"",
            "mode = \"on\"\ndpop_nonce = true\ndpop_nonce_window_secs = 60\n\
             dpop_nonce_secret_env = \"NONCE_KEY\"",
        );
        let c = AuthConfig::from_toml_str(&on).expect("valid");
        assert!(c.dpop_nonce);
        assert_eq!(c.dpop_nonce_window_secs, 60);
        assert_eq!(c.dpop_nonce_secret_env.as_deref(), Some("NONCE_KEY"));
        assert_eq!(
            err_key(&on.replace("= 60", "= 0")),
            "auth.dpop_nonce_window_secs"
        );
        assert_eq!(
            err_key(&on.replace("NONCE_KEY", "s3cr3t key")),
            "auth.dpop_nonce_secret_env"
        );
        for (value, want) in [("true", true), ("ON", true), ("0", false), ("false", false)] {
            let c = AuthConfig::from_toml_str(&on)
                .and_then(|c| {
                    c.with_overrides_from(|k| (k == "FHIR_AUTH_DPOP_NONCE").then(|| value.into()))
                })
                .expect("valid");
            assert_eq!(c.dpop_nonce, want, "{value}");
        }
        let bad = AuthConfig::from_toml_str(MINIMAL).and_then(|c| {
            c.with_overrides_from(|k| (k == "FHIR_AUTH_DPOP_NONCE").then(|| "maybe".into()))
        });
        assert!(matches!(
            bad,
            Err(ConfigError::Env {
                var: "FHIR_AUTH_DPOP_NONCE",
                ..
            })
        ));
        let c = AuthConfig::from_toml_str(MINIMAL)
            .and_then(|c| {
                c.with_overrides_from(|k| {
                    (k == "FHIR_AUTH_DPOP_NONCE_SECRET_ENV").then(|| "SHARED_NONCE".into())
                })
            })
            .expect("valid");
        assert_eq!(c.dpop_nonce_secret_env.as_deref(), Some("SHARED_NONCE"));
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = AuthConfig::from_toml_str(MINIMAL).expect("valid");
        let i = &c.issuers[0];
        assert_eq!(i.algorithms, default_algorithms());
        assert_eq!(i.dpop, DpopMode::Optional);
        assert_eq!(i.tenant_claims[0].claim, HELSEID_ORGNR_PARENT);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err_key("[auth]\nmode = \"on\""), "auth.issuer");
        assert_eq!(
            err_key(&MINIMAL.replace("[\"fhir\"]", "[]")),
            "auth.issuer[0].audiences"
        );
        assert_eq!(
            err_key(&MINIMAL.replace("jwks_file = \"/tmp/jwks.json\"", "")),
            "auth.issuer[0].jwks_file"
        );
        assert_eq!(
            err_key(&MINIMAL.replace(
                "jwks_file = \"/tmp/jwks.json\"",
                "jwks_url = \"http://evil.example/jwks\""
            )),
            "auth.issuer[0].jwks_url"
        );
        assert_eq!(
            err_key(&format!(
                "{MINIMAL}\n[auth.issuer.scope_map]\n\"api/read\" = [\"user/Patient.sr\"]"
            )),
            "auth.issuer[0].scope_map.\"api/read\""
        );
        assert_eq!(
            err_key(&format!(
                "{MINIMAL}\n[auth.issuer.org_tenants]\n\"1\" = \"bad id!\""
            )),
            "auth.issuer[0].org_tenants.\"1\""
        );
        assert_eq!(err_key("x = 1"), "auth");
    }

    #[test]
    fn serde_errors_name_the_key_too() {
        let e =
            AuthConfig::from_toml_str(&MINIMAL.replace("audiences", "audience")).expect_err("typo");
        assert!(e.to_string().contains("audience"), "{e}");
        let e = AuthConfig::from_toml_str(&format!("{MINIMAL}algorithms = [\"HS256\"]"))
            .expect_err("hs256");
        assert!(e.to_string().contains("HS256"), "{e}");
        let e =
            AuthConfig::from_toml_str(&MINIMAL.replace("\"on\"", "\"maybe\"")).expect_err("mode");
        assert!(e.to_string().contains("mode"), "{e}");
    }

    #[test]
    fn env_overrides() {
        let env: BTreeMap<&str, &str> = [
            ("FHIR_AUTH_MODE", "off"),
            ("FHIR_AUTH_JWKS_URL", "https://issuer.example/jwks"),
            ("FHIR_AUTH_AUDIENCES", "a, b"),
            ("FHIR_AUTH_DPOP", "required"),
            ("FHIR_AUTH_ORG_TENANTS", "983974899=hb"),
        ]
        .into();
        let c = AuthConfig::from_toml_str(MINIMAL)
            .and_then(|c| c.with_overrides_from(|k| env.get(k).map(|v| v.to_string())))
            .expect("valid");
        assert_eq!(c.mode, AuthMode::Off);
        let i = &c.issuers[0];
        assert_eq!(i.jwks_file, None);
        assert_eq!(i.jwks_url.as_deref(), Some("https://issuer.example/jwks"));
        assert_eq!(i.audiences, vec!["a", "b"]);
        assert_eq!(i.dpop, DpopMode::Required);
        assert_eq!(
            c.org_tenants.get("983974899").map(String::as_str),
            Some("hb")
        );
    }

    #[test]
    fn env_overrides_for_tls_introspection_and_security_level() {
        let env: BTreeMap<&str, &str> = [
            ("FHIR_AUTH_JWKS_CA_FILE", "/etc/fhir/ca.pem"),
            ("FHIR_AUTH_MIN_SECURITY_LEVEL", "4"),
            (
                "FHIR_AUTH_INTROSPECTION_URL",
                "https://idp.example/introspect",
            ),
            ("FHIR_AUTH_INTROSPECTION_CLIENT_ID", "fhir-api"),
            ("FHIR_AUTH_INTROSPECTION_CLIENT_SECRET_ENV", "MY_SECRET"),
        ]
        .into();
        let c = AuthConfig::from_toml_str(MINIMAL)
            .and_then(|c| c.with_overrides_from(|k| env.get(k).map(|v| v.to_string())))
            .expect("valid");
        let i = &c.issuers[0];
        assert_eq!(
            i.jwks_ca_file.as_deref(),
            Some(Path::new("/etc/fhir/ca.pem"))
        );
        assert_eq!(i.min_security_level, Some(4));
        assert_eq!(
            i.introspection_url.as_deref(),
            Some("https://idp.example/introspect")
        );
        assert_eq!(i.introspection_client_id.as_deref(), Some("fhir-api"));
        assert_eq!(
            i.introspection_client_secret_env.as_deref(),
            Some("MY_SECRET")
        );
        // Out-of-range levels are refused by the same check as in the file.
        for bad in ["9", "x"] {
            let r = AuthConfig::from_toml_str(MINIMAL).and_then(|c| {
                c.with_overrides_from(|k| {
                    (k == "FHIR_AUTH_MIN_SECURITY_LEVEL").then(|| bad.to_string())
                })
            });
            assert!(r.is_err(), "{bad}");
        }
    }

    #[test]
    fn env_alone_builds_a_config() {
        let env: BTreeMap<&str, &str> = [
            ("FHIR_AUTH_MODE", "on"),
            ("FHIR_AUTH_ISSUER", "https://idp.example"),
            ("FHIR_AUTH_JWKS_FILE", "/etc/jwks.json"),
            ("FHIR_AUTH_AUDIENCES", "fhir"),
        ]
        .into();
        let c = AuthConfig::off()
            .with_overrides_from(|k| env.get(k).map(|v| v.to_string()))
            .expect("valid");
        assert_eq!(c.issuers.len(), 1);
        assert_eq!(c.issuers[0].issuer, "https://idp.example");
        let bad = AuthConfig::off()
            .with_overrides_from(|k| (k == "FHIR_AUTH_AUDIENCES").then(|| "x".to_string()));
        assert!(matches!(
            bad,
            Err(ConfigError::Env {
                var: "FHIR_AUTH_AUDIENCES",
                ..
            })
        ));
        let bad = AuthConfig::off()
            .with_overrides_from(|k| (k == "FHIR_AUTH_MODE").then(|| "yes".to_string()));
        assert!(matches!(
            bad,
            Err(ConfigError::Env {
                var: "FHIR_AUTH_MODE",
                ..
            })
        ));
    }

    #[test]
    fn introspection_and_security_level_keys() {
        let intro = MINIMAL.replace(
            "jwks_file = \"/tmp/jwks.json\"",
            "introspection_url = \"https://idp.example/introspect\"\n\
             introspection_client_id = \"api\"\n\
             introspection_client_secret_env = \"API_SECRET\"",
        );
        let c = AuthConfig::from_toml_str(&intro).expect("introspection without a JWKS");
        assert_eq!(c.issuers[0].introspection_cache_secs, 60);
        assert_eq!(
            err_key(&intro.replace("API_SECRET", "hunter 2")),
            "auth.issuer[0].introspection_client_secret_env"
        );
        assert_eq!(
            err_key(&format!("{MINIMAL}introspection_client_id = \"api\"")),
            "auth.issuer[0].introspection_client_id"
        );
        assert_eq!(
            err_key(&format!("{MINIMAL}min_security_level = 5")),
            "auth.issuer[0].min_security_level"
        );
        assert_eq!(
            err_key(&format!("{MINIMAL}jwks_ca_file = \"\"")),
            "auth.issuer[0].jwks_ca_file"
        );
    }

    #[test]
    fn jwks_url_rules() {
        assert!(check_jwks_url("https://helseid-sts.nhn.no/jwks").is_ok());
        assert!(check_jwks_url("http://127.0.0.1:9/jwks").is_ok());
        assert!(check_jwks_url("http://localhost/jwks").is_ok());
        assert!(check_jwks_url("http://[::1]:8/jwks").is_ok());
        assert!(check_jwks_url("http://10.0.0.1/jwks").is_err());
        assert!(check_jwks_url("file:///etc/jwks").is_err());
        assert!(check_jwks_url("https://").is_err());
    }
}
