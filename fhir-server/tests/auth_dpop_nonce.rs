//! Server-provided DPoP nonces (RFC 9449 §8 and §9): `dpop_nonce = true` makes every DPoP proof
//! carry a recent nonce from the server's `DPoP-Nonce` header. Over HTTP against a real server,
//! and at the `Authenticator` for the shared nonce key.

mod common;

use axum::http::{HeaderMap, HeaderValue};
use fhir_server::auth::{AuthConfig, AuthError, Authenticator, ConfigError, DpopError};
use reqwest::{Method, StatusCode};
use serde_json::json;

use common::auth::*;

/// [`config_text`] with server nonces on, plus `extra` lines in `[auth]`.
fn nonce_config(jwks_url: &str, extra: &str) -> String {
    let text = config_text(jwks_url);
    let with = text.replace(
        "realm = \"test\"\n",
        &format!("realm = \"test\"\ndpop_nonce = true\n{extra}\n"),
    );
    assert_ne!(text, with, "the template still has its realm line");
    with
}

async fn nonce_server(extra: &str) -> AuthServer {
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa, &k.ec])).await;
    start_with_config(&nonce_config(&jwks_url, extra)).await
}

/// A token for trust-a bound to the `client` DPoP key.
fn bound_token(scope: &str) -> String {
    let k = keys();
    sign(
        &k.rsa,
        &claims(scope, json!({"cnf": {"jkt": ec_thumbprint(&k.client.jwk)}})),
    )
}

async fn dpop_get(s: &AuthServer, url: &str, token: &str, proof: String) -> reqwest::Response {
    s.client
        .get(url)
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", proof)
        .send()
        .await
        .expect("request")
}

fn nonce_header(r: &reqwest::Response) -> Option<String> {
    let mut all = r.headers().get_all("dpop-nonce").iter();
    let first = all.next()?.to_str().ok()?.to_string();
    assert!(all.next().is_none(), "one DPoP-Nonce header at most");
    Some(first)
}

fn challenges(r: &reqwest::Response) -> String {
    r.headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Asserts a 401 `use_dpop_nonce` refusal with a fresh nonce and an OperationOutcome; returns
/// the nonce.
async fn assert_use_nonce(r: reqwest::Response, what: &str) -> String {
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
    let c = challenges(&r);
    assert!(
        c.contains("DPoP realm=\"test\"") && c.contains("error=\"use_dpop_nonce\""),
        "{what}: {c}"
    );
    assert!(c.contains("error_description=\""), "{what}: {c}");
    let nonce = nonce_header(&r).unwrap_or_else(|| panic!("{what}: no DPoP-Nonce header"));
    assert_eq!(nonce.len(), 32, "{what}: {nonce}");
    assert!(
        nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{what}: base64url: {nonce}"
    );
    let b = body(r).await;
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}");
    assert_eq!(b["issue"][0]["code"], "login", "{what}: {b}");
    nonce
}

#[tokio::test]
async fn proof_without_nonce_gets_one_and_the_retry_succeeds() {
    let s = nonce_server("").await;
    let k = keys();
    let tok = bound_token("user/Observation.rs");
    let url = s.fhir("trust-a", "/Observation");

    let r = dpop_get(&s, &url, &tok, proof(&k.client, "GET", &url, &tok, "j-1")).await;
    let nonce = assert_use_nonce(r, "proof without nonce").await;

    // The refused proof's jti was not recorded: even a retry that (against the spec's advice)
    // reuses it is let in, so the order of checks cannot turn a nonce refusal into a replay.
    let r = dpop_get(
        &s,
        &url,
        &tok,
        proof_with_nonce(&k.client, "GET", &url, &tok, "j-1", &nonce),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let next = nonce_header(&r).expect("a successful DPoP response carries DPoP-Nonce");
    assert_eq!(next.len(), 32);
    assert_eq!(body(r).await["resourceType"], "Bundle");

    // The nonce of the success keeps the client going without another refusal.
    let r = dpop_get(
        &s,
        &url,
        &tok,
        proof_with_nonce(&k.client, "GET", &url, &tok, "j-2", &next),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(nonce_header(&r).is_some());

    // Replaying an accepted proof is still refused as a replay (not a nonce problem), and the
    // refusal carries a nonce too.
    let r = dpop_get(
        &s,
        &url,
        &tok,
        proof_with_nonce(&k.client, "GET", &url, &tok, "j-2", &next),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = challenges(&r);
    assert!(c.contains("error=\"invalid_dpop_proof\""), "{c}");
    assert!(c.contains("jti replay"), "{c}");
    assert!(
        nonce_header(&r).is_some(),
        "error responses carry DPoP-Nonce"
    );
}

#[tokio::test]
async fn forged_and_garbled_nonces_are_refused() {
    let s = nonce_server("").await;
    let k = keys();
    let tok = bound_token("user/Observation.rs");
    let url = s.fhir("trust-a", "/Observation");
    let r = dpop_get(&s, &url, &tok, proof(&k.client, "GET", &url, &tok, "f-0")).await;
    let good = assert_use_nonce(r, "no nonce").await;

    // Same length and alphabet as a real nonce, other tag bits.
    let mut flipped = good.clone().into_bytes();
    flipped[31] = if flipped[31] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ASCII");
    // A nonce from another server (another random key), as after a restart.
    let other = nonce_server("").await;
    let other_url = other.fhir("trust-a", "/Observation");
    let r = dpop_get(
        &other,
        &other_url,
        &tok,
        proof(&k.client, "GET", &other_url, &tok, "f-other"),
    )
    .await;
    let foreign = assert_use_nonce(r, "no nonce at the other server").await;
    assert_ne!(foreign, good, "each process has its own key");

    for (i, bad) in [
        flipped.as_str(),
        foreign.as_str(),
        "garbage",
        "",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &format!("{good}x"),
    ]
    .into_iter()
    .enumerate()
    {
        let p = proof_with_nonce(&k.client, "GET", &url, &tok, &format!("f-{i}"), bad);
        let r = dpop_get(&s, &url, &tok, p).await;
        assert_use_nonce(r, &format!("bad nonce {bad:?}")).await;
    }

    // A nonce claim that is not a string counts as none.
    let p = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": k.client.jwk}),
        &json!({"jti": "f-num", "htm": "GET", "htu": url, "iat": now(), "ath": ath(&tok), "nonce": 5}),
        &k.client.key,
        jsonwebtoken::Algorithm::ES256,
    );
    assert_use_nonce(dpop_get(&s, &url, &tok, p).await, "numeric nonce").await;

    // The real one still works.
    let p = proof_with_nonce(&k.client, "GET", &url, &tok, "f-ok", &good);
    assert_eq!(dpop_get(&s, &url, &tok, p).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn expired_nonce_is_refused_with_a_new_one() {
    // One-second windows: a nonce is accepted in its window and the next, so after two seconds
    // it has expired whatever the phase of the clock.
    let s = nonce_server("dpop_nonce_window_secs = 1").await;
    let k = keys();
    let tok = bound_token("user/Observation.rs");
    let url = s.fhir("trust-a", "/Observation");
    let r = dpop_get(&s, &url, &tok, proof(&k.client, "GET", &url, &tok, "e-0")).await;
    let old = assert_use_nonce(r, "no nonce").await;

    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    // The proof itself is fresh (iat now); only the nonce is old.
    let p = proof_with_nonce(&k.client, "GET", &url, &tok, "e-1", &old);
    let r = dpop_get(&s, &url, &tok, p).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(challenges(&r).contains("expired"), "{}", challenges(&r));
    let fresh = assert_use_nonce(r, "expired nonce").await;
    assert_ne!(fresh, old, "a later window has another nonce");
}

#[tokio::test]
async fn other_proof_errors_come_before_the_nonce_and_every_dpop_response_has_one() {
    let s = nonce_server("").await;
    let k = keys();
    let tok = bound_token("user/Observation.rs");
    let url = s.fhir("trust-a", "/Observation");

    // A proof that is wrong in another way is told so first (no nonce either): fixing only the
    // nonce would not help it.
    let r = dpop_get(&s, &url, &tok, proof(&k.client, "POST", &url, &tok, "o-1")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let c = challenges(&r);
    assert!(
        c.contains("error=\"invalid_dpop_proof\"") && c.contains("htm"),
        "{c}"
    );
    let nonce = nonce_header(&r).expect("DPoP-Nonce on a refused proof");
    let r = dpop_get(
        &s,
        &url,
        &tok,
        proof(&k.other_client, "GET", &url, &tok, "o-2"),
    )
    .await;
    assert!(
        challenges(&r).contains("invalid_dpop_proof"),
        "{}",
        challenges(&r)
    );

    // A valid DPoP request outside its scopes: 403, still with a nonce.
    let patients = s.fhir("trust-a", "/Patient");
    let p = proof_with_nonce(&k.client, "GET", &patients, &tok, "o-3", &nonce);
    let r = dpop_get(&s, &patients, &tok, p).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert!(nonce_header(&r).is_some(), "DPoP-Nonce on a 403");

    // A DPoP request without a proof at all.
    let r = s
        .call(Method::GET, url.clone(), Some(&format!("DPoP {tok}")), None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(nonce_header(&r).is_some(), "DPoP-Nonce without a proof");
}

#[tokio::test]
async fn bearer_requests_are_unaffected() {
    let s = nonce_server("").await;
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation",
            Some(&token("user/Observation.rs")),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(nonce_header(&r), None, "no nonce for Bearer");
    let r = s
        .req(Method::GET, "trust-a", "/Observation", None, None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(nonce_header(&r), None, "no nonce without credentials");
    assert!(!challenges(&r).contains("use_dpop_nonce"));
    let r = s
        .req(Method::GET, "trust-a", "/Observation", Some("a.b.c"), None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(nonce_header(&r), None, "no nonce for a bad Bearer token");
}

#[tokio::test]
async fn without_dpop_nonce_proofs_need_none() {
    let s = start().await;
    let k = keys();
    let tok = bound_token("user/Observation.rs");
    let url = s.fhir("trust-a", "/Observation");
    let r = dpop_get(&s, &url, &tok, proof(&k.client, "GET", &url, &tok, "n-1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(nonce_header(&r), None, "no DPoP-Nonce when nonces are off");
    // A nonce claim (e.g. from the authorization server) is not ours to judge then.
    let p = proof_with_nonce(&k.client, "GET", &url, &tok, "n-2", "from-the-as");
    assert_eq!(dpop_get(&s, &url, &tok, p).await.status(), StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// The shared key, at the Authenticator

const URL: &str = "https://fhir.example/fhir/trust-a/Observation";
const SHARED: &str = "0123456789abcdef0123456789abcdef-shared";

fn dpop_headers(token: &str, proof: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("DPoP {token}")).expect("header"),
    );
    h.insert("dpop", HeaderValue::from_str(proof).expect("header"));
    h
}

fn authenticator(text: &str, key: Option<&str>) -> Result<Authenticator, ConfigError> {
    let cfg = AuthConfig::from_toml_str(text)?;
    let key = key.map(str::to_string);
    Authenticator::with_secrets(cfg, move |name| {
        (name == "NONCE_KEY").then(|| key.clone()).flatten()
    })
}

#[tokio::test]
async fn instances_with_a_shared_key_accept_each_others_nonces() {
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa])).await;
    let text = nonce_config(&jwks_url, "dpop_nonce_secret_env = \"NONCE_KEY\"");
    let a = authenticator(&text, Some(SHARED)).expect("a");
    let b = authenticator(&text, Some(SHARED)).expect("b");
    let lone = authenticator(&nonce_config(&jwks_url, ""), None).expect("random key");
    let tok = bound_token("user/Observation.rs");

    let nonce = a
        .dpop_nonce_for(&dpop_headers(&tok, "x"))
        .expect("a nonce for a DPoP request");
    assert_eq!(
        a.dpop_nonce_for(&{
            let mut h = HeaderMap::new();
            h.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {tok}")).expect("header"),
            );
            h
        }),
        None,
        "none for Bearer"
    );
    let h = dpop_headers(
        &tok,
        &proof_with_nonce(&k.client, "GET", URL, &tok, "s-1", &nonce),
    );
    assert!(b.authenticate(&Method::GET, URL, &h).await.is_ok());
    assert_eq!(
        lone.authenticate(&Method::GET, URL, &h).await.err(),
        Some(AuthError::InvalidDpopProof(DpopError::NonceInvalid)),
        "a server with its own random key does not know the nonce"
    );

    // Nonces off: no header, and proofs without nonce pass.
    let off = authenticator(&config_text(&jwks_url), None).expect("off");
    let h = dpop_headers(&tok, &proof(&k.client, "GET", URL, &tok, "s-2"));
    assert_eq!(off.dpop_nonce_for(&h), None);
    assert!(off.authenticate(&Method::GET, URL, &h).await.is_ok());
    assert_eq!(
        a.authenticate(&Method::GET, URL, &h).await.err(),
        Some(AuthError::InvalidDpopProof(DpopError::NonceMissing))
    );
}

#[tokio::test]
async fn a_missing_or_short_shared_key_fails_start_up() {
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa])).await;
    let text = nonce_config(&jwks_url, "dpop_nonce_secret_env = \"NONCE_KEY\"");
    for key in [None, Some("too short")] {
        match authenticator(&text, key) {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "auth.dpop_nonce_secret_env")
            }
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }
}
