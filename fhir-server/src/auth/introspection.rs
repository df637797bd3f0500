//! OAuth 2.0 token introspection (RFC 7662) for opaque access tokens.
//!
//! A bearer token that is not a JWT is sent to the one issuer configured with
//! `introspection_url`, authenticated with HTTP Basic (`introspection_client_id` and the secret
//! from the environment variable named by `introspection_client_secret_env`). An answer with
//! `"active": true` is then read exactly like the claims of a JWT (times, audience, `cnf.jkt`,
//! scopes, tenants) by [`crate::auth::Authenticator`].
//!
//! Positive answers are reused until the token's `exp` or `introspection_cache_secs`, whichever
//! comes first, keyed by the SHA-256 of the token (the token itself is not kept). Negative
//! answers and failures are not cached: a failure must not lock valid tokens out for longer
//! than the endpoint is down.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::error::{AuthError, clip};
use super::fetch::HttpClient;

/// Largest introspection answer accepted; real ones are well under a KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Most cached answers; when full, expired entries go first, then the ones expiring soonest.
const MAX_CACHE_ENTRIES: usize = 10_000;

/// A positive answer and until when (Unix seconds) it may be reused.
struct Cached {
    claims: Arc<Map<String, Value>>,
    until: i64,
}

/// The introspection client of one issuer.
pub(crate) struct Introspector {
    issuer: String,
    url: String,
    client_id: String,
    client_secret: String,
    http: HttpClient,
    ttl: i64,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

impl fmt::Debug for Introspector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Introspector")
            .field("issuer", &self.issuer)
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Introspector {
    pub(crate) fn new(
        issuer: &str,
        url: &str,
        client_id: &str,
        client_secret: String,
        http: HttpClient,
        cache_secs: u64,
    ) -> Introspector {
        Introspector {
            issuer: issuer.to_string(),
            url: url.to_string(),
            client_id: client_id.to_string(),
            client_secret,
            http,
            ttl: i64::try_from(cache_secs).unwrap_or(i64::MAX),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The claims of an active token (without `active`), from the cache or the endpoint.
    ///
    /// `InactiveToken` when the endpoint says so, `UnknownIssuer` when its answer names another
    /// issuer, `Unavailable` when it cannot be asked or answers nonsense. Times and audience
    /// are left to the caller, which checks them on every use, cached or not.
    pub(crate) async fn introspect(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Arc<Map<String, Value>>, AuthError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.cached(&key, now) {
            return Ok(hit);
        }
        let body = self
            .http
            .post_form(
                &self.url,
                &[("token", token), ("token_type_hint", "access_token")],
                &self.client_id,
                &self.client_secret,
                MAX_ANSWER_BYTES,
            )
            .await
            .map_err(|e| {
                tracing::error!(issuer = %self.issuer, error = %e, "token introspection failed");
                AuthError::Unavailable("the token introspection endpoint cannot be asked".into())
            })?;
        let mut claims = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(m)) => m,
            _ => {
                tracing::error!(issuer = %self.issuer, "token introspection answer is not a JSON object");
                return Err(AuthError::Unavailable(
                    "the token introspection endpoint gave an unusable answer".into(),
                ));
            }
        };
        // RFC 7662 §2.2: `active` is a boolean; anything but `true` means "do not accept".
        if claims.remove("active") != Some(Value::Bool(true)) {
            return Err(AuthError::InactiveToken);
        }
        match claims.get("iss") {
            None | Some(Value::Null) => {}
            Some(Value::String(iss)) if *iss == self.issuer => {}
            Some(Value::String(iss)) => return Err(AuthError::UnknownIssuer(clip(iss))),
            Some(_) => {
                return Err(AuthError::InvalidClaim {
                    claim: "iss".into(),
                    reason: "expected a string".into(),
                });
            }
        }
        let claims = Arc::new(claims);
        let exp = claims.get("exp").and_then(super::dpop::numeric_date);
        if let Some(exp) = exp {
            self.remember(
                key,
                claims.clone(),
                exp.min(now.saturating_add(self.ttl)),
                now,
            );
        }
        Ok(claims)
    }

    fn cached(&self, key: &[u8; 32], now: i64) -> Option<Arc<Map<String, Value>>> {
        // A poisoned lock only means a panic elsewhere while the map was consistent between
        // operations; the cache is an optimisation, so keep using it.
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(key)
            .filter(|c| now < c.until)
            .map(|c| c.claims.clone())
    }

    fn remember(&self, key: [u8; 32], claims: Arc<Map<String, Value>>, until: i64, now: i64) {
        if until <= now {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.retain(|_, c| c.until > now);
        }
        if cache.len() >= MAX_CACHE_ENTRIES
            && let Some(victim) = cache.iter().min_by_key(|(_, c)| c.until).map(|(k, _)| *k)
        {
            cache.remove(&victim);
        }
        cache.insert(key, Cached { claims, until });
    }
}
