//! DPoP proof checks (RFC 9449 §4.3 and §7.1), the `jti` replay cache, and server-issued
//! nonces (RFC 9449 §8–9).
//!
//! Without nonces, freshness rests on the `iat` window plus the replay cache, and a client
//! clock (or an attacker holding the client's key for a while) decides `iat`. With
//! `dpop_nonce = true` every proof must also carry a `nonce` this server handed out recently in
//! a `DPoP-Nonce` header, so a proof cannot be made long in advance. Nonces are stateless
//! ([`NonceKeys`]): an HMAC over a time-window counter, so any server holding the same key can
//! check them and nothing is stored per client.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use axum::http::{HeaderMap, Method};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::DpopError;
use super::jwt::{Jws, PublicKey, SigningAlg, sha256_b64};

/// Longest DPoP proof looked at; real ones are well under 2 KiB.
const MAX_PROOF_LEN: usize = 8 * 1024;
/// Longest `jti` accepted; RFC 9449 asks for ≥ 96 bits of randomness, so this is generous.
const MAX_JTI_LEN: usize = 256;

/// What a checked proof tells the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckedProof {
    /// RFC 7638 thumbprint of the proof key.
    pub jkt: String,
    /// The `nonce` claim, when it is a string; checked by [`NonceKeys::check`] only when
    /// server nonces are on (otherwise it is not ours to judge, e.g. an authorization
    /// server's nonce).
    pub nonce: Option<String>,
    /// When the replay-cache entry may be dropped.
    replay_key: [u8; 32],
    replay_until: i64,
}

/// Why a proof could not be recorded in the replay cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplayError {
    /// Seen before.
    Replay,
    /// The cache is full of live entries.
    Full,
}

/// Remembers proof `jti`s until their proofs would be too old anyway.
///
/// Keys are SHA-256 of `jkt '.' jti`, so entries have a fixed size whatever clients send, and
/// one client cannot block another's `jti`. When the cache is full of unexpired entries new
/// proofs are refused (fail closed) rather than forgetting live entries, which would reopen
/// replay.
pub(crate) struct ReplayCache {
    capacity: usize,
    inner: Mutex<ReplayInner>,
}

#[derive(Default)]
struct ReplayInner {
    until: HashMap<[u8; 32], i64>,
    by_expiry: BTreeSet<(i64, [u8; 32])>,
}

impl ReplayCache {
    pub fn new(capacity: usize) -> Self {
        ReplayCache {
            capacity,
            inner: Mutex::new(ReplayInner::default()),
        }
    }

    /// Records `key` until `until`; fails if it is already recorded.
    pub fn insert(&self, key: [u8; 32], until: i64, now: i64) -> Result<(), ReplayError> {
        // The cache holds no invariant that a panic elsewhere could break halfway in a way that
        // matters more than refusing all DPoP requests would, so recover from poisoning.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(exp, k)) = inner.by_expiry.first() {
            if exp > now {
                break;
            }
            inner.by_expiry.pop_first();
            inner.until.remove(&k);
        }
        if inner.until.contains_key(&key) {
            return Err(ReplayError::Replay);
        }
        if inner.until.len() >= self.capacity {
            return Err(ReplayError::Full);
        }
        inner.until.insert(key, until);
        inner.by_expiry.insert((until, key));
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .until
            .len()
    }
}

/// Settings for proof checks.
#[derive(Debug, Clone)]
pub(crate) struct ProofRules {
    pub algorithms: Vec<SigningAlg>,
    /// How old (by `iat`) a proof may be.
    pub max_age: i64,
    /// How far in the future `iat` may be.
    pub skew: i64,
}

/// Checks the request's `DPoP` header against the request and the access token. Does not
/// touch the replay cache: call [`commit`] once every other check of the request passed, so
/// that rejected requests do not use up cache space.
pub(crate) fn check_proof(
    headers: &HeaderMap,
    method: &Method,
    url: &str,
    access_token: &str,
    rules: &ProofRules,
    now: i64,
) -> Result<CheckedProof, DpopError> {
    let mut values = headers.get_all("dpop").iter();
    let value = values.next().ok_or(DpopError::Missing)?;
    if values.next().is_some() {
        return Err(DpopError::Multiple);
    }
    let proof = value
        .to_str()
        .map_err(|_| DpopError::Malformed("the DPoP header is not visible ASCII".into()))?
        .trim();
    if proof.len() > MAX_PROOF_LEN {
        return Err(DpopError::Malformed(format!(
            "proof longer than {MAX_PROOF_LEN} bytes"
        )));
    }
    let jws = Jws::parse(proof).map_err(DpopError::Malformed)?;

    let typ = jws.header_str("typ").map_err(DpopError::Malformed)?;
    if !typ.is_some_and(|t| media_type_is(t, "dpop+jwt")) {
        return Err(DpopError::Type);
    }
    let alg_text = jws.alg().map_err(DpopError::Malformed)?;
    let alg = alg_text
        .parse::<SigningAlg>()
        .ok()
        .filter(|a| rules.algorithms.contains(a))
        .ok_or_else(|| DpopError::Algorithm(super::error::clip(alg_text)))?;
    let jwk = jws
        .header
        .get("jwk")
        .ok_or_else(|| DpopError::Key("no jwk header".into()))?;
    let key = PublicKey::from_jwk(jwk, true).map_err(DpopError::Key)?;
    if !key.fits(alg) {
        return Err(DpopError::Key(format!("the key cannot verify {alg}")));
    }
    if !jws.verify(&key, alg) {
        return Err(DpopError::Signature);
    }

    let claims = &jws.claims;
    let jti = match claims.get("jti") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_JTI_LEN => s,
        _ => return Err(DpopError::Malformed("jti missing or invalid".into())),
    };
    match claims.get("htm") {
        Some(Value::String(m)) if m == method.as_str() => {}
        Some(Value::String(_)) => return Err(DpopError::Method),
        _ => return Err(DpopError::Malformed("htm missing or not a string".into())),
    }
    let htu = match claims.get("htu") {
        Some(Value::String(u)) => u,
        _ => return Err(DpopError::Malformed("htu missing or not a string".into())),
    };
    match (normalize_htu(htu), normalize_htu(url)) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(DpopError::Url),
    }
    let iat = claims
        .get("iat")
        .and_then(numeric_date)
        .ok_or_else(|| DpopError::Malformed("iat missing or not a number".into()))?;
    if iat < now.saturating_sub(rules.max_age) || iat > now.saturating_add(rules.skew) {
        return Err(DpopError::IssuedAt);
    }
    match claims.get("ath") {
        Some(Value::String(a)) if *a == sha256_b64(access_token.as_bytes()) => {}
        _ => return Err(DpopError::AccessTokenHash),
    }

    let mut h = Sha256::new();
    h.update(key.thumbprint.as_bytes());
    h.update(b".");
    h.update(jti.as_bytes());
    let nonce = match claims.get("nonce") {
        Some(Value::String(n)) => Some(n.clone()),
        _ => None,
    };

    Ok(CheckedProof {
        jkt: key.thumbprint,
        nonce,
        replay_key: h.finalize().into(),
        // After this, the iat check alone rejects the proof.
        replay_until: iat.saturating_add(rules.max_age).saturating_add(rules.skew),
    })
}

/// Records the proof's `jti`; fails on replay or a full cache.
pub(crate) fn commit(
    cache: &ReplayCache,
    proof: &CheckedProof,
    now: i64,
) -> Result<(), ReplayError> {
    cache.insert(proof.replay_key, proof.replay_until, now)
}

/// What the nonce MAC covers before the window counter, so that these MACs cannot be
/// confused with any other use of the same key.
const NONCE_CONTEXT: &[u8] = b"fhir-server DPoP-Nonce v1\0";
/// Bytes of the (truncated) HMAC-SHA256 tag in a nonce: 128 bits cannot be guessed.
const NONCE_TAG_LEN: usize = 16;
/// A nonce is base64url(counter (8 bytes, big-endian) ‖ tag): 24 bytes, 32 characters.
const NONCE_RAW_LEN: usize = 8 + NONCE_TAG_LEN;
const NONCE_TEXT_LEN: usize = 32;
/// Smallest key accepted from configuration (bytes): an HMAC key is only as strong as it is
/// long.
pub(crate) const MIN_NONCE_SECRET_LEN: usize = 32;

/// Issues and checks stateless DPoP nonces (RFC 9449 §8).
///
/// Time is cut into windows of `window` seconds; the nonce of window `n` is
/// `base64url(n ‖ HMAC-SHA256(key, context ‖ n)[..16])`. A nonce is accepted during its own
/// window and the next one, so it lives between `window` and `2 × window` seconds and a
/// client that always uses the latest `DPoP-Nonce` never sees it expire. Nothing is stored:
/// any server with the same key (and roughly the same clock) accepts it, and a server with a
/// new key (a restart with a random key) answers the old nonce with `use_dpop_nonce` and a
/// fresh one, which costs the client one retry.
pub(crate) struct NonceKeys {
    /// The keyed MAC, cloned for each nonce so the key schedule is computed once.
    mac: Hmac<Sha256>,
    window: u64,
}

impl NonceKeys {
    /// Keys for `secret` (callers ensure it is long and secret) and windows of `window_secs`
    /// (at least 1).
    pub fn new(secret: &[u8], window_secs: u64) -> Result<NonceKeys, String> {
        // HMAC takes keys of any length (long ones are hashed), so this does not fail today;
        // the error is passed on rather than assumed away.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .map_err(|e| format!("unusable nonce key: {e}"))?;
        Ok(NonceKeys {
            mac,
            window: window_secs.max(1),
        })
    }

    /// The window `now` falls in (times before 1970 count as window 0).
    fn counter(&self, now: i64) -> u64 {
        u64::try_from(now).unwrap_or(0) / self.window
    }

    fn tag(&self, counter: u64) -> Hmac<Sha256> {
        let mut m = self.mac.clone();
        m.update(NONCE_CONTEXT);
        m.update(&counter.to_be_bytes());
        m
    }

    /// The nonce of the window `now` falls in.
    pub fn issue(&self, now: i64) -> String {
        let counter = self.counter(now);
        let tag = self.tag(counter).finalize().into_bytes();
        let mut raw = [0u8; NONCE_RAW_LEN];
        raw[..8].copy_from_slice(&counter.to_be_bytes());
        raw[8..].copy_from_slice(&tag[..NONCE_TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Whether `nonce` (a proof's `nonce` claim) is one of ours, of the current or the
    /// previous window. The tag is checked before the window, and in constant time, so a
    /// forged nonce learns nothing from the answer.
    pub fn check(&self, nonce: Option<&str>, now: i64) -> Result<(), DpopError> {
        let nonce = nonce.ok_or(DpopError::NonceMissing)?;
        if nonce.len() != NONCE_TEXT_LEN {
            return Err(DpopError::NonceInvalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(nonce)
            .map_err(|_| DpopError::NonceInvalid)?;
        let (counter, tag) = raw.split_at_checked(8).ok_or(DpopError::NonceInvalid)?;
        let counter = <[u8; 8]>::try_from(counter)
            .map(u64::from_be_bytes)
            .map_err(|_| DpopError::NonceInvalid)?;
        if tag.len() != NONCE_TAG_LEN {
            return Err(DpopError::NonceInvalid);
        }
        self.tag(counter)
            .verify_truncated_left(tag)
            .map_err(|_| DpopError::NonceInvalid)?;
        let current = self.counter(now);
        if counter == current || counter.checked_add(1) == Some(current) {
            Ok(())
        } else {
            Err(DpopError::NonceStale)
        }
    }
}

/// Whether media type `t` is `expected`, ignoring case and an `application/` prefix (RFC 7515
/// §4.1.9).
pub(crate) fn media_type_is(t: &str, expected: &str) -> bool {
    let t = match t.get(..12) {
        Some(p) if p.eq_ignore_ascii_case("application/") => &t[12..],
        _ => t,
    };
    t.eq_ignore_ascii_case(expected)
}

/// A JWT NumericDate (integer or fractional seconds) as whole seconds.
pub(crate) fn numeric_date(v: &Value) -> Option<i64> {
    if let Some(i) = v.as_i64() {
        return Some(i);
    }
    // `as` saturates for out-of-range floats, so this cannot panic.
    v.as_f64()
        .filter(|f| f.is_finite())
        .map(|f| f.floor() as i64)
}

/// The URL without query and fragment, with scheme and host lower-cased, the default port
/// dropped, an empty path as `/` and percent-escapes normalised (RFC 3986 §6.2.2), so that
/// equivalent spellings compare equal (RFC 9449 §4.3 point 9).
pub(crate) fn normalize_htu(url: &str) -> Option<String> {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let default_port = if scheme == "http" { ":80" } else { ":443" };
    let authority = authority
        .strip_suffix(default_port)
        .unwrap_or(&authority)
        .to_string();
    Some(format!("{scheme}://{authority}{}", normalize_percent(path)))
}

/// Upper-cases percent-escape hex digits and decodes escapes of unreserved characters.
fn normalize_percent(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|c| (*c as char).to_digit(16)),
                b.get(i + 2).and_then(|c| (*c as char).to_digit(16)),
            )
        {
            let byte = (h * 16 + l) as u8;
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                out.push(byte);
            } else {
                out.extend_from_slice(format!("%{byte:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    // Only ASCII was replaced by ASCII, so the bytes are still UTF-8; the fallback keeps the
    // function total.
    String::from_utf8(out).unwrap_or_else(|_| path.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_normalisation() {
        let n = |s| normalize_htu(s);
        assert_eq!(
            n("HTTPS://Example.COM:443/fhir/a/Patient?x=1#y").as_deref(),
            Some("https://example.com/fhir/a/Patient")
        );
        assert_eq!(
            n("http://h:80").as_deref(),
            Some("http://h/"),
            "empty path is /"
        );
        assert_eq!(n("http://h:8080/a").as_deref(), Some("http://h:8080/a"));
        assert_eq!(
            n("http://h/%7euser/%2f").as_deref(),
            Some("http://h/~user/%2F")
        );
        assert_eq!(n("ftp://h/"), None);
        assert_eq!(n("no-scheme"), None);
        assert_eq!(n("http://u@h/"), None);
        assert_eq!(n("http://h/%zz%").as_deref(), Some("http://h/%zz%"));
        assert_eq!(n("http://h/é%C3%A9").as_deref(), Some("http://h/é%C3%A9"));
    }

    #[test]
    fn media_types() {
        assert!(media_type_is("dpop+jwt", "dpop+jwt"));
        assert!(media_type_is("application/DPoP+JWT", "dpop+jwt"));
        assert!(!media_type_is("jwt", "dpop+jwt"));
        assert!(!media_type_is("é", "dpop+jwt"));
        assert!(media_type_is("application/at+jwt", "at+jwt"));
    }

    #[test]
    fn replay_cache_expires_and_bounds() {
        let c = ReplayCache::new(2);
        assert_eq!(c.insert([1; 32], 100, 0), Ok(()));
        assert_eq!(c.insert([1; 32], 100, 50), Err(ReplayError::Replay));
        assert_eq!(c.insert([2; 32], 200, 50), Ok(()));
        assert_eq!(c.insert([3; 32], 200, 50), Err(ReplayError::Full));
        // At t=100 the first entry has expired and makes room.
        assert_eq!(c.insert([3; 32], 200, 100), Ok(()));
        assert_eq!(c.len(), 2);
        assert_eq!(c.insert([1; 32], 300, 200), Ok(()), "expired jti may recur");
        assert_eq!(c.len(), 1, "entries expiring at 200 were dropped");
        assert_eq!(c.insert([9; 32], 400, 1000), Ok(()));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn nonces_live_one_to_two_windows() {
        let k = NonceKeys::new(&[7; 32], 300).expect("keys");
        // Issued early in window 3 (t = 900..1199).
        let n = k.issue(905);
        assert_eq!(n.len(), NONCE_TEXT_LEN);
        assert_eq!(n, k.issue(1199), "stable within a window");
        assert_ne!(n, k.issue(1200), "a new window has a new nonce");
        assert_eq!(k.check(Some(&n), 905), Ok(()));
        assert_eq!(
            k.check(Some(&n), 1499),
            Ok(()),
            "the next window accepts it"
        );
        assert_eq!(k.check(Some(&n), 1500), Err(DpopError::NonceStale));
        assert_eq!(
            k.check(Some(&n), 600),
            Err(DpopError::NonceStale),
            "not before its window"
        );
        assert_eq!(k.check(None, 905), Err(DpopError::NonceMissing));
        assert_eq!(k.check(Some(&n), -5), Err(DpopError::NonceStale));
        assert!(
            k.issue(i64::MIN).len() == NONCE_TEXT_LEN,
            "total for any clock"
        );
    }

    #[test]
    fn forged_and_garbled_nonces_are_refused() {
        let k = NonceKeys::new(b"a key of at least thirty-two bytes!", 60).expect("keys");
        let other = NonceKeys::new(b"another key, also thirty-two bytes", 60).expect("keys");
        let n = k.issue(6000);
        assert_eq!(
            k.check(Some(&other.issue(6000)), 6000),
            Err(DpopError::NonceInvalid),
            "another key's nonce"
        );
        // Another window's counter with this window's tag.
        let mut raw = URL_SAFE_NO_PAD.decode(&n).unwrap_or_default();
        raw[7] ^= 1;
        let moved = URL_SAFE_NO_PAD.encode(&raw);
        assert_eq!(k.check(Some(&moved), 6000), Err(DpopError::NonceInvalid));
        let mut flipped = n.clone().into_bytes();
        flipped[31] = if flipped[31] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(flipped).unwrap_or_default();
        for bad in ["", "x", "not base64!", &flipped, &format!("{n}A"), &n[..31]] {
            assert_eq!(
                k.check(Some(bad), 6000),
                Err(DpopError::NonceInvalid),
                "{bad}"
            );
        }
        assert_eq!(k.check(Some(&n), 6000), Ok(()));
    }

    #[test]
    fn numeric_dates() {
        assert_eq!(numeric_date(&serde_json::json!(5)), Some(5));
        assert_eq!(numeric_date(&serde_json::json!(5.9)), Some(5));
        assert_eq!(numeric_date(&serde_json::json!(1e300)), Some(i64::MAX));
        assert_eq!(numeric_date(&serde_json::json!("5")), None);
    }
}
