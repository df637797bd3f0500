//! JWKS over real TLS: a CA and server certificates made here, a JWKS served over HTTPS on a
//! loopback port, and the server with auth on fetching it with the built-in fetcher.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::auth::*;
use common::binary::Server;
use fhir_server::auth::{AuthConfig, Authenticator, IssuerConfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).expect("CA certificate");
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// A server certificate and its key, signed by `ca`, for the given DNS names / IP addresses.
fn server_cert(ca: &Ca, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().expect("server key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("server params");
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params
        .signed_by(&key, &ca.issuer)
        .expect("server certificate");
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// A JWKS served over HTTPS on 127.0.0.1.
struct TlsJwks {
    port: u16,
    /// TCP connections accepted (a TLS handshake was at least attempted).
    connections: Arc<AtomicUsize>,
    /// Requests answered after a completed handshake.
    requests: Arc<AtomicUsize>,
}

/// Serves `doc` at `/jwks` over TLS with `cert`; a minimal HTTP/1.1 responder is enough for a
/// client that sends one GET per connection or reuses it.
async fn tls_jwks(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    doc: String,
) -> TlsJwks {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server TLS config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let (acceptor, doc, r) = (acceptor.clone(), doc.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                loop {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.len() > 16 * 1024 {
                            return;
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let first = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let (status, body) = if first.starts_with("GET /jwks ") {
                        ("200 OK", doc.clone())
                    } else {
                        ("404 Not Found", String::new())
                    };
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tls.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    TlsJwks {
        port,
        connections,
        requests,
    }
}

/// [`config_text`] with `jwks_ca_file` (if any) added to the issuer.
fn tls_config(jwks_url: &str, ca_file: Option<&std::path::Path>) -> String {
    let text = config_text(jwks_url);
    match ca_file {
        Some(f) => text.replace(
            &format!("jwks_url = \"{jwks_url}\"\n"),
            &format!(
                "jwks_url = \"{jwks_url}\"\njwks_ca_file = \"{}\"\n",
                f.display()
            ),
        ),
        None => text,
    }
}

fn write_pem(dir: &tempfile::TempDir, name: &str, pem: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, pem).expect("write PEM");
    path
}

async fn search_patients(s: &AuthServer, token: &str) -> reqwest::Response {
    s.req(Method::GET, "trust-a", "/Patient", Some(token), None)
        .await
}

#[tokio::test]
async fn jwks_over_https_from_a_private_ca_verifies_tokens() {
    let k = keys();
    let trusted = ca("Test issuer CA");
    let (cert, key) = server_cert(&trusted, &["localhost", "127.0.0.1"]);
    let jwks_server = tls_jwks(cert, key, jwks(&[&k.rsa, &k.ec])).await;
    let pems = tempfile::tempdir().expect("tempdir");
    let ca_file = write_pem(&pems, "ca.pem", &trusted.pem);

    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{}/jwks", jwks_server.port);
        let s = start_with_config(&tls_config(&url, Some(&ca_file))).await;
        let before = jwks_server.requests.load(Ordering::SeqCst);
        let r = search_patients(&s, &token("user/Patient.rs")).await;
        assert_eq!(r.status(), StatusCode::OK, "{host}: RS256 token");
        let ec = sign(&k.ec, &claims("user/Patient.rs", serde_json::json!({})));
        let r = search_patients(&s, &ec).await;
        assert_eq!(r.status(), StatusCode::OK, "{host}: ES256 token");
        assert_eq!(
            jwks_server.requests.load(Ordering::SeqCst) - before,
            1,
            "{host}: the JWKS is fetched once over HTTPS and cached"
        );
        // A token the keys do not verify is still refused: the keys are really used.
        let forged = sign(
            &k.stranger,
            &claims("user/Patient.rs", serde_json::json!({})),
        );
        assert_401(search_patients(&s, &forged).await, "key not in the JWKS").await;
    }
}

/// The JWKS cannot be fetched, so the token cannot be checked: refused with 503 and no
/// challenge, as for an unreachable JWKS (the token may be fine; the client should retry
/// rather than get a new one), and the keys were never read.
async fn assert_untrusted(s: &AuthServer, server: &TlsJwks, what: &str) {
    let connections = server.connections.load(Ordering::SeqCst);
    let r = search_patients(s, &token("user/Patient.rs")).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
    assert!(r.headers().get("www-authenticate").is_none(), "{what}");
    let b = body(r).await;
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}");
    assert!(
        server.connections.load(Ordering::SeqCst) > connections,
        "{what}: the fetcher did connect"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        0,
        "{what}: no request got past the TLS handshake"
    );
}

#[tokio::test]
async fn untrusted_jwks_certificates_are_refused() {
    let k = keys();
    let trusted = ca("Test issuer CA");
    let rogue = ca("Rogue CA");
    let pems = tempfile::tempdir().expect("tempdir");
    let ca_file = write_pem(&pems, "ca.pem", &trusted.pem);

    // Signed by a CA that is neither in jwks_ca_file nor in the system store.
    let (cert, key) = server_cert(&rogue, &["localhost", "127.0.0.1"]);
    let rogue_server = tls_jwks(cert, key, jwks(&[&k.rsa, &k.ec])).await;
    let url = format!("https://localhost:{}/jwks", rogue_server.port);
    let s = start_with_config(&tls_config(&url, Some(&ca_file))).await;
    assert_untrusted(&s, &rogue_server, "certificate from another CA").await;
    // Without jwks_ca_file only the system's public CAs are trusted.
    let s = start_with_config(&tls_config(&url, None)).await;
    assert_untrusted(&s, &rogue_server, "no jwks_ca_file").await;

    // The trusted CA, but a certificate for another host name.
    let (cert, key) = server_cert(&trusted, &["jwks.other.example"]);
    let wrong_name = tls_jwks(cert, key, jwks(&[&k.rsa, &k.ec])).await;
    let url = format!("https://localhost:{}/jwks", wrong_name.port);
    let s = start_with_config(&tls_config(&url, Some(&ca_file))).await;
    assert_untrusted(&s, &wrong_name, "certificate for another host").await;
}

#[test]
fn plain_http_jwks_urls_must_be_loopback() {
    for url in [
        "http://10.1.2.3/jwks",
        "http://idp.example/jwks",
        "ftp://idp.example/jwks",
    ] {
        let err = AuthConfig::from_toml_str(&config_text(url))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.issuer[0].jwks_url"), "{url}: {err}");
    }
    // Built in code, past the TOML parser: the authenticator checks again.
    let mut cfg =
        AuthConfig::from_toml_str(&config_text("http://127.0.0.1:9/jwks")).expect("valid");
    let mut issuer = IssuerConfig::new("https://idp.example");
    issuer.jwks_url = Some("http://192.168.1.10/jwks".into());
    issuer.audiences = vec![AUD.into()];
    cfg.issuers.push(issuer);
    let err = Authenticator::new(cfg)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("auth.issuer[1].jwks_url"), "{err}");
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn unreadable_ca_files_fail_start_up() {
    let pems = tempfile::tempdir().expect("tempdir");
    let not_pem = write_pem(&pems, "junk.pem", "this is no certificate\n");
    for file in [not_pem, pems.path().join("missing.pem")] {
        let cfg = AuthConfig::from_toml_str(&tls_config("https://localhost:1/jwks", Some(&file)))
            .expect("parses");
        let err = Authenticator::new(cfg)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("auth.issuer[0].jwks_ca_file"), "{err}");
    }
}

/// Starts the real binary with `--auth-config config`; `Err(stderr)` when it exits instead of
/// listening.
fn start_binary(config: &std::path::Path, data: &std::path::Path) -> Result<Server, String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-server"))
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .env_remove("FHIR_AUTH_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fhir-server");
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

#[tokio::test]
async fn the_helseid_example_starts_offline_and_asks_for_a_token() {
    // https:// JWKS URLs of HelseID; this machine need not reach them: keys load on first use.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/auth/examples/helseid.toml");
    let data = tempfile::tempdir().expect("tempdir");
    let server = start_binary(&example, data.path()).expect("the binary starts");
    let r = reqwest::Client::new()
        .get(format!("{}/fhir/default/Patient", server.url))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        challenge.starts_with("DPoP realm=\"dho-fhir\""),
        "{challenge}"
    );
}

#[test]
fn the_binary_refuses_a_non_loopback_http_jwks_url() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("auth.toml");
    std::fs::write(&config, config_text("http://10.1.2.3:8080/jwks")).expect("write");
    let err = start_binary(&config, &dir.path().join("data"))
        .err()
        .unwrap_or_default();
    assert!(err.contains("auth.issuer[0].jwks_url"), "{err}");
    assert!(err.contains("loopback"), "{err}");
}
