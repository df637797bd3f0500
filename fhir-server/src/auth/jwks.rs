//! Issuer signing keys: loading a JWKS from a file or URL, caching it, and refreshing it when a
//! token names a key we do not know (key rotation).
//!
//! Fetching over the network goes through the small [`JwksFetcher`] trait. The built-in one,
//! [`crate::auth::HttpsFetcher`], speaks HTTPS (rustls; system CA store plus the issuer's
//! `jwks_ca_file`) and plain HTTP to loopback hosts; embedders with their own HTTP stack pass a
//! fetcher to [`crate::auth::Authenticator::with_fetcher`].

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::error::{AuthError, clip};
use super::jwt::{PublicKey, SigningAlg};

/// Largest JWKS document accepted; real ones are a few KiB.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Most keys tried for a token without `kid`, to bound the work a single request can cause.
const MAX_CANDIDATES: usize = 8;

/// Why a JWKS could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FetchError(pub String);

/// The future a [`JwksFetcher`] returns.
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, FetchError>> + Send + 'a>>;

/// Fetches a JWKS document by URL.
pub trait JwksFetcher: Send + Sync + 'static {
    /// GETs `url` and returns the body of a 2xx answer (at most [`MAX_JWKS_BYTES`]).
    fn fetch<'a>(&'a self, url: &'a str) -> FetchFuture<'a>;

    /// Whether `https://` URLs work; [`crate::auth::Authenticator::with_fetcher`] refuses a
    /// configuration with `https` JWKS URLs and a fetcher that cannot reach them, so that the
    /// problem shows at start-up instead of as 503s later.
    fn supports_https(&self) -> bool {
        false
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeySource {
    /// A JWKS file, re-read on refresh so operators can rotate keys by replacing it.
    File(PathBuf),
    /// A JWKS URL.
    Url(String),
}

/// Parses a JWKS document, skipping (and logging) keys that cannot verify signatures, so one
/// exotic key (an encryption key, an Ed25519 key) does not take the issuer down.
pub(crate) fn parse_jwks(bytes: &[u8], issuer: &str) -> Result<Vec<PublicKey>, String> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let Some(Value::Array(keys)) = doc.get("keys") else {
        return Err("no \"keys\" array".into());
    };
    let mut out = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if k.get("d").is_some() {
            tracing::warn!(
                issuer,
                index = i,
                "the JWKS holds a private key; only its public part is used"
            );
        }
        match PublicKey::from_jwk(k, false) {
            Ok(pk) => out.push(pk),
            Err(e) => tracing::warn!(issuer, index = i, error = %e, "skipping JWKS key"),
        }
    }
    Ok(out)
}

#[derive(Debug, Default)]
struct KeySet {
    keys: Vec<Arc<PublicKey>>,
    /// When the set was last loaded successfully; `None` before the first load.
    loaded_at: Option<Instant>,
}

/// The cached keys of one issuer.
pub(crate) struct KeyStore {
    issuer: String,
    source: KeySource,
    /// After this long the keys are re-fetched on next use (kept if the fetch fails).
    ttl: Duration,
    /// Fewest time between two refreshes triggered by unknown `kid`s, so random `kid`s cannot
    /// make us hammer the issuer.
    min_refresh: Duration,
    keys: RwLock<Arc<KeySet>>,
    /// Serialises refreshes (one fetch at a time) and remembers the last attempt.
    refresh: tokio::sync::Mutex<RefreshState>,
    /// Number of finished fetch attempts; lets a task that waited for the lock see that
    /// another task just tried.
    attempts: AtomicU64,
}

#[derive(Debug, Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_ok: bool,
}

impl KeyStore {
    pub fn new(issuer: &str, source: KeySource, ttl: Duration, min_refresh: Duration) -> Self {
        KeyStore {
            issuer: issuer.to_string(),
            source,
            ttl,
            min_refresh,
            keys: RwLock::new(Arc::new(KeySet::default())),
            refresh: tokio::sync::Mutex::new(RefreshState::default()),
            attempts: AtomicU64::new(0),
        }
    }

    fn current(&self) -> Arc<KeySet> {
        // A poisoned lock only means another thread panicked while swapping an Arc; the Arc
        // itself is always whole, so keep using it.
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Loads a file source synchronously, for start-up checks.
    pub fn load_file_now(&self) -> Result<usize, String> {
        let KeySource::File(path) = &self.source else {
            return Ok(0);
        };
        let bytes = read_file(path)?;
        let keys = parse_jwks(&bytes, &self.issuer)?;
        let n = keys.len();
        self.install(keys);
        Ok(n)
    }

    fn install(&self, keys: Vec<PublicKey>) {
        let set = Arc::new(KeySet {
            keys: keys.into_iter().map(Arc::new).collect(),
            loaded_at: Some(Instant::now()),
        });
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = set;
    }

    async fn load(&self, fetcher: &dyn JwksFetcher) -> Result<Vec<PublicKey>, String> {
        let bytes = match &self.source {
            KeySource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path))
                    .await
                    .map_err(|e| format!("file reader failed: {e}"))??
            }
            KeySource::Url(url) => fetcher.fetch(url).await.map_err(|e| e.0)?,
        };
        parse_jwks(&bytes, &self.issuer)
    }

    /// Reloads the keys and says whether the set may have changed.
    ///
    /// Tasks that queue up while one fetch runs share its outcome instead of fetching again,
    /// and within `min_refresh` of the last attempt nothing is fetched: an unknown `kid`
    /// (`forced`) then just gets no refresh, and a routine refresh after a failure gets the
    /// failure, so that an unreachable issuer does not make every request wait for a timeout.
    async fn refresh(&self, fetcher: &dyn JwksFetcher, forced: bool) -> Result<bool, String> {
        let seen = self.attempts.load(Ordering::SeqCst);
        let mut state = self.refresh.lock().await;
        if self.attempts.load(Ordering::SeqCst) != seen {
            return if state.last_ok {
                Ok(true)
            } else {
                Err("a concurrent refresh failed".into())
            };
        }
        if state
            .last_attempt
            .is_some_and(|t| t.elapsed() < self.min_refresh)
        {
            return if forced || state.last_ok {
                Ok(false)
            } else {
                Err("the previous attempt failed moments ago".into())
            };
        }
        state.last_attempt = Some(Instant::now());
        let loaded = self.load(fetcher).await;
        // Counted when finished, so tasks that started waiting during this fetch see it.
        self.attempts.fetch_add(1, Ordering::SeqCst);
        match loaded {
            Ok(keys) => {
                tracing::info!(issuer = %self.issuer, keys = keys.len(), "loaded JWKS");
                self.install(keys);
                state.last_ok = true;
                Ok(true)
            }
            Err(e) => {
                state.last_ok = false;
                Err(e)
            }
        }
    }

    /// The keys that may have signed a token with `kid` (if any) and `alg`, loading or
    /// refreshing the JWKS as needed.
    pub async fn candidates(
        &self,
        kid: Option<&str>,
        alg: SigningAlg,
        fetcher: &dyn JwksFetcher,
    ) -> Result<Vec<Arc<PublicKey>>, AuthError> {
        let set = self.current();
        let stale = set.loaded_at.is_none_or(|t| t.elapsed() >= self.ttl);
        if stale && let Err(e) = self.refresh(fetcher, false).await {
            if set.loaded_at.is_none() {
                tracing::error!(issuer = %self.issuer, error = %e, "cannot load JWKS");
                return Err(AuthError::Unavailable(
                    "the issuer's signing keys cannot be loaded".into(),
                ));
            }
            // Keys that were good an hour ago are better than refusing every request while
            // the issuer's endpoint has a hiccup.
            tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh failed; keeping cached keys");
        }
        let found = pick(&self.current(), kid, alg);
        if !found.is_empty() || kid.is_none() {
            return if found.is_empty() {
                Err(AuthError::UnknownKey(format!("(no kid, {alg})")))
            } else {
                Ok(found)
            };
        }
        // An unknown kid usually means the issuer rotated its keys.
        match self.refresh(fetcher, true).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(issuer = %self.issuer, "unknown kid; refresh skipped (too soon)")
            }
            Err(e) => {
                tracing::warn!(issuer = %self.issuer, error = %e, "JWKS refresh for unknown kid failed")
            }
        }
        let found = pick(&self.current(), kid, alg);
        if found.is_empty() {
            Err(AuthError::UnknownKey(clip(kid.unwrap_or_default())))
        } else {
            Ok(found)
        }
    }
}

fn pick(set: &KeySet, kid: Option<&str>, alg: SigningAlg) -> Vec<Arc<PublicKey>> {
    set.keys
        .iter()
        .filter(|k| k.fits(alg))
        .filter(|k| kid.is_none() || k.kid.as_deref() == kid)
        .take(MAX_CANDIDATES)
        .cloned()
        .collect()
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_JWKS_BYTES as u64 {
        return Err(format!(
            "{}: larger than {MAX_JWKS_BYTES} bytes",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails every fetch after a short delay, counting calls.
    struct Failing(std::sync::atomic::AtomicUsize);

    impl JwksFetcher for Failing {
        fn fetch<'a>(&'a self, _url: &'a str) -> FetchFuture<'a> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(FetchError("down".into()))
            })
        }
    }

    fn store(min_refresh: u64) -> KeyStore {
        KeyStore::new(
            "i",
            KeySource::Url("http://127.0.0.1:9/jwks".into()),
            Duration::from_secs(3600),
            Duration::from_secs(min_refresh),
        )
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_failed_fetch() {
        let f = Arc::new(Failing(std::sync::atomic::AtomicUsize::new(0)));
        let s = Arc::new(store(0));
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let (s, f) = (s.clone(), f.clone());
                tokio::spawn(async move {
                    s.candidates(Some("k"), SigningAlg::RS256, f.as_ref())
                        .await
                        .map(|_| ())
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.unwrap_or(Ok(()));
            assert!(matches!(r, Err(AuthError::Unavailable(_))), "{r:?}");
        }
        assert_eq!(f.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_fetch_is_not_retried_within_min_refresh() {
        let f = Failing(std::sync::atomic::AtomicUsize::new(0));
        let s = store(60);
        for _ in 0..3 {
            let r = s.candidates(Some("k"), SigningAlg::RS256, &f).await;
            assert!(matches!(r, Err(AuthError::Unavailable(_))));
        }
        assert_eq!(f.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn jwks_with_odd_keys_keeps_the_good_ones() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},
            {"kty": "EC", "crv": "P-256", "use": "enc",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty": "EC", "crv": "P-256", "kid": "good",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]});
        let keys = parse_jwks(doc.to_string().as_bytes(), "t").expect("parses");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("good"));
        assert!(parse_jwks(b"[]", "t").is_err());
        assert!(parse_jwks(b"not json", "t").is_err());
    }
}
