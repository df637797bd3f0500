//! Auth on for a benchmark: an in-process server that checks tokens, writes the access log and
//! enforces scopes, with a key made for the run and one `system/*.cruds` token for all
//! traffic. Comparing a run with `--auth` to one without prices what security costs per
//! request (token check, scope check, one AuditEvent per request).

use std::path::Path;

use fhir_server::auth::{AuthConfig, Authenticator};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::{EncodePrivateKey, LineEnding};

use crate::BenchError;

const ISSUER: &str = "https://fhir-bench.invalid";
const AUDIENCE: &str = "fhir-bench";
const KID: &str = "fhir-bench-1";

/// A run's authenticator and the token every benchmark request carries.
pub struct BenchAuth {
    /// Checks tokens against the run's key (a JWKS file in the data folder).
    pub authenticator: Authenticator,
    /// `system/*.cruds` for `tenant`, valid for a day.
    pub token: String,
}

impl std::fmt::Debug for BenchAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchAuth").finish_non_exhaustive()
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::new(format!("auth setup: {what}: {e}"))
}

/// Makes an ES256 key, writes its JWKS to `dir/bench-jwks.json`, and signs the run's token.
pub fn setup(dir: &Path, tenant: &str) -> Result<BenchAuth, BenchError> {
    let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = secret
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| err("PKCS#8", e))?;
    let mut jwk: serde_json::Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).map_err(|e| err("JWK", e))?;
    jwk["kid"] = serde_json::json!(KID);
    let jwks_path = dir.join("bench-jwks.json");
    std::fs::write(&jwks_path, serde_json::json!({ "keys": [jwk] }).to_string())
        .map_err(|e| err("writing the JWKS", e))?;
    // TOML literal strings take any path without escaping.
    let config = format!(
        "[auth]\nmode = \"on\"\nrealm = \"fhir-bench\"\n\n[[auth.issuer]]\nissuer = \"{ISSUER}\"\n\
         jwks_file = '{}'\naudiences = [\"{AUDIENCE}\"]\n",
        jwks_path.display()
    );
    let cfg = AuthConfig::from_toml_str(&config).map_err(|e| err("config", e))?;
    let authenticator = Authenticator::new(cfg).map_err(|e| err("authenticator", e))?;
    let now = chrono::Utc::now().timestamp();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "fhir-bench",
        "client_id": "fhir-bench",
        "jti": uuid::Uuid::new_v4().to_string(),
        "iat": now,
        "exp": now + 24 * 3600,
        "scope": "system/*.cruds",
        "tenant": tenant,
    });
    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some("at+jwt".into());
    header.kid = Some(KID.into());
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).map_err(|e| err("signing key", e))?;
    let token = jsonwebtoken::encode(&header, &claims, &key).map_err(|e| err("signing", e))?;
    Ok(BenchAuth {
        authenticator,
        token,
    })
}
