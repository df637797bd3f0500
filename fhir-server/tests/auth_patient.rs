//! A patient-context token (`patient/` scopes, patient `p1`) over HTTP: what a SMART patient app
//! may do, and that everything it gets, tests or writes stays in p1's compartment.

mod common;

use common::auth::*;
use common::next_link;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const XML: &str = "application/fhir+xml";

/// `GET` with extra headers; the status and the body text.
async fn get_with(
    s: &AuthServer,
    path: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, String) {
    let mut r = s
        .client
        .get(s.fhir("trust-a", path))
        .header("authorization", format!("Bearer {token}"));
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.expect("request");
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, resp.text().await.expect("body"))
}

/// An XML resource as JSON (through the server's own converter).
fn from_xml(text: &str) -> Value {
    let tree = fhir_core::xml::from_xml(text.as_bytes()).unwrap_or_else(|e| panic!("{e}: {text}"));
    serde_json::from_slice(&tree.to_bytes()).expect("JSON")
}

async fn get(s: &AuthServer, path: &str, token: &str) -> reqwest::Response {
    s.req(Method::GET, "trust-a", path, Some(token), None).await
}

async fn ok_bundle(s: &AuthServer, path: &str, token: &str) -> Value {
    let r = get(s, path, token).await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    body(r).await
}

/// `Type/id/version` of every history entry (deletions too), sorted.
fn versions(bundle: &Value) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let url = e["fullUrl"].as_str().unwrap_or("");
                    let tail: Vec<&str> = url.rsplit('/').take(2).collect();
                    let etag = e["response"]["etag"].as_str().unwrap_or("");
                    let v = etag.trim_start_matches("W/").trim_matches('"');
                    format!(
                        "{}/{}/{v}",
                        tail.get(1).unwrap_or(&""),
                        tail.first().unwrap_or(&"")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn delete_as_admin(s: &AuthServer, path: &str) {
    let r = s
        .req(Method::DELETE, "trust-a", path, Some(&admin_token()), None)
        .await;
    assert!(r.status().is_success(), "delete {path}: {}", r.status());
}

/// `compartment_data`, plus: o3 moved from p2 to p1, o4 moved from p1 to p2, o5 (p1) and o6
/// (p2) deleted.
async fn moving_data(s: &AuthServer) {
    compartment_data(s).await;
    s.seed("trust-a", "/Observation/o3", obs("o3", "p2")).await;
    s.seed("trust-a", "/Observation/o3", obs("o3", "p1")).await;
    s.seed("trust-a", "/Observation/o4", obs("o4", "p1")).await;
    s.seed("trust-a", "/Observation/o4", obs("o4", "p2")).await;
    s.seed("trust-a", "/Observation/o5", obs("o5", "p1")).await;
    delete_as_admin(s, "/Observation/o5").await;
    s.seed("trust-a", "/Observation/o6", obs("o6", "p2")).await;
    delete_as_admin(s, "/Observation/o6").await;
}

// ---------------------------------------------------------------------------------------------
// 1. vread

#[tokio::test]
async fn vread_checks_the_version_it_returns() {
    let s = start().await;
    moving_data(&s).await;
    let t = patient_token("patient/*.rs");
    for (path, want) in [
        // o3 was p2's at version 1, p1's now.
        ("/Observation/o3/_history/1", StatusCode::NOT_FOUND),
        ("/Observation/o3/_history/2", StatusCode::OK),
        ("/Observation/o3", StatusCode::OK),
        // o4 was p1's at version 1 and moved to p2.
        ("/Observation/o4/_history/1", StatusCode::OK),
        ("/Observation/o4/_history/2", StatusCode::NOT_FOUND),
        ("/Observation/o4", StatusCode::NOT_FOUND),
        // o5 (p1) was deleted: its deletion is p1's to see; o6's (p2) is not.
        ("/Observation/o5", StatusCode::GONE),
        ("/Observation/o5/_history/2", StatusCode::GONE),
        ("/Observation/o5/_history/1", StatusCode::OK),
        ("/Observation/o6", StatusCode::NOT_FOUND),
        ("/Observation/o6/_history/2", StatusCode::NOT_FOUND),
        ("/Observation/o6/_history/1", StatusCode::NOT_FOUND),
        // A version that does not exist, and an id that does not: the same 404.
        ("/Observation/o3/_history/9", StatusCode::NOT_FOUND),
        ("/Observation/nope/_history/1", StatusCode::NOT_FOUND),
    ] {
        let r = get(&s, path, &t).await;
        assert_eq!(r.status(), want, "{path}");
    }
    let b = body(get(&s, "/Observation/o4/_history/1", &t).await).await;
    assert_eq!(b["subject"]["reference"], "Patient/p1");
    // A refused vread looks like a missing one, in the format asked for.
    let hidden = get_with(&s, "/Observation/o3/_history/1?_format=xml", &t, &[]).await;
    let missing = get_with(&s, "/Observation/o3/_history/9?_format=xml", &t, &[]).await;
    assert_eq!(hidden.0, StatusCode::NOT_FOUND);
    assert_eq!(hidden.1, missing.1);
    assert!(hidden.1.contains("xml"), "{}", hidden.1);
}

// ---------------------------------------------------------------------------------------------
// 2. History

#[tokio::test]
async fn instance_history_keeps_the_versions_in_the_compartment() {
    let s = start().await;
    moving_data(&s).await;
    let t = patient_token("patient/*.rs");
    for (path, want) in [
        ("/Observation/o3/_history", vec!["Observation/o3/2"]),
        ("/Observation/o4/_history", vec!["Observation/o4/1"]),
        (
            "/Observation/o5/_history",
            vec!["Observation/o5/1", "Observation/o5/2"],
        ),
        ("/Observation/o1/_history", vec!["Observation/o1/1"]),
    ] {
        let b = ok_bundle(&s, path, &t).await;
        assert_eq!(versions(&b), want, "{path}: {b}");
    }
    // Never in the compartment: as missing as an id that never existed.
    for path in [
        "/Observation/o2/_history",
        "/Observation/o6/_history",
        "/Observation/nope/_history",
    ] {
        let r = get(&s, path, &t).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn type_and_system_history_drop_what_is_outside() {
    let s = start().await;
    moving_data(&s).await;
    let t = patient_token("patient/*.rs");
    let mine = vec![
        "Observation/o1/1",
        "Observation/o3/2",
        "Observation/o4/1",
        "Observation/o5/1",
        "Observation/o5/2",
    ];
    let b = ok_bundle(&s, "/Observation/_history", &t).await;
    assert_eq!(versions(&b), mine, "{b}");
    assert_eq!(b["type"], "history");

    let b = ok_bundle(&s, "/_history", &t).await;
    let mut all = mine.clone();
    all.push("Patient/p1/1");
    all.sort();
    assert_eq!(versions(&b), all, "{b}");

    // Paging: pages may be short, the links still lead through everything.
    let mut seen = Vec::new();
    let mut url = Some(s.fhir("trust-a", "/Observation/_history?_count=2"));
    let mut pages = 0;
    while let Some(u) = url {
        pages += 1;
        assert!(pages < 20, "history paging does not end");
        let r = s
            .call(Method::GET, u, Some(&format!("Bearer {t}")), None)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let b = body(r).await;
        let page = versions(&b);
        assert!(page.len() <= 2);
        seen.extend(page);
        url = next_link(&b);
    }
    seen.sort();
    assert_eq!(seen, mine);
    assert!(
        pages > 3,
        "the unfiltered history has 10 Observation versions"
    );

    // Type history needs a search scope on the type, system history a `*` scope.
    let obs_only = patient_token("patient/Observation.rs");
    let b = ok_bundle(&s, "/Observation/_history", &obs_only).await;
    assert_eq!(versions(&b), mine);
    assert_403(get(&s, "/_history", &obs_only).await, "system history").await;
    assert_403(
        get(
            &s,
            "/Observation/_history",
            &patient_token("patient/Observation.r"),
        )
        .await,
        "type history without s",
    )
    .await;
    // A filter-restricted scope cannot be applied to history entries.
    let filtered = patient_token("patient/Observation.rs?code=8867-4");
    assert_403(
        get(&s, "/Observation/_history", &filtered).await,
        "filtered",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. XML output

#[tokio::test]
async fn xml_results_are_filtered_then_converted() {
    let s = start().await;
    moving_data(&s).await;
    let t = patient_token("patient/*.rs");
    // o1 includes o2 (p2's) through hasMember: dropped, in XML too.
    let path = "/Observation?_id=o1&_include=Observation:has-member";
    for (q, headers) in [
        ("&_format=xml", vec![]),
        ("", vec![("accept", XML)]),
        ("&_format=application/fhir%2Bxml&_pretty=true", vec![]),
    ] {
        let (status, ct, text) = get_with(&s, &format!("{path}{q}"), &t, &headers).await;
        assert_eq!(status, StatusCode::OK, "{q}: {text}");
        assert!(ct.starts_with(XML), "{q}: {ct}");
        let b = from_xml(&text);
        assert_eq!(ids(&b), ["Observation/o1"], "{q}: {b}");
    }
    // History in XML.
    let (status, ct, text) = get_with(&s, "/Observation/o4/_history?_format=xml", &t, &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(ct.starts_with(XML));
    assert_eq!(versions(&from_xml(&text)), ["Observation/o4/1"]);
    // Errors come back in XML as well.
    let (status, ct, text) = get_with(
        &s,
        "/Observation?date=notadate",
        &t,
        &[("accept", XML), ("prefer", "handling=strict")],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    assert!(ct.starts_with(XML), "{ct}");
    assert_eq!(from_xml(&text)["resourceType"], "OperationOutcome");

    // Paging links keep _format, and the next page is filtered XML too.
    let (status, _, text) =
        get_with(&s, "/Observation?_count=1&_sort=_id&_format=xml", &t, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let first = from_xml(&text);
    let next = next_link(&first).expect("next link");
    assert!(next.contains("_format=xml"), "{next}");
    let r = s
        .client
        .get(next)
        .header("authorization", format!("Bearer {t}"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or("")
            .starts_with(XML)
    );
    let second = from_xml(&r.text().await.expect("text"));
    assert_eq!(ids(&second).len(), 1, "{second}");
    assert_ne!(ids(&first), ids(&second));
    // An unknown _format is refused as the handlers refuse it.
    let (status, _, _) = get_with(&s, "/Observation?_format=yaml", &t, &[]).await;
    assert_eq!(status, StatusCode::NOT_ACCEPTABLE);
}

// ---------------------------------------------------------------------------------------------
// 4. POST _search

async fn post_form(
    s: &AuthServer,
    path: &str,
    token: &str,
    form: &str,
    ct: &str,
) -> reqwest::Response {
    s.client
        .post(s.fhir("trust-a", path))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", ct)
        .body(form.to_string())
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn post_search_is_restricted_like_get() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/*.rs");
    const FORM: &str = "application/x-www-form-urlencoded";
    let r = post_form(&s, "/Observation/_search", &t, "code=8867-4", FORM).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&body(r).await), ["Observation/o1"]);
    // p2's data stays out whatever the body asks for.
    for form in [
        "_id=o2",
        "subject=Patient/p2",
        "_id=o1,o2&_include=Observation:has-member",
    ] {
        let r = post_form(&s, "/Observation/_search", &t, form, FORM).await;
        assert_eq!(r.status(), StatusCode::OK, "{form}");
        let b = body(r).await;
        assert!(
            !ids(&b).contains(&"Observation/o2".to_string()),
            "{form}: {b}"
        );
    }
    let r = post_form(&s, "/Patient/_search?gender=female", &t, "", FORM).await;
    assert_eq!(ids(&body(r).await), ["Patient/p1"]);
    // Body and query string are merged; the body's _format counts.
    let r = post_form(&s, "/Patient/_search?_id=p1,p2", &t, "_format=xml", FORM).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        ids(&from_xml(&r.text().await.expect("text"))),
        ["Patient/p1"]
    );
    // Chains in the body go through the same rules as in a query string.
    let r = post_form(
        &s,
        "/Observation/_search",
        &t,
        "subject:Patient.gender=female",
        FORM,
    )
    .await;
    assert_eq!(ids(&body(r).await), ["Observation/o1"]);
    let r = post_form(
        &s,
        "/Observation/_search",
        &t,
        "performer:Practitioner.name=x",
        FORM,
    )
    .await;
    assert_403(r, "chain into Practitioner in a form").await;
    let r = post_form(
        &s,
        "/Observation/_search",
        &t,
        "{\"code\":1}",
        "application/json",
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

// ---------------------------------------------------------------------------------------------
// 5. PATCH

async fn patch(
    s: &AuthServer,
    path: &str,
    token: &str,
    ops: Value,
    if_match: Option<&str>,
) -> reqwest::Response {
    let mut r = s
        .client
        .patch(s.fhir("trust-a", path))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json-patch+json")
        .body(ops.to_string());
    if let Some(m) = if_match {
        r = r.header("if-match", m);
    }
    r.send().await.expect("request")
}

#[tokio::test]
async fn patch_must_keep_the_resource_in_the_compartment() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/Observation.ru");
    let admin = admin_token();
    let r = patch(
        &s,
        "/Observation/o1",
        &t,
        json!([{"op": "replace", "path": "/status", "value": "amended"}]),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await["status"], "amended");
    // Moving it to p2 is refused, and nothing is written.
    let r = patch(
        &s,
        "/Observation/o1",
        &t,
        json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]),
        None,
    )
    .await;
    assert_403(r, "patch out of the compartment").await;
    let r = get(&s, "/Observation/o1", &admin).await;
    let o1 = body(r).await;
    assert_eq!(o1["subject"]["reference"], "Patient/p1");
    assert_eq!(o1["meta"]["versionId"], "2");
    // p2's resource: the 404 of a missing one, patched or not.
    let r = patch(
        &s,
        "/Observation/o2",
        &t,
        json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p1"}]),
        None,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = get(&s, "/Observation/o2", &admin).await;
    assert_eq!(body(r).await["meta"]["versionId"], "1");
    // If-Match is honoured; a stale one fails before anything is written.
    let r = patch(
        &s,
        "/Observation/o1",
        &t,
        json!([{"op": "replace", "path": "/status", "value": "final"}]),
        Some("W/\"1\""),
    )
    .await;
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let r = patch(
        &s,
        "/Observation/o1",
        &t,
        json!([{"op": "replace", "path": "/status", "value": "final"}]),
        Some("W/\"2\""),
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    // A patch that does not apply is the handler's error; other patch formats are refused.
    let r = patch(
        &s,
        "/Observation/o1",
        &t,
        json!([{"op": "test", "path": "/status", "value": "preliminary"}]),
        None,
    )
    .await;
    assert!(
        r.status().is_client_error() && r.status() != StatusCode::FORBIDDEN,
        "{}",
        r.status()
    );
    let r = s
        .client
        .patch(s.fhir("trust-a", "/Observation/o1"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/fhir+json")
        .body("{}")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Without `u` there is no patch at all.
    let r = patch(
        &s,
        "/Observation/o1",
        &patient_token("patient/Observation.rs"),
        json!([]),
        None,
    )
    .await;
    assert_403(r, "patch without u").await;
}

// ---------------------------------------------------------------------------------------------
// 6. Chains and _has

/// p3 (male) is the subject of o7, which is in p1's compartment through `performer`.
async fn chain_data(s: &AuthServer) {
    compartment_data(s).await;
    let mut p3 = patient("p3");
    p3["gender"] = json!("male");
    s.seed("trust-a", "/Patient/p3", p3).await;
    let mut o7 = obs("o7", "p3");
    o7["performer"] = json!([{"reference": "Patient/p1"}]);
    o7["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "29463-7"}]});
    s.seed("trust-a", "/Observation/o7", o7).await;
    let mut p1 = patient("p1");
    p1["identifier"] = json!([{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "13116900216"}]);
    s.seed("trust-a", "/Patient/p1", p1).await;
}

#[tokio::test]
async fn chains_into_the_patient_are_answered_with_the_patient_in_context() {
    let s = start().await;
    chain_data(&s).await;
    let t = patient_token("patient/*.rs");
    let admin = admin_token();
    // Unrestricted, the chain finds o7 through its (male) subject p3.
    let b = ok_bundle(&s, "/Observation?subject:Patient.gender=male", &admin).await;
    assert_eq!(ids(&b), ["Observation/o7"]);
    for (path, want) in [
        (
            "/Observation?subject:Patient.gender=female",
            vec!["Observation/o1"],
        ),
        // o7 is p1's (performer) but its subject p3 is not: p3 is never tested.
        ("/Observation?subject:Patient.gender=male", vec![]),
        ("/Observation?subject.gender=female", vec!["Observation/o1"]),
        ("/Observation?patient.gender=female", vec!["Observation/o1"]),
        (
            "/Observation?performer:Patient.gender=female",
            vec!["Observation/o7"],
        ),
        (
            "/Observation?subject:Patient.identifier=urn:oid:2.16.578.1.12.4.1.4.1|13116900216",
            vec!["Observation/o1"],
        ),
        ("/Observation?subject:Patient.identifier=other", vec![]),
        (
            "/Observation?subject:Patient.gender=female&code=8867-4",
            vec!["Observation/o1"],
        ),
        ("/Patient?link:Patient.gender=female", vec![]),
        (
            "/Observation?subject:Patient.gender:missing=false",
            vec!["Observation/o1"],
        ),
    ] {
        let b = ok_bundle(&s, path, &t).await;
        let want: Vec<String> = want.into_iter().map(String::from).collect();
        assert_eq!(ids(&b), want, "{path}: {b}");
    }
    for path in [
        // Into other types: not the patient's own data.
        "/Observation?performer:Practitioner.name=x",
        "/Observation?subject:Group.name=x",
        // Location and Patient both have `name`: the type must be named.
        "/Observation?subject.name=x",
        "/Observation?encounter.status=finished",
        "/Patient?general-practitioner.name=x",
        // Not a reference to a patient, or no such parameter.
        "/Observation?code.x=1",
        "/Observation?nosuch.gender=male",
        "/Observation?subject:Patient.nosuch=1",
        "/Observation?subject:Patient._has:Observation:subject:code=1",
    ] {
        assert_403(get(&s, path, &t).await, path).await;
    }
    // The chain tests Patient: the token must be allowed to search it.
    let obs_only = patient_token("patient/Observation.rs");
    assert_403(
        get(&s, "/Observation?subject:Patient.gender=female", &obs_only).await,
        "chain without Patient scope",
    )
    .await;
    // Filter-only restrictions have no patient to pin a chain to.
    let filtered = token("user/Observation.rs?code=8867-4 user/Patient.rs");
    assert_403(
        get(&s, "/Observation?subject:Patient.gender=female", &filtered).await,
        "filter-restricted chain",
    )
    .await;
}

#[tokio::test]
async fn has_on_the_patient_tests_the_patients_own_resources() {
    let s = start().await;
    chain_data(&s).await;
    // p2's o2 has code 29463-7 too, so a tenant-wide _has would find p2.
    let mut o2 = obs("o2", "p2");
    o2["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "29463-7"}]});
    s.seed("trust-a", "/Observation/o2", o2).await;
    let t = patient_token("patient/*.rs");
    for (path, want) in [
        (
            "/Patient?_has:Observation:subject:code=8867-4",
            vec!["Patient/p1"],
        ),
        // o7 (29463-7) is p1's by performer, but p1 is not its subject.
        ("/Patient?_has:Observation:subject:code=29463-7", vec![]),
        (
            "/Patient?_has:Observation:performer:code=29463-7",
            vec!["Patient/p1"],
        ),
        (
            "/Patient?_has:Observation:patient:code=8867-4",
            vec!["Patient/p1"],
        ),
        ("/Patient?_has:Observation:subject:code=0000-0", vec![]),
        (
            "/Patient?_has:Observation:subject:subject:Patient.gender=female",
            vec!["Patient/p1"],
        ),
        (
            "/Patient?_has:Observation:subject:code=8867-4&_has:Observation:subject:code=0000-0",
            vec![],
        ),
    ] {
        let b = ok_bundle(&s, path, &t).await;
        let want: Vec<String> = want.into_iter().map(String::from).collect();
        assert_eq!(ids(&b), want, "{path}: {b}");
    }
    for path in [
        "/Observation?_has:Observation:has-member:code=8867-4",
        "/Patient?_has:Observation:subject:_has:Observation:has-member:code=1",
        "/Patient?_has:Observation:subject:performer:Practitioner.name=x",
        "/Patient?_has:Observation:code:status=final",
        "/Patient?_has:Observation",
        "/Patient?_has:Nothing:subject:code=1",
    ] {
        assert_403(get(&s, path, &t).await, path).await;
    }
    // The scope's filters for the tested type apply inside _has.
    let t = patient_token("patient/Patient.rs patient/Observation.rs?code=29463-7");
    let b = ok_bundle(&s, "/Patient?_has:Observation:subject:status=final", &t).await;
    assert!(ids(&b).is_empty(), "{b}");
    let b = ok_bundle(&s, "/Patient?_has:Observation:performer:status=final", &t).await;
    assert_eq!(ids(&b), ["Patient/p1"]);
    // Without search rights on Observation there is no _has over it.
    let t = patient_token("patient/Patient.rs");
    assert_403(
        get(&s, "/Patient?_has:Observation:subject:code=8867-4", &t).await,
        "_has without Observation scope",
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Writes keep pinned to the version checked

#[tokio::test]
async fn updates_and_deletes_honour_if_match_against_the_checked_version() {
    let s = start().await;
    compartment_data(&s).await;
    let t = patient_token("patient/Observation.cruds");
    let r = s
        .client
        .put(s.fhir("trust-a", "/Observation/o1"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"7\"")
        .body(obs("o1", "p1").to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    // XML bodies are checked as well.
    let xml = "<Observation xmlns=\"http://hl7.org/fhir\"><id value=\"o1\"/><status value=\"final\"/>\
        <code><text value=\"x\"/></code><subject><reference value=\"Patient/p2\"/></subject></Observation>";
    let r = s
        .client
        .put(s.fhir("trust-a", "/Observation/o1"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", XML)
        .body(xml)
        .send()
        .await
        .expect("request");
    assert_403(r, "XML update moving out").await;
    let r = s
        .client
        .put(s.fhir("trust-a", "/Observation/o1"))
        .header("authorization", format!("Bearer {t}"))
        .header("content-type", XML)
        .body(xml.replace("Patient/p2", "Patient/p1"))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(Method::DELETE, "trust-a", "/Observation/o1", Some(&t), None)
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = get(
        &s,
        "/Observation/o1",
        &patient_token("patient/Observation.r"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::GONE);
}

// ---------------------------------------------------------------------------------------------
// 7. Bundles

fn patch_entry(url: &str, ops: Value) -> Value {
    use base64::Engine as _;
    json!({
        "resource": {
            "resourceType": "Binary",
            "contentType": "application/json-patch+json",
            "data": base64::engine::general_purpose::STANDARD.encode(ops.to_string()),
        },
        "request": {"method": "PATCH", "url": url},
    })
}

fn statuses(b: &Value) -> Vec<String> {
    b["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let s = e["response"]["status"].as_str().unwrap_or("");
                    s.split(' ').next().unwrap_or("").to_string()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn bundle_entries_follow_the_rules_of_their_interaction() {
    let s = start().await;
    compartment_data(&s).await;
    s.seed("trust-a", "/Observation/o3", obs("o3", "p1")).await;
    let t = patient_token("patient/Observation.cruds");
    let admin = admin_token();
    let post = |b: Value, tok: String| {
        let s = &s;
        async move {
            s.req(Method::POST, "trust-a", "", Some(&tok), Some(&b))
                .await
        }
    };
    let current = |path: &'static str| {
        let s = &s;
        let admin = admin.clone();
        async move {
            s.req(Method::GET, "trust-a", path, Some(&admin), None)
                .await
        }
    };

    // A transaction of writes in the compartment goes through.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("o1", "p1"), "request": {"method": "PUT", "url": "Observation/o1"}},
        {"resource": obs("x", "p1"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("n1", "p1"), "request": {"method": "PUT", "url": "Observation/n1"}},
        patch_entry("Observation/o3", json!([{"op": "replace", "path": "/status", "value": "amended"}])),
    ]});
    let r = post(tx, t.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(statuses(&b), ["200", "201", "201", "200"], "{b}");
    assert_eq!(
        body(current("/Observation/o3").await).await["status"],
        "amended"
    );

    // One entry outside the compartment refuses the whole transaction, as a single request
    // would be refused: p2's resource is a 404, a body for p2 a 403.
    for (entry, want) in [
        (
            json!({"resource": obs("o2", "p1"), "request": {"method": "PUT", "url": "Observation/o2"}}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"request": {"method": "DELETE", "url": "Observation/o2"}}),
            StatusCode::NOT_FOUND,
        ),
        (
            json!({"resource": obs("y", "p2"), "request": {"method": "POST", "url": "Observation"}}),
            StatusCode::FORBIDDEN,
        ),
        (
            patch_entry(
                "Observation/o3",
                json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/p2"}]),
            ),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"request": {"method": "GET", "url": "Observation/o1"}}),
            StatusCode::FORBIDDEN,
        ),
        (
            json!({"resource": obs("o1", "p1"), "request": {"method": "PUT", "url": "Observation/o1", "ifMatch": "W/\"1\""}}),
            StatusCode::PRECONDITION_FAILED,
        ),
    ] {
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": obs("n2", "p1"), "request": {"method": "PUT", "url": "Observation/n2"}},
            entry,
        ]});
        let r = post(tx, t.clone()).await;
        assert_eq!(r.status(), want, "{entry}");
        let r = current("/Observation/n2").await;
        assert_eq!(
            r.status(),
            StatusCode::NOT_FOUND,
            "nothing written: {entry}"
        );
    }
    assert_eq!(
        body(current("/Observation/o2").await).await["meta"]["versionId"],
        "1"
    );

    // A batch answers each entry by itself.
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": obs("o1", "p1"), "request": {"method": "PUT", "url": "Observation/o1"}},
        {"resource": obs("o2", "p1"), "request": {"method": "PUT", "url": "Observation/o2"}},
        {"resource": obs("y", "p2"), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "GET", "url": "Observation/o1"}},
        {"request": {"method": "DELETE", "url": "Observation/o2"}},
        {"request": {"method": "DELETE", "url": "Observation/n1"}},
    ]});
    let r = post(batch, t.clone()).await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(
        statuses(&b),
        ["200", "404", "403", "403", "404", "204"],
        "{b}"
    );
    assert_eq!(current("/Observation/n1").await.status(), StatusCode::GONE);
    assert_eq!(
        body(current("/Observation/o2").await).await["meta"]["versionId"],
        "1"
    );

    // A Patient created with the token's patient id gets a new id: not in the compartment.
    let pt = patient_token("patient/Patient.c");
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Patient",
            Some(&pt),
            Some(&patient("p1")),
        )
        .await;
    assert_403(r, "create a Patient").await;
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("p1"), "request": {"method": "POST", "url": "Patient"}},
    ]});
    assert_403(post(tx, pt).await, "create a Patient in a Bundle").await;
}
