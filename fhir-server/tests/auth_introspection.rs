//! Opaque access tokens checked by RFC 7662 token introspection against a loopback endpoint
//! that demands the server's client credentials, and the HelseID minimum security level.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::auth::*;
use common::binary::Server;
use fhir_core::TenantId;
use fhir_server::auth::{AuthConfig, Authenticator};
use fhir_server::discovery::SmartDiscovery;
use fhir_server::{AppState, ServerConfig};
use fhir_store::Store;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const CLIENT_ID: &str = "fhir-rs";
/// With characters that RFC 6749 §2.3.1 form-encoding changes.
const SECRET: &str = "s3cr:et/+ø x";
const SECRET_ENV: &str = "FHIR_TEST_INTROSPECTION_SECRET";

/// The loopback introspection endpoint: answers from `answers` by token, `active: false` for
/// unknown tokens, 401 to wrong client credentials.
struct Idp {
    url: String,
    calls: Arc<AtomicUsize>,
    answers: Arc<Mutex<HashMap<String, Value>>>,
}

impl Idp {
    fn answer(&self, token: &str, answer: Value) {
        if let Ok(mut a) = self.answers.lock() {
            a.insert(token.to_string(), answer);
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// RFC 6749 §2.3.1: `Basic base64(urlencode(id) ":" urlencode(secret))`.
fn client_of(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let decoded = STANDARD.decode(value.strip_prefix("Basic ")?).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    let unform = |s: &str| {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
    };
    Some((unform(id)?, unform(secret)?))
}

async fn idp() -> Idp {
    let calls = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let (c, a) = (calls.clone(), answers.clone());
    let app = axum::Router::new().route(
        "/introspect",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let (c, a) = (c.clone(), a.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if client_of(&headers) != Some((CLIENT_ID.into(), SECRET.into())) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(json!({"error": "invalid_client"})),
                    );
                }
                let form: HashMap<String, String> = form_urlencoded::parse(body.as_bytes())
                    .into_owned()
                    .collect();
                let answer = form
                    .get("token")
                    .and_then(|t| a.lock().ok().and_then(|a| a.get(t).cloned()))
                    .unwrap_or_else(|| json!({"active": false}));
                (StatusCode::OK, axum::Json(answer))
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
    Idp {
        url: format!("http://{addr}/introspect"),
        calls,
        answers,
    }
}

/// An active answer for trust-a with `scope`, plus `extra` (a null value removes a member).
fn active(scope: &str, extra: Value) -> Value {
    let mut a = json!({
        "active": true,
        "iss": ISS,
        "aud": AUD,
        "sub": "user-9",
        "client_id": "app-9",
        "jti": "opaque-jti",
        "scope": scope,
        "exp": now() + 300,
        "iat": now(),
        "tenant": "trust-a",
    });
    if let (Some(a), Value::Object(e)) = (a.as_object_mut(), extra) {
        for (k, v) in e {
            if v.is_null() {
                a.remove(&k);
            } else {
                a.insert(k, v);
            }
        }
    }
    a
}

/// [`config_text`] (JWKS at `jwks_url`) with introspection at `introspection_url` and
/// `extra` issuer lines.
fn introspection_config(jwks_url: &str, introspection_url: &str, extra: &str) -> String {
    config_text(jwks_url).replace(
        &format!("jwks_url = \"{jwks_url}\"\n"),
        &format!(
            "jwks_url = \"{jwks_url}\"\n\
             introspection_url = \"{introspection_url}\"\n\
             introspection_client_id = \"{CLIENT_ID}\"\n\
             introspection_client_secret_env = \"{SECRET_ENV}\"\n\
             {extra}\n"
        ),
    )
}

/// Like `start_with_config`, with `secret` as the value of [`SECRET_ENV`] (tests must not
/// change the process environment while other tests run).
async fn start_with_secret(text: &str, secret: &str) -> AuthServer {
    let cfg = AuthConfig::from_toml_str(text).expect("config");
    let smart = SmartDiscovery::from_toml_str(text)
        .expect("smart")
        .with_defaults_from(&cfg);
    let auth =
        Authenticator::with_secrets(cfg, |name| (name == SECRET_ENV).then(|| secret.to_string()))
            .expect("authenticator");
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

/// A server whose issuer has the test JWKS and introspection at `idp`.
async fn start_introspecting(idp: &Idp, extra: &str) -> AuthServer {
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa, &k.ec])).await;
    start_with_secret(&introspection_config(&jwks_url, &idp.url, extra), SECRET).await
}

fn challenge(r: &reqwest::Response) -> String {
    r.headers()
        .get_all("www-authenticate")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(" | ")
}

async fn get(s: &AuthServer, tenant: &str, token: &str) -> reqwest::Response {
    s.req(Method::GET, tenant, "/Patient", Some(token), None)
        .await
}

#[tokio::test]
async fn active_opaque_tokens_get_their_scopes() {
    let idp = idp().await;
    idp.answer("opaque-reader", active("user/Patient.rs", json!({})));
    let s = start_introspecting(&idp, "").await;

    let r = get(&s, "trust-a", "opaque-reader").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["resourceType"], "Bundle");
    assert_eq!(idp.calls(), 1);
    // The scopes are those of the answer: reading yes, writing no.
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Patient",
            Some("opaque-reader"),
            Some(&patient("new")),
        )
        .await;
    assert_403(r, "create with read scopes").await;
    assert_eq!(idp.calls(), 1, "the positive answer is cached");
    // JWTs are still checked locally, without asking the endpoint.
    let r = get(&s, "trust-a", &token("user/Patient.rs")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 1);
}

#[tokio::test]
async fn inactive_expired_and_foreign_tokens_are_refused() {
    let idp = idp().await;
    idp.answer("revoked", json!({"active": false, "scope": "user/*.cruds"}));
    idp.answer(
        "stringly-active",
        active("user/*.cruds", json!({"active": "true"})),
    );
    idp.answer(
        "expired",
        active("user/Patient.rs", json!({"exp": now() - 3600})),
    );
    idp.answer("no-exp", active("user/Patient.rs", json!({"exp": null})));
    idp.answer(
        "other-api",
        active("user/Patient.rs", json!({"aud": "another-api"})),
    );
    idp.answer("no-aud", active("user/Patient.rs", json!({"aud": null})));
    idp.answer(
        "other-issuer",
        active("user/Patient.rs", json!({"iss": "https://evil.test"})),
    );
    idp.answer(
        "trust-b-token",
        active("user/Patient.rs", json!({"tenant": "trust-b"})),
    );
    let s = start_introspecting(&idp, "").await;

    for (tok, what) in [
        ("revoked", "active: false"),
        ("stringly-active", "active is not the boolean true"),
        ("never-issued", "unknown to the issuer"),
        ("expired", "exp in the past"),
        ("no-exp", "no exp"),
        ("other-api", "audience of another API"),
        ("no-aud", "no audience"),
        ("other-issuer", "answer names another issuer"),
    ] {
        let r = get(&s, "trust-a", tok).await;
        let c = challenge(&r);
        assert!(c.contains("error=\"invalid_token\""), "{what}: {c}");
        assert_401(r, what).await;
    }
    // A token for trust-b gets the 404 of an unknown tenant on trust-a, and works on trust-b.
    let r = get(&s, "trust-a", "trust-b-token").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = get(&s, "trust-b", "trust-b-token").await;
    assert_eq!(r.status(), StatusCode::OK);
    // Refusals are not cached: asking again asks the endpoint again.
    let before = idp.calls();
    assert_401(get(&s, "trust-a", "revoked").await, "revoked again").await;
    assert_eq!(idp.calls(), before + 1);
}

#[tokio::test]
async fn answers_are_cached_until_exp_or_the_configured_time() {
    let idp = idp().await;
    let s = start_introspecting(&idp, "").await;
    // Made after the (slow) start, so that exp is still ahead.
    idp.answer(
        "short",
        active("user/Patient.rs", json!({"exp": now() + 2})),
    );
    idp.answer("long", active("user/Patient.rs", json!({})));
    assert_eq!(get(&s, "trust-a", "short").await.status(), StatusCode::OK);
    assert_eq!(get(&s, "trust-a", "short").await.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    // Past its exp the answer is not reused (the token passes again only by the clock skew).
    assert_eq!(get(&s, "trust-a", "short").await.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 2);

    let uncached = start_introspecting(&idp, "introspection_cache_secs = 0").await;
    let before = idp.calls();
    for _ in 0..2 {
        assert_eq!(
            get(&uncached, "trust-a", "long").await.status(),
            StatusCode::OK
        );
    }
    assert_eq!(idp.calls(), before + 2);
}

#[tokio::test]
async fn dpop_bound_opaque_tokens_need_a_proof() {
    let idp = idp().await;
    let k = keys();
    idp.answer(
        "bound",
        active(
            "user/Patient.rs",
            json!({"cnf": {"jkt": ec_thumbprint(&k.client.jwk)}}),
        ),
    );
    let s = start_introspecting(&idp, "").await;
    assert_401(get(&s, "trust-a", "bound").await, "bound token as Bearer").await;
    let url = s.fhir("trust-a", "/Patient");
    let send = |key: &Signer, jti: &str| {
        s.client
            .get(url.clone())
            .header("authorization", "DPoP bound")
            .header("dpop", proof(key, "GET", &url, "bound", jti))
            .send()
    };
    let r = send(&k.client, "p-1").await.expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&k.other_client, "p-2").await.expect("request");
    assert_401(r, "proof by another key").await;
}

#[tokio::test]
async fn wrong_credentials_or_a_down_endpoint_are_not_server_errors() {
    let idp = idp().await;
    idp.answer("fine", active("user/Patient.rs", json!({})));
    let k = keys();
    let jwks_url = jwks_server(jwks(&[&k.rsa])).await;

    // The endpoint refuses our credentials: the token cannot be checked.
    let s = start_with_secret(&introspection_config(&jwks_url, &idp.url, ""), "wrong").await;
    let r = get(&s, "trust-a", "fine").await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body(r).await["resourceType"], "OperationOutcome");
    assert_eq!(idp.calls(), 1, "the endpoint was asked");

    // Nothing listens.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let down = format!("http://127.0.0.1:{closed}/introspect");
    let s = start_with_secret(&introspection_config(&jwks_url, &down, ""), SECRET).await;
    for _ in 0..2 {
        let r = get(&s, "trust-a", "fine").await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(r).await["resourceType"], "OperationOutcome");
    }
    // JWTs do not depend on the endpoint.
    let r = get(&s, "trust-a", &token("user/Patient.rs")).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn introspection_config_is_checked() {
    let base = introspection_config("http://127.0.0.1:1/jwks", "http://127.0.0.1:2/i", "");
    assert!(AuthConfig::from_toml_str(&base).is_ok());
    let err = |text: &str| {
        AuthConfig::from_toml_str(text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(&base.replace(
        &format!("introspection_client_secret_env = \"{SECRET_ENV}\""),
        "introspection_client_secret_env = \"s3cr:et\"",
    ));
    assert!(
        e.contains("introspection_client_secret_env"),
        "a secret in the file: {e}"
    );
    let e = err(&base.replace(&format!("introspection_client_id = \"{CLIENT_ID}\""), ""));
    assert!(e.contains("introspection_client_id"), "{e}");
    let e = err(&base.replace("http://127.0.0.1:2/i", "http://10.0.0.2/i"));
    assert!(
        e.contains("introspection_url") && e.contains("loopback"),
        "{e}"
    );
    let e = err(&introspection_config(
        "http://127.0.0.1:1/jwks",
        "http://127.0.0.1:2/i",
        "introspection_cache_secs = 86400",
    ));
    assert!(e.contains("introspection_cache_secs"), "{e}");
    // A second issuer with introspection.
    let second = format!(
        "{base}\n[[auth.issuer]]\nissuer = \"https://other.test\"\naudiences = [\"{AUD}\"]\n\
         introspection_url = \"http://127.0.0.1:3/i\"\nintrospection_client_id = \"x\"\n\
         introspection_client_secret_env = \"OTHER_SECRET\"\n"
    );
    let e = err(&second);
    assert!(e.contains("auth.issuer[1].introspection_url"), "{e}");

    // The secret must be there at start-up.
    let cfg = AuthConfig::from_toml_str(&base).expect("valid");
    let e = Authenticator::with_secrets(cfg, |_| None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains(SECRET_ENV), "{e}");
}

// ---------------------------------------------------------------------------------------------
// HelseID security level

const LEVEL: &str = "helseid://claims/identity/security_level";
const PID: &str = "helseid://claims/identity/pid";

#[tokio::test]
async fn min_security_level_applies_to_user_tokens_only() {
    let idp = idp().await;
    idp.answer(
        "opaque-level-3",
        active("user/Patient.rs", json!({LEVEL: "3"})),
    );
    idp.answer(
        "opaque-level-4",
        active("user/Patient.rs", json!({LEVEL: "4"})),
    );
    let s = start_introspecting(&idp, "min_security_level = 4").await;
    let k = keys();
    let jwt = |extra: Value| sign(&k.rsa, &claims("user/Patient.rs", extra));

    for (tok, what) in [
        (jwt(json!({LEVEL: "3"})), "user at level 3"),
        (jwt(json!({})), "user without a level"),
        (jwt(json!({LEVEL: "high"})), "user with a non-numeric level"),
        (
            jwt(json!({"sub": null, PID: "01017012345", LEVEL: 3})),
            "HelseID user (pid) at level 3",
        ),
        ("opaque-level-3".to_string(), "introspected user at level 3"),
    ] {
        let r = get(&s, "trust-a", &tok).await;
        let c = challenge(&r);
        assert!(
            c.contains("error=\"insufficient_user_authentication\""),
            "{what}: {c}"
        );
        assert_401(r, what).await;
    }
    for (tok, what) in [
        (jwt(json!({LEVEL: "4"})), "user at level 4"),
        (jwt(json!({LEVEL: 4})), "level as a number"),
        (jwt(json!({"sub": null})), "client credentials (no sub)"),
        (
            jwt(json!({"sub": "app-1"})),
            "client credentials (sub = client_id)",
        ),
        ("opaque-level-4".to_string(), "introspected user at level 4"),
    ] {
        assert_eq!(
            get(&s, "trust-a", &tok).await.status(),
            StatusCode::OK,
            "{what}"
        );
    }
}

#[test]
fn min_security_level_is_checked() {
    let base = config_text("http://127.0.0.1:1/jwks");
    for bad in ["0", "5"] {
        let text = base.replace(
            "jwks_min_refresh_secs = 0",
            &format!("jwks_min_refresh_secs = 0\nmin_security_level = {bad}"),
        );
        let e = AuthConfig::from_toml_str(&text)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("auth.issuer[0].min_security_level"),
            "{bad}: {e}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The binary

/// Starts `fhir-server serve` with `config`; `Err(stderr)` when it exits instead.
fn start_binary(
    config: &std::path::Path,
    data: &std::path::Path,
    secret: Option<&str>,
) -> Result<Server, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhir-server"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--auth-config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .env_remove("FHIR_AUTH_CONFIG")
        .env_remove(SECRET_ENV)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(s) = secret {
        cmd.env(SECRET_ENV, s);
    }
    let mut child = cmd.spawn().expect("start fhir-server");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    match line.trim().strip_prefix("listening on ") {
        Some(url) => Ok(Server {
            url: url.to_string(),
            child,
        }),
        None => {
            let out = child.wait_with_output().expect("wait");
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_takes_the_secret_from_the_environment() {
    let idp = idp().await;
    idp.answer(
        "opaque-default",
        active("user/Patient.rs", json!({"tenant": "default"})),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("auth.toml");
    // An introspection-only issuer: no JWKS at all.
    let text = format!(
        "[auth]\nmode = \"on\"\n\n[[auth.issuer]]\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\n\
         introspection_url = \"{}\"\nintrospection_client_id = \"{CLIENT_ID}\"\n\
         introspection_client_secret_env = \"{SECRET_ENV}\"\n",
        idp.url
    );
    std::fs::write(&config, text).expect("write config");

    let err = start_binary(&config, &dir.path().join("data"), None)
        .err()
        .unwrap_or_default();
    assert!(err.contains(SECRET_ENV), "{err}");

    let server = start_binary(&config, &dir.path().join("data"), Some(SECRET)).expect("starts");
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/fhir/default/Patient", server.url))
        .header("authorization", "Bearer opaque-default")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(idp.calls(), 1);
    // A JWT names this issuer, which has no keys: refused.
    let r = client
        .get(format!("{}/fhir/default/Patient", server.url))
        .header(
            "authorization",
            format!("Bearer {}", token("user/Patient.rs")),
        )
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
