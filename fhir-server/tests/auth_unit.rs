//! Token validation, DPoP, scopes and tenant binding of `fhir_server::auth`, with keys generated
//! here and JWKS served from a file and from a local HTTP server.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhir_core::TenantId;
use fhir_server::auth::{
    Access, AuthConfig, AuthError, Authenticator, DpopError, Interaction, Principal, Restriction,
};
use jsonwebtoken::{Algorithm, EncodingKey};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use common::auth::{AUD, ISS, Signer, b64json, ec_thumbprint, jwks, keys, now, sign_raw};

const HELSEID: &str = "https://helseid.test";
const URL: &str = "https://fhir.example/fhir/trust-a/Observation";
const ORGNR_PARENT: &str = "helseid://claims/client/claims/orgnr_parent";
const ORGNR_CHILD: &str = "helseid://claims/client/claims/orgnr_child";

// ---------------------------------------------------------------------------------------------
// Tokens

fn claims() -> Value {
    let t = now();
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "client_id": "app-1",
        "jti": "token-1",
        "iat": t,
        "exp": t + 300,
        "scope": "openid user/Observation.rs",
        "tenant": "trust-a",
    })
}

fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    base
}

fn token_typ(s: &Signer, claims: &Value, typ: &str) -> String {
    let alg = format!("{:?}", s.alg);
    sign_raw(
        &json!({"alg": alg, "typ": typ, "kid": s.kid}),
        claims,
        &s.key,
        s.alg,
    )
}

fn token(s: &Signer, claims: &Value) -> String {
    token_typ(s, claims, "at+jwt")
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

// ---------------------------------------------------------------------------------------------
// Configuration

const ORG_TENANTS: &str = r#"
[auth.org_tenants]
"111111111" = "trust-a"
"222222222" = "trust-b"
"#;

/// Two issuers (a SMART one with `dpop`, and a HelseID-like one with scope mapping) sharing
/// one JWKS source line.
fn config_text(jwks_line: &str, dpop: &str, min_refresh: u64) -> String {
    format!(
        r#"
[auth]
mode = "on"
realm = "test"
dpop_max_age_secs = 60
{ORG_TENANTS}
[[auth.issuer]]
issuer = "{ISS}"
{jwks_line}
audiences = ["{AUD}", "other-api"]
algorithms = ["RS256", "PS256", "ES256"]
dpop = "{dpop}"
clock_skew_secs = 30
jwks_min_refresh_secs = {min_refresh}

[[auth.issuer]]
issuer = "{HELSEID}"
{jwks_line}
audiences = ["nhn:dho-fhir"]
dpop = "optional"
smart_scopes = false
jwks_min_refresh_secs = {min_refresh}
tenant_claims = [
  {{ claim = "{ORGNR_PARENT}", kind = "orgnr" }},
  {{ claim = "{ORGNR_CHILD}", kind = "orgnr" }},
]
[auth.issuer.scope_map]
"nhn:dho-fhir/read" = ["user/*.rs"]
"nhn:dho-fhir/write" = ["user/*.cud"]
"#
    )
}

struct Setup {
    auth: Authenticator,
    dir: tempfile::TempDir,
}

fn setup_with(dpop: &str, signers: &[&Signer]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(signers)).expect("write JWKS");
    let line = format!("jwks_file = '{}'", path.display());
    let cfg = AuthConfig::from_toml_str(&config_text(&line, dpop, 0)).expect("config");
    Setup {
        auth: Authenticator::new(cfg).expect("authenticator"),
        dir,
    }
}

fn setup(dpop: &str) -> Setup {
    let k = keys();
    setup_with(dpop, &[&k.rsa, &k.ec])
}

async fn get(auth: &Authenticator, headers: &HeaderMap) -> Result<Principal, AuthError> {
    auth.authenticate(&Method::GET, URL, headers).await
}

fn tenant(s: &str) -> TenantId {
    TenantId::new(s).expect("tenant id")
}

// ---------------------------------------------------------------------------------------------
// Signatures and standard claims

#[tokio::test]
async fn rs256_token_is_accepted() {
    let s = setup("optional");
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &claims())))
        .await
        .expect("valid RS256 token");
    assert_eq!(p.issuer(), ISS);
    assert_eq!(p.subject(), Some("user-1"));
    assert_eq!(p.client_id(), Some("app-1"));
    assert_eq!(p.jti(), Some("token-1"));
    assert_eq!(p.dpop_jkt(), None);
    assert!(p.allows(Interaction::Read, "Observation"));
}

#[tokio::test]
async fn es256_token_is_accepted() {
    let s = setup("optional");
    let p = get(&s.auth, &bearer(&token(&keys().ec, &claims())))
        .await
        .expect("valid ES256 token");
    assert_eq!(p.subject(), Some("user-1"));
}

#[tokio::test]
async fn ps256_token_is_accepted() {
    let s = setup("optional");
    let signer = keys().rsa.with_alg(Algorithm::PS256);
    let p = get(&s.auth, &bearer(&token(&signer, &claims())))
        .await
        .expect("valid PS256 token");
    assert_eq!(p.subject(), Some("user-1"));
}

#[tokio::test]
async fn token_typ_jwt_and_media_type_form_are_accepted() {
    let s = setup("optional");
    for typ in ["JWT", "application/at+jwt", "AT+JWT"] {
        let t = token_typ(&keys().rsa, &claims(), typ);
        assert!(get(&s.auth, &bearer(&t)).await.is_ok(), "{typ}");
    }
}

#[tokio::test]
async fn expired_token_is_rejected() {
    let s = setup("optional");
    let c = with(claims(), json!({"exp": now() - 31, "iat": now() - 400}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert_eq!(err, Some(AuthError::Expired));
    let err = err.unwrap_or(AuthError::MissingCredentials);
    assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        s.auth.www_authenticate(&err),
        vec![
            "Bearer realm=\"test\", error=\"invalid_token\", error_description=\"the access token has expired\"",
            "DPoP realm=\"test\", algs=\"RS256 PS256 ES256\"",
        ]
    );
}

#[tokio::test]
async fn token_without_exp_is_rejected() {
    let s = setup("optional");
    let c = with(claims(), json!({"exp": null}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert!(
        matches!(&err, Some(AuthError::InvalidClaim { claim, .. }) if claim == "exp"),
        "{err:?}"
    );
}

#[tokio::test]
async fn not_yet_valid_token_is_rejected() {
    let s = setup("optional");
    let c = with(claims(), json!({"nbf": now() + 120}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert_eq!(err, Some(AuthError::NotYetValid));
    let c = with(claims(), json!({"iat": now() + 120}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert_eq!(err, Some(AuthError::NotYetValid));
}

#[tokio::test]
async fn clock_skew_is_tolerated() {
    let s = setup("optional");
    // The issuer allows 30 s of skew.
    let c = with(
        claims(),
        json!({"exp": now() - 10, "nbf": now() + 10, "iat": now() + 10}),
    );
    assert!(get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.is_ok());
}

#[tokio::test]
async fn wrong_issuer_is_rejected() {
    let s = setup("optional");
    let c = with(claims(), json!({"iss": "https://evil.test"}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert_eq!(
        err,
        Some(AuthError::UnknownIssuer("https://evil.test".into()))
    );
    let c = with(claims(), json!({"iss": null}));
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
    assert!(matches!(err, Some(AuthError::UnknownIssuer(_))), "{err:?}");
}

#[tokio::test]
async fn wrong_audience_is_rejected() {
    let s = setup("optional");
    for aud in [
        json!("someone-else"),
        json!(["a", "b"]),
        json!(null),
        json!(5),
    ] {
        let c = with(claims(), json!({"aud": aud.clone()}));
        let err = get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.err();
        assert_eq!(err, Some(AuthError::InvalidAudience), "{aud}");
    }
    let c = with(claims(), json!({"aud": ["x", AUD]}));
    assert!(get(&s.auth, &bearer(&token(&keys().rsa, &c))).await.is_ok());
}

#[tokio::test]
async fn wrong_signature_is_rejected() {
    let s = setup("optional");
    let k = keys();
    // Signed by key B but claiming to be key A.
    let forged = Signer {
        kid: "rsa-a",
        ..k.rsa_b.clone()
    };
    let err = get(&s.auth, &bearer(&token(&forged, &claims())))
        .await
        .err();
    assert_eq!(err, Some(AuthError::InvalidSignature));

    // A genuine token whose claims were changed afterwards.
    let genuine = token(&k.rsa, &claims());
    let parts: Vec<&str> = genuine.split('.').collect();
    let more = b64json(&with(claims(), json!({"scope": "system/*.cruds"})));
    let tampered = format!("{}.{}.{}", parts[0], more, parts[2]);
    let err = get(&s.auth, &bearer(&tampered)).await.err();
    assert_eq!(err, Some(AuthError::InvalidSignature));
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let s = setup("optional");
    let header = json!({"alg": "none", "typ": "at+jwt", "kid": "rsa-a"});
    for sig in ["", "AAAA"] {
        let t = format!("{}.{}.{sig}", b64json(&header), b64json(&claims()));
        let err = get(&s.auth, &bearer(&t)).await.err();
        assert_eq!(err, Some(AuthError::UnsupportedAlgorithm("none".into())));
    }
}

#[tokio::test]
async fn hs256_is_rejected() {
    let s = setup("optional");
    let k = keys();
    // Including the classic confusion attack: the RSA public key used as HMAC secret.
    for secret in [
        b"shared-secret".to_vec(),
        k.rsa.public_pem.as_bytes().to_vec(),
    ] {
        let t = sign_raw(
            &json!({"alg": "HS256", "typ": "at+jwt", "kid": "rsa-a"}),
            &claims(),
            &EncodingKey::from_secret(&secret),
            Algorithm::HS256,
        );
        let err = get(&s.auth, &bearer(&t)).await.err();
        assert_eq!(err, Some(AuthError::UnsupportedAlgorithm("HS256".into())));
    }
}

#[tokio::test]
async fn algorithm_not_configured_for_issuer_is_rejected() {
    let s = setup("optional");
    let t = token(&keys().rsa.with_alg(Algorithm::RS384), &claims());
    let err = get(&s.auth, &bearer(&t)).await.err();
    assert_eq!(err, Some(AuthError::UnsupportedAlgorithm("RS384".into())));
}

#[tokio::test]
async fn wrong_typ_is_rejected() {
    let s = setup("optional");
    let k = keys();
    let t = token_typ(&k.rsa, &claims(), "dpop+jwt");
    let err = get(&s.auth, &bearer(&t)).await.err();
    assert_eq!(err, Some(AuthError::InvalidType("dpop+jwt".into())));
    let t = sign_raw(
        &json!({"alg": "RS256", "kid": "rsa-a"}),
        &claims(),
        &k.rsa.key,
        Algorithm::RS256,
    );
    let err = get(&s.auth, &bearer(&t)).await.err();
    assert_eq!(err, Some(AuthError::InvalidType("(none)".into())));
}

#[tokio::test]
async fn missing_authorization_is_rejected() {
    let s = setup("optional");
    let err = get(&s.auth, &HeaderMap::new()).await.err();
    assert_eq!(err, Some(AuthError::MissingCredentials));
    let err = err.unwrap_or(AuthError::Expired);
    assert_eq!(
        s.auth.www_authenticate(&err),
        vec![
            "Bearer realm=\"test\"",
            "DPoP realm=\"test\", algs=\"RS256 PS256 ES256\""
        ]
    );
}

#[tokio::test]
async fn garbled_authorization_is_rejected() {
    let s = setup("optional");
    type Expect = fn(&AuthError) -> bool;
    let cases: Vec<(&[u8], Expect)> = vec![
        (b"Bearer", |e| {
            matches!(e, AuthError::MalformedAuthorization(_))
        }),
        (b"Bearer two words", |e| {
            matches!(e, AuthError::MalformedAuthorization(_))
        }),
        (b"Bearer \xc3\xa6\xc3\xb8", |e| {
            matches!(e, AuthError::MalformedAuthorization(_))
        }),
        (b"Basic dXNlcjpwYXNz", |e| {
            matches!(e, AuthError::UnsupportedScheme(_))
        }),
        (b"Bearer not-a-jwt", |e| {
            matches!(e, AuthError::MalformedToken(_))
        }),
        (b"Bearer a.b.c", |e| {
            matches!(e, AuthError::MalformedToken(_))
        }),
        (b"Bearer e30.e30.e30", |e| {
            matches!(e, AuthError::MalformedToken(_))
        }),
    ];
    for (value, ok) in cases {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_bytes(value).expect("header"),
        );
        let err = get(&s.auth, &h).await.err();
        assert!(
            err.as_ref().is_some_and(ok),
            "{:?} gave {err:?}",
            String::from_utf8_lossy(value)
        );
    }
}

#[tokio::test]
async fn hostile_headers_never_panic() {
    let s = setup("optional");
    let genuine = token(&keys().rsa, &claims());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..2000 {
        let mut bytes: Vec<u8> = genuine.as_bytes().to_vec();
        if i % 2 == 0 {
            // Flip some bytes of a real token.
            for _ in 0..rng.gen_range(1..6) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.r#gen();
            }
        } else {
            let len = rng.gen_range(0..300);
            bytes = (0..len).map(|_| rng.r#gen()).collect();
        }
        let mut value = b"DPoP ".to_vec();
        value.extend_from_slice(&bytes);
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            h.insert("authorization", v.clone());
            h.insert("dpop", v);
        }
        let r = get(&s.auth, &h).await;
        if let Err(e) = r {
            let _ = e.status();
            for v in s.auth.www_authenticate(&e) {
                assert!(HeaderValue::from_str(&v).is_ok(), "{v}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Key sources

#[tokio::test]
async fn unknown_kid_in_file_is_rejected_then_found_after_rotation() {
    let k = keys();
    let s = setup("optional");
    let t = token(&k.rsa_b, &claims());
    let err = get(&s.auth, &bearer(&t)).await.err();
    assert_eq!(err, Some(AuthError::UnknownKey("rsa-b".into())));
    // The operator rotates the file; the next unknown kid re-reads it.
    std::fs::write(s.dir.path().join("jwks.json"), jwks(&[&k.rsa_b])).expect("rotate");
    assert!(get(&s.auth, &bearer(&t)).await.is_ok());
}

/// A JWKS endpoint on 127.0.0.1 whose document can be swapped, counting fetches.
struct JwksServer {
    url: String,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(initial: String) -> JwksServer {
    let doc = Arc::new(Mutex::new(initial));
    let hits = Arc::new(AtomicUsize::new(0));
    let (d, h) = (doc.clone(), hits.clone());
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let (d, h) = (d.clone(), h.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let body = d.lock().map(|g| g.clone()).unwrap_or_default();
                ([("content-type", "application/json")], body)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    JwksServer {
        url: format!("http://{addr}/jwks"),
        doc,
        hits,
    }
}

fn url_auth(url: &str, min_refresh: u64) -> Authenticator {
    let line = format!("jwks_url = \"{url}\"");
    let cfg =
        AuthConfig::from_toml_str(&config_text(&line, "optional", min_refresh)).expect("config");
    Authenticator::new(cfg).expect("authenticator")
}

#[tokio::test]
async fn jwks_url_is_fetched_cached_and_refreshed_on_unknown_kid() {
    let k = keys();
    let server = jwks_server(jwks(&[&k.rsa])).await;
    let auth = url_auth(&server.url, 0);

    assert!(get(&auth, &bearer(&token(&k.rsa, &claims()))).await.is_ok());
    assert!(get(&auth, &bearer(&token(&k.rsa, &claims()))).await.is_ok());
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "keys are cached");

    let rotated = token(&k.rsa_b, &claims());
    assert_eq!(
        get(&auth, &bearer(&rotated)).await.err(),
        Some(AuthError::UnknownKey("rsa-b".into()))
    );
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        2,
        "unknown kid refetches"
    );

    // The issuer rotates: publishes key B.
    if let Ok(mut d) = server.doc.lock() {
        *d = jwks(&[&k.rsa, &k.rsa_b]);
    }
    assert!(get(&auth, &bearer(&rotated)).await.is_ok());
    assert_eq!(server.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn jwks_refresh_on_unknown_kid_is_rate_limited() {
    let k = keys();
    let server = jwks_server(jwks(&[&k.rsa])).await;
    let auth = url_auth(&server.url, 3600);
    assert!(get(&auth, &bearer(&token(&k.rsa, &claims()))).await.is_ok());
    for _ in 0..5 {
        let err = get(&auth, &bearer(&token(&k.rsa_b, &claims()))).await.err();
        assert_eq!(err, Some(AuthError::UnknownKey("rsa-b".into())));
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn unreachable_jwks_url_gives_503() {
    // Bind and drop, so the port is very likely closed.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let auth = url_auth(&format!("http://127.0.0.1:{port}/jwks"), 0);
    let err = get(&auth, &bearer(&token(&keys().rsa, &claims())))
        .await
        .err();
    assert!(matches!(err, Some(AuthError::Unavailable(_))), "{err:?}");
    assert_eq!(
        err.map(|e| e.status()),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

/// HelseID publishes its keys over https: such a URL is accepted, and (so that the server
/// starts without network access) not fetched at start-up.
#[test]
fn https_jwks_url_is_accepted_and_not_fetched_at_start_up() {
    let cfg = AuthConfig::from_toml_str(&config_text(
        "jwks_url = \"https://idp.test/jwks\"",
        "optional",
        0,
    ))
    .expect("config");
    assert!(Authenticator::new(cfg).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Scopes

async fn principal_with(scope: Value, extra: Value) -> Principal {
    let s = setup("optional");
    let c = with(with(claims(), json!({"scope": scope})), extra);
    get(&s.auth, &bearer(&token(&keys().rsa, &c)))
        .await
        .expect("valid token")
}

#[tokio::test]
async fn v2_scope_letters_each_grant_their_interactions() {
    use Interaction::*;
    let cases: [(&str, &[Interaction]); 5] = [
        ("c", &[Create]),
        ("r", &[Read, Vread, HistoryInstance]),
        ("u", &[Update, Patch]),
        ("d", &[Delete]),
        ("s", &[SearchType, HistoryType]),
    ];
    let all = [
        Create,
        Read,
        Vread,
        Update,
        Patch,
        Delete,
        HistoryInstance,
        HistoryType,
        SearchType,
        Operation,
    ];
    for (letter, granted) in cases {
        let p = principal_with(json!(format!("user/Observation.{letter}")), json!({})).await;
        for i in all {
            assert_eq!(
                p.allows(i, "Observation"),
                granted.contains(&i),
                "{letter} / {i:?}"
            );
            assert!(!p.allows(i, "Patient"), "{letter} / {i:?} on Patient");
        }
        assert!(p.allows(Capabilities, ""));
        assert!(!p.allows(SearchSystem, ""));
    }
}

#[tokio::test]
async fn write_does_not_imply_read() {
    let p = principal_with(json!("user/Observation.cud"), json!({})).await;
    assert!(p.allows(Interaction::Update, "Observation"));
    assert!(!p.allows(Interaction::Read, "Observation"));
    assert!(!p.allows(Interaction::SearchType, "Observation"));
    let err = p.check(Interaction::Read, "Observation").err();
    assert!(
        matches!(&err, Some(AuthError::InsufficientScope(_))),
        "{err:?}"
    );
    assert_eq!(err.map(|e| e.status()), Some(StatusCode::FORBIDDEN));
}

#[tokio::test]
async fn v1_scopes_map_to_v2() {
    let p = principal_with(json!("user/Observation.read user/Patient.write"), json!({})).await;
    assert!(p.allows(Interaction::Read, "Observation"));
    assert!(p.allows(Interaction::SearchType, "Observation"));
    assert!(!p.allows(Interaction::Create, "Observation"));
    assert!(p.allows(Interaction::Create, "Patient"));
    assert!(p.allows(Interaction::Delete, "Patient"));
    assert!(!p.allows(Interaction::Read, "Patient"));
    let p = principal_with(json!("system/Encounter.*"), json!({})).await;
    assert!(p.allows(Interaction::Operation, "Encounter"));
    assert_eq!(p.scopes()[0].to_string(), "system/Encounter.cruds");
}

#[tokio::test]
async fn wildcard_type_scopes_cover_all_types_and_system_search() {
    let p = principal_with(json!(["user/*.rs"]), json!({})).await;
    assert!(p.allows(Interaction::Read, "CarePlan"));
    assert!(p.allows(Interaction::SearchSystem, ""));
    assert!(p.allows(Interaction::HistorySystem, ""));
    assert!(!p.allows(Interaction::Create, "CarePlan"));
}

#[tokio::test]
async fn out_of_order_and_malformed_scopes_grant_nothing() {
    let p = principal_with(
        json!("user/Observation.sr user/observation.r patient/X"),
        json!({}),
    )
    .await;
    assert!(p.scopes().is_empty());
    assert!(!p.allows(Interaction::Read, "Observation"));
}

#[tokio::test]
async fn scope_filters_are_parsed_and_restrict_access() {
    let p = principal_with(
        json!("user/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"),
        json!({}),
    )
    .await;
    let filters = vec![(
        "category".to_string(),
        "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs".to_string(),
    )];
    assert_eq!(p.scopes()[0].filters, filters);
    assert_eq!(
        p.access(Interaction::SearchType, "Observation"),
        Access::Restricted(vec![Restriction {
            patient: None,
            filters
        }])
    );
}

#[tokio::test]
async fn patient_context_comes_from_patient_claim() {
    let p = principal_with(json!("patient/Observation.rs"), json!({"patient": "p-123"})).await;
    assert_eq!(p.patient(), Some("p-123"));
    assert_eq!(
        p.access(Interaction::Read, "Observation"),
        Access::Restricted(vec![Restriction {
            patient: Some("p-123".into()),
            filters: vec![]
        }])
    );
}

#[tokio::test]
async fn patient_context_comes_from_fhir_user() {
    let p = principal_with(
        json!("patient/*.rs"),
        json!({"fhirUser": "https://fhir.example/fhir/trust-a/Patient/p-9"}),
    )
    .await;
    assert_eq!(p.patient(), Some("p-9"));
    assert!(p.allows(Interaction::Read, "Observation"));
}

#[tokio::test]
async fn patient_scope_without_patient_context_grants_nothing() {
    let p = principal_with(json!("patient/Observation.rs"), json!({})).await;
    assert_eq!(p.patient(), None);
    assert_eq!(p.access(Interaction::Read, "Observation"), Access::Denied);
}

#[tokio::test]
async fn user_scope_beats_patient_restriction() {
    let p = principal_with(
        json!("patient/Observation.rs user/Observation.r"),
        json!({"patient": "p-1"}),
    )
    .await;
    assert_eq!(
        p.access(Interaction::Read, "Observation"),
        Access::Unrestricted
    );
    assert!(matches!(
        p.access(Interaction::SearchType, "Observation"),
        Access::Restricted(_)
    ));
}

// ---------------------------------------------------------------------------------------------
// HelseID: scope mapping, tenants, identity claims

fn helseid_claims() -> Value {
    with(
        claims(),
        json!({
            "iss": HELSEID,
            "aud": "nhn:dho-fhir",
            "scope": ["nhn:dho-fhir/read", "user/*.cruds"],
            "tenant": null,
            ORGNR_PARENT: "111111111",
            ORGNR_CHILD: "222222222",
            "helseid://claims/client/claims/orgnr_supplier": "333333333",
            "helseid://claims/identity/pid": "01017012345",
            "helseid://claims/hpr/hpr_number": "565505933",
            "helseid://claims/identity/security_level": "4",
            "helseid://claims/identity/assurance_level": "high",
            "name": "Kari Nordmann",
            "authorization_details": [{
                "type": "nhn:tillitsrammeverk:parameters",
                "care_relationship": {
                    "purpose_of_use": {"code": "TREAT", "system": "urn:oid:2.16.840.1.113883.1.11.20448"}
                }
            }],
        }),
    )
}

#[tokio::test]
async fn helseid_scopes_are_mapped_and_smart_scopes_ignored() {
    let s = setup("optional");
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &helseid_claims())))
        .await
        .expect("valid HelseID token");
    assert_eq!(
        p.scopes().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        vec!["user/*.rs"],
        "user/*.cruds in the token is ignored: smart_scopes = false"
    );
    assert!(p.allows(Interaction::Read, "Observation"));
    assert!(!p.allows(Interaction::Create, "Observation"));
    assert_eq!(p.raw_scopes().len(), 2);
}

#[tokio::test]
async fn helseid_identity_claims_reach_the_principal() {
    let s = setup("optional");
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &helseid_claims())))
        .await
        .expect("valid HelseID token");
    assert_eq!(p.pid(), Some("01017012345"));
    assert_eq!(p.hpr_number(), Some("565505933"));
    assert_eq!(p.name(), Some("Kari Nordmann"));
    assert_eq!(p.org_numbers().parent.as_deref(), Some("111111111"));
    assert_eq!(p.org_numbers().child.as_deref(), Some("222222222"));
    assert_eq!(p.org_numbers().supplier.as_deref(), Some("333333333"));
    assert_eq!(p.security_level(), Some("4"));
    assert_eq!(p.assurance_level(), Some("high"));
    assert_eq!(p.purpose_of_use().len(), 1);
    assert_eq!(p.purpose_of_use()[0].code, "TREAT");
    assert!(!format!("{p:?}").contains("01017012345"));
}

#[tokio::test]
async fn tenant_from_orgnr_parent() {
    let s = setup("optional");
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &helseid_claims())))
        .await
        .expect("valid");
    // orgnr_parent (trust-a) decides; orgnr_child (which maps to trust-b) is not consulted.
    assert!(p.allows_tenant(&tenant("trust-a")));
    assert!(!p.allows_tenant(&tenant("trust-b")));
}

#[tokio::test]
async fn tenant_from_orgnr_child_without_parent() {
    let s = setup("optional");
    let c = with(helseid_claims(), json!({ORGNR_PARENT: null}));
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &c)))
        .await
        .expect("valid");
    assert!(p.allows_tenant(&tenant("trust-b")));
    assert!(!p.allows_tenant(&tenant("trust-a")));
}

#[tokio::test]
async fn tenant_from_smart_tenant_claim() {
    let s = setup("optional");
    let c = with(claims(), json!({"tenant": "trust-c"}));
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &c)))
        .await
        .expect("valid");
    assert!(p.allows_tenant(&tenant("trust-c")));
    assert!(!p.allows_tenant(&tenant("trust-a")));
}

#[tokio::test]
async fn token_for_trust_a_is_not_allowed_for_trust_b() {
    let s = setup("optional");
    let c = with(helseid_claims(), json!({ORGNR_CHILD: null}));
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &c)))
        .await
        .expect("valid");
    assert_eq!(p.check_tenant(&tenant("trust-a")), Ok(()));
    let err = p.check_tenant(&tenant("trust-b")).err();
    assert_eq!(err, Some(AuthError::TenantNotAllowed("trust-b".into())));
    assert_eq!(err.map(|e| e.status()), Some(StatusCode::FORBIDDEN));
    // An organisation that maps to no tenant reaches none.
    let c = with(
        helseid_claims(),
        json!({ORGNR_PARENT: "999999999", ORGNR_CHILD: null}),
    );
    let p = get(&s.auth, &bearer(&token(&keys().rsa, &c)))
        .await
        .expect("valid");
    assert!(!p.allows_tenant(&tenant("trust-a")));
}

// ---------------------------------------------------------------------------------------------
// DPoP

fn ath(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

fn proof_claims(method: &str, url: &str, token: &str) -> Value {
    json!({
        "jti": format!("proof-{}", rand::random::<u64>()),
        "htm": method,
        "htu": url,
        "iat": now(),
        "ath": ath(token),
    })
}

fn proof(client: &Signer, claims: &Value) -> String {
    sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk}),
        claims,
        &client.key,
        Algorithm::ES256,
    )
}

/// An access token bound to `client`'s key.
fn bound_token(client: &Signer) -> String {
    let c = with(
        claims(),
        json!({"cnf": {"jkt": ec_thumbprint(&client.jwk)}}),
    );
    token(&keys().rsa, &c)
}

fn dpop_headers(token: &str, proof: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("DPoP {token}")).expect("header"),
    );
    h.insert("dpop", HeaderValue::from_str(proof).expect("header"));
    h
}

async fn dpop_request(
    auth: &Authenticator,
    token: &str,
    proof_claims: &Value,
) -> Result<Principal, AuthError> {
    let p = proof(&keys().client, proof_claims);
    auth.authenticate(&Method::POST, URL, &dpop_headers(token, &p))
        .await
}

#[tokio::test]
async fn dpop_valid_proof_is_accepted() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    // The query is not part of htu, and scheme/host case does not matter.
    let url = "HTTPS://FHIR.example:443/fhir/trust-a/Observation";
    let p = dpop_request(&s.auth, &t, &proof_claims("POST", url, &t))
        .await
        .expect("valid DPoP request");
    assert_eq!(
        p.dpop_jkt(),
        Some(ec_thumbprint(&keys().client.jwk).as_str())
    );
    let p2 = s
        .auth
        .authenticate(
            &Method::POST,
            &format!("{URL}?_format=json"),
            &dpop_headers(&t, &proof(&keys().client, &proof_claims("POST", URL, &t))),
        )
        .await;
    assert!(p2.is_ok(), "{:?}", p2.err());
}

#[tokio::test]
async fn dpop_required_rejects_bearer() {
    let s = setup("required");
    let err = get(&s.auth, &bearer(&token(&keys().rsa, &claims())))
        .await
        .err();
    assert_eq!(err, Some(AuthError::DpopRequired));
    let err = err.unwrap_or(AuthError::Expired);
    // The helseid.test issuer still takes Bearer, so both challenges are offered.
    let v = s.auth.www_authenticate(&err);
    assert_eq!(v.len(), 2);
    assert!(
        v[1].starts_with(
            "DPoP realm=\"test\", algs=\"RS256 PS256 ES256\", error=\"invalid_token\""
        ),
        "{v:?}"
    );
}

#[tokio::test]
async fn dpop_bound_token_sent_as_bearer_is_rejected() {
    let s = setup("optional");
    let err = get(&s.auth, &bearer(&bound_token(&keys().client)))
        .await
        .err();
    assert_eq!(err, Some(AuthError::BoundTokenAsBearer));
}

#[tokio::test]
async fn dpop_scheme_is_rejected_when_dpop_is_off() {
    let s = setup("off");
    let t = bound_token(&keys().client);
    let err = dpop_request(&s.auth, &t, &proof_claims("POST", URL, &t))
        .await
        .err();
    assert_eq!(err, Some(AuthError::DpopNotAccepted));
}

#[tokio::test]
async fn dpop_replayed_jti_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    let pc = proof_claims("POST", URL, &t);
    assert!(dpop_request(&s.auth, &t, &pc).await.is_ok());
    let err = dpop_request(&s.auth, &t, &pc).await.err();
    assert_eq!(err, Some(AuthError::InvalidDpopProof(DpopError::Replay)));
    let err = err.unwrap_or(AuthError::Expired);
    assert!(
        err.www_authenticate()
            .is_some_and(|v| v.starts_with("DPoP realm=\"fhir\", error=\"invalid_dpop_proof\"")),
    );
}

#[tokio::test]
async fn dpop_wrong_htm_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    let err = dpop_request(&s.auth, &t, &proof_claims("GET", URL, &t))
        .await
        .err();
    assert_eq!(err, Some(AuthError::InvalidDpopProof(DpopError::Method)));
}

#[tokio::test]
async fn dpop_wrong_htu_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    for url in [
        "https://fhir.example/fhir/trust-b/Observation",
        "http://fhir.example/fhir/trust-a/Observation",
        "https://fhir.example:8443/fhir/trust-a/Observation",
        "not a url",
    ] {
        let err = dpop_request(&s.auth, &t, &proof_claims("POST", url, &t))
            .await
            .err();
        assert_eq!(
            err,
            Some(AuthError::InvalidDpopProof(DpopError::Url)),
            "{url}"
        );
    }
}

#[tokio::test]
async fn dpop_stale_or_future_iat_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    // max age 60 s; skew 30 s.
    for iat in [now() - 120, now() + 90] {
        let pc = with(proof_claims("POST", URL, &t), json!({"iat": iat}));
        let err = dpop_request(&s.auth, &t, &pc).await.err();
        assert_eq!(err, Some(AuthError::InvalidDpopProof(DpopError::IssuedAt)));
    }
    let pc = with(proof_claims("POST", URL, &t), json!({"iat": now() - 50}));
    assert!(dpop_request(&s.auth, &t, &pc).await.is_ok());
}

#[tokio::test]
async fn dpop_ath_mismatch_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    let pc = with(
        proof_claims("POST", URL, &t),
        json!({"ath": ath("another token")}),
    );
    let err = dpop_request(&s.auth, &t, &pc).await.err();
    assert_eq!(
        err,
        Some(AuthError::InvalidDpopProof(DpopError::AccessTokenHash))
    );
    let pc = with(proof_claims("POST", URL, &t), json!({"ath": null}));
    let err = dpop_request(&s.auth, &t, &pc).await.err();
    assert_eq!(
        err,
        Some(AuthError::InvalidDpopProof(DpopError::AccessTokenHash))
    );
}

#[tokio::test]
async fn dpop_cnf_jkt_mismatch_is_rejected() {
    let s = setup("required");
    // Bound to another client's key, proven with ours.
    let t = bound_token(&keys().other_client);
    let err = dpop_request(&s.auth, &t, &proof_claims("POST", URL, &t))
        .await
        .err();
    assert_eq!(
        err,
        Some(AuthError::InvalidDpopProof(DpopError::KeyMismatch))
    );
}

#[tokio::test]
async fn dpop_with_unbound_token_is_rejected() {
    let s = setup("required");
    let t = token(&keys().rsa, &claims());
    let err = dpop_request(&s.auth, &t, &proof_claims("POST", URL, &t))
        .await
        .err();
    assert_eq!(
        err,
        Some(AuthError::InvalidDpopProof(DpopError::UnboundToken))
    );
}

#[tokio::test]
async fn dpop_missing_or_repeated_proof_header_is_rejected() {
    let s = setup("required");
    let t = bound_token(&keys().client);
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("DPoP {t}")).expect("header"),
    );
    let err = s.auth.authenticate(&Method::POST, URL, &h).await.err();
    assert_eq!(err, Some(AuthError::InvalidDpopProof(DpopError::Missing)));
    let p = proof(&keys().client, &proof_claims("POST", URL, &t));
    h.append("dpop", HeaderValue::from_str(&p).expect("header"));
    h.append("dpop", HeaderValue::from_str(&p).expect("header"));
    let err = s.auth.authenticate(&Method::POST, URL, &h).await.err();
    assert_eq!(err, Some(AuthError::InvalidDpopProof(DpopError::Multiple)));
}

#[tokio::test]
async fn dpop_proof_header_checks() {
    let s = setup("required");
    let c = &keys().client;
    let t = bound_token(c);
    let pc = proof_claims("POST", URL, &t);
    let send = |proof: String| {
        let auth = s.auth.clone();
        let t = t.clone();
        async move {
            auth.authenticate(&Method::POST, URL, &dpop_headers(&t, &proof))
                .await
                .err()
        }
    };

    // typ must be dpop+jwt.
    let p = sign_raw(
        &json!({"typ": "JWT", "alg": "ES256", "jwk": c.jwk}),
        &pc,
        &c.key,
        Algorithm::ES256,
    );
    assert_eq!(
        send(p).await,
        Some(AuthError::InvalidDpopProof(DpopError::Type))
    );

    // A private key in the jwk header.
    let mut private = c.jwk.clone();
    private["d"] = json!("AAAA");
    let p = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": private}),
        &pc,
        &c.key,
        Algorithm::ES256,
    );
    assert!(matches!(
        send(p).await,
        Some(AuthError::InvalidDpopProof(DpopError::Key(_)))
    ));

    // No jwk at all.
    let p = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256"}),
        &pc,
        &c.key,
        Algorithm::ES256,
    );
    assert!(matches!(
        send(p).await,
        Some(AuthError::InvalidDpopProof(DpopError::Key(_)))
    ));

    // A symmetric algorithm.
    let p = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": c.jwk}),
        &pc,
        &EncodingKey::from_secret(b"s"),
        Algorithm::HS256,
    );
    assert_eq!(
        send(p).await,
        Some(AuthError::InvalidDpopProof(DpopError::Algorithm(
            "HS256".into()
        )))
    );

    // Signed by a key other than the one in the header.
    let p = sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": c.jwk}),
        &pc,
        &keys().other_client.key,
        Algorithm::ES256,
    );
    assert_eq!(
        send(p).await,
        Some(AuthError::InvalidDpopProof(DpopError::Signature))
    );
}

// ---------------------------------------------------------------------------------------------
// Configuration

#[test]
fn example_configs_parse() {
    let h = AuthConfig::from_toml_str(include_str!("../src/auth/examples/helseid.toml"))
        .expect("HelseID example");
    assert_eq!(h.issuers[0].issuer, "https://helseid-sts.nhn.no");
    assert_eq!(
        h.issuers[0].scope_map["nhn:dho-fhir/read"],
        vec!["user/*.rs"]
    );
    let s = AuthConfig::from_toml_str(include_str!("../src/auth/examples/smart.toml"))
        .expect("SMART example");
    assert_eq!(s.issuers.len(), 2);
}

#[test]
fn config_errors_name_the_key() {
    let text = config_text("jwks_file = '/nonexistent/jwks.json'", "sometimes", 0);
    let err = AuthConfig::from_toml_str(&text)
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref().is_some_and(|e| e.contains("dpop")),
        "{err:?}"
    );

    let text = config_text("jwks_file = '/nonexistent/jwks.json'", "optional", 0);
    let cfg = AuthConfig::from_toml_str(&text).expect("parses");
    let err = Authenticator::new(cfg).err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("auth.issuer[0].jwks_file")),
        "{err:?}"
    );
}

#[tokio::test]
async fn auth_off_gives_an_unrestricted_principal() {
    let cfg = AuthConfig::from_toml_str("[auth]\nmode = \"off\"").expect("config");
    let auth = Authenticator::new(cfg).expect("authenticator");
    let p = get(&auth, &HeaderMap::new()).await.expect("no auth needed");
    assert!(p.is_unrestricted());
    assert!(p.allows(Interaction::Delete, "Patient"));
    assert!(p.allows_tenant(&tenant("anything")));
}
