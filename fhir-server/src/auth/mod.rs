//! Authentication and authorisation: JWT access tokens (Bearer and DPoP), SMART scopes,
//! tenant binding.
//!
//! # Flow
//!
//! ```text
//! Authorization: Bearer|DPoP <token>    ──► Authenticator::authenticate(method, url, headers)
//!   1. header syntax                          MissingCredentials / UnsupportedScheme / MalformedAuthorization
//!   a JWT (three dot-separated parts):
//!   2. JWS shape, alg (no none, no HS*)       MalformedToken / UnsupportedAlgorithm
//!   3. iss → configured issuer, typ           UnknownIssuer / InvalidType
//!   4. scheme vs the issuer's dpop mode       DpopRequired / DpopNotAccepted
//!   5. key by kid (JWKS, refreshed on miss)   UnknownKey / Unavailable
//!   6. signature                              InvalidSignature
//!   any other token, when an issuer has introspection_url (RFC 7662):
//!   2. scheme vs the issuer's dpop mode       DpopRequired / DpopNotAccepted
//!   3. introspection (cached)                 InactiveToken / UnknownIssuer / Unavailable
//!   then, for both:
//!   7. exp, nbf, iat (± skew), aud            Expired / NotYetValid / InvalidAudience
//!   8. cnf.jkt vs scheme; DPoP proof          BoundTokenAsBearer / InvalidDpopProof(…)
//!   9. claims → Principal (scopes mapped, patient context, tenants, HelseID facts)
//!  10. HelseID security level of a user       InsufficientUserAuthentication
//!  11. DPoP nonce, when dpop_nonce = true     InvalidDpopProof(NonceMissing / NonceInvalid / NonceStale)
//!  12. DPoP proof jti into the replay cache   InvalidDpopProof(Replay) / Unavailable
//! ──► Principal::check_tenant(&tenant)?  and  Principal::check(interaction, type)?  (403s)
//! ```
//!
//! JWKS documents and introspection answers are fetched over HTTPS with rustls (see
//! [`HttpsFetcher`]); nothing is fetched at start-up, keys load on first use and on an unknown
//! `kid`.
//!
//! Every error maps to a status and a `WWW-Authenticate` value: see [`AuthError`] and
//! [`Authenticator::www_authenticate`]. With server DPoP nonces on (`dpop_nonce = true`, RFC
//! 9449 §8–9), a proof without a valid nonce gets `DPoP …, error="use_dpop_nonce"`, and every
//! response to a DPoP request should carry a [`DPOP_NONCE_HEADER`] with
//! [`Authenticator::dpop_nonce_for`], which is where the client learns the nonce.
//!
//! Configuration, its environment overrides and two complete examples (HelseID, generic SMART)
//! are described in [`config`]; the examples are `src/auth/examples/helseid.toml` and
//! `src/auth/examples/smart.toml`.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(headers: axum::http::HeaderMap) -> Result<(), Box<dyn std::error::Error>> {
//! use fhir_server::auth::{AuthConfig, Authenticator, Interaction};
//! use fhir_core::TenantId;
//!
//! let config = AuthConfig::from_file("/etc/fhir/server.toml")?.with_env_overrides()?;
//! let auth = Authenticator::new(config)?;
//! let principal = auth
//!     .authenticate(&axum::http::Method::GET, "https://fhir.example/fhir/hf-vest/Observation?code=8867-4", &headers)
//!     .await?;
//! principal.check_tenant(&TenantId::new("hf-vest")?)?;
//! let access = principal.check(Interaction::SearchType, "Observation")?;
//! // `access` may restrict results to the patient's compartment or to scope filters.
//! # let _ = access; Ok(()) }
//! ```

pub mod config;
mod dpop;
pub mod error;
mod fetch;
mod introspection;
pub mod jwks;
mod jwt;
pub mod principal;
pub mod scopes;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method};
use serde_json::Value;

pub use config::{
    AuthConfig, AuthMode, ConfigError, DpopMode, IssuerConfig, TenantClaim, TenantClaimKind,
};
pub use error::{AuthError, DpopError, Scheme};
pub use fetch::HttpsFetcher;
pub use jwks::{FetchError, FetchFuture, JwksFetcher};
pub use jwt::SigningAlg;
pub use principal::{OrgNumbers, Principal, PurposeOfUse, TenantAccess};
pub use scopes::{
    Access, Interaction, Permissions, Restriction, ScopeContext, ScopeError, SmartScope,
};

use dpop::{MIN_NONCE_SECRET_LEN, NonceKeys, ProofRules, ReplayCache, ReplayError};
use error::clip;
use fetch::HttpClient;
use introspection::Introspector;
use jwks::{KeySource, KeyStore};
use jwt::Jws;
use principal::ClaimRules;

/// The response header carrying the server's current DPoP nonce (RFC 9449 §8.1), in the
/// lower case `HeaderName::from_static` wants.
pub const DPOP_NONCE_HEADER: &str = "dpop-nonce";

/// One configured issuer, ready for use.
struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<SigningAlg>,
    token_types: Vec<String>,
    dpop: DpopMode,
    skew: i64,
    /// Signing keys, and what fetches them; `None` for an introspection-only issuer.
    keys: Option<(KeyStore, Arc<dyn JwksFetcher>)>,
    introspection: Option<Introspector>,
    min_security_level: Option<u8>,
    rules: ClaimRules,
}

struct Inner {
    mode: AuthMode,
    realm: String,
    issuers: Vec<Issuer>,
    /// The issuer asked about opaque tokens (config validation allows one at most).
    introspecting: Option<usize>,
    dpop_algorithms: Vec<SigningAlg>,
    dpop_max_age: i64,
    replay: ReplayCache,
    /// Server nonces (`dpop_nonce = true`); `None` when off.
    nonces: Option<NonceKeys>,
}

/// Validates requests' credentials against the configured issuers. Cheap to clone (shared
/// state: key caches and the DPoP replay cache).
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.inner.mode)
            .field(
                "issuers",
                &self
                    .inner
                    .issuers
                    .iter()
                    .map(|i| i.issuer.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Authenticator {
    /// Builds an authenticator with the built-in [`HttpsFetcher`] for JWKS URLs (HTTPS with
    /// the system CA store plus each issuer's `jwks_ca_file`, or plain HTTP to loopback hosts),
    /// reading introspection client secrets from the process environment.
    ///
    /// Nothing is fetched here: keys load on first use. JWKS files and CA files are read now,
    /// so a missing or unusable file fails start-up, and so does a missing introspection
    /// secret.
    pub fn new(config: AuthConfig) -> Result<Authenticator, ConfigError> {
        Authenticator::build(config, None, &|name| std::env::var(name).ok())
    }

    /// Builds an authenticator that fetches JWKS URLs with `fetcher` (an embedder's own HTTP
    /// stack). Its trust roots are the fetcher's business: `jwks_ca_file` then only applies to
    /// introspection, which always uses the built-in client.
    pub fn with_fetcher(
        config: AuthConfig,
        fetcher: Arc<dyn JwksFetcher>,
    ) -> Result<Authenticator, ConfigError> {
        Authenticator::build(config, Some(fetcher), &|name| std::env::var(name).ok())
    }

    /// Like [`Authenticator::new`], looking up the environment variables named by
    /// `introspection_client_secret_env` through `secret` instead of the process environment
    /// (for embedders with a secret store, and tests).
    pub fn with_secrets(
        config: AuthConfig,
        secret: impl Fn(&str) -> Option<String>,
    ) -> Result<Authenticator, ConfigError> {
        Authenticator::build(config, None, &secret)
    }

    fn build(
        config: AuthConfig,
        fetcher: Option<Arc<dyn JwksFetcher>>,
        secret: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Authenticator, ConfigError> {
        config.validate()?;
        let mut issuers = Vec::new();
        if config.mode == AuthMode::On {
            for (i, ic) in config.issuers.iter().enumerate() {
                issuers.push(build_issuer(i, ic, &config, fetcher.as_ref(), secret)?);
            }
        }
        let introspecting = issuers.iter().position(|i| i.introspection.is_some());
        let nonces = if config.mode == AuthMode::On && config.dpop_nonce {
            Some(nonce_keys(&config, secret)?)
        } else {
            None
        };
        Ok(Authenticator {
            inner: Arc::new(Inner {
                mode: config.mode,
                realm: config.realm.clone(),
                issuers,
                introspecting,
                dpop_algorithms: config.dpop_algorithms.clone(),
                dpop_max_age: i64::try_from(config.dpop_max_age_secs).unwrap_or(i64::MAX),
                replay: ReplayCache::new(config.dpop_replay_cache_entries),
                nonces,
            }),
        })
    }

    /// Whether requests are checked at all.
    pub fn mode(&self) -> AuthMode {
        self.inner.mode
    }

    /// Loads every issuer's keys now (fetching URLs), e.g. for a readiness check. Requests
    /// load keys on demand anyway.
    pub async fn preload_keys(&self) -> Result<(), AuthError> {
        for (keys, fetcher) in self.inner.issuers.iter().filter_map(|i| i.keys.as_ref()) {
            // No kid: loads the set if it was never loaded; "no key for this alg" is fine here.
            match keys
                .candidates(None, SigningAlg::RS256, fetcher.as_ref())
                .await
            {
                Ok(_) | Err(AuthError::UnknownKey(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Checks the request's credentials and returns who is calling.
    ///
    /// `url` is the absolute URL the client used (scheme, host, path; the query is ignored),
    /// needed to check a DPoP proof's `htu`; behind a proxy build it from the public base URL.
    /// With auth off, every request gets [`Principal::unrestricted`]. Never panics, whatever
    /// the headers hold.
    pub async fn authenticate(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
    ) -> Result<Principal, AuthError> {
        self.authenticate_at(method, url, headers, unix_now()).await
    }

    async fn authenticate_at(
        &self,
        method: &Method,
        url: &str,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<Principal, AuthError> {
        if self.inner.mode == AuthMode::Off {
            return Ok(Principal::unrestricted());
        }
        let (scheme, token) = parse_authorization(headers)?;
        let (issuer, claims) = match self.inner.introspecting {
            Some(i) if !looks_like_jws(token) => {
                let issuer = &self.inner.issuers[i];
                (issuer, self.introspect(issuer, scheme, token, now).await?)
            }
            _ => self.verify_jws(scheme, token).await?,
        };

        check_times(&claims, issuer.skew, now)?;
        check_audience(&claims, &issuer.audiences)?;

        let bound_jkt = match claims.get("cnf") {
            None | Some(Value::Null) => None,
            Some(Value::Object(cnf)) => match cnf.get("jkt") {
                None => None,
                Some(Value::String(j)) => Some(j.clone()),
                Some(_) => {
                    return Err(AuthError::InvalidClaim {
                        claim: "cnf.jkt".into(),
                        reason: "expected a string".into(),
                    });
                }
            },
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: "cnf".into(),
                    reason: "expected an object".into(),
                });
            }
        };
        let proof = match scheme {
            Scheme::Bearer => {
                if bound_jkt.is_some() {
                    return Err(AuthError::BoundTokenAsBearer);
                }
                None
            }
            Scheme::Dpop => {
                let jkt = bound_jkt.ok_or(AuthError::InvalidDpopProof(DpopError::UnboundToken))?;
                let rules = ProofRules {
                    algorithms: self.inner.dpop_algorithms.clone(),
                    max_age: self.inner.dpop_max_age,
                    skew: issuer.skew,
                };
                let proof = dpop::check_proof(headers, method, url, token, &rules, now)
                    .map_err(AuthError::InvalidDpopProof)?;
                if proof.jkt != jkt {
                    return Err(AuthError::InvalidDpopProof(DpopError::KeyMismatch));
                }
                Some(proof)
            }
        };

        let jkt = proof.as_ref().map(|p| p.jkt.clone());
        let principal = Principal::from_claims(claims, &issuer.rules, jkt)?;
        if let Some(min) = issuer.min_security_level {
            check_security_level(&principal, min)?;
        }
        // The nonce is checked after everything else, so that `use_dpop_nonce` means "only the
        // nonce is wrong" and the client's retry with the nonce succeeds instead of meeting the
        // next error; and before the replay cache, so that a proof refused for its nonce does
        // not use up its jti (RFC 9449 §8: the retry carries a new proof anyway).
        if let (Some(proof), Some(nonces)) = (&proof, &self.inner.nonces) {
            nonces
                .check(proof.nonce.as_deref(), now)
                .map_err(AuthError::InvalidDpopProof)?;
        }
        // Recorded last, so that requests failing any other check do not fill the cache.
        if let Some(proof) = proof {
            dpop::commit(&self.inner.replay, &proof, now).map_err(|e| match e {
                ReplayError::Replay => AuthError::InvalidDpopProof(DpopError::Replay),
                ReplayError::Full => {
                    tracing::error!("DPoP replay cache is full; refusing DPoP requests");
                    AuthError::Unavailable("too many recent DPoP proofs".into())
                }
            })?;
        }
        Ok(principal)
    }

    /// The value of the [`DPOP_NONCE_HEADER`] for the response to a request with `headers`: the
    /// current nonce when `dpop_nonce` is on and the request uses `Authorization: DPoP`,
    /// whether it succeeds or fails (RFC 9449 §8.2: so that a client can keep its nonce fresh
    /// without an extra round trip, and learns it from a `use_dpop_nonce` refusal). `None` for
    /// Bearer and unauthenticated requests, and when nonces or auth are off.
    pub fn dpop_nonce_for(&self, headers: &HeaderMap) -> Option<String> {
        let nonces = self.inner.nonces.as_ref()?;
        uses_dpop_scheme(headers).then(|| nonces.issue(unix_now()))
    }

    /// Checks a JWT up to its signature: shape, algorithm, issuer, type, scheme, key.
    async fn verify_jws(
        &self,
        scheme: Scheme,
        token: &str,
    ) -> Result<(&Issuer, serde_json::Map<String, Value>), AuthError> {
        let jws = Jws::parse(token).map_err(AuthError::MalformedToken)?;

        let alg_text = jws.alg().map_err(AuthError::MalformedToken)?;
        let alg: SigningAlg = alg_text
            .parse()
            .map_err(|_| AuthError::UnsupportedAlgorithm(clip(alg_text)))?;
        if jws.header.contains_key("crit") {
            // RFC 7515 §4.1.11: extensions we do not understand must not be ignored.
            return Err(AuthError::MalformedToken(
                "critical header parameters are not supported".into(),
            ));
        }
        let iss = match jws.claims.get("iss") {
            Some(Value::String(s)) => s.as_str(),
            _ => return Err(AuthError::UnknownIssuer("(no iss claim)".into())),
        };
        let issuer = self
            .inner
            .issuers
            .iter()
            .find(|i| i.issuer == iss)
            .ok_or_else(|| AuthError::UnknownIssuer(clip(iss)))?;
        if !issuer.algorithms.contains(&alg) {
            return Err(AuthError::UnsupportedAlgorithm(alg.to_string()));
        }
        match jws.header_str("typ").map_err(AuthError::MalformedToken)? {
            None => return Err(AuthError::InvalidType("(none)".into())),
            Some(t)
                if !issuer
                    .token_types
                    .iter()
                    .any(|want| dpop::media_type_is(t, want)) =>
            {
                return Err(AuthError::InvalidType(clip(t)));
            }
            Some(_) => {}
        }
        check_scheme(scheme, issuer.dpop)?;

        let Some((store, fetcher)) = &issuer.keys else {
            // An introspection-only issuer publishes no keys to check its JWTs with.
            return Err(AuthError::UnknownKey(
                "(the issuer has no JWKS configured)".into(),
            ));
        };
        let kid = jws.header_str("kid").map_err(AuthError::MalformedToken)?;
        let keys = store.candidates(kid, alg, fetcher.as_ref()).await?;
        if !keys.iter().any(|k| jws.verify(k, alg)) {
            return Err(AuthError::InvalidSignature);
        }
        Ok((issuer, jws.into_claims()))
    }

    /// Asks `issuer`'s introspection endpoint about an opaque token.
    async fn introspect(
        &self,
        issuer: &Issuer,
        scheme: Scheme,
        token: &str,
        now: i64,
    ) -> Result<serde_json::Map<String, Value>, AuthError> {
        if token.len() > jwt::MAX_JWS_LEN {
            return Err(AuthError::MalformedToken(format!(
                "longer than {} bytes",
                jwt::MAX_JWS_LEN
            )));
        }
        check_scheme(scheme, issuer.dpop)?;
        let Some(introspector) = &issuer.introspection else {
            return Err(AuthError::MalformedToken(
                "expected three dot-separated parts (compact JWS)".into(),
            ));
        };
        let claims = introspector.introspect(token, now).await?;
        Ok(claims.as_ref().clone())
    }

    /// The `WWW-Authenticate` values for `err` (one header line each), fitting the
    /// configuration: a `Bearer` challenge when some issuer accepts Bearer tokens, a `DPoP`
    /// challenge with `algs` when some issuer accepts DPoP; the error code goes on the
    /// challenge of [`AuthError::scheme`] (or the only one offered). Empty when `err` takes no
    /// challenge (403 tenant mismatch, 503).
    ///
    /// Example for an expired token with one issuer at `dpop = "required"`:
    /// `DPoP realm="fhir", algs="RS256 PS256 ES256", error="invalid_token", error_description="the access token has expired"`.
    pub fn www_authenticate(&self, err: &AuthError) -> Vec<String> {
        if !err.has_challenge() {
            return Vec::new();
        }
        let issuers = &self.inner.issuers;
        let bearer = issuers.is_empty() || issuers.iter().any(|i| i.dpop != DpopMode::Required);
        let dpop = issuers.iter().any(|i| i.dpop != DpopMode::Off);
        let target = match err.scheme() {
            Scheme::Bearer if !bearer => Scheme::Dpop,
            Scheme::Dpop if !dpop => Scheme::Bearer,
            s => s,
        };
        let algs = self
            .inner
            .dpop_algorithms
            .iter()
            .map(|a| a.as_str())
            .collect::<Vec<_>>()
            .join(" ");
        let mut out = Vec::new();
        if bearer {
            out.push(error::challenge(
                Scheme::Bearer,
                &self.inner.realm,
                None,
                (target == Scheme::Bearer).then_some(err),
            ));
        }
        if dpop {
            out.push(error::challenge(
                Scheme::Dpop,
                &self.inner.realm,
                Some(&algs),
                (target == Scheme::Dpop).then_some(err),
            ));
        }
        out
    }
}

fn build_issuer(
    i: usize,
    ic: &IssuerConfig,
    config: &AuthConfig,
    custom_fetcher: Option<&Arc<dyn JwksFetcher>>,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<Issuer, ConfigError> {
    let key = |k: &str| format!("auth.issuer[{i}].{k}");
    let invalid = |k: &str, message: String| ConfigError::Invalid {
        key: key(k),
        message,
    };
    let https = |u: &Option<String>| u.as_deref().is_some_and(|u| u.starts_with("https://"));
    let builtin_jwks = custom_fetcher.is_none() && ic.jwks_file.is_none() && ic.jwks_url.is_some();
    let http = if builtin_jwks || ic.introspection_url.is_some() {
        let system_roots = https(&ic.introspection_url) || (builtin_jwks && https(&ic.jwks_url));
        let timeout = Duration::from_secs(config.jwks_fetch_timeout_secs);
        let client = HttpClient::new(timeout, ic.jwks_ca_file.as_deref(), system_roots);
        Some(client.map_err(|m| {
            let k = match (&ic.jwks_ca_file, builtin_jwks) {
                (Some(_), _) => "jwks_ca_file",
                (None, true) => "jwks_url",
                (None, false) => "introspection_url",
            };
            invalid(k, m)
        })?)
    } else {
        if let Some(f) = &ic.jwks_ca_file {
            tracing::warn!(
                issuer = %ic.issuer,
                file = %f.display(),
                "jwks_ca_file is not used: this issuer has no URL the built-in HTTPS client fetches"
            );
        }
        None
    };

    let keys = match (&ic.jwks_file, &ic.jwks_url, custom_fetcher, &http) {
        (Some(f), ..) => {
            let store = KeyStore::new(
                &ic.issuer,
                KeySource::File(f.clone()),
                Duration::from_secs(ic.jwks_cache_secs),
                Duration::from_secs(ic.jwks_min_refresh_secs),
            );
            match store.load_file_now() {
                Ok(0) => {
                    return Err(invalid(
                        "jwks_file",
                        "the JWKS has no usable signing key".into(),
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(invalid("jwks_file", e)),
            }
            let none: Arc<dyn JwksFetcher> = Arc::new(FileOnly);
            Some((store, none))
        }
        (None, Some(u), custom, http) => {
            let fetcher: Arc<dyn JwksFetcher> = match (custom, http) {
                (Some(f), _) => f.clone(),
                (None, Some(h)) => Arc::new(HttpsFetcher::from_client(h.clone())),
                (None, None) => {
                    return Err(invalid("jwks_url", "no HTTP client was set up".into()));
                }
            };
            if u.starts_with("https://") && !fetcher.supports_https() {
                return Err(invalid(
                    "jwks_url",
                    "https:// needs a TLS-capable JwksFetcher; the one given to \
                     Authenticator::with_fetcher does not support it"
                        .into(),
                ));
            }
            let store = KeyStore::new(
                &ic.issuer,
                KeySource::Url(u.clone()),
                Duration::from_secs(ic.jwks_cache_secs),
                Duration::from_secs(ic.jwks_min_refresh_secs),
            );
            Some((store, fetcher))
        }
        (None, None, ..) if ic.introspection_url.is_some() => None,
        (None, None, ..) => {
            return Err(invalid("jwks_file", "give jwks_file or jwks_url".into()));
        }
    };

    let introspection = match (&ic.introspection_url, &http) {
        (Some(url), Some(http)) => {
            let client_id = ic
                .introspection_client_id
                .as_deref()
                .ok_or_else(|| invalid("introspection_client_id", "missing".into()))?;
            let var = ic
                .introspection_client_secret_env
                .as_deref()
                .ok_or_else(|| invalid("introspection_client_secret_env", "missing".into()))?;
            let value = secret(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                invalid(
                    "introspection_client_secret_env",
                    format!("the environment variable {var} is not set or empty"),
                )
            })?;
            Some(Introspector::new(
                &ic.issuer,
                url,
                client_id,
                value,
                http.clone(),
                ic.introspection_cache_secs,
            ))
        }
        _ => None,
    };

    let mut scope_map = HashMap::new();
    for (from, to) in &ic.scope_map {
        let mut list = Vec::new();
        for s in to {
            match SmartScope::parse(s) {
                Ok(Some(sc)) => list.push(sc),
                _ => {
                    return Err(ConfigError::Invalid {
                        key: format!("auth.issuer[{i}].scope_map.\"{from}\""),
                        message: format!("'{s}' is not a SMART resource scope"),
                    });
                }
            }
        }
        scope_map.insert(from.clone(), list);
    }
    let mut org_tenants = HashMap::new();
    for (section, map) in [
        ("auth.org_tenants".to_string(), &config.org_tenants),
        (key("org_tenants"), &ic.org_tenants),
    ] {
        for (org, tenant) in map {
            let t = fhir_core::TenantId::new(tenant).map_err(|e| ConfigError::Invalid {
                key: format!("{section}.\"{org}\""),
                message: e.to_string(),
            })?;
            org_tenants.insert(org.trim().to_string(), t);
        }
    }
    Ok(Issuer {
        issuer: ic.issuer.clone(),
        audiences: ic.audiences.clone(),
        algorithms: ic.algorithms.clone(),
        token_types: ic.token_types.clone(),
        dpop: ic.dpop,
        skew: i64::try_from(ic.clock_skew_secs).unwrap_or(i64::MAX),
        keys,
        introspection,
        min_security_level: ic.min_security_level,
        rules: ClaimRules {
            issuer: ic.issuer.clone(),
            smart_scopes: ic.smart_scopes,
            scope_map,
            tenant_claims: ic.tenant_claims.clone(),
            org_tenants,
        },
    })
}

/// The nonce key: from the environment variable named by `dpop_nonce_secret_env` (so that
/// several instances, and restarts, accept each other's nonces), else random for this process.
fn nonce_keys(
    config: &AuthConfig,
    secret: &dyn Fn(&str) -> Option<String>,
) -> Result<NonceKeys, ConfigError> {
    let key = match &config.dpop_nonce_secret_env {
        Some(var) => secret(var)
            .filter(|v| v.len() >= MIN_NONCE_SECRET_LEN)
            .ok_or_else(|| ConfigError::Invalid {
                key: "auth.dpop_nonce_secret_env".into(),
                message: format!(
                    "the environment variable {var} is not set or shorter than \
                     {MIN_NONCE_SECRET_LEN} bytes"
                ),
            })?
            .into_bytes(),
        None => {
            use rand::RngCore as _;
            let mut k = vec![0u8; 32];
            rand::rngs::OsRng
                .try_fill_bytes(&mut k)
                .map_err(|e| ConfigError::Invalid {
                    key: "auth.dpop_nonce".into(),
                    message: format!("no random key for DPoP nonces: {e}"),
                })?;
            k
        }
    };
    NonceKeys::new(&key, config.dpop_nonce_window_secs).map_err(|message| ConfigError::Invalid {
        key: "auth.dpop_nonce_secret_env".into(),
        message,
    })
}

/// Whether the request's `Authorization` header uses the DPoP scheme, whatever follows it (a
/// malformed DPoP request still gets a nonce to go on with).
fn uses_dpop_scheme(headers: &HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_whitespace().next())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("dpop"))
}

/// The fetcher of a `jwks_file` issuer, whose keys are read from disk: never asked.
struct FileOnly;

impl JwksFetcher for FileOnly {
    fn fetch<'a>(&'a self, _url: &'a str) -> FetchFuture<'a> {
        Box::pin(async { Err(FetchError("this issuer's keys come from a file".into())) })
    }
}

/// Whether the scheme fits the issuer's `dpop` mode.
fn check_scheme(scheme: Scheme, dpop: DpopMode) -> Result<(), AuthError> {
    match (scheme, dpop) {
        (Scheme::Bearer, DpopMode::Required) => Err(AuthError::DpopRequired),
        (Scheme::Dpop, DpopMode::Off) => Err(AuthError::DpopNotAccepted),
        _ => Ok(()),
    }
}

/// A compact JWS has exactly three dot-separated parts; anything else is an opaque token (or
/// garbage) for introspection.
fn looks_like_jws(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
}

/// Whether the token speaks for a user. RFC 9068 §2.2: without a resource owner (client
/// credentials) `sub` is absent or names the client itself; HelseID user tokens also carry the
/// user's `pid`.
fn has_user(p: &Principal) -> bool {
    p.pid().is_some() || p.subject().is_some_and(|sub| Some(sub) != p.client_id())
}

/// HelseID `security_level` of a user's token against the issuer's minimum. A user token
/// without a (numeric) level fails: the issuer must vouch for the strength, not the absence of
/// a claim.
fn check_security_level(p: &Principal, min: u8) -> Result<(), AuthError> {
    if !has_user(p) {
        return Ok(());
    }
    let level = p.security_level().and_then(|l| l.trim().parse::<u8>().ok());
    match level {
        Some(l) if l >= min => Ok(()),
        Some(l) => Err(AuthError::InsufficientUserAuthentication(format!(
            "security level {l}; at least {min} is required"
        ))),
        None => Err(AuthError::InsufficientUserAuthentication(format!(
            "no security level in the token; at least {min} is required"
        ))),
    }
}

/// Splits `Authorization: <scheme> <token68>`.
fn parse_authorization(headers: &HeaderMap) -> Result<(Scheme, &str), AuthError> {
    let mut all = headers.get_all(AUTHORIZATION).iter();
    let value = all.next().ok_or(AuthError::MissingCredentials)?;
    if all.next().is_some() {
        return Err(AuthError::MalformedAuthorization(
            "more than one Authorization header".into(),
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| AuthError::MalformedAuthorization("not visible ASCII".into()))?
        .trim();
    if text.is_empty() {
        return Err(AuthError::MalformedAuthorization("empty".into()));
    }
    let (scheme_text, token) = match text.split_once(' ') {
        Some((s, t)) => (s, t.trim_start()),
        None => (text, ""),
    };
    let scheme = if scheme_text.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme_text.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        return Err(AuthError::UnsupportedScheme(clip(scheme_text)));
    };
    if token.is_empty() {
        return Err(AuthError::MalformedAuthorization(
            "no token after the scheme".into(),
        ));
    }
    // token68 (RFC 9110 §11.2); a JWT uses only its base64url subset and dots.
    let token68 = token
        .trim_end_matches('=')
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b));
    if !token68 {
        return Err(AuthError::MalformedAuthorization(
            "the token is not a single token68 value".into(),
        ));
    }
    Ok((scheme, token))
}

fn check_times(
    claims: &serde_json::Map<String, Value>,
    skew: i64,
    now: i64,
) -> Result<(), AuthError> {
    let date = |name: &str| -> Result<Option<i64>, AuthError> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => dpop::numeric_date(v)
                .map(Some)
                .ok_or_else(|| AuthError::InvalidClaim {
                    claim: name.into(),
                    reason: "expected a NumericDate".into(),
                }),
        }
    };
    let exp = date("exp")?.ok_or_else(|| AuthError::InvalidClaim {
        claim: "exp".into(),
        reason: "missing; access tokens must expire".into(),
    })?;
    if now > exp.saturating_add(skew) {
        return Err(AuthError::Expired);
    }
    for name in ["nbf", "iat"] {
        if let Some(t) = date(name)?
            && t > now.saturating_add(skew)
        {
            return Err(AuthError::NotYetValid);
        }
    }
    Ok(())
}

fn check_audience(
    claims: &serde_json::Map<String, Value>,
    accepted: &[String],
) -> Result<(), AuthError> {
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => accepted.contains(a),
        Some(Value::Array(list)) => list
            .iter()
            .any(|a| a.as_str().is_some_and(|a| accepted.iter().any(|x| x == a))),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(AuthError::InvalidAudience)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for a in auth {
            if let Ok(v) = HeaderValue::from_bytes(a) {
                h.append(AUTHORIZATION, v);
            }
        }
        h
    }

    #[test]
    fn authorization_parsing() {
        assert_eq!(
            parse_authorization(&headers(&[])),
            Err(AuthError::MissingCredentials)
        );
        assert_eq!(
            parse_authorization(&headers(&[b"bearer a.b.c"])),
            Ok((Scheme::Bearer, "a.b.c"))
        );
        assert_eq!(
            parse_authorization(&headers(&[b"DPoP   a.b.c"])),
            Ok((Scheme::Dpop, "a.b.c"))
        );
        assert!(matches!(
            parse_authorization(&headers(&[b"Basic dXNlcjpwdw=="])),
            Err(AuthError::UnsupportedScheme(_))
        ));
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Bearer a b",
            b"Bearer a\"b",
            b"Bearer \xff\xfe",
            b"   ",
        ] {
            assert!(
                matches!(
                    parse_authorization(&headers(&[bad])),
                    Err(AuthError::MalformedAuthorization(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_authorization(&headers(&[b"Bearer a.b.c", b"Bearer d.e.f"])),
            Err(AuthError::MalformedAuthorization(_))
        ));
    }

    #[test]
    fn times_and_audience() {
        let claims = |v: Value| match v {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        let c = claims(serde_json::json!({"exp": 100, "nbf": 50, "aud": ["x", "fhir"]}));
        assert_eq!(check_times(&c, 10, 105), Ok(()));
        assert_eq!(check_times(&c, 10, 111), Err(AuthError::Expired));
        assert_eq!(check_times(&c, 10, 39), Err(AuthError::NotYetValid));
        assert_eq!(check_audience(&c, &["fhir".into()]), Ok(()));
        assert_eq!(
            check_audience(&c, &["other".into()]),
            Err(AuthError::InvalidAudience)
        );
        let c = claims(serde_json::json!({"exp": "soon"}));
        assert!(matches!(
            check_times(&c, 0, 0),
            Err(AuthError::InvalidClaim { .. })
        ));
        assert!(matches!(
            check_times(&serde_json::Map::new(), 0, 0),
            Err(AuthError::InvalidClaim { .. })
        ));
    }

    #[test]
    fn auth_off_lets_everyone_in() {
        let a = Authenticator::new(AuthConfig::off()).expect("off is valid");
        let rt = tokio::runtime::Builder::new_current_thread().build();
        let p = rt
            .expect("runtime")
            .block_on(a.authenticate(&Method::GET, "http://x/", &HeaderMap::new()))
            .expect("unrestricted");
        assert!(p.is_unrestricted());
    }
}
