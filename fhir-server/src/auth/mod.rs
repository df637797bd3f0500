//! Authentication and authorisation: JWT access tokens (Bearer and DPoP), SMART scopes,
//! tenant binding.
//!
//! # Flow
//!
//! ```text
//! Authorization: Bearer|DPoP <JWT>      ──► Authenticator::authenticate(method, url, headers)
//!   1. header syntax                          MissingCredentials / UnsupportedScheme / MalformedAuthorization
//!   2. JWS shape, alg (no none, no HS*)       MalformedToken / UnsupportedAlgorithm
//!   3. iss → configured issuer, typ           UnknownIssuer / InvalidType
//!   4. scheme vs the issuer's dpop mode       DpopRequired / DpopNotAccepted
//!   5. key by kid (JWKS, refreshed on miss)   UnknownKey / Unavailable
//!   6. signature                              InvalidSignature
//!   7. exp, nbf, iat (± skew), aud            Expired / NotYetValid / InvalidAudience
//!   8. cnf.jkt vs scheme; DPoP proof          BoundTokenAsBearer / InvalidDpopProof(…)
//!   9. claims → Principal (scopes mapped, patient context, tenants, HelseID facts)
//! ──► Principal::check_tenant(&tenant)?  and  Principal::check(interaction, type)?  (403s)
//! ```
//!
//! Every error maps to a status and a `WWW-Authenticate` value: see [`AuthError`] and
//! [`Authenticator::www_authenticate`]. Configuration, its environment overrides and two
//! complete examples (HelseID, generic SMART) are described in [`config`]; the examples are
//! `src/auth/examples/helseid.toml` and `src/auth/examples/smart.toml`.
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
pub use jwks::{FetchError, FetchFuture, JwksFetcher, PlainHttpFetcher};
pub use jwt::SigningAlg;
pub use principal::{OrgNumbers, Principal, PurposeOfUse, TenantAccess};
pub use scopes::{
    Access, Interaction, Permissions, Restriction, ScopeContext, ScopeError, SmartScope,
};

use dpop::{ProofRules, ReplayCache, ReplayError};
use error::clip;
use jwks::{KeySource, KeyStore};
use jwt::Jws;
use principal::ClaimRules;

/// One configured issuer, ready for use.
struct Issuer {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<SigningAlg>,
    token_types: Vec<String>,
    dpop: DpopMode,
    skew: i64,
    keys: KeyStore,
    rules: ClaimRules,
}

struct Inner {
    mode: AuthMode,
    realm: String,
    issuers: Vec<Issuer>,
    dpop_algorithms: Vec<SigningAlg>,
    dpop_max_age: i64,
    replay: ReplayCache,
    fetcher: Arc<dyn JwksFetcher>,
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
    /// Builds an authenticator with the built-in [`PlainHttpFetcher`] for JWKS URLs (so only
    /// `http://` loopback URLs and `jwks_file`s work; see [`Authenticator::with_fetcher`]).
    ///
    /// JWKS files are read now, so a missing or unusable file fails start-up.
    pub fn new(config: AuthConfig) -> Result<Authenticator, ConfigError> {
        let fetcher = PlainHttpFetcher {
            timeout: Duration::from_secs(config.jwks_fetch_timeout_secs),
        };
        Authenticator::with_fetcher(config, Arc::new(fetcher))
    }

    /// Builds an authenticator that fetches JWKS URLs with `fetcher`.
    pub fn with_fetcher(
        config: AuthConfig,
        fetcher: Arc<dyn JwksFetcher>,
    ) -> Result<Authenticator, ConfigError> {
        config.validate()?;
        let mut issuers = Vec::new();
        if config.mode == AuthMode::On {
            for (i, ic) in config.issuers.iter().enumerate() {
                issuers.push(build_issuer(i, ic, &config, fetcher.as_ref())?);
            }
        }
        Ok(Authenticator {
            inner: Arc::new(Inner {
                mode: config.mode,
                realm: config.realm.clone(),
                issuers,
                dpop_algorithms: config.dpop_algorithms.clone(),
                dpop_max_age: i64::try_from(config.dpop_max_age_secs).unwrap_or(i64::MAX),
                replay: ReplayCache::new(config.dpop_replay_cache_entries),
                fetcher,
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
        for iss in &self.inner.issuers {
            // No kid: loads the set if it was never loaded; "no key for this alg" is fine here.
            match iss
                .keys
                .candidates(None, SigningAlg::RS256, self.inner.fetcher.as_ref())
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
        match (scheme, issuer.dpop) {
            (Scheme::Bearer, DpopMode::Required) => return Err(AuthError::DpopRequired),
            (Scheme::Dpop, DpopMode::Off) => return Err(AuthError::DpopNotAccepted),
            _ => {}
        }

        let kid = jws.header_str("kid").map_err(AuthError::MalformedToken)?;
        let keys = issuer
            .keys
            .candidates(kid, alg, self.inner.fetcher.as_ref())
            .await?;
        if !keys.iter().any(|k| jws.verify(k, alg)) {
            return Err(AuthError::InvalidSignature);
        }

        check_times(&jws.claims, issuer.skew, now)?;
        check_audience(&jws.claims, &issuer.audiences)?;

        let bound_jkt = match jws.claims.get("cnf") {
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
        let principal = Principal::from_claims(jws.into_claims(), &issuer.rules, jkt)?;
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
    fetcher: &dyn JwksFetcher,
) -> Result<Issuer, ConfigError> {
    let key = |k: &str| format!("auth.issuer[{i}].{k}");
    let invalid = |k: &str, message: String| ConfigError::Invalid {
        key: key(k),
        message,
    };
    let source = match (&ic.jwks_file, &ic.jwks_url) {
        (Some(f), _) => KeySource::File(f.clone()),
        (None, Some(u)) => {
            if u.starts_with("https://") && !fetcher.supports_https() {
                return Err(invalid(
                    "jwks_url",
                    "https:// needs a TLS-capable JwksFetcher (Authenticator::with_fetcher); \
                     the built-in one speaks plain HTTP only"
                        .into(),
                ));
            }
            KeySource::Url(u.clone())
        }
        (None, None) => return Err(invalid("jwks_file", "give jwks_file or jwks_url".into())),
    };
    let keys = KeyStore::new(
        &ic.issuer,
        source,
        Duration::from_secs(ic.jwks_cache_secs),
        Duration::from_secs(ic.jwks_min_refresh_secs),
    );
    if matches!(keys.source(), KeySource::File(_)) {
        match keys.load_file_now() {
            Ok(0) => {
                return Err(invalid(
                    "jwks_file",
                    "the JWKS has no usable signing key".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(invalid("jwks_file", e)),
        }
    }
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
        rules: ClaimRules {
            issuer: ic.issuer.clone(),
            smart_scopes: ic.smart_scopes,
            scope_map,
            tenant_claims: ic.tenant_claims.clone(),
            org_tenants,
        },
    })
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
