//! Why a request was not let in, and how to tell the client.
//!
//! Every failure is an [`AuthError`]. [`AuthError::status`] gives the HTTP status (401 when the
//! credentials are missing or invalid, 403 when they are valid but do not reach what was asked,
//! 503 when we could not check them) and [`AuthError::www_authenticate`] the `WWW-Authenticate`
//! challenge (RFC 6750 §3, RFC 9449 §7.1). [`crate::auth::Authenticator::www_authenticate`] gives
//! the challenges that fit the configured issuers (Bearer, DPoP or both) and should be preferred
//! by the server.
//!
//! With server nonces on (`dpop_nonce = true`, RFC 9449 §8–9), a DPoP proof without a valid
//! `nonce` gets 401 with `DPoP …, error="use_dpop_nonce"`; the nonce to use comes in the
//! `DPoP-Nonce` header, which the server sends with every response to a DPoP request
//! ([`crate::auth::Authenticator::dpop_nonce_for`]), not in the challenge.

use axum::http::StatusCode;

/// The default `realm` of challenges built without configuration.
pub const DEFAULT_REALM: &str = "fhir";

/// Longest piece of client-supplied text that is echoed in an error.
const MAX_ECHO: usize = 80;

/// Why a request could not be authenticated or authorised.
///
/// Each variant names one check, so callers (and tests) can tell them apart; the text is safe to
/// show to the client (it never contains the token or key material, and client-supplied parts
/// are clipped and stripped of control characters).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error(
        "no access token: send 'Authorization: Bearer <token>' or 'Authorization: DPoP <token>'"
    )]
    MissingCredentials,
    /// An `Authorization` header with a scheme other than `Bearer` or `DPoP`.
    #[error("authorization scheme '{0}' is not supported")]
    UnsupportedScheme(String),
    /// The `Authorization` header is not `<scheme> <token68>` (or appears more than once).
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(String),
    /// The access token is not a compact JWS with a JSON header and claims.
    #[error("malformed access token: {0}")]
    MalformedToken(String),
    /// The token's `alg` is `none`, a shared-secret (HS*) algorithm, or not accepted for its
    /// issuer.
    #[error("signing algorithm '{0}' is not accepted")]
    UnsupportedAlgorithm(String),
    /// The token's `typ` header is missing or not an accepted access-token type.
    #[error("token type '{0}' is not accepted; expected an access token (at+jwt or JWT)")]
    InvalidType(String),
    /// The `iss` claim is missing or not a configured issuer.
    #[error("issuer '{0}' is not trusted")]
    UnknownIssuer(String),
    /// No key of the issuer's JWKS matches the token's `kid` and `alg`, even after a refresh.
    #[error("no signing key '{0}' is known for this issuer")]
    UnknownKey(String),
    /// The signature does not verify with the issuer's key.
    #[error("the token signature is invalid")]
    InvalidSignature,
    /// `exp` lies in the past (beyond the allowed clock skew).
    #[error("the access token has expired")]
    Expired,
    /// `nbf` or `iat` lies in the future (beyond the allowed clock skew).
    #[error("the access token is not yet valid")]
    NotYetValid,
    /// `aud` is missing or names none of the configured audiences.
    #[error("the access token is not meant for this server (audience mismatch)")]
    InvalidAudience,
    /// A claim has the wrong JSON type or an invalid value.
    #[error("claim '{claim}' is invalid: {reason}")]
    InvalidClaim {
        /// The claim's name.
        claim: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `Bearer` token was sent to an issuer configured with `dpop = "required"`.
    #[error("this server requires DPoP-bound access tokens (Authorization: DPoP)")]
    DpopRequired,
    /// The `DPoP` scheme was used for an issuer configured with `dpop = "off"`.
    #[error("DPoP is not enabled for this issuer; use Authorization: Bearer")]
    DpopNotAccepted,
    /// A DPoP-bound token (with `cnf.jkt`) was presented as a `Bearer` token (RFC 9449 §7.2).
    #[error("a DPoP-bound access token must be sent with Authorization: DPoP and a DPoP proof")]
    BoundTokenAsBearer,
    /// The DPoP proof failed a check.
    #[error("invalid DPoP proof: {0}")]
    InvalidDpopProof(DpopError),
    /// The issuer's introspection endpoint says the (opaque) token is not active: revoked,
    /// expired, or never issued by it (RFC 7662 §2.2).
    #[error("the access token is not active")]
    InactiveToken,
    /// A user's token whose authentication is weaker than the issuer's
    /// `min_security_level` (HelseID `security_level`). RFC 9470 §3: 401 with
    /// `insufficient_user_authentication`, so the client can have the user log in again with a
    /// stronger method.
    #[error("insufficient user authentication: {0}")]
    InsufficientUserAuthentication(String),
    /// Valid token, but the granted scopes do not allow the interaction.
    #[error("insufficient scope: {0}")]
    InsufficientScope(String),
    /// Valid token, but it is not issued for the tenant in the URL.
    #[error("the access token does not give access to tenant '{0}'")]
    TenantNotAllowed(String),
    /// The credentials could not be checked right now (JWKS or introspection endpoint
    /// unreachable or not trusted, replay cache full).
    #[error("authentication is temporarily unavailable: {0}")]
    Unavailable(String),
}

/// Which check of a DPoP proof (RFC 9449 §4.3) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    /// No `DPoP` header came with `Authorization: DPoP`.
    #[error("the DPoP header is missing")]
    Missing,
    /// More than one `DPoP` header.
    #[error("more than one DPoP header")]
    Multiple,
    /// Not a compact JWS with JSON header and claims, or a required claim is absent or mistyped.
    #[error("{0}")]
    Malformed(String),
    /// `typ` is not `dpop+jwt`.
    #[error("typ must be dpop+jwt")]
    Type,
    /// `alg` is not an accepted asymmetric algorithm.
    #[error("algorithm '{0}' is not accepted")]
    Algorithm(String),
    /// The `jwk` header is missing, holds private key parts, or is not a usable public key.
    #[error("bad jwk header: {0}")]
    Key(String),
    /// The proof's signature does not verify with its own `jwk`.
    #[error("signature does not verify with the jwk header")]
    Signature,
    /// `htm` differs from the request method.
    #[error("htm does not match the request method")]
    Method,
    /// `htu` differs from the request URL (without query and fragment).
    #[error("htu does not match the request URL")]
    Url,
    /// `iat` is outside the accepted window.
    #[error("iat is too old or in the future")]
    IssuedAt,
    /// The proof's `jti` was seen before (replay).
    #[error("the proof was already used (jti replay)")]
    Replay,
    /// `ath` is missing or is not the hash of the access token.
    #[error("ath does not match the access token")]
    AccessTokenHash,
    /// The access token's `cnf.jkt` is not the thumbprint of the proof's key.
    #[error("the proof key does not match the key the access token is bound to (cnf.jkt)")]
    KeyMismatch,
    /// `Authorization: DPoP` with an access token that has no `cnf.jkt`.
    #[error("the access token is not DPoP-bound (no cnf.jkt)")]
    UnboundToken,
    /// Server nonces are on (`dpop_nonce = true`) and the proof has no `nonce` claim (or it is
    /// not a string). Challenge `use_dpop_nonce` (RFC 9449 §9); the response's `DPoP-Nonce`
    /// header holds the nonce to put in a new proof.
    #[error(
        "a server nonce is required: sign a new proof with the DPoP-Nonce header's value as nonce"
    )]
    NonceMissing,
    /// The proof's `nonce` was not issued by this server (forged, garbled, or from a server
    /// with another nonce key). Challenge `use_dpop_nonce`.
    #[error("the nonce was not issued by this server: use the DPoP-Nonce header's value")]
    NonceInvalid,
    /// The proof's `nonce` was issued by this server, but too long ago. Challenge
    /// `use_dpop_nonce`.
    #[error("the nonce has expired: use the DPoP-Nonce header's value")]
    NonceStale,
}

impl DpopError {
    /// Whether the fix is a fresh server nonce (`use_dpop_nonce`) rather than a better proof.
    pub fn is_nonce(&self) -> bool {
        matches!(
            self,
            DpopError::NonceMissing | DpopError::NonceInvalid | DpopError::NonceStale
        )
    }
}

/// The authentication scheme a challenge is issued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// RFC 6750 bearer tokens.
    Bearer,
    /// RFC 9449 DPoP-bound tokens.
    Dpop,
}

impl Scheme {
    /// The scheme's name as written in headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Bearer => "Bearer",
            Scheme::Dpop => "DPoP",
        }
    }
}

impl AuthError {
    /// The HTTP status the server should answer with: 401 for missing or invalid credentials,
    /// 403 when valid credentials do not reach the resource or tenant, 503 when credentials
    /// could not be checked.
    ///
    /// A malformed `Authorization` header also gives 401 (RFC 6750 suggests 400 for
    /// `invalid_request`), so that every credential problem sends the client to the same
    /// re-authentication path.
    pub fn status(&self) -> StatusCode {
        match self {
            AuthError::InsufficientScope(_) | AuthError::TenantNotAllowed(_) => {
                StatusCode::FORBIDDEN
            }
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The OAuth error code of the challenge (`invalid_request`, `invalid_token`,
    /// `invalid_dpop_proof`, `use_dpop_nonce`, `insufficient_scope`,
    /// `insufficient_user_authentication`), or `None` when RFC 6750 §3.1 says to send none (no
    /// or unsupported credentials) or no challenge applies.
    pub fn error_code(&self) -> Option<&'static str> {
        match self {
            AuthError::MissingCredentials | AuthError::UnsupportedScheme(_) => None,
            AuthError::MalformedAuthorization(_) | AuthError::DpopNotAccepted => {
                Some("invalid_request")
            }
            AuthError::InvalidDpopProof(DpopError::UnboundToken) => Some("invalid_token"),
            AuthError::InvalidDpopProof(e) if e.is_nonce() => Some("use_dpop_nonce"),
            AuthError::InvalidDpopProof(_) => Some("invalid_dpop_proof"),
            AuthError::InsufficientScope(_) => Some("insufficient_scope"),
            AuthError::InsufficientUserAuthentication(_) => {
                Some("insufficient_user_authentication")
            }
            AuthError::TenantNotAllowed(_) | AuthError::Unavailable(_) => None,
            _ => Some("invalid_token"),
        }
    }

    /// The scheme whose challenge should carry this error: DPoP for DPoP-specific failures,
    /// otherwise Bearer.
    pub fn scheme(&self) -> Scheme {
        match self {
            AuthError::InvalidDpopProof(_) | AuthError::DpopRequired => Scheme::Dpop,
            _ => Scheme::Bearer,
        }
    }

    /// Whether the response should carry a `WWW-Authenticate` header at all: every 401, and a
    /// 403 for insufficient scope (RFC 6750 §3.1). A tenant mismatch and a 503 get none.
    pub fn has_challenge(&self) -> bool {
        self.status() == StatusCode::UNAUTHORIZED || matches!(self, AuthError::InsufficientScope(_))
    }

    /// A single `WWW-Authenticate` value for this error, in [`AuthError::scheme`], with realm
    /// `"fhir"` and no `algs`; `None` when no challenge applies.
    ///
    /// Examples:
    /// - `Bearer realm="fhir", error="invalid_token", error_description="the access token has expired"`
    /// - `DPoP realm="fhir", error="invalid_dpop_proof", error_description="invalid DPoP proof: the proof was already used (jti replay)"`
    /// - `DPoP realm="fhir", error="use_dpop_nonce", error_description="invalid DPoP proof: a server nonce is required: …"`
    ///   (RFC 9449 §9; the server sends the nonce in a `DPoP-Nonce` header next to it)
    /// - `Bearer realm="fhir"` (no credentials)
    ///
    /// The server should prefer [`crate::auth::Authenticator::www_authenticate`], which knows
    /// the configured realm, DPoP algorithms and which schemes are accepted.
    pub fn www_authenticate(&self) -> Option<String> {
        if !self.has_challenge() {
            return None;
        }
        Some(challenge(self.scheme(), DEFAULT_REALM, None, Some(self)))
    }
}

/// Builds one challenge: `<scheme> realm="…"[, algs="…"][, error="…", error_description="…"]`.
///
/// The description is restricted to the characters RFC 6750 §3 allows in quoted values
/// (`%x20-21 / %x23-5B / %x5D-7E`), so the result is always a valid header value.
pub(crate) fn challenge(
    scheme: Scheme,
    realm: &str,
    algs: Option<&str>,
    error: Option<&AuthError>,
) -> String {
    let mut out = format!("{} realm=\"{}\"", scheme.as_str(), quoted_safe(realm));
    if let Some(algs) = algs {
        out.push_str(&format!(", algs=\"{}\"", quoted_safe(algs)));
    }
    if let Some(err) = error
        && let Some(code) = err.error_code()
    {
        out.push_str(&format!(
            ", error=\"{code}\", error_description=\"{}\"",
            quoted_safe(&err.to_string())
        ));
    }
    out
}

/// Replaces every character outside `%x20-21 / %x23-5B / %x5D-7E` by `'`.
fn quoted_safe(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

/// Client-supplied text, cut to a readable length and stripped of control characters, for use
/// in error messages.
pub(crate) fn clip(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(MAX_ECHO)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > MAX_ECHO {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_challenge_is_exact() {
        assert_eq!(
            AuthError::Expired.www_authenticate().as_deref(),
            Some(
                "Bearer realm=\"fhir\", error=\"invalid_token\", error_description=\"the access token has expired\""
            )
        );
        assert_eq!(AuthError::Expired.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn missing_credentials_has_no_error_code() {
        assert_eq!(
            AuthError::MissingCredentials.www_authenticate().as_deref(),
            Some("Bearer realm=\"fhir\"")
        );
    }

    #[test]
    fn dpop_errors_use_dpop_scheme() {
        let e = AuthError::InvalidDpopProof(DpopError::Replay);
        let v = e.www_authenticate().unwrap_or_default();
        assert!(
            v.starts_with("DPoP realm=\"fhir\", error=\"invalid_dpop_proof\""),
            "{v}"
        );
    }

    #[test]
    fn nonce_errors_ask_for_a_nonce() {
        for e in [
            DpopError::NonceMissing,
            DpopError::NonceInvalid,
            DpopError::NonceStale,
        ] {
            let e = AuthError::InvalidDpopProof(e);
            assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(e.error_code(), Some("use_dpop_nonce"));
            let v = e.www_authenticate().unwrap_or_default();
            assert!(
                v.starts_with("DPoP realm=\"fhir\", error=\"use_dpop_nonce\""),
                "{v}"
            );
        }
        assert!(!DpopError::Replay.is_nonce());
    }

    #[test]
    fn step_up_challenge() {
        let e = AuthError::InsufficientUserAuthentication("security level 3 < 4".into());
        assert_eq!(e.status(), StatusCode::UNAUTHORIZED);
        let v = e.www_authenticate().unwrap_or_default();
        assert!(
            v.starts_with("Bearer realm=\"fhir\", error=\"insufficient_user_authentication\""),
            "{v}"
        );
        assert_eq!(AuthError::InactiveToken.error_code(), Some("invalid_token"));
    }

    #[test]
    fn forbidden_errors() {
        let e = AuthError::TenantNotAllowed("b".into());
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(e.www_authenticate(), None);
        let e = AuthError::InsufficientScope("needs r on Observation".into());
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert!(
            e.www_authenticate()
                .unwrap_or_default()
                .contains("error=\"insufficient_scope\"")
        );
    }

    #[test]
    fn hostile_text_cannot_break_the_header() {
        let e = AuthError::UnknownIssuer(clip("evil\"\r\nSet-Cookie: x=1\\é"));
        let v = e.www_authenticate().unwrap_or_default();
        assert!(axum::http::HeaderValue::from_str(&v).is_ok(), "{v}");
        assert!(!v.contains('\\'));
        assert_eq!(v.matches('"').count(), 6, "{v}");
    }

    #[test]
    fn clip_cuts_long_text() {
        let long = "x".repeat(500);
        assert!(clip(&long).chars().count() <= MAX_ECHO + 1);
    }
}
