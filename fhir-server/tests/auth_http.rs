//! Authentication and authorisation over HTTP: a server with auth on, tokens signed with RSA
//! and EC keys generated here, a JWKS served by a local HTTP server.

mod common;

use common::auth::*;
use fhir_core::TenantId;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Token validation

#[tokio::test]
async fn requests_without_a_token_get_401_with_a_challenge() {
    let s = start().await;
    let r = s
        .req(Method::GET, "trust-a", "/Observation", None, None)
        .await;
    assert_401(r, "no token").await;
    let r = s
        .call(
            Method::GET,
            s.fhir("trust-a", "/Observation"),
            Some("Basic dXNlcjpwdw=="),
            None,
        )
        .await;
    assert_401(r, "basic").await;
    let r = s
        .call(
            Method::GET,
            s.fhir("trust-a", "/Observation"),
            Some("Bearer a b c"),
            None,
        )
        .await;
    assert_401(r, "garbled").await;
    let r = s
        .call(
            Method::GET,
            s.fhir("trust-a", "/Observation"),
            Some("Bearer not-a-jwt"),
            None,
        )
        .await;
    assert_401(r, "not a JWT").await;
}

#[tokio::test]
async fn rsa_and_ec_tokens_are_accepted() {
    let s = start().await;
    for signer in [&keys().rsa, &keys().ec] {
        let t = sign(signer, &claims("user/Observation.rs", json!({})));
        let r = s
            .req(Method::GET, "trust-a", "/Observation", Some(&t), None)
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{}", signer.kid);
    }
}

#[tokio::test]
async fn bad_tokens_get_401() {
    let s = start().await;
    let k = keys();
    let t = now();
    let scope = "user/*.cruds";
    let mut cases: Vec<(&str, String)> = vec![
        (
            "expired",
            sign(
                &k.rsa,
                &claims(scope, json!({"exp": t - 600, "iat": t - 900})),
            ),
        ),
        (
            "not yet valid",
            sign(&k.rsa, &claims(scope, json!({"nbf": t + 600}))),
        ),
        (
            "wrong issuer",
            sign(&k.rsa, &claims(scope, json!({"iss": "https://evil.test"}))),
        ),
        (
            "wrong audience",
            sign(&k.rsa, &claims(scope, json!({"aud": "other-api"}))),
        ),
        (
            "wrong signature",
            sign(&k.stranger, &claims(scope, json!({}))),
        ),
    ];
    let c = claims(scope, json!({}));
    cases.push((
        "alg none",
        format!(
            "{}.{}.",
            b64json(&json!({"alg": "none", "typ": "at+jwt"})),
            b64json(&c)
        ),
    ));
    let good = sign(&k.rsa, &c);
    let (head, rest) = good.split_once('.').expect("jws");
    let (_, sig) = rest.split_once('.').expect("jws");
    let tampered = with_scope_claims(scope);
    cases.push((
        "payload swapped",
        format!("{head}.{}.{sig}", b64json(&tampered)),
    ));
    for (what, tok) in cases {
        for (m, path) in [
            (Method::GET, "/Observation"),
            (Method::GET, "/Observation/x"),
            (Method::POST, "/Observation"),
        ] {
            let body = obs("x", "p1");
            let r = s
                .req(
                    m.clone(),
                    "trust-a",
                    path,
                    Some(&tok),
                    Some(&body).filter(|_| m == Method::POST),
                )
                .await;
            assert_401(r, what).await;
        }
    }
    // Nothing was written by the refused creates.
    let tenant = TenantId::new("trust-a").expect("id");
    let read = s
        .store
        .read(
            &tenant,
            fhir_core::ResourceType::parse("Observation").expect("type"),
            &fhir_core::ResourceId::new("x").expect("id"),
        )
        .expect("read");
    assert!(matches!(read, fhir_store::ReadResult::NotFound));
}

fn with_scope_claims(scope: &str) -> Value {
    claims(
        &format!("{scope} system/*.cruds"),
        json!({"tenant": "trust-b"}),
    )
}

// ---------------------------------------------------------------------------------------------
// Scopes

#[tokio::test]
async fn missing_scope_gets_403_and_write_does_not_imply_read() {
    let s = start().await;
    s.seed("trust-a", "/Observation/o1", obs("o1", "p1")).await;

    let only_patients = token("user/Patient.rs");
    for path in [
        "/Observation",
        "/Observation/o1",
        "/Observation/o1/_history",
    ] {
        let r = s
            .req(Method::GET, "trust-a", path, Some(&only_patients), None)
            .await;
        assert_403(r, path).await;
    }

    // Create only: may create, may not read or search what it wrote.
    let create_only = token("user/Observation.c");
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o2",
            Some(&create_only),
            Some(&obs("o2", "p1")),
        )
        .await;
    assert_403(r, "update with c").await;
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&create_only),
            Some(&obs("new", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    for path in ["/Observation/o1", "/Observation?code=8867-4"] {
        let r = s
            .req(Method::GET, "trust-a", path, Some(&create_only), None)
            .await;
        assert_403(r, path).await;
    }

    // Read without search: read and instance history, no search, no type history.
    let read_only = token("user/Observation.r");
    for (path, want) in [
        ("/Observation/o1", StatusCode::OK),
        ("/Observation/o1/_history", StatusCode::OK),
        ("/Observation/o1/_history/1", StatusCode::OK),
        ("/Observation", StatusCode::FORBIDDEN),
        ("/Observation/_history", StatusCode::FORBIDDEN),
        ("/_history", StatusCode::FORBIDDEN),
    ] {
        let r = s
            .req(Method::GET, "trust-a", path, Some(&read_only), None)
            .await;
        assert_eq!(r.status(), want, "{path}");
    }
    let r = s
        .req(
            Method::DELETE,
            "trust-a",
            "/Observation/o1",
            Some(&read_only),
            None,
        )
        .await;
    assert_403(r, "delete with r").await;
}

#[tokio::test]
async fn v1_and_v2_scopes_are_both_understood() {
    let s = start().await;
    s.seed("trust-a", "/Observation/o1", obs("o1", "p1")).await;
    let v1_read = token("user/Observation.read");
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?code=8867-4",
            Some(&v1_read),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&v1_read),
            Some(&obs("n", "p1")),
        )
        .await;
    assert_403(r, "v1 read cannot create").await;
    let v1_write = token("user/Observation.write");
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&v1_write),
            Some(&obs("n", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v2 = token("user/Observation.rs");
    let r = s
        .req(Method::GET, "trust-a", "/Observation/o1", Some(&v2), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn transaction_entries_need_their_scopes() {
    let s = start().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": obs("t1", "p1"), "request": {"method": "PUT", "url": "Observation/t1"}},
            {"resource": patient("tp"), "request": {"method": "PUT", "url": "Patient/tp"}},
        ]
    });
    let obs_writer = token("user/Observation.cu");
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "",
            Some(&obs_writer),
            Some(&bundle),
        )
        .await;
    assert_403(r, "transaction with a Patient entry").await;
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation/t1",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "nothing of it was written"
    );

    let both = token("user/Observation.cu user/Patient.cu");
    let r = s
        .req(Method::POST, "trust-a", "", Some(&both), Some(&bundle))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

/// A conditional reference is resolved by a search: whether `Patient?identifier=…` matches
/// none, one or several patients must not be learnt without search rights on Patient.
#[tokio::test]
async fn conditional_references_in_bundles_need_search_rights_on_their_type() {
    let s = start().await;
    s.seed(
        "trust-a",
        "/Patient/cr",
        json!({"resourceType": "Patient", "id": "cr",
               "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "13116900216"}]}),
    )
    .await;
    let mut o = obs("x", "cr");
    o.as_object_mut().map(|m| m.remove("id"));
    o["subject"] = json!({"reference":
        "Patient?identifier=urn:oid:2.16.578.1.12.4.1.4.1|13116900216"});
    for ty in ["transaction", "batch"] {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": ty,
            "entry": [{"resource": o, "request": {"method": "POST", "url": "Observation"}}]
        });
        // Create rights on Observation alone: refused (a batch answers the entry with 403).
        let writer = token("system/Observation.c");
        let r = s
            .req(Method::POST, "trust-a", "", Some(&writer), Some(&bundle))
            .await;
        if ty == "transaction" {
            assert_403(r, "transaction with a conditional reference").await;
        } else {
            assert_eq!(r.status(), StatusCode::OK);
            let b = body(r).await;
            assert_eq!(b["entry"][0]["response"]["status"], "403 Forbidden", "{b}");
        }
        // With search rights on Patient it resolves to Patient/cr.
        let both = token("system/Observation.c system/Patient.s");
        let r = s
            .req(Method::POST, "trust-a", "", Some(&both), Some(&bundle))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{ty}");
        let b = body(r).await;
        assert!(
            b["entry"][0]["response"]["status"]
                .as_str()
                .is_some_and(|st| st.starts_with("201")),
            "{ty}: {b}"
        );
    }
    // Two created, none by the refused requests.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?subject=Patient/cr&_summary=count",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(body(r).await["total"], 2);
}

/// `_include`/`_revinclude` return resources of other types than the one searched: each needs
/// read rights of its own (a `user/Observation.rs` token must not read Patients through
/// `_include=Observation:subject`), in every format and on every page.
#[tokio::test]
async fn included_resources_need_read_rights_on_their_type() {
    let s = start().await;
    compartment_data(&s).await;
    let obs_only = token("user/Observation.rs");
    let obs_and_patient = token("user/Observation.rs user/Patient.r");
    let q = "/Observation?_id=o1&_include=Observation:subject";
    let r = s
        .req(Method::GET, "trust-a", q, Some(&obs_only), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&body(r).await), ["Observation/o1"]);
    let r = s
        .req(Method::GET, "trust-a", q, Some(&obs_and_patient), None)
        .await;
    assert_eq!(ids(&body(r).await), ["Observation/o1", "Patient/p1"]);
    // _revinclude of Observations with Patient rights only.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient?_id=p1&_revinclude=Observation:subject",
            Some(&token("user/Patient.rs")),
            None,
        )
        .await;
    assert_eq!(ids(&body(r).await), ["Patient/p1"]);
    // XML: filtered, then converted.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            &format!("{q}&_format=xml"),
            Some(&obs_only),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let xml = r.text().await.expect("body");
    assert!(
        xml.contains("<Observation") && !xml.contains("<Patient"),
        "{xml}"
    );
    // POST _search with the include in the form body.
    let r = s
        .client
        .post(s.fhir("trust-a", "/Observation/_search"))
        .header("authorization", format!("Bearer {obs_only}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("_id=o1&_include=Observation:subject")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&body(r).await), ["Observation/o1"]);
    // Every page of a paged search.
    let mut url = s.fhir(
        "trust-a",
        "/Observation?_include=Observation:subject&_count=1&_sort=_id",
    );
    let mut pages = 0;
    let mut seen = Vec::new();
    loop {
        let r = s
            .call(Method::GET, url, Some(&format!("Bearer {obs_only}")), None)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let b = body(r).await;
        seen.extend(ids(&b));
        pages += 1;
        match common::next_link(&b) {
            Some(n) if pages < 5 => url = n,
            _ => break,
        }
    }
    assert_eq!(pages, 2);
    seen.sort();
    assert_eq!(seen, ["Observation/o1", "Observation/o2"]);
}

/// Chains and `_has` test resources of other types: each tested type needs a search scope, or a
/// token could probe data it may not read.
#[tokio::test]
async fn chains_and_has_need_search_rights_on_the_types_they_test() {
    let s = start().await;
    compartment_data(&s).await;
    let obs_only = token("user/Observation.rs");
    for path in [
        "/Observation?subject:Patient.gender=female",
        "/Observation?subject.gender=female",
        "/Observation?_has:Observation:has-member:code=8867-4",
    ] {
        if path.contains("_has") {
            // _has on Observation by Observation: allowed, it tests Observations only.
            let r = s
                .req(Method::GET, "trust-a", path, Some(&obs_only), None)
                .await;
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            continue;
        }
        let r = s
            .req(Method::GET, "trust-a", path, Some(&obs_only), None)
            .await;
        assert_403(r, path).await;
    }
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient?_has:Observation:subject:code=8867-4",
            Some(&token("user/Patient.rs")),
            None,
        )
        .await;
    assert_403(r, "_has:Observation without Observation rights").await;
    // The same in a POST _search form body.
    let r = s
        .client
        .post(s.fhir("trust-a", "/Observation/_search"))
        .header("authorization", format!("Bearer {obs_only}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("subject:Patient.gender=female")
        .send()
        .await
        .expect("request");
    assert_403(r, "a chain in a POST _search body").await;
    // With search rights on the tested types they run.
    let both = token("user/Observation.rs user/Patient.s");
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?subject:Patient.gender=female",
            Some(&both),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&body(r).await), ["Observation/o1", "Observation/o2"]);
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient?_has:Observation:subject:code=8867-4",
            Some(&token("user/Patient.rs user/Observation.s")),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&body(r).await), ["Patient/p1", "Patient/p2"]);
}

// ---------------------------------------------------------------------------------------------
// Tenants

#[tokio::test]
async fn a_token_for_trust_a_learns_nothing_about_trust_b() {
    let s = start().await;
    s.seed("trust-b", "/Observation/b1", obs("b1", "p9")).await;
    let t = token("user/*.cruds");
    // Every interaction on trust-b answers like an unknown tenant, existing data or not.
    let unknown = s
        .req(
            Method::GET,
            "no-such-trust",
            "/Observation/b1",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let unknown_text = body(unknown).await["issue"][0]["code"].clone();
    for (m, path, b) in [
        (Method::GET, "/Observation/b1", None),
        (Method::GET, "/Observation/nope", None),
        (Method::GET, "/Observation?code=8867-4", None),
        (Method::GET, "/Observation/b1/_history", None),
        (Method::GET, "/_history", None),
        (Method::PUT, "/Observation/b1", Some(obs("b1", "p1"))),
        (Method::POST, "/Observation", Some(obs("x", "p1"))),
        (Method::DELETE, "/Observation/b1", None),
    ] {
        let r = s
            .req(m.clone(), "trust-b", path, Some(&t), b.as_ref())
            .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{m} {path}");
        let b = body(r).await;
        assert_eq!(b["issue"][0]["code"], unknown_text, "{m} {path}");
        assert!(
            b["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or("")
                .contains("unknown tenant"),
            "{b}"
        );
    }
    // Percent-encoding the tenant does not get around the binding.
    let r = s
        .req(Method::GET, "trust%2Db", "/Observation/b1", Some(&t), None)
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // b1 is untouched.
    let tb = sign(
        &keys().rsa,
        &claims("user/*.rs", json!({"tenant": "trust-b"})),
    );
    let r = s
        .req(Method::GET, "trust-b", "/Observation/b1", Some(&tb), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["meta"]["versionId"], "1");
}

// ---------------------------------------------------------------------------------------------
// Patient compartment

#[tokio::test]
async fn patient_scope_limits_reads_and_searches_to_the_compartment() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/*.rs");
    for (path, want) in [
        ("/Observation/o1", StatusCode::OK),
        ("/Patient/p1", StatusCode::OK),
        ("/Observation/o1/_history", StatusCode::OK),
        ("/Observation/o1/_history/1", StatusCode::OK),
        ("/Observation/o2", StatusCode::NOT_FOUND),
        ("/Patient/p2", StatusCode::NOT_FOUND),
        ("/Observation/o2/_history/1", StatusCode::NOT_FOUND),
        ("/Observation/o2/_history", StatusCode::NOT_FOUND),
    ] {
        let r = s.req(Method::GET, "trust-a", path, Some(&t), None).await;
        assert_eq!(r.status(), want, "{path}");
    }
    let r = s
        .req(Method::GET, "trust-a", "/Observation", Some(&t), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(ids(&b), ["Observation/o1"], "{b}");
    assert_eq!(b["total"], 1);
    let r = s
        .req(Method::GET, "trust-a", "/Patient", Some(&t), None)
        .await;
    assert_eq!(ids(&body(r).await), ["Patient/p1"]);
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient/p2/Observation",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(ids(&body(r).await).is_empty());
    // Queries that would test resources outside the compartment are refused…
    for path in [
        "/Observation?performer:Practitioner.name=x",
        "/Observation?_has:Observation:has-member:code=8867-4",
        "?_type=Observation",
    ] {
        let r = s.req(Method::GET, "trust-a", path, Some(&t), None).await;
        assert_403(r, path).await;
    }
    // …while chains into the token's patient, `_has` on it, and history are limited to it
    // (tests/auth_patient.rs checks what they return).
    for path in [
        "/Observation?subject:Patient.gender=female",
        "/Patient?_has:Observation:subject:code=8867-4",
        "/_history",
        "/Observation/_history",
    ] {
        let r = s.req(Method::GET, "trust-a", path, Some(&t), None).await;
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn patient_scope_filters_include_and_revinclude_results() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/*.rs");
    // o1 includes o2 (another patient's) through hasMember: dropped.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_include=Observation:has-member&_include=Observation:subject",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(ids(&b), ["Observation/o1", "Patient/p1"], "{b}");
    // Unrestricted, the include is there.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_include=Observation:has-member",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(ids(&body(r).await), ["Observation/o1", "Observation/o2"]);
    // p2's observation points at nothing of p1; p1's revinclude of o1 stays in.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient?_revinclude=Observation:subject",
            Some(&t),
            None,
        )
        .await;
    assert_eq!(ids(&body(r).await), ["Observation/o1", "Patient/p1"]);
}

#[tokio::test]
async fn patient_scope_writes_stay_in_the_compartment() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/Observation.cruds");
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&t),
            Some(&obs("n", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&t),
            Some(&obs("n", "p2")),
        )
        .await;
    assert_403(r, "create for p2").await;
    // Moving o1 to p2 is refused; updating it in place is fine.
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o1",
            Some(&t),
            Some(&obs("o1", "p2")),
        )
        .await;
    assert_403(r, "move out").await;
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o1",
            Some(&t),
            Some(&obs("o1", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // p2's observation can be neither overwritten nor deleted.
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o2",
            Some(&t),
            Some(&obs("o2", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(Method::DELETE, "trust-a", "/Observation/o2", Some(&t), None)
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation/o2",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(body(r).await["subject"]["reference"], "Patient/p2");
}

// ---------------------------------------------------------------------------------------------
// DPoP

#[tokio::test]
async fn dpop_proofs_are_checked_over_http() {
    let s = start().await;
    let k = keys();
    let tok = sign(
        &k.rsa,
        &claims(
            "user/Observation.rs",
            json!({"cnf": {"jkt": ec_thumbprint(&k.client.jwk)}}),
        ),
    );
    let url = s.fhir("trust-a", "/Observation");
    let send = |p: String| {
        s.client
            .get(url.clone())
            .header("authorization", format!("DPoP {tok}"))
            .header("dpop", p)
            .send()
    };
    let p = proof(&k.client, "GET", &url, &tok, "proof-1");
    let r = send(p.clone()).await.expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(p).await.expect("request");
    assert_401(r, "replayed proof").await;
    let r = send(proof(&k.other_client, "GET", &url, &tok, "proof-2"))
        .await
        .expect("request");
    assert_401(r, "proof by another key").await;
    let r = send(proof(&k.client, "POST", &url, &tok, "proof-3"))
        .await
        .expect("request");
    assert_401(r, "wrong htm").await;
    let r = send(proof(
        &k.client,
        "GET",
        &s.fhir("trust-b", "/Observation"),
        &tok,
        "proof-4",
    ))
    .await
    .expect("request");
    assert_401(r, "wrong htu").await;
    // The bound token as Bearer is refused.
    let r = s
        .req(Method::GET, "trust-a", "/Observation", Some(&tok), None)
        .await;
    assert_401(r, "bound token as bearer").await;
}

// ---------------------------------------------------------------------------------------------
// Discovery and admin

#[tokio::test]
async fn discovery_is_public_and_describes_the_authorization_server() {
    let s = start().await;
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/.well-known/smart-configuration",
            None,
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let c = body(r).await;
    assert_eq!(c["issuer"], ISS);
    assert_eq!(c["token_endpoint"], "https://idp.test/token");
    assert_eq!(c["authorization_endpoint"], "https://idp.test/authorize");
    assert!(
        c["jwks_uri"]
            .as_str()
            .unwrap_or("")
            .starts_with("http://127.0.0.1")
    );
    assert_eq!(c["code_challenge_methods_supported"], json!(["S256"]));
    let caps = c["capabilities"].as_array().expect("capabilities");
    for want in [
        "permission-v1",
        "permission-v2",
        "permission-patient",
        "permission-user",
    ] {
        assert!(caps.contains(&json!(want)), "{want}");
    }

    let r = s.req(Method::GET, "trust-a", "/metadata", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let cs = body(r).await;
    let sec = &cs["rest"][0]["security"];
    assert_eq!(
        sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR",
        "{sec}"
    );
    let ext = &sec["extension"][0];
    assert_eq!(
        ext["url"],
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    );
    assert!(
        ext["extension"]
            .as_array()
            .expect("uris")
            .iter()
            .any(|e| e["url"] == "token" && e["valueUri"] == "https://idp.test/token")
    );
}

#[tokio::test]
async fn admin_api_needs_an_admin_scope() {
    let s = start().await;
    let url = format!("{}/admin/tenants", s.url);
    let r = s.call(Method::GET, url.clone(), None, None).await;
    assert_401(r, "admin without token").await;
    let user = format!("Bearer {}", token("user/*.rs"));
    let r = s.call(Method::GET, url.clone(), Some(&user), None).await;
    assert_403(r, "admin with read scope").await;
    let admin = format!("Bearer {}", admin_token());
    let r = s.call(Method::GET, url, Some(&admin), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    // Health stays public.
    let r = s
        .call(Method::GET, format!("{}/health", s.url), None, None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn search_pages_belong_to_the_token_that_searched() {
    let s = start().await;
    for i in 0..3 {
        s.seed(
            "trust-a",
            &format!("/Observation/o{i}"),
            obs(&format!("o{i}"), "p1"),
        )
        .await;
    }
    let mine = token("user/Observation.rs");
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_count=1",
            Some(&mine),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    let next = common::next_link(&b).expect("next link");
    let r = s
        .call(
            Method::GET,
            next.clone(),
            Some(&format!("Bearer {mine}")),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "the searcher follows its link");
    assert_eq!(ids(&body(r).await).len(), 1);
    let other = sign(
        &keys().rsa,
        &claims("user/*.rs", json!({"sub": "someone-else"})),
    );
    let r = s
        .call(Method::GET, next, Some(&format!("Bearer {other}")), None)
        .await;
    assert_403(r, "another user's page").await;
}

// The access-log tests are in tests/audit.rs.

#[tokio::test]
async fn batch_refuses_only_the_entries_the_token_does_not_allow() {
    let s = start().await;
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": obs("b1", "p1"), "request": {"method": "PUT", "url": "Observation/b1"}},
            {"resource": patient("bp"), "request": {"method": "PUT", "url": "Patient/bp"}},
            {"request": {"method": "GET", "url": "Observation/b1"}},
        ]
    });
    let obs_writer = token("user/Observation.cu");
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "",
            Some(&obs_writer),
            Some(&bundle),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(b["type"], "batch-response", "{b}");
    let statuses: Vec<&str> = b["entry"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(statuses.len(), 3, "{b}");
    assert!(statuses[0].starts_with("201"), "{statuses:?}");
    assert_eq!(statuses[1], "403 Forbidden");
    assert_eq!(statuses[2], "403 Forbidden", "write does not imply read");
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Patient/bp",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation/b1",
            Some(&admin_token()),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
}
