//! Tokens signed with keys generated here (RSA and EC), a JWKS served from a loopback HTTP
//! server, and a real server with auth on over tenants `trust-a` and `trust-b`: what every
//! auth test starts from.
#![allow(dead_code)]

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use fhir_core::TenantId;
use fhir_server::auth::{AuthConfig, Authenticator};
use fhir_server::discovery::SmartDiscovery;
use fhir_server::{AppState, ServerConfig};
use fhir_store::Store;
use jsonwebtoken::{Algorithm, EncodingKey};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const ISS: &str = "https://idp.test";
pub const AUD: &str = "fhir-api";

// ---------------------------------------------------------------------------------------------
// Keys and tokens (in the style of auth_unit.rs)

/// A signing key with its public JWK (and, for RSA, its public PEM).
#[derive(Clone)]
pub struct Signer {
    pub key: EncodingKey,
    pub alg: Algorithm,
    pub kid: &'static str,
    pub jwk: Value,
    pub public_pem: String,
}

impl Signer {
    /// The same key used with another algorithm (e.g. PS256 with an RSA key).
    pub fn with_alg(&self, alg: Algorithm) -> Signer {
        Signer {
            alg,
            ..self.clone()
        }
    }
}

pub struct Keys {
    /// In the test JWKS (kid `rsa-a`).
    pub rsa: Signer,
    /// A second RSA key (kid `rsa-b`), for rotation tests.
    pub rsa_b: Signer,
    pub ec: Signer,
    /// Same kid as `ec`, but not in the JWKS.
    pub stranger: Signer,
    /// DPoP client keys.
    pub client: Signer,
    pub other_client: Signer,
}

pub fn rsa_signer(kid: &'static str) -> Signer {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let private = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("RSA key");
    let pem = private.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 PEM");
    let public_pem = private
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("public PEM");
    Signer {
        key: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key"),
        alg: Algorithm::RS256,
        kid,
        jwk: json!({
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "n": URL_SAFE_NO_PAD.encode(private.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(private.e().to_bytes_be()),
        }),
        public_pem,
    }
}

pub fn ec_signer(kid: &'static str) -> Signer {
    use p256::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = secret.to_pkcs8_pem(LineEnding::LF).expect("PKCS#8 PEM");
    let public_pem = secret
        .public_key()
        .to_public_key_pem(LineEnding::LF)
        .expect("public PEM");
    let mut jwk: Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).expect("JWK JSON");
    jwk["kid"] = json!(kid);
    Signer {
        key: EncodingKey::from_ec_pem(pem.as_bytes()).expect("encoding key"),
        alg: Algorithm::ES256,
        kid,
        jwk,
        public_pem,
    }
}

/// Keys are made once per test binary: RSA generation is slow in debug builds.
pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let b = std::thread::spawn(|| rsa_signer("rsa-b"));
        let rsa = rsa_signer("rsa-a");
        Keys {
            rsa,
            rsa_b: b.join().expect("RSA thread"),
            ec: ec_signer("ec-1"),
            stranger: ec_signer("ec-1"),
            client: ec_signer("client"),
            other_client: ec_signer("other-client"),
        }
    })
}

/// A JWKS document with the signers' public keys.
pub fn jwks(signers: &[&Signer]) -> String {
    json!({"keys": signers.iter().map(|s| s.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

pub fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let input = format!("{}.{}", b64json(header), b64json(claims));
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).expect("signing");
    format!("{input}.{sig}")
}

/// Claims for trust-a with `scope`, plus `extra` (a null value removes a claim).
pub fn claims(scope: &str, extra: Value) -> Value {
    let t = now();
    let mut c = json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "client_id": "app-1",
        "jti": format!("token-{}", rand::random::<u64>()),
        "iat": t,
        "exp": t + 300,
        "scope": scope,
        "tenant": "trust-a",
    });
    if let (Some(b), Value::Object(e)) = (c.as_object_mut(), extra) {
        for (k, v) in e {
            if v.is_null() {
                b.remove(&k);
            } else {
                b.insert(k, v);
            }
        }
    }
    c
}

pub fn sign(s: &Signer, claims: &Value) -> String {
    let alg = format!("{:?}", s.alg);
    sign_raw(
        &json!({"alg": alg, "typ": "at+jwt", "kid": s.kid}),
        claims,
        &s.key,
        s.alg,
    )
}

/// An RS256 token for trust-a with `scope`.
pub fn token(scope: &str) -> String {
    sign(&keys().rsa, &claims(scope, json!({})))
}

pub fn admin_token() -> String {
    token("system/*.cruds")
}

// ---------------------------------------------------------------------------------------------
// Server

pub struct AuthServer {
    pub url: String,
    pub client: reqwest::Client,
    pub store: Store,
    pub dir: tempfile::TempDir,
}

pub async fn jwks_server(doc: String) -> String {
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let d = doc.clone();
            async move { ([("content-type", "application/json")], d) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/jwks")
}

pub fn config_text(jwks_url: &str) -> String {
    format!(
        r#"
[auth]
mode = "on"
realm = "test"

[[auth.issuer]]
issuer = "{ISS}"
jwks_url = "{jwks_url}"
audiences = ["{AUD}"]
dpop = "optional"
jwks_min_refresh_secs = 0

[smart]
authorization_endpoint = "https://idp.test/authorize"
token_endpoint = "https://idp.test/token"
"#
    )
}

/// A server with auth on, configured by [`config_text`] with a loopback JWKS of `rsa` and `ec`.
pub async fn start() -> AuthServer {
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa, &k.ec])).await;
    start_with_config(&config_text(&jwks_url)).await
}

/// A server with auth on, configured by the TOML `text` (`[auth]` and `[smart]`).
pub async fn start_with_config(text: &str) -> AuthServer {
    let cfg = AuthConfig::from_toml_str(text).expect("config");
    let smart = SmartDiscovery::from_toml_str(text)
        .expect("smart")
        .with_defaults_from(&cfg);
    let auth = Authenticator::new(cfg).expect("authenticator");

    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("store")).expect("store");
    for t in ["trust-a", "trust-b"] {
        store
            .create_tenant(&TenantId::new(t).expect("id"), t)
            .expect("tenant");
    }
    let config = ServerConfig {
        smart: Some(smart),
        ..ServerConfig::default()
    };
    let state = AppState::open(store.clone(), config, &dir.path().join("index"))
        .expect("state")
        .with_auth(auth);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, fhir_server::app(state)).await;
    });
    AuthServer {
        url: format!("http://{addr}"),
        client: reqwest::Client::new(),
        store,
        dir,
    }
}

impl AuthServer {
    pub fn fhir(&self, tenant: &str, path: &str) -> String {
        format!("{}/fhir/{tenant}{path}", self.url)
    }

    pub async fn call(
        &self,
        method: Method,
        url: String,
        auth: Option<&str>,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let mut r = self.client.request(method, url);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        if let Some(b) = body {
            r = r
                .header("content-type", "application/fhir+json")
                .body(b.to_string());
        }
        r.send().await.expect("request")
    }

    pub async fn req(
        &self,
        method: Method,
        tenant: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> reqwest::Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        self.call(method, self.fhir(tenant, path), auth.as_deref(), body)
            .await
    }

    /// PUT with the admin token; asserts success.
    pub async fn seed(&self, tenant: &str, path: &str, body: Value) {
        let t = sign(
            &keys().rsa,
            &claims("system/*.cruds", json!({"tenant": tenant})),
        );
        let r = self
            .req(Method::PUT, tenant, path, Some(&t), Some(&body))
            .await;
        assert!(r.status().is_success(), "seed {path}: {}", r.status());
    }
}

pub async fn body(r: reqwest::Response) -> Value {
    let text = r.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts a 401 with a `WWW-Authenticate` challenge carrying `invalid_token` or no code.
pub async fn assert_401(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{what}");
    let challenge = r
        .headers()
        .get_all("www-authenticate")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join(" | ");
    assert!(challenge.contains("realm=\"test\""), "{what}: {challenge}");
    let b = body(r).await;
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}");
}

pub async fn assert_403(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "{what}");
    let b = body(r).await;
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}: {b}");
    assert_eq!(b["issue"][0]["code"], "forbidden", "{what}: {b}");
}

pub fn obs(id: &str, patient: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": id,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")},
    })
}

pub fn patient(id: &str) -> Value {
    json!({"resourceType": "Patient", "id": id, "gender": "female"})
}

pub fn ids(bundle: &Value) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap_or(""),
                        e["resource"]["id"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub async fn compartment_data(s: &AuthServer) {
    s.seed("trust-a", "/Patient/p1", patient("p1")).await;
    s.seed("trust-a", "/Patient/p2", patient("p2")).await;
    s.seed("trust-a", "/Observation/o2", obs("o2", "p2")).await;
    let mut o1 = obs("o1", "p1");
    o1["hasMember"] = json!([{"reference": "Observation/o2"}]);
    s.seed("trust-a", "/Observation/o1", o1).await;
}

pub fn patient_token(scope: &str) -> String {
    sign(&keys().rsa, &claims(scope, json!({"patient": "p1"})))
}

pub fn ath(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(token.as_bytes()))
}

pub fn ec_thumbprint(jwk: &Value) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["crv"].as_str().unwrap_or_default(),
        jwk["x"].as_str().unwrap_or_default(),
        jwk["y"].as_str().unwrap_or_default()
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

pub fn proof(client: &Signer, method: &str, url: &str, token: &str, jti: &str) -> String {
    sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk}),
        &json!({"jti": jti, "htm": method, "htu": url, "iat": now(), "ath": ath(token)}),
        &client.key,
        Algorithm::ES256,
    )
}

/// Like [`proof`], with the server nonce `nonce` (RFC 9449 §8, the `DPoP-Nonce` header's value).
pub fn proof_with_nonce(
    client: &Signer,
    method: &str,
    url: &str,
    token: &str,
    jti: &str,
    nonce: &str,
) -> String {
    sign_raw(
        &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client.jwk}),
        &json!({
            "jti": jti,
            "htm": method,
            "htu": url,
            "iat": now(),
            "ath": ath(token),
            "nonce": nonce,
        }),
        &client.key,
        Algorithm::ES256,
    )
}

/// The auditor's view of trust-a's log for `query`, polled until `want(events)` holds, since
/// reads are logged in the background.
pub async fn audit_events(
    s: &AuthServer,
    query: &str,
    want: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let auditor = token("user/AuditEvent.rs");
    let mut last = Vec::new();
    for _ in 0..100 {
        let r = s
            .req(
                Method::GET,
                "trust-a",
                &format!("/AuditEvent?{query}"),
                Some(&auditor),
                None,
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let b = body(r).await;
        last = b["entry"]
            .as_array()
            .map(|a| a.iter().map(|e| e["resource"].clone()).collect())
            .unwrap_or_default();
        if want(&last) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for ev in &last {
        fhir_core::Resource::from_json_bytes(ev.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("invalid AuditEvent {ev}: {e:?}"));
    }
    last
}

pub fn has_subtype(ev: &Value, code: &str) -> bool {
    ev["subtype"][0]["code"] == code
}
