//! Outbound HTTP of the authenticator: JWKS documents and token introspection (RFC 7662).
//!
//! Built on `reqwest` with rustls. Server certificates are checked against the operating
//! system's CA store (`/etc/ssl/certs` and friends, through `rustls-platform-verifier`) plus the
//! issuer's optional `jwks_ca_file`. Whatever the server answers, these rules hold:
//!
//! * `https://`, or plain `http://` to a loopback host only (checked here as well as in the
//!   configuration, so an embedder's URL cannot slip past);
//! * no redirects: a 3xx is an error, so a compromised or misconfigured endpoint cannot send us
//!   to another host for keys;
//! * one time limit for connecting, sending and reading the whole answer;
//! * a size cap on the answer, enforced while reading (a missing or lying `Content-Length`
//!   does not help).
//!
//! `HTTPS_PROXY` (and `NO_PROXY`) are honoured for `https://` URLs, where TLS still runs end
//! to end through the proxy; plain loopback `http://` is never sent to a proxy, since a proxy
//! there could substitute the keys.

use std::path::Path;
use std::time::Duration;

use reqwest::Url;
use reqwest::header::{ACCEPT, CONTENT_TYPE};

use super::jwks::{FetchError, FetchFuture, JwksFetcher, MAX_JWKS_BYTES};

/// Checks that `url` is `https://` with a host, or `http://` to a loopback host, without
/// user info. Plain HTTP elsewhere would let anyone on the path substitute the issuer's keys or
/// answer introspection requests.
pub(crate) fn check_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err("the URL must not contain user info".into());
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "the URL needs a host".to_string())?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" => {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = bare.eq_ignore_ascii_case("localhost")
                || bare
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(parsed)
            } else {
                Err("plain http:// is only allowed for loopback hosts; use https://".into())
            }
        }
        _ => Err("must be an https:// URL".into()),
    }
}

/// The error and its causes, e.g. `error sending request for url (…): client error (Connect):
/// invalid peer certificate: UnknownIssuer`, since the top-level message alone rarely says
/// what an operator has to fix.
fn describe(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// Reads the PEM certificates of a CA file (`jwks_ca_file`).
fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: {}", path.display(), describe(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) found",
            path.display()
        ));
    }
    Ok(certs)
}

/// `HTTPS_PROXY` / `https_proxy`, if set.
fn https_proxy_from_env() -> Option<String> {
    ["HTTPS_PROXY", "https_proxy"]
        .into_iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
}

/// An HTTP client that follows the module's rules; cheap to clone (shares connections).
#[derive(Debug, Clone)]
pub(crate) struct HttpClient {
    client: reqwest::Client,
    timeout: Duration,
}

impl HttpClient {
    /// A client trusting the PEM certificates in `ca_file`, plus the system CA store when
    /// `system_roots` is set. Without `system_roots` the store is not even read, so that a
    /// configuration with loopback `http://` URLs only works on a machine without CA
    /// certificates.
    pub(crate) fn new(
        timeout: Duration,
        ca_file: Option<&Path>,
        system_roots: bool,
    ) -> Result<HttpClient, String> {
        let extra = match ca_file {
            Some(p) => read_ca_file(p)?,
            None => Vec::new(),
        };
        let builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("fhir-server/", env!("CARGO_PKG_VERSION")))
            .no_proxy();
        let mut builder = if system_roots {
            builder.tls_certs_merge(extra)
        } else {
            builder.tls_certs_only(extra)
        };
        if let Some(proxy) = https_proxy_from_env() {
            let p = reqwest::Proxy::https(proxy.as_str())
                .map_err(|e| format!("HTTPS_PROXY: {}", describe(&e)))?
                .no_proxy(reqwest::NoProxy::from_env());
            builder = builder.proxy(p);
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot set up the HTTPS client: {}", describe(&e)))?;
        Ok(HttpClient { client, timeout })
    }

    /// GETs `url` and returns the body of a 2xx answer of at most `limit` bytes.
    pub(crate) async fn get(
        &self,
        url: &str,
        accept: &str,
        limit: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let url = check_url(url).map_err(FetchError)?;
        self.send(self.client.get(url).header(ACCEPT, accept), limit)
            .await
    }

    /// POSTs `form` (as `application/x-www-form-urlencoded`) to `url` with HTTP Basic client
    /// authentication and returns the body of a 2xx answer of at most `limit` bytes.
    ///
    /// The client id and secret are form-encoded before they go into the Basic credentials,
    /// as RFC 6749 §2.3.1 requires (and as servers that follow it decode them).
    pub(crate) async fn post_form(
        &self,
        url: &str,
        form: &[(&str, &str)],
        client_id: &str,
        client_secret: &str,
        limit: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let url = check_url(url).map_err(FetchError)?;
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(ACCEPT, "application/json")
            .basic_auth(encode(client_id), Some(encode(client_secret)))
            .body(body);
        self.send(request, limit).await
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        limit: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let work = async {
            let mut response = request.send().await.map_err(|e| FetchError(describe(&e)))?;
            let status = response.status();
            if status.is_redirection() {
                return Err(FetchError(format!(
                    "HTTP status {status}; redirects are not followed"
                )));
            }
            if !status.is_success() {
                return Err(FetchError(format!("HTTP status {status}")));
            }
            if response.content_length().is_some_and(|n| n > limit as u64) {
                return Err(FetchError(format!("answer larger than {limit} bytes")));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| FetchError(describe(&e)))?
            {
                if body.len() + chunk.len() > limit {
                    return Err(FetchError(format!("answer larger than {limit} bytes")));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        // reqwest's own timeout should fire first; this one also bounds a slow body for sure.
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(FetchError(format!(
                "no complete answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// The built-in [`JwksFetcher`]: HTTPS with rustls (system CA store plus an optional PEM file
/// of extra CA certificates), plain HTTP to loopback hosts, no redirects, answers of at most
/// [`MAX_JWKS_BYTES`]. [`crate::auth::Authenticator::new`] builds one per issuer from its
/// `jwks_ca_file`.
#[derive(Debug, Clone)]
pub struct HttpsFetcher {
    http: HttpClient,
}

impl HttpsFetcher {
    /// A fetcher that trusts the system CA store and the PEM certificates in `ca_file`, and
    /// gives up on a fetch after `timeout`. Reads the CA file and the system store now (no
    /// network); fails when a file is unreadable or holds no certificate, or when no CA
    /// certificate at all could be loaded.
    pub fn new(timeout: Duration, ca_file: Option<&Path>) -> Result<HttpsFetcher, FetchError> {
        HttpClient::new(timeout, ca_file, true)
            .map(HttpsFetcher::from_client)
            .map_err(FetchError)
    }

    pub(crate) fn from_client(http: HttpClient) -> HttpsFetcher {
        HttpsFetcher { http }
    }
}

impl JwksFetcher for HttpsFetcher {
    fn fetch<'a>(&'a self, url: &'a str) -> FetchFuture<'a> {
        Box::pin(async move {
            self.http
                .get(
                    url,
                    "application/jwk-set+json, application/json",
                    MAX_JWKS_BYTES,
                )
                .await
        })
    }

    fn supports_https(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;

    #[test]
    fn url_rules() {
        assert!(check_url("https://helseid-sts.nhn.no/jwks").is_ok());
        assert!(check_url("http://127.0.0.1:9/jwks").is_ok());
        assert!(check_url("http://127.0.0.2/jwks").is_ok());
        assert!(check_url("http://LOCALHOST/jwks").is_ok());
        assert!(check_url("http://[::1]:8/jwks").is_ok());
        assert!(check_url("http://10.0.0.1/jwks").is_err());
        assert!(check_url("http://localhost.evil.example/jwks").is_err());
        assert!(check_url("http://127.0.0.1.evil.example/jwks").is_err());
        assert!(check_url("https://user:pw@idp.example/jwks").is_err());
        assert!(check_url("file:///etc/jwks").is_err());
        assert!(check_url("ftp://idp.example/jwks").is_err());
        assert!(check_url("https://").is_err());
        assert!(check_url("jwks.json").is_err());
    }

    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("addr: {e}"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    fn client(timeout_ms: u64) -> HttpClient {
        HttpClient::new(Duration::from_millis(timeout_ms), None, false)
            .unwrap_or_else(|e| panic!("client: {e}"))
    }

    #[tokio::test]
    async fn answers_are_checked() {
        let big = "x".repeat(2000);
        let app = axum::Router::new()
            .route("/ok", get(|| async { "{\"keys\":[]}" }))
            .route("/big", get(move || async move { big.clone() }))
            .route(
                "/redirect",
                get(|| async {
                    (
                        axum::http::StatusCode::FOUND,
                        [("location", "http://127.0.0.1:1/ok")],
                    )
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            );
        let base = serve(app).await;
        let c = client(500);
        let get = |path: &'static str| {
            let (c, url) = (c.clone(), format!("{base}{path}"));
            async move { c.get(&url, "application/json", 1000).await }
        };
        assert_eq!(get("/ok").await, Ok(b"{\"keys\":[]}".to_vec()));
        let e = get("/big").await.err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("larger than 1000"), "{e}");
        let e = get("/redirect")
            .await
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("redirects are not followed"), "{e}");
        let e = get("/missing").await.err().map(|e| e.0).unwrap_or_default();
        assert!(e.contains("404"), "{e}");
        let started = std::time::Instant::now();
        assert!(get("/slow").await.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        let e = c
            .get("http://10.0.0.1/jwks", "application/json", 10)
            .await
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        assert!(e.contains("loopback"), "{e}");
    }

    #[test]
    fn ca_files_must_hold_certificates() {
        let dir = std::env::temp_dir().join(format!("fhir-ca-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let empty = dir.join("empty.pem");
        let _ = std::fs::write(&empty, "not a certificate\n");
        let e = HttpClient::new(Duration::from_secs(1), Some(&empty), false)
            .err()
            .unwrap_or_default();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = HttpClient::new(
            Duration::from_secs(1),
            Some(&dir.join("missing.pem")),
            false,
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
