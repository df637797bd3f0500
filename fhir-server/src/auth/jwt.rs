//! Compact JWS parsing, public JWKs, RFC 7638 thumbprints and signature checks.
//!
//! The header and claims are parsed here as plain JSON rather than through jsonwebtoken's
//! `Header`, because its `alg` enum cannot represent `none` and so would turn a forged
//! `alg=none` token into a vague JSON error instead of an explicit rejection; jsonwebtoken is
//! used for the signature arithmetic only.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Longest compact JWS we look at; real access tokens are a few KiB, and the bound keeps
/// base64 and JSON work on hostile input small.
pub(crate) const MAX_JWS_LEN: usize = 16 * 1024;

/// Smallest RSA modulus accepted, per NIST SP 800-131A and HelseID's key requirements.
const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted; the RustCrypto verifier refuses larger ones anyway, and the
/// bound stops a DPoP proof from making us work on a giant key.
const MAX_RSA_BITS: usize = 4096;

/// An asymmetric JWS algorithm this module accepts. HMAC (`HS*`) and `none` are deliberately
/// absent: trusting a shared secret would let anyone holding it mint tokens for every tenant.
///
/// In configuration it is written as its JOSE name (`"RS256"`); other names are refused with a
/// message that says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA on P-256 with SHA-256.
    ES256,
    /// ECDSA on P-384 with SHA-384.
    ES384,
}

impl SigningAlg {
    /// Every accepted algorithm.
    pub const ALL: [SigningAlg; 8] = [
        SigningAlg::RS256,
        SigningAlg::RS384,
        SigningAlg::RS512,
        SigningAlg::PS256,
        SigningAlg::PS384,
        SigningAlg::PS512,
        SigningAlg::ES256,
        SigningAlg::ES384,
    ];

    /// The JOSE name, e.g. `RS256`.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "RS256",
            SigningAlg::RS384 => "RS384",
            SigningAlg::RS512 => "RS512",
            SigningAlg::PS256 => "PS256",
            SigningAlg::PS384 => "PS384",
            SigningAlg::PS512 => "PS512",
            SigningAlg::ES256 => "ES256",
            SigningAlg::ES384 => "ES384",
        }
    }

    pub(crate) fn jsonwebtoken(self) -> Algorithm {
        match self {
            SigningAlg::RS256 => Algorithm::RS256,
            SigningAlg::RS384 => Algorithm::RS384,
            SigningAlg::RS512 => Algorithm::RS512,
            SigningAlg::PS256 => Algorithm::PS256,
            SigningAlg::PS384 => Algorithm::PS384,
            SigningAlg::PS512 => Algorithm::PS512,
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::ES384 => Algorithm::ES384,
        }
    }

    /// The key type and curve a key must have to verify this algorithm.
    fn key_kind(self) -> KeyKind {
        match self {
            SigningAlg::ES256 => KeyKind::Ec(Curve::P256),
            SigningAlg::ES384 => KeyKind::Ec(Curve::P384),
            _ => KeyKind::Rsa,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SigningAlg::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                if s.eq_ignore_ascii_case("none") || s.starts_with("HS") {
                    format!(
                        "'{s}' is not allowed: only asymmetric algorithms (RS*, PS*, ES*) are accepted"
                    )
                } else {
                    format!(
                        "unknown algorithm '{s}'; accepted: RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384"
                    )
                }
            })
    }
}

impl TryFrom<String> for SigningAlg {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SigningAlg> for String {
    fn from(a: SigningAlg) -> String {
        a.as_str().to_string()
    }
}

/// A parsed compact JWS whose signature has not been checked yet.
#[derive(Debug)]
pub(crate) struct Jws<'a> {
    /// The protected header.
    pub header: Map<String, Value>,
    /// The claims.
    pub claims: Map<String, Value>,
    /// `base64url(header) '.' base64url(claims)`: what the signature covers.
    signing_input: &'a str,
    /// The base64url signature (may be empty, as in `alg=none` tokens).
    signature: &'a str,
}

impl<'a> Jws<'a> {
    /// Splits and decodes `token`; the error says what is wrong in a few words.
    pub fn parse(token: &'a str) -> Result<Jws<'a>, String> {
        if token.len() > MAX_JWS_LEN {
            return Err(format!("longer than {MAX_JWS_LEN} bytes"));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("expected three dot-separated parts (compact JWS)".into());
        };
        let header = json_object(h).map_err(|e| format!("header: {e}"))?;
        let claims = json_object(c).map_err(|e| format!("claims: {e}"))?;
        Ok(Jws {
            header,
            claims,
            signing_input: &token[..h.len() + 1 + c.len()],
            signature: sig,
        })
    }

    /// The claims, once the token has been checked.
    pub fn into_claims(self) -> Map<String, Value> {
        self.claims
    }

    /// The header's `alg`, as written.
    pub fn alg(&self) -> Result<&str, String> {
        match self.header.get("alg") {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err("alg is not a string".into()),
            None => Err("no alg in the header".into()),
        }
    }

    /// A string header parameter; `Err` when present but not a string.
    pub fn header_str(&self, name: &str) -> Result<Option<&str>, String> {
        match self.header.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("header '{name}' is not a string")),
        }
    }

    /// Whether the signature verifies with `key` under `alg`.
    pub fn verify(&self, key: &PublicKey, alg: SigningAlg) -> bool {
        if self.signature.is_empty() || !key.fits(alg) {
            return false;
        }
        // An undecodable signature or a key the crypto backend refuses is simply "does not
        // verify": the caller cannot do better than reject.
        jsonwebtoken::crypto::verify(
            self.signature,
            self.signing_input.as_bytes(),
            &key.decoding,
            alg.jsonwebtoken(),
        )
        .unwrap_or(false)
    }
}

fn json_object(b64: &str) -> Result<Map<String, Value>, String> {
    let bytes = URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| "not base64url without padding".to_string())?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("not a JSON object".into()),
        Err(_) => Err("not JSON".into()),
    }
}

/// base64url(SHA-256(`data`)), as used by `ath` and RFC 7638 thumbprints.
pub(crate) fn sha256_b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(data))
}

/// Elliptic curves accepted for keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Rsa,
    Ec(Curve),
}

/// A public verification key taken from a JWK.
#[derive(Clone)]
pub(crate) struct PublicKey {
    /// `kid`, if the JWK has one.
    pub kid: Option<String>,
    /// The JWK's own `alg`, which then must equal the token's.
    alg: Option<SigningAlg>,
    kind: KeyKind,
    decoding: DecodingKey,
    /// RFC 7638 SHA-256 thumbprint.
    pub thumbprint: String,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .field("thumbprint", &self.thumbprint)
            .finish()
    }
}

/// JWK members that only private or symmetric keys have.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

impl PublicKey {
    /// Reads an RSA or EC (P-256, P-384) public JWK.
    ///
    /// With `public_only`, a JWK holding private members is refused (RFC 9449 §4.3 for DPoP
    /// proofs); for configured JWKS the private members are ignored instead, with a warning by
    /// the caller.
    pub fn from_jwk(jwk: &Value, public_only: bool) -> Result<PublicKey, String> {
        let Value::Object(m) = jwk else {
            return Err("not a JSON object".into());
        };
        if public_only && PRIVATE_MEMBERS.iter().any(|k| m.contains_key(*k)) {
            return Err("contains private key members".into());
        }
        let s = |name: &str| -> Result<&str, String> {
            match m.get(name) {
                Some(Value::String(v)) => Ok(v.as_str()),
                _ => Err(format!("'{name}' missing or not a string")),
            }
        };
        let opt_s = |name: &str| -> Result<Option<&str>, String> {
            match m.get(name) {
                None => Ok(None),
                Some(Value::String(v)) => Ok(Some(v.as_str())),
                Some(_) => Err(format!("'{name}' is not a string")),
            }
        };
        if let Some(u) = opt_s("use")?
            && u != "sig"
        {
            return Err(format!("use is '{}', not 'sig'", super::error::clip(u)));
        }
        if let Some(Value::Array(ops)) = m.get("key_ops")
            && !ops.iter().any(|o| o == "verify")
        {
            return Err("key_ops does not include verify".into());
        }
        let alg = match opt_s("alg")? {
            None => None,
            Some(a) => Some(a.parse::<SigningAlg>()?),
        };
        let kid = opt_s("kid")?.map(str::to_string);
        let (kind, decoding, canonical) = match s("kty")? {
            "RSA" => {
                let (n, e) = (s("n")?, s("e")?);
                let n_bytes = URL_SAFE_NO_PAD
                    .decode(n)
                    .map_err(|_| "n is not base64url".to_string())?;
                let e_bytes = URL_SAFE_NO_PAD
                    .decode(e)
                    .map_err(|_| "e is not base64url".to_string())?;
                let bits = bit_len(&n_bytes);
                if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
                    return Err(format!(
                        "RSA modulus of {bits} bits; {MIN_RSA_BITS} to {MAX_RSA_BITS} accepted"
                    ));
                }
                if e_bytes.is_empty() || e_bytes.len() > 8 {
                    return Err("bad RSA exponent".into());
                }
                (
                    KeyKind::Rsa,
                    DecodingKey::from_rsa_raw_components(&n_bytes, &e_bytes),
                    // RFC 7638 §3.2: required members only, lexicographic order, no spaces.
                    format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, json_str(e), json_str(n)),
                )
            }
            "EC" => {
                let crv = s("crv")?;
                let (curve, len) = match crv {
                    "P-256" => (Curve::P256, 32),
                    "P-384" => (Curve::P384, 48),
                    other => {
                        return Err(format!(
                            "curve '{}' is not accepted",
                            super::error::clip(other)
                        ));
                    }
                };
                let (x, y) = (s("x")?, s("y")?);
                for (name, v) in [("x", x), ("y", y)] {
                    let b = URL_SAFE_NO_PAD
                        .decode(v)
                        .map_err(|_| format!("{name} is not base64url"))?;
                    if b.len() != len {
                        return Err(format!("{name} has the wrong length for {crv}"));
                    }
                }
                let decoding = DecodingKey::from_ec_components(x, y)
                    .map_err(|_| "bad EC coordinates".to_string())?;
                (
                    KeyKind::Ec(curve),
                    decoding,
                    format!(
                        r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#,
                        json_str(crv),
                        json_str(x),
                        json_str(y)
                    ),
                )
            }
            other => {
                return Err(format!(
                    "key type '{}' is not accepted (RSA or EC only)",
                    super::error::clip(other)
                ));
            }
        };
        if let Some(a) = alg
            && a.key_kind() != kind
        {
            return Err(format!("alg {a} does not fit the key type"));
        }
        Ok(PublicKey {
            kid,
            alg,
            kind,
            decoding,
            thumbprint: sha256_b64(canonical.as_bytes()),
        })
    }

    /// Whether this key may verify a signature made with `alg`.
    pub fn fits(&self, alg: SigningAlg) -> bool {
        self.kind == alg.key_kind() && self.alg.is_none_or(|a| a == alg)
    }
}

/// A JSON string literal. Serialising a `&str` cannot fail; the fallback keeps that true
/// without a panic path.
fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

/// Number of significant bits of a big-endian unsigned integer.
fn bit_len(be: &[u8]) -> usize {
    let mut bytes = be.iter().skip_while(|b| **b == 0);
    match bytes.next() {
        None => 0,
        Some(first) => (8 - first.leading_zeros() as usize) + 8 * bytes.count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rfc7638_example_thumbprint() {
        // The RSA key of RFC 7638 §3.1 and its published thumbprint.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        let k = PublicKey::from_jwk(&jwk, true).expect("valid key");
        assert_eq!(k.thumbprint, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert!(k.fits(SigningAlg::RS256));
        assert!(!k.fits(SigningAlg::PS256), "the JWK's alg pins RS256");
        assert!(!k.fits(SigningAlg::ES256));
    }

    #[test]
    fn private_members_are_refused_for_proofs() {
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": "", "y": "", "d": "x"});
        assert!(
            PublicKey::from_jwk(&jwk, true)
                .unwrap_err()
                .contains("private")
        );
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let jwk = json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"});
        assert!(
            PublicKey::from_jwk(&jwk, true)
                .unwrap_err()
                .contains("1024")
        );
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        for t in [
            "",
            ".",
            "..",
            "a.b.c",
            "a.b.c.d",
            "eyJhbGciOiJub25lIn0.e30",
            "€€€.€.€",
            "eyJhbGciOiJub25lIn0.bnVsbA.",
        ] {
            assert!(Jws::parse(t).is_err(), "{t}");
        }
        let ok = Jws::parse("eyJhbGciOiJub25lIn0.e30.").expect("alg none parses");
        assert_eq!(ok.alg(), Ok("none"));
    }

    #[test]
    fn bit_length() {
        assert_eq!(bit_len(&[0, 0, 1]), 1);
        assert_eq!(bit_len(&[0x80, 0]), 16);
        assert_eq!(bit_len(&[]), 0);
    }

    #[test]
    fn algorithm_names() {
        assert_eq!("PS256".parse::<SigningAlg>(), Ok(SigningAlg::PS256));
        assert!(
            "HS256"
                .parse::<SigningAlg>()
                .unwrap_err()
                .contains("asymmetric")
        );
        assert!(
            "none"
                .parse::<SigningAlg>()
                .unwrap_err()
                .contains("asymmetric")
        );
        assert!("XX1".parse::<SigningAlg>().unwrap_err().contains("unknown"));
    }
}
