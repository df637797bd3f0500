//! The authenticated caller: who, for which client and tenants, with which scopes, and the
//! facts the access log (IHE BALP / Norwegian AuditEvent) needs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use fhir_core::TenantId;
use serde_json::{Map, Value};

use super::config::{TenantClaim, TenantClaimKind};
use super::error::{AuthError, clip};
use super::scopes::{Access, Interaction, SmartScope, decide};

/// HelseID: the person's national identity number (fødselsnummer / d-nummer).
pub const CLAIM_PID: &str = "helseid://claims/identity/pid";
/// HelseID: the health personnel number (HPR).
pub const CLAIM_HPR_NUMBER: &str = "helseid://claims/hpr/hpr_number";
/// HelseID: the client's organisation number (parent, e.g. the health trust).
pub const CLAIM_ORGNR_PARENT: &str = super::config::HELSEID_ORGNR_PARENT;
/// HelseID: the client's sub-unit organisation number ("underenhet/behandlingssted").
pub const CLAIM_ORGNR_CHILD: &str = super::config::HELSEID_ORGNR_CHILD;
/// HelseID: the organisation number of the client's software supplier.
pub const CLAIM_ORGNR_SUPPLIER: &str = "helseid://claims/client/claims/orgnr_supplier";
/// HelseID: authentication security level (`2`, `3`, `4`).
pub const CLAIM_SECURITY_LEVEL: &str = "helseid://claims/identity/security_level";
/// HelseID: authentication assurance level (`low`, `substantial`, `high`).
pub const CLAIM_ASSURANCE_LEVEL: &str = "helseid://claims/identity/assurance_level";

/// The tenants a principal may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantAccess {
    /// Every tenant (auth off).
    Any,
    /// Only these (possibly none).
    Only(Vec<TenantId>),
}

/// A purpose of use (why data is accessed), e.g. `TREAT` from
/// `urn:oid:2.16.840.1.113883.1.11.20448` (v3 PurposeOfUse).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PurposeOfUse {
    /// The code system, when the token gives one.
    pub system: Option<String>,
    /// The code.
    pub code: String,
}

/// The organisation numbers HelseID puts in client tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrgNumbers {
    /// `orgnr_parent`: the legal entity (for DHO, the health trust).
    pub parent: Option<String>,
    /// `orgnr_child`: the sub-unit.
    pub child: Option<String>,
    /// `orgnr_supplier`: the software vendor.
    pub supplier: Option<String>,
}

/// What an issuer's configuration says about reading its tokens, resolved at start-up.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules {
    pub issuer: String,
    pub smart_scopes: bool,
    pub scope_map: HashMap<String, Vec<SmartScope>>,
    pub tenant_claims: Vec<TenantClaim>,
    pub org_tenants: HashMap<String, TenantId>,
}

/// An authenticated caller. Built by [`crate::auth::Authenticator::authenticate`] from a
/// validated token, or [`Principal::unrestricted`] when auth is off.
///
/// `Debug` leaves out the national identity number and the raw claims, so a principal can be
/// logged.
#[derive(Clone)]
pub struct Principal {
    unrestricted: bool,
    issuer: String,
    subject: Option<String>,
    client_id: Option<String>,
    jti: Option<String>,
    scopes: Vec<SmartScope>,
    raw_scopes: Vec<String>,
    patient: Option<String>,
    fhir_user: Option<String>,
    pid: Option<String>,
    hpr_number: Option<String>,
    name: Option<String>,
    org_numbers: OrgNumbers,
    purpose_of_use: Vec<PurposeOfUse>,
    security_level: Option<String>,
    assurance_level: Option<String>,
    tenants: TenantAccess,
    expires_at: Option<i64>,
    dpop_jkt: Option<String>,
    claims: Arc<Map<String, Value>>,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("unrestricted", &self.unrestricted)
            .field("issuer", &self.issuer)
            .field("subject", &self.subject)
            .field("client_id", &self.client_id)
            .field("jti", &self.jti)
            .field("scopes", &self.raw_scopes)
            .field("patient", &self.patient)
            .field("pid", &self.pid.as_ref().map(|_| "<redacted>"))
            .field("hpr_number", &self.hpr_number)
            .field("org_numbers", &self.org_numbers)
            .field("tenants", &self.tenants)
            .field("dpop_jkt", &self.dpop_jkt)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// The principal of every request when auth is off: all tenants, all interactions.
    pub fn unrestricted() -> Principal {
        Principal {
            unrestricted: true,
            issuer: String::new(),
            subject: None,
            client_id: None,
            jti: None,
            scopes: Vec::new(),
            raw_scopes: Vec::new(),
            patient: None,
            fhir_user: None,
            pid: None,
            hpr_number: None,
            name: None,
            org_numbers: OrgNumbers::default(),
            purpose_of_use: Vec::new(),
            security_level: None,
            assurance_level: None,
            tenants: TenantAccess::Any,
            expires_at: None,
            dpop_jkt: None,
            claims: Arc::new(Map::new()),
        }
    }

    /// Reads a validated token's claims.
    pub(crate) fn from_claims(
        claims: Map<String, Value>,
        rules: &ClaimRules,
        dpop_jkt: Option<String>,
    ) -> Result<Principal, AuthError> {
        let raw_scopes = scope_list(&claims)?;
        let mut scopes: Vec<SmartScope> = Vec::new();
        for raw in &raw_scopes {
            let mapped: Vec<SmartScope> = match rules.scope_map.get(raw) {
                Some(m) => m.clone(),
                None if rules.smart_scopes => match SmartScope::parse(raw) {
                    Ok(Some(s)) => vec![s],
                    Ok(None) => Vec::new(),
                    Err(e) => {
                        // SMART lets servers ignore scopes they do not understand; one odd
                        // scope should not cost the client the rest.
                        tracing::debug!(issuer = %rules.issuer, error = %e, "ignoring scope");
                        Vec::new()
                    }
                },
                None => Vec::new(),
            };
            for s in mapped {
                if !scopes.contains(&s) {
                    scopes.push(s);
                }
            }
        }

        let fhir_user = opt_string(&claims, "fhirUser")?;
        let patient = match opt_string(&claims, "patient")? {
            Some(p) => {
                let id = p.strip_prefix("Patient/").unwrap_or(&p);
                if !is_fhir_id(id) {
                    return Err(AuthError::InvalidClaim {
                        claim: "patient".into(),
                        reason: "not a Patient id".into(),
                    });
                }
                Some(id.to_string())
            }
            None => fhir_user.as_deref().and_then(patient_of_fhir_user),
        };

        let name = match opt_string(&claims, "name")? {
            Some(n) => Some(n),
            None => {
                let given = opt_string(&claims, "given_name")?;
                let family = opt_string(&claims, "family_name")?;
                match (given, family) {
                    (None, None) => None,
                    (g, f) => Some([g, f].into_iter().flatten().collect::<Vec<_>>().join(" ")),
                }
            }
        };

        let tenants = tenants_of(&claims, rules);
        let purpose_of_use = purposes_of(&claims);

        Ok(Principal {
            unrestricted: false,
            issuer: rules.issuer.clone(),
            subject: opt_string(&claims, "sub")?,
            client_id: opt_string(&claims, "client_id")?,
            jti: opt_string(&claims, "jti")?,
            scopes,
            raw_scopes,
            patient,
            fhir_user,
            pid: opt_string(&claims, CLAIM_PID)?,
            hpr_number: opt_string(&claims, CLAIM_HPR_NUMBER)?,
            name,
            org_numbers: OrgNumbers {
                parent: opt_string(&claims, CLAIM_ORGNR_PARENT)?,
                child: opt_string(&claims, CLAIM_ORGNR_CHILD)?,
                supplier: opt_string(&claims, CLAIM_ORGNR_SUPPLIER)?,
            },
            purpose_of_use,
            security_level: opt_string(&claims, CLAIM_SECURITY_LEVEL)?,
            assurance_level: opt_string(&claims, CLAIM_ASSURANCE_LEVEL)?,
            tenants: TenantAccess::Only(tenants),
            expires_at: claims.get("exp").and_then(super::dpop::numeric_date),
            dpop_jkt,
            claims: Arc::new(claims),
        })
    }

    /// Whether this is the auth-off principal.
    pub fn is_unrestricted(&self) -> bool {
        self.unrestricted
    }

    /// What the granted scopes allow for `interaction` on `resource_type` (ignored for
    /// system-level interactions; pass `""` or `"*"` for a system-level operation).
    pub fn access(&self, interaction: Interaction, resource_type: &str) -> Access {
        if self.unrestricted {
            return Access::Unrestricted;
        }
        decide(
            &self.scopes,
            self.patient.as_deref(),
            interaction,
            resource_type,
        )
    }

    /// Whether any granted scope allows the interaction. When the answer is `true` the
    /// server must still apply the restrictions of [`Principal::access`] (patient compartment,
    /// scope filters).
    pub fn allows(&self, interaction: Interaction, resource_type: &str) -> bool {
        self.access(interaction, resource_type).is_allowed()
    }

    /// [`Principal::access`] as a `Result`: `Err(InsufficientScope)` (403) when denied.
    pub fn check(
        &self,
        interaction: Interaction,
        resource_type: &str,
    ) -> Result<Access, AuthError> {
        match self.access(interaction, resource_type) {
            Access::Denied => {
                let ty = if interaction.is_system_level() || resource_type.is_empty() {
                    "*"
                } else {
                    resource_type
                };
                Err(AuthError::InsufficientScope(format!(
                    "{} on {} needs '{}' in a granted scope",
                    interaction.as_str(),
                    clip(ty),
                    interaction.needs().letters()
                )))
            }
            a => Ok(a),
        }
    }

    /// Whether the token is valid for `tenant`.
    pub fn allows_tenant(&self, tenant: &TenantId) -> bool {
        match &self.tenants {
            TenantAccess::Any => true,
            TenantAccess::Only(list) => list.contains(tenant),
        }
    }

    /// [`Principal::allows_tenant`] as a `Result`: `Err(TenantNotAllowed)` (403) when not.
    pub fn check_tenant(&self, tenant: &TenantId) -> Result<(), AuthError> {
        if self.allows_tenant(tenant) {
            Ok(())
        } else {
            Err(AuthError::TenantNotAllowed(tenant.as_str().to_string()))
        }
    }

    /// The tenants the token reaches.
    pub fn tenants(&self) -> &TenantAccess {
        &self.tenants
    }

    /// The patient context (a Patient id) from the `patient` claim, or from `fhirUser` when it
    /// is a Patient. `patient/` scopes are limited to this patient's compartment.
    pub fn patient(&self) -> Option<&str> {
        self.patient.as_deref()
    }

    /// The token's issuer (`iss`); empty for the unrestricted principal.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `sub`.
    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// `client_id`.
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// `jti` of the access token (BALP records it as `urn:ietf:params:oauth:jti:<jti>`).
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }

    /// The SMART scopes granted after `scope_map`, normalised to v2.
    pub fn scopes(&self) -> &[SmartScope] {
        &self.scopes
    }

    /// The scopes as the token lists them.
    pub fn raw_scopes(&self) -> &[String] {
        &self.raw_scopes
    }

    /// `fhirUser` (a reference to the user's Practitioner, Patient, … resource).
    pub fn fhir_user(&self) -> Option<&str> {
        self.fhir_user.as_deref()
    }

    /// HelseID `pid`: the user's national identity number. Sensitive: log only where the
    /// access log requires it.
    pub fn pid(&self) -> Option<&str> {
        self.pid.as_deref()
    }

    /// HelseID `hpr_number`.
    pub fn hpr_number(&self) -> Option<&str> {
        self.hpr_number.as_deref()
    }

    /// The user's name (`name`, or `given_name` and `family_name`).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// HelseID organisation numbers.
    pub fn org_numbers(&self) -> &OrgNumbers {
        &self.org_numbers
    }

    /// Purposes of use found in the token: a `purpose_of_use` / `purposeOfUse` claim, or
    /// Tillitsrammeverket `authorization_details[].care_relationship.purpose_of_use` (also
    /// spelled `care_relation`). Where HelseID places these attributes in the access token is
    /// not confirmed, so all these places are read.
    pub fn purpose_of_use(&self) -> &[PurposeOfUse] {
        &self.purpose_of_use
    }

    /// HelseID `security_level`.
    pub fn security_level(&self) -> Option<&str> {
        self.security_level.as_deref()
    }

    /// HelseID `assurance_level`.
    pub fn assurance_level(&self) -> Option<&str> {
        self.assurance_level.as_deref()
    }

    /// `exp` (seconds since the epoch).
    pub fn expires_at(&self) -> Option<i64> {
        self.expires_at
    }

    /// The RFC 7638 thumbprint of the DPoP key the request was proven with.
    pub fn dpop_jkt(&self) -> Option<&str> {
        self.dpop_jkt.as_deref()
    }

    /// Every claim of the validated token (e.g. for `authorization_details` in the audit log).
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }
}

/// A string claim; numbers are accepted as their decimal text because organisation and HPR
/// numbers are sometimes sent as JSON numbers.
fn opt_string(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, AuthError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(AuthError::InvalidClaim {
            claim: clip(name),
            reason: "expected a string".into(),
        }),
    }
}

/// Strings of a claim that may be one value or an array of values; other members are skipped.
fn string_values(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Number(n) => vec![n.to_string()],
        Value::Array(a) => a.iter().flat_map(string_values).collect(),
        _ => Vec::new(),
    }
}

/// `scope` as a space-separated string (RFC 9068) or an array (IdentityServer, HelseID);
/// `scp` as a fallback.
fn scope_list(claims: &Map<String, Value>) -> Result<Vec<String>, AuthError> {
    let (name, v) = match (claims.get("scope"), claims.get("scp")) {
        (Some(v), _) => ("scope", v),
        (None, Some(v)) => ("scp", v),
        (None, None) => return Ok(Vec::new()),
    };
    let list = match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Array(a) => {
            let mut out = Vec::new();
            for item in a {
                match item {
                    Value::String(s) => out.extend(s.split_whitespace().map(str::to_string)),
                    _ => {
                        return Err(AuthError::InvalidClaim {
                            claim: name.into(),
                            reason: "array members must be strings".into(),
                        });
                    }
                }
            }
            out
        }
        Value::Null => Vec::new(),
        _ => {
            return Err(AuthError::InvalidClaim {
                claim: name.into(),
                reason: "expected a string or an array of strings".into(),
            });
        }
    };
    Ok(list)
}

/// FHIR `id`: 1–64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The id in a `fhirUser` such as `https://server/fhir/Patient/123` or `Patient/123`.
fn patient_of_fhir_user(fhir_user: &str) -> Option<String> {
    let mut segs = fhir_user.trim_end_matches('/').rsplit('/');
    let id = segs.next()?;
    (segs.next()? == "Patient" && is_fhir_id(id)).then(|| id.to_string())
}

/// Applies the tenant rules: the first configured claim present in the token decides.
fn tenants_of(claims: &Map<String, Value>, rules: &ClaimRules) -> Vec<TenantId> {
    let mut out: Vec<TenantId> = Vec::new();
    for rule in &rules.tenant_claims {
        let Some(v) = claims.get(&rule.claim).filter(|v| !v.is_null()) else {
            continue;
        };
        for value in string_values(v) {
            let t = match rule.kind {
                TenantClaimKind::Orgnr => rules.org_tenants.get(value.trim()).cloned(),
                TenantClaimKind::Tenant => TenantId::new(&value).ok(),
            };
            match t {
                Some(t) if !out.contains(&t) => out.push(t),
                Some(_) => {}
                None => tracing::debug!(
                    issuer = %rules.issuer,
                    claim = %rule.claim,
                    value = %clip(&value),
                    "tenant claim value maps to no tenant"
                ),
            }
        }
        // Falling through to the next claim when this one maps to nothing would let a less
        // specific claim widen access; the first claim present is authoritative.
        break;
    }
    out
}

/// Purposes of use from a top-level claim or from Tillitsrammeverket authorization details.
fn purposes_of(claims: &Map<String, Value>) -> Vec<PurposeOfUse> {
    let mut out = Vec::new();
    for name in ["purpose_of_use", "purposeOfUse"] {
        if let Some(v) = claims.get(name) {
            collect_purposes(v, &mut out);
        }
    }
    if let Some(details) = claims.get("authorization_details") {
        // Some issuers put the RAR array in the token as a JSON string.
        let parsed;
        let details = match details {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s).unwrap_or(Value::Null);
                &parsed
            }
            other => other,
        };
        let items: Vec<&Value> = match details {
            Value::Array(a) => a.iter().collect(),
            Value::Object(_) => vec![details],
            _ => Vec::new(),
        };
        for item in items {
            for rel in ["care_relationship", "care_relation"] {
                if let Some(p) = item.get(rel).and_then(|r| r.get("purpose_of_use")) {
                    collect_purposes(p, &mut out);
                }
            }
        }
    }
    let mut unique: Vec<PurposeOfUse> = Vec::new();
    for p in out {
        if !unique.contains(&p) {
            unique.push(p);
        }
    }
    unique
}

fn collect_purposes(v: &Value, out: &mut Vec<PurposeOfUse>) {
    match v {
        Value::String(code) if !code.is_empty() => out.push(PurposeOfUse {
            system: None,
            code: code.clone(),
        }),
        Value::Object(o) => {
            if let Some(Value::String(code)) = o.get("code") {
                let system = match o.get("system") {
                    Some(Value::String(s)) => Some(s.clone()),
                    _ => None,
                };
                out.push(PurposeOfUse {
                    system,
                    code: code.clone(),
                });
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_purposes(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rules() -> ClaimRules {
        ClaimRules {
            issuer: "i".into(),
            smart_scopes: true,
            scope_map: HashMap::new(),
            tenant_claims: vec![
                TenantClaim {
                    claim: CLAIM_ORGNR_PARENT.into(),
                    kind: TenantClaimKind::Orgnr,
                },
                TenantClaim {
                    claim: "tenant".into(),
                    kind: TenantClaimKind::Tenant,
                },
            ],
            org_tenants: [(
                "111".to_string(),
                TenantId::new("a").unwrap_or_else(|e| panic!("{e}")),
            )]
            .into(),
        }
    }

    fn principal(claims: Value) -> Result<Principal, AuthError> {
        let Value::Object(m) = claims else {
            panic!("object")
        };
        Principal::from_claims(m, &rules(), None)
    }

    fn tid(s: &str) -> TenantId {
        TenantId::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn fhir_user_gives_patient_context() {
        let p = principal(json!({"fhirUser": "https://x/fhir/Patient/p-1"})).expect("ok");
        assert_eq!(p.patient(), Some("p-1"));
        let p = principal(json!({"fhirUser": "Practitioner/9"})).expect("ok");
        assert_eq!(p.patient(), None);
        let p = principal(json!({"patient": "Patient/42"})).expect("ok");
        assert_eq!(p.patient(), Some("42"));
        assert!(matches!(
            principal(json!({"patient": "../x"})),
            Err(AuthError::InvalidClaim { .. })
        ));
    }

    #[test]
    fn first_present_tenant_claim_decides() {
        let p = principal(json!({CLAIM_ORGNR_PARENT: "111", "tenant": "b"})).expect("ok");
        assert!(p.allows_tenant(&tid("a")));
        assert!(!p.allows_tenant(&tid("b")));
        // An unmapped orgnr_parent does not fall through to the tenant claim.
        let p = principal(json!({CLAIM_ORGNR_PARENT: "999", "tenant": "b"})).expect("ok");
        assert_eq!(p.tenants(), &TenantAccess::Only(vec![]));
        let p = principal(json!({"tenant": ["b", "c", "not valid!"]})).expect("ok");
        assert_eq!(p.tenants(), &TenantAccess::Only(vec![tid("b"), tid("c")]));
    }

    #[test]
    fn scope_claim_forms() {
        let p = principal(json!({"scope": "openid patient/Observation.rs user/Patient.read"}))
            .expect("ok");
        assert_eq!(p.scopes().len(), 2);
        let p = principal(json!({"scope": ["user/Patient.r", "user/Patient.r"]})).expect("ok");
        assert_eq!(p.scopes().len(), 1);
        let p = principal(json!({"scp": "user/Patient.r"})).expect("ok");
        assert_eq!(p.scopes().len(), 1);
        assert!(principal(json!({"scope": 5})).is_err());
        assert!(principal(json!({"sub": {"x": 1}})).is_err());
    }

    #[test]
    fn purpose_of_use_is_found() {
        let p = principal(json!({
            "authorization_details": [{
                "type": "nhn:tillitsrammeverk:parameters",
                "care_relationship": {"purpose_of_use": {
                    "code": "TREAT", "system": "urn:oid:2.16.840.1.113883.1.11.20448"}}
            }]
        }))
        .expect("ok");
        assert_eq!(
            p.purpose_of_use(),
            &[PurposeOfUse {
                system: Some("urn:oid:2.16.840.1.113883.1.11.20448".into()),
                code: "TREAT".into()
            }]
        );
        let p = principal(json!({"purpose_of_use": ["TREAT", "ETREAT"]})).expect("ok");
        assert_eq!(p.purpose_of_use().len(), 2);
        let p = principal(json!({
            "authorization_details": "{\"care_relation\":{\"purpose_of_use\":\"TREAT\"}}"
        }))
        .expect("ok");
        assert_eq!(p.purpose_of_use().len(), 1);
    }

    #[test]
    fn debug_hides_pid() {
        let p = principal(
            json!({CLAIM_PID: "01017012345", "given_name": "Kari", "family_name": "Nordmann"}),
        )
        .expect("ok");
        assert_eq!(p.pid(), Some("01017012345"));
        assert_eq!(p.name(), Some("Kari Nordmann"));
        assert!(!format!("{p:?}").contains("01017012345"));
    }

    #[test]
    fn unrestricted_allows_everything() {
        let p = Principal::unrestricted();
        assert!(p.allows(Interaction::Delete, "Patient"));
        assert!(p.allows_tenant(&tid("x")));
    }
}
