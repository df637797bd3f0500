//! Batch and transaction Bundles and PATCH over HTTP against a real server on 127.0.0.1.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use base64::Engine;
use common::*;
use fhir_server::ServerConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};

const FNR: &str = "urn:oid:2.16.578.1.12.4.1.4.1";
const PHG: &str = "urn:oid:2.16.578.1.12.4.1.1.9999";

async fn post_bundle(s: &TestServer, body: &Value) -> reqwest::Response {
    s.post("default", "", body).await
}

/// Every change of the tenant, newest first: (method, type/id).
async fn system_history(s: &TestServer) -> Vec<(String, String)> {
    let h = json(s.get("default", "/_history?_count=1000").await).await;
    h["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let url = e["fullUrl"].as_str().unwrap();
                    let rel = url.split("/fhir/default/").nth(1).unwrap().to_string();
                    (e["request"]["method"].as_str().unwrap().to_string(), rel)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn statuses(resp: &Value) -> Vec<String> {
    resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_string())
        .collect()
}

/// `Type/id` from a response entry's location `Type/id/_history/v`.
fn rel(entry: &Value) -> String {
    let loc = entry["response"]["location"].as_str().unwrap();
    let parts: Vec<&str> = loc.split('/').collect();
    assert_eq!(parts.len(), 4, "location {loc}");
    assert_eq!(parts[2], "_history");
    format!("{}/{}", parts[0], parts[1])
}

async fn read(s: &TestServer, rel: &str) -> Value {
    let r = s.get("default", &format!("/{rel}")).await;
    assert_eq!(r.status(), StatusCode::OK, "read {rel}");
    json(r).await
}

fn bp_observation(id_value: &str, subject: &str, systolic: &str, diastolic: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation",
        "identifier":[{{"system":"{PHG}","value":"{id_value}"}}],
        "status":"final",
        "category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],
        "code":{{"coding":[{{"system":"http://loinc.org","code":"85354-9","display":"Blood pressure panel with all children optional"}}]}},
        "subject":{{"reference":"{subject}"}},
        "effectiveDateTime":"2026-11-23T08:15:00+01:00",
        "component":[
          {{"code":{{"coding":[{{"system":"http://loinc.org","code":"8480-6","display":"Systolic blood pressure"}}]}},
           "valueQuantity":{{"value":{systolic},"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}},
          {{"code":{{"coding":[{{"system":"http://loinc.org","code":"8462-4","display":"Diastolic blood pressure"}}]}},
           "valueQuantity":{{"value":{diastolic},"unit":"mm[Hg]","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}}]}}"#
    )
}

/// A batch of `n` blood-pressure Observations, each with `ifNoneExist` on its identifier.
fn measurement_batch(prefix: &str, n: usize) -> String {
    let entries: Vec<String> = (0..n)
        .map(|i| {
            let v = format!("{prefix}-{i}");
            format!(
                r#"{{"resource":{},"request":{{"method":"POST","url":"Observation","ifNoneExist":"identifier={PHG}|{v}"}}}}"#,
                bp_observation(&v, "Patient/p1", "128.0", "84")
            )
        })
        .collect();
    format!(
        r#"{{"resourceType":"Bundle","type":"batch","entry":[{}]}}"#,
        entries.join(",")
    )
}

async fn post_text(s: &TestServer, body: String) -> reqwest::Response {
    s.client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_JSON)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn transaction_rewrites_references_across_three_levels() {
    let s = TestServer::start().await;
    let p = "urn:uuid:3f6b1a52-0d7e-4c3a-9a51-0a0b0c0d0e01";
    let enc = "urn:uuid:3f6b1a52-0d7e-4c3a-9a51-0a0b0c0d0e02";
    let cp = "urn:uuid:3f6b1a52-0d7e-4c3a-9a51-0a0b0c0d0e03";
    let goal = "urn:oid:2.16.578.1.12.4.1.7.42";
    // Children come before their parents: the server must not depend on the order.
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"resource": {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                "subject": {"reference": p}, "encounter": {"reference": enc},
                "basedOn": [{"reference": cp}],
                "focus": [{"reference": goal}]},
             "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": goal,
             "resource": {"resourceType": "Goal", "lifecycleStatus": "active",
                "description": {"text": "Blodtrykk under 140/90"},
                "subject": {"reference": p},
                "extension": [{"url": "http://example.org/fhir/StructureDefinition/goal-careplan",
                               "valueReference": {"reference": cp}}]},
             "request": {"method": "POST", "url": "Goal"}},
            {"fullUrl": cp,
             "resource": {"resourceType": "CarePlan", "status": "active", "intent": "plan",
                "contained": [{"resourceType": "ServiceRequest", "id": "measure", "status": "active",
                    "intent": "order", "code": {"text": "Blodtrykksmåling morgen og kveld"},
                    "subject": {"reference": p}}],
                "subject": {"reference": p}, "encounter": {"reference": enc},
                "goal": [{"reference": goal}],
                "activity": [{"reference": {"reference": "#measure"}}]},
             "request": {"method": "POST", "url": "CarePlan"}},
            {"fullUrl": enc,
             "resource": {"resourceType": "Encounter", "status": "planned",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "VR"},
                "subject": {"reference": p}},
             "request": {"method": "POST", "url": "Encounter"}},
            {"fullUrl": p,
             "resource": patient("13031353453"),
             "request": {"method": "POST", "url": "Patient"}}
        ]
    });
    let r = post_bundle(&s, &bundle).await;
    assert_eq!(r.status(), StatusCode::OK);
    let resp = json(r).await;
    assert_eq!(resp["resourceType"], "Bundle");
    assert_eq!(resp["type"], "transaction-response");
    assert_eq!(statuses(&resp), vec!["201 Created"; 5]);
    let e = resp["entry"].as_array().unwrap();
    for entry in e {
        assert_eq!(entry["response"]["etag"], "W/\"1\"");
        assert!(
            entry["response"]["lastModified"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert!(
            entry["fullUrl"]
                .as_str()
                .unwrap()
                .starts_with(&s.fhir("default", "/"))
        );
    }
    let (obs, goal_ref, cp_ref, enc_ref, p_ref) =
        (rel(&e[0]), rel(&e[1]), rel(&e[2]), rel(&e[3]), rel(&e[4]));
    assert!(obs.starts_with("Observation/") && p_ref.starts_with("Patient/"));

    let o = read(&s, &obs).await;
    assert_eq!(o["subject"]["reference"], p_ref.as_str());
    assert_eq!(o["encounter"]["reference"], enc_ref.as_str());
    assert_eq!(o["basedOn"][0]["reference"], cp_ref.as_str());
    assert_eq!(o["focus"][0]["reference"], goal_ref.as_str());
    let g = read(&s, &goal_ref).await;
    assert_eq!(g["subject"]["reference"], p_ref.as_str());
    assert_eq!(
        g["extension"][0]["valueReference"]["reference"],
        cp_ref.as_str(),
        "inside an extension"
    );
    let c = read(&s, &cp_ref).await;
    assert_eq!(c["subject"]["reference"], p_ref.as_str());
    assert_eq!(c["encounter"]["reference"], enc_ref.as_str());
    assert_eq!(c["goal"][0]["reference"], goal_ref.as_str());
    assert_eq!(
        c["contained"][0]["subject"]["reference"],
        p_ref.as_str(),
        "inside a contained resource"
    );
    assert_eq!(
        c["activity"][0]["reference"]["reference"], "#measure",
        "local references stay"
    );
    let en = read(&s, &enc_ref).await;
    assert_eq!(en["subject"]["reference"], p_ref.as_str());
    // The returned resources are the stored ones.
    assert_eq!(e[0]["resource"]["subject"]["reference"], p_ref.as_str());

    // One commit, one contiguous range of sequence numbers, one lastUpdated; processing order
    // (all POSTs in request order).
    let tenant = fhir_core::TenantId::new("default").unwrap();
    let changes: Vec<_> = s
        .store
        .changes(&tenant, 1)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    assert!(
        changes
            .iter()
            .all(|c| c.last_updated == changes[0].last_updated)
    );
}

#[tokio::test]
async fn transaction_whose_last_entry_fails_writes_nothing() {
    let s = TestServer::start().await;
    let kari = s.create("default", &patient("01010112345")).await;
    let kari_id = kari["id"].as_str().unwrap();
    let before = system_history(&s).await;
    assert_eq!(before.len(), 1);
    let p = "urn:uuid:0e3c3f4b-6a1d-4d8e-8f2a-3b4c5d6e7f80";
    let entries = |last: Value| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": p, "resource": patient("22222222222"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": serde_json::from_str::<Value>(&bp_observation("tx-1", p, "120", "80")).unwrap(),
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Patient", "id": kari_id, "gender": "female",
                          "identifier": [{"system": FNR, "value": "01010112345"}]},
             "request": {"method": "PUT", "url": format!("Patient/{kari_id}")}},
            {"request": {"method": "DELETE", "url": format!("Patient/{kari_id}")}},
            last
        ]})
    };
    // The last entry fails in the store: its If-Match is stale.
    let stale = json!({"resource": {"resourceType": "Basic", "id": "b1", "code": {"text": "x"}},
                       "request": {"method": "PUT", "url": "Basic/b1", "ifMatch": "W/\"4\""}});
    let r = post_bundle(&s, &entries(stale)).await;
    let oo = outcome(r, StatusCode::PRECONDITION_FAILED).await;
    let text = issues_text(&oo);
    assert!(text.contains("Bundle.entry[4]"), "{text}");
    assert!(text.contains("version"), "{text}");
    // The last entry is invalid: refused before anything is tried.
    let invalid = json!({"resource": {"resourceType": "Observation", "status": "final"},
                         "request": {"method": "POST", "url": "Observation"}});
    let r = post_bundle(&s, &entries(invalid)).await;
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert_eq!(
        oo["issue"][0]["expression"][0],
        "Bundle.entry[4].resource.code"
    );
    // A conditional reference in the last entry that matches nothing.
    let dangling = json!({"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                          "subject": {"reference": format!("Patient?identifier={FNR}|99999999999")}},
                          "request": {"method": "POST", "url": "Observation"}});
    let r = post_bundle(&s, &entries(dangling)).await;
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert!(
        issues_text(&oo).contains("Bundle.entry[4]"),
        "{}",
        issues_text(&oo)
    );

    // Nothing of the three attempts is visible: not by read, not by search, not in history.
    assert_eq!(system_history(&s).await, before);
    let r = s.get("default", &format!("/Patient/{kari_id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    let found = json(s.get("default", "/Patient?identifier=22222222222").await).await;
    assert_eq!(found["total"], 0);
    let found = json(
        s.get("default", &format!("/Observation?identifier={PHG}|tx-1"))
            .await,
    )
    .await;
    assert_eq!(found["total"], 0);
    let h = json(
        s.get("default", &format!("/Patient/{kari_id}/_history"))
            .await,
    )
    .await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 1);
    let r = s.get("default", "/Basic/b1").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn transaction_processing_order_and_conditional_references() {
    let s = TestServer::start().await;
    let old = s.create("default", &patient("42424242424")).await;
    let old_id = old["id"].as_str().unwrap().to_string();
    let mut kept = patient("12121212121");
    kept["id"] = json!("kept");
    assert_eq!(
        s.put("default", "/Patient/kept", &kept).await.status(),
        StatusCode::CREATED
    );
    let mut kept2 = kept.clone();
    kept2["gender"] = json!("male");
    // Request order: GET, PUT, conditional POST, DELETE, and an Observation whose subject is a
    // conditional reference. Spec order: DELETE, POST, PUT, GET.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "GET", "url": "Patient/kept"}},
        {"resource": kept2, "request": {"method": "PUT", "url": "Patient/kept", "ifMatch": "W/\"1\""}},
        {"resource": patient("42424242424"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": format!("identifier={FNR}|42424242424")}},
        {"request": {"method": "DELETE", "url": format!("{}/Patient/{old_id}", s.fhir("default", ""))}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                      "subject": {"reference": format!("Patient?identifier={FNR}|12121212121")}},
         "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "GET", "url": format!("Patient?identifier={FNR}|42424242424")}}
    ]});
    let resp = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(resp["type"], "transaction-response", "{resp}");
    assert_eq!(
        statuses(&resp),
        vec![
            "200 OK",
            "200 OK",
            "201 Created",
            "204 No Content",
            "201 Created",
            "200 OK"
        ]
    );
    let e = resp["entry"].as_array().unwrap();
    // The GET ran after the PUT.
    assert_eq!(e[0]["resource"]["meta"]["versionId"], "2");
    assert_eq!(e[0]["resource"]["gender"], "male");
    // The DELETE ran before the conditional create, which therefore created a new Patient.
    assert_ne!(rel(&e[2]), format!("Patient/{old_id}"));
    assert_eq!(
        s.get("default", &format!("/Patient/{old_id}"))
            .await
            .status(),
        StatusCode::GONE
    );
    assert_eq!(e[3]["response"]["etag"], "W/\"2\"");
    // The conditional reference was resolved.
    let o = read(&s, &rel(&e[4])).await;
    assert_eq!(o["subject"]["reference"], "Patient/kept");
    // The search saw the new Patient only.
    assert_eq!(e[5]["resource"]["type"], "searchset");
    assert_eq!(e[5]["resource"]["total"], 1);
    assert_eq!(
        format!(
            "Patient/{}",
            e[5]["resource"]["entry"][0]["resource"]["id"]
                .as_str()
                .unwrap()
        ),
        rel(&e[2])
    );

    // Two matches for a conditional reference: 412, naming the entry.
    s.create("default", &patient("77777777777")).await;
    s.create("default", &patient("77777777777")).await;
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "Patient?identifier=77777777777"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    let oo = outcome(
        post_bundle(&s, &bundle).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    let text = issues_text(&oo);
    assert!(
        text.contains("Bundle.entry[0]") && text.contains("matches 2"),
        "{text}"
    );
    // ifNoneMatch * on an existing resource, and ifNoneExist matching two: 412 each.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": kept, "request": {"method": "PUT", "url": "Patient/kept", "ifNoneMatch": "*"}}]});
    let oo = outcome(
        post_bundle(&s, &bundle).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    assert!(
        issues_text(&oo).contains("If-None-Match"),
        "{}",
        issues_text(&oo)
    );
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("77777777777"),
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=77777777777"}}]});
    outcome(
        post_bundle(&s, &bundle).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
}

#[tokio::test]
async fn batch_entries_succeed_and_fail_independently() {
    let s = TestServer::start().await;
    let existing = s.create("default", &patient("31313131313")).await;
    let id = existing["id"].as_str().unwrap().to_string();
    let patch = base64::engine::general_purpose::STANDARD
        .encode(br#"[{"op":"replace","path":"/gender","value":"other"}]"#);
    let good =
        serde_json::from_str::<Value>(&bp_observation("b-1", "Patient/p1", "131", "88")).unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": good, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Observation", "status": "final"},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": existing, "request": {"method": "PUT", "url": format!("Patient/{id}"), "ifMatch": "W/\"9\""}},
        {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": patch},
         "request": {"method": "PATCH", "url": format!("Patient/{id}")}},
        {"request": {"method": "DELETE", "url": "Observation/not-there"}},
        {"resource": {"resourceType": "Patient", "id": "fresh"},
         "request": {"method": "PUT", "url": "Patient/fresh", "ifNoneMatch": "*"}},
        {"request": {"method": "GET", "url": format!("Patient/{id}"), "ifNoneMatch": "W/\"2\""}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:not-in-this-bundle"}},
         "request": {"method": "POST", "url": "Observation"}}
    ]});
    let r = post_bundle(&s, &bundle).await;
    assert_eq!(r.status(), StatusCode::OK);
    let resp = json(r).await;
    assert_eq!(resp["type"], "batch-response");
    assert_eq!(
        statuses(&resp),
        vec![
            "201 Created",
            "400 Bad Request",
            "412 Precondition Failed",
            "404 Not Found",
            "200 OK",
            "204 No Content",
            "201 Created",
            "304 Not Modified",
            "400 Bad Request",
        ]
    );
    let e = resp["entry"].as_array().unwrap();
    for (i, entry) in e.iter().enumerate() {
        let failed = [1, 2, 3, 8].contains(&i);
        let oo = &entry["response"]["outcome"];
        assert_eq!(oo.is_object(), failed, "entry {i}: {entry}");
        if failed {
            assert_eq!(oo["resourceType"], "OperationOutcome");
            assert!(
                issues_text(oo).contains(&format!("Bundle.entry[{i}]")),
                "entry {i}: {oo}"
            );
        }
    }
    assert!(issues_text(&e[1]["response"]["outcome"]).contains("Bundle.entry[1].resource.code"));
    // The good entries were written.
    assert_eq!(
        read(&s, &rel(&e[0])).await["component"][0]["valueQuantity"]["value"],
        131
    );
    let p = read(&s, &format!("Patient/{id}")).await;
    assert_eq!(p["gender"], "other");
    assert_eq!(p["meta"]["versionId"], "2");
    assert_eq!(read(&s, "Patient/fresh").await["meta"]["versionId"], "1");
    // Exactly three changes were written by the batch (one per successful write).
    assert_eq!(system_history(&s).await.len(), 4);
}

#[tokio::test]
async fn retried_batch_creates_no_duplicates() {
    let s = TestServer::start().await;
    let body = measurement_batch("retry", 25);
    let first = json(post_text(&s, body.clone()).await).await;
    assert_eq!(statuses(&first), vec!["201 Created"; 25]);
    let second = json(post_text(&s, body).await).await;
    assert_eq!(statuses(&second), vec!["200 OK"; 25]);
    let ids = |b: &Value| {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(rel)
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&first), ids(&second));
    let h = json(s.get("default", "/Observation/_history?_count=1000").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 25);
    // Decimals keep their text through a batch.
    let text = s
        .get("default", &format!("/{}", ids(&first)[0]))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.contains(r#""value":128.0"#), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_batch_from_eight_clients_yields_each_observation_once() {
    let s = Arc::new(TestServer::start().await);
    let n = 100;
    let body = measurement_batch("conc", n);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = post_text(&s, body).await;
            assert_eq!(r.status(), StatusCode::OK);
            json(r).await
        }));
    }
    let mut created = 0;
    let mut by_identifier: HashMap<usize, HashSet<String>> = HashMap::new();
    for t in tasks {
        let resp = t.await.unwrap();
        for (i, e) in resp["entry"].as_array().unwrap().iter().enumerate() {
            match e["response"]["status"].as_str().unwrap() {
                "201 Created" => created += 1,
                "200 OK" => {}
                other => panic!("entry {i}: {other}"),
            }
            by_identifier.entry(i).or_default().insert(rel(e));
        }
    }
    assert_eq!(created, n, "each Observation created exactly once");
    assert!(
        by_identifier.values().all(|ids| ids.len() == 1),
        "every client got the same ids"
    );
    let h = json(s.get("default", "/Observation/_history?_count=1000").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), n);
    for i in [0, n / 2, n - 1] {
        let found = json(
            s.get(
                "default",
                &format!("/Observation?identifier={PHG}|conc-{i}"),
            )
            .await,
        )
        .await;
        assert_eq!(found["total"], 1);
    }
}

#[tokio::test]
async fn json_patch_on_a_resource() {
    let s = TestServer::start().await;
    // Sent as text: serde_json would turn 72.50 into 72.5 before it left the client.
    let r = s
        .client
        .post(s.fhir("default", "/Observation"))
        .header("content-type", FHIR_JSON)
        .body(bp_observation("patch-1", "Patient/p1", "72.50", "60"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = json(r).await["id"].as_str().unwrap().to_string();
    let patch = |body: &str, ct: &str, if_match: Option<&str>| {
        let mut rb = s
            .client
            .patch(s.fhir("default", &format!("/Observation/{id}")))
            .header("content-type", ct)
            .body(body.to_string());
        if let Some(m) = if_match {
            rb = rb.header("if-match", m);
        }
        rb.send()
    };
    const JP: &str = "application/json-patch+json";
    let ops = r#"[{"op":"test","path":"/status","value":"final"},
                  {"op":"replace","path":"/status","value":"amended"},
                  {"op":"add","path":"/note","value":[{"text":"målt etter trening"}]}]"#;
    let r = patch(ops, JP, Some("W/\"1\"")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    let body = r.text().await.unwrap();
    assert!(
        body.contains(r#""status":"amended""#) && body.contains("72.50"),
        "{body}"
    );
    // Stale If-Match.
    let r = patch(ops, JP, Some("W/\"1\"")).await.unwrap();
    outcome(r, StatusCode::PRECONDITION_FAILED).await;
    // Wrong media types.
    let r = patch(ops, FHIR_JSON, None).await.unwrap();
    let oo = outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert!(
        issues_text(&oo).contains("json-patch"),
        "{}",
        issues_text(&oo)
    );
    let r = patch(ops, "text/plain", None).await.unwrap();
    outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    // Malformed JSON and malformed patch: 400, naming the operation.
    outcome(
        patch("[{", JP, None).await.unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    let r = patch(
        r#"[{"op":"replace","path":"/status","value":"final"},{"op":"frobnicate","path":"/x"}]"#,
        JP,
        None,
    )
    .await
    .unwrap();
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert!(
        issues_text(&oo).contains("operation 1"),
        "{}",
        issues_text(&oo)
    );
    // Does not apply, or makes the resource invalid, or changes its id: 422.
    let r = patch(
        r#"[{"op":"test","path":"/status","value":"final"}]"#,
        JP,
        None,
    )
    .await
    .unwrap();
    outcome(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    let r = patch(r#"[{"op":"remove","path":"/code"}]"#, JP, None)
        .await
        .unwrap();
    let oo = outcome(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(
        issues_text(&oo).contains("Observation.code"),
        "{}",
        issues_text(&oo)
    );
    let r = patch(r#"[{"op":"replace","path":"/id","value":"x"}]"#, JP, None)
        .await
        .unwrap();
    outcome(r, StatusCode::UNPROCESSABLE_ENTITY).await;
    // Nothing of the failures was written.
    let h = json(
        s.get("default", &format!("/Observation/{id}/_history"))
            .await,
    )
    .await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 2);
    // Absent and deleted resources.
    let r = s
        .client
        .patch(s.fhir("default", "/Observation/nope"))
        .header("content-type", JP)
        .body("[]")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::NOT_FOUND).await;
    assert_eq!(
        s.delete("default", &format!("/Observation/{id}"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    outcome(patch("[]", JP, None).await.unwrap(), StatusCode::GONE).await;
}

#[tokio::test]
async fn json_patch_inside_a_transaction() {
    let s = TestServer::start().await;
    let created = s.create("default", &patient("51515151515")).await;
    let id = created["id"].as_str().unwrap().to_string();
    let enc = |ops: &str| base64::engine::general_purpose::STANDARD.encode(ops.as_bytes());
    let p = "urn:uuid:5a5a5a5a-1111-2222-3333-444444444444";
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                      "data": enc(&format!(r#"[{{"op":"add","path":"/link","value":[{{"other":{{"reference":"{p}"}},"type":"seealso"}}]}}]"#))},
         "request": {"method": "PATCH", "url": format!("Patient/{id}"), "ifMatch": "W/\"1\""}},
        {"fullUrl": p, "resource": patient("61616161616"), "request": {"method": "POST", "url": "Patient"}}
    ]});
    let resp = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(statuses(&resp), vec!["200 OK", "201 Created"], "{resp}");
    let new = rel(&resp["entry"][1]);
    let patched = read(&s, &format!("Patient/{id}")).await;
    assert_eq!(patched["meta"]["versionId"], "2");
    assert_eq!(
        patched["link"][0]["other"]["reference"],
        new.as_str(),
        "placeholder rewritten in the patch"
    );
    // A failing patch fails the transaction.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("71717171717"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Binary", "contentType": "application/json-patch+json",
                      "data": enc(r#"[{"op":"test","path":"/gender","value":"male"}]"#)},
         "request": {"method": "PATCH", "url": format!("Patient/{id}")}}
    ]});
    let oo = outcome(
        post_bundle(&s, &bundle).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert!(
        issues_text(&oo).contains("Bundle.entry[1]"),
        "{}",
        issues_text(&oo)
    );
    let found = json(s.get("default", "/Patient?identifier=71717171717").await).await;
    assert_eq!(found["total"], 0);
}

#[tokio::test]
async fn bad_bundles_get_a_clear_400_and_write_nothing() {
    let s = TestServer::start().await;
    let obs = || json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}});
    let post = |url: &str| json!({"resource": obs(), "request": {"method": "POST", "url": url}});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "wrong type",
            json!({"resourceType": "Bundle", "type": "collection", "entry": [post("Observation")]}),
            "Bundle.type",
        ),
        (
            "searchset",
            json!({"resourceType": "Bundle", "type": "searchset"}),
            "batch",
        ),
        (
            "not a Bundle",
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}}),
            "Bundle",
        ),
        (
            "no request",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("Observation"), {"resource": obs()}]}),
            "Bundle.entry[1].request",
        ),
        (
            "bad method",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": obs(), "request": {"method": "FETCH", "url": "Observation"}}]}),
            "request.method",
        ),
        (
            "other server",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("Observation"), post("https://evil.example.com/fhir/default/Observation")]}),
            "outside",
        ),
        (
            "other tenant",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post(&s.fhir("other", "/Observation"))]}),
            "outside",
        ),
        (
            "absolute path",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("/fhir/other/Observation")]}),
            "outside",
        ),
        (
            "unknown type",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("Observasjon")]}),
            "unknown resource type",
        ),
        (
            "type mismatch",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("Patient")]}),
            "URL is for Patient",
        ),
        (
            "nested transaction",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Bundle", "type": "transaction"}, "request": {"method": "POST", "url": "Bundle"}}]}),
            "document or collection",
        ),
        (
            "entry not an array",
            json!({"resourceType": "Bundle", "type": "batch", "entry": {}}),
            "array",
        ),
        (
            "post to an id",
            json!({"resourceType": "Bundle", "type": "transaction", "entry": [post("Observation/abc")]}),
            "not supported",
        ),
    ];
    for (what, body, expected) in cases {
        let r = post_bundle(&s, &body).await;
        let oo = outcome(r, StatusCode::BAD_REQUEST).await;
        let text = issues_text(&oo);
        assert!(
            text.contains(expected),
            "{what}: expected '{expected}' in {text}"
        );
    }
    // In a batch, the same mistakes in one entry are that entry's problem only.
    let r = post_bundle(
        &s,
        &json!({"resourceType": "Bundle", "type": "batch", "entry": [
        post("Observation"), {"resource": obs()}, post("https://evil.example.com/Observation")]}),
    )
    .await;
    let resp = json(r).await;
    assert_eq!(
        statuses(&resp),
        vec!["201 Created", "400 Bad Request", "400 Bad Request"]
    );
    assert_eq!(
        system_history(&s).await.len(),
        1,
        "only the good batch entry was written"
    );

    // Malformed JSON, wrong media type, empty body.
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_JSON)
        .body("{\"resourceType\":")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", "text/csv")
        .body("a,b")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_JSON)
        .body("")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;
    // An unknown tenant.
    let r = s
        .post(
            "nope",
            "",
            &json!({"resourceType": "Bundle", "type": "batch"}),
        )
        .await;
    outcome(r, StatusCode::NOT_FOUND).await;
    // A nested document Bundle is an ordinary resource.
    let doc = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Bundle", "type": "document", "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:1"},
                      "timestamp": "2026-11-23T08:15:00+01:00"},
         "request": {"method": "POST", "url": "Bundle"}}]});
    let resp = json(post_bundle(&s, &doc).await).await;
    assert_eq!(statuses(&resp), vec!["201 Created"]);
    assert_eq!(system_history(&s).await.len(), 2);
}

#[tokio::test]
async fn limits_on_entries_and_size() {
    let s = TestServer::start_with(ServerConfig {
        max_bundle_entries: 3,
        max_bundle_bytes: 20_000,
        ..ServerConfig::default()
    })
    .await;
    let r = post_text(&s, measurement_batch("lim", 4)).await;
    let oo = outcome(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert!(
        issues_text(&oo).contains("at most 3"),
        "{}",
        issues_text(&oo)
    );
    let r = post_text(&s, measurement_batch("lim", 3)).await;
    assert_eq!(r.status(), StatusCode::OK);
    // Over the byte limit (but within the entry limit).
    let mut big = measurement_batch("big", 1);
    big = big.replacen(
        "\"status\":\"final\"",
        &format!(
            "\"status\":\"final\",\"comment\":\"{}\"",
            "x".repeat(30_000)
        ),
        1,
    );
    let r = post_text(&s, big).await;
    outcome(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    let h = json(s.get("default", "/Observation/_history").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn xml_transaction_and_minimal_responses() {
    let s = TestServer::start().await;
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Bundle xmlns="http://hl7.org/fhir">
  <type value="transaction"/>
  <entry>
    <fullUrl value="urn:uuid:9d2b7f3e-8a4c-4c1d-b5e6-0f1e2d3c4b5a"/>
    <resource>
      <Patient>
        <identifier><system value="urn:oid:2.16.578.1.12.4.1.4.1"/><value value="13031353453"/></identifier>
      </Patient>
    </resource>
    <request><method value="POST"/><url value="Patient"/></request>
  </entry>
  <entry>
    <resource>
      <Observation>
        <status value="final"/>
        <code><text value="puls"/></code>
        <subject><reference value="urn:uuid:9d2b7f3e-8a4c-4c1d-b5e6-0f1e2d3c4b5a"/></subject>
        <valueQuantity><value value="72.50"/><unit value="/min"/></valueQuantity>
      </Observation>
    </resource>
    <request><method value="POST"/><url value="Observation"/></request>
  </entry>
</Bundle>"#;
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_XML)
        .header("accept", FHIR_XML)
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains(r#"<type value="transaction-response"/>"#),
        "{text}"
    );
    assert!(text.contains(r#"<status value="201 Created"/>"#), "{text}");
    assert!(text.contains(r#"<value value="72.50"/>"#), "{text}");
    // Prefer: return=minimal leaves the resources out.
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(measurement_batch("min", 2))
        .send()
        .await
        .unwrap();
    let resp = json(r).await;
    assert_eq!(statuses(&resp), vec!["201 Created"; 2]);
    assert!(resp["entry"][0].get("resource").is_none());
    assert!(
        resp["entry"][0]["response"]["location"]
            .as_str()
            .unwrap()
            .starts_with("Observation/")
    );
}

#[tokio::test]
async fn capability_statement_lists_batch_transaction_and_patch() {
    let s = TestServer::start().await;
    let cs = json(s.get("default", "/metadata").await).await;
    let system: Vec<&str> = cs["rest"][0]["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert!(
        system.contains(&"transaction") && system.contains(&"batch"),
        "{system:?}"
    );
    let obs = cs["rest"][0]["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    assert!(
        obs["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["code"] == "patch")
    );
}

// ------------------------------------------------------------------ full search criteria

/// A Patient with a name and birth date (and no identifier).
fn named_patient(given: &str, family: &str, birth_date: &str) -> Value {
    json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}],
           "birthDate": birth_date})
}

fn pulse_for(patient: &str, value: u32) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
           "subject": {"reference": patient},
           "effectiveDateTime": "2026-11-23T08:15:00+01:00",
           "valueQuantity": {"value": value, "unit": "/min"}})
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn transaction_if_none_exist_on_search_criteria() {
    let s = TestServer::start().await;
    let kari = id_of(&s.create("default", &patient("11111111111")).await);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        // Matches Kari (name and birth date): nothing created.
        {"resource": named_patient("Kari", "Nordmann", "1970-01-01"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "family=Nordmann&birthdate=1970-01-01"}},
        // Matches nobody: created, once, although the entry comes twice.
        {"fullUrl": "urn:uuid:6b0f5c1e-2d3a-4b5c-8d9e-0f1a2b3c4d01",
         "resource": named_patient("Per", "Hansen", "1980-02-02"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "Patient?birthdate=1980-02-02&family=Hansen"}},
        {"fullUrl": "urn:uuid:6b0f5c1e-2d3a-4b5c-8d9e-0f1a2b3c4d02",
         "resource": named_patient("Per", "Hansen", "1980-02-02"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "family=Hansen&birthdate=1980-02-02"}}
    ]});
    let resp = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(
        statuses(&resp),
        vec!["200 OK", "201 Created", "200 OK"],
        "{resp}"
    );
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(rel(&e[0]), format!("Patient/{kari}"));
    assert_eq!(rel(&e[1]), rel(&e[2]));
    assert_eq!(system_history(&s).await.len(), 2);
    // Retried: nothing new.
    let again = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(statuses(&again), vec!["200 OK"; 3]);
    assert_eq!(rel(&again["entry"][1]), rel(&e[1]));
    assert_eq!(system_history(&s).await.len(), 2);
    // Two matches: 412 naming the entry.
    s.create("default", &patient("22222222222")).await;
    let two = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": named_patient("Kari", "Nordmann", "1970-01-01"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "family=Nordmann&birthdate=1970-01-01"}}]});
    let oo = outcome(post_bundle(&s, &two).await, StatusCode::PRECONDITION_FAILED).await;
    assert!(
        issues_text(&oo).contains("Bundle.entry[0]"),
        "{}",
        issues_text(&oo)
    );
}

#[tokio::test]
async fn conditional_update_and_delete_entries_on_search_criteria() {
    let s = TestServer::start().await;
    let upd = id_of(&s.create("default", &pulse_for("Patient/p-upd", 70)).await);
    let del = id_of(&s.create("default", &pulse_for("Patient/p-del", 71)).await);
    let keep = id_of(&s.create("default", &pulse_for("Patient/p-keep", 72)).await);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": pulse_for("Patient/p-upd", 99),
         "request": {"method": "PUT",
                     "url": "Observation?subject=Patient/p-upd&code=http://loinc.org|8867-4"}},
        {"request": {"method": "DELETE", "url": "Observation?subject=Patient/p-del&code=8867-4"}},
        // No match: the update creates.
        {"resource": pulse_for("Patient/p-new", 60),
         "request": {"method": "PUT", "url": "Observation?subject=Patient/p-new&code=8867-4"}}
    ]});
    let resp = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(
        statuses(&resp),
        vec!["200 OK", "204 No Content", "201 Created"],
        "{resp}"
    );
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(rel(&e[0]), format!("Observation/{upd}"));
    let o = read(&s, &format!("Observation/{upd}")).await;
    assert_eq!(o["meta"]["versionId"], "2");
    assert_eq!(o["valueQuantity"]["value"], 99);
    assert_eq!(
        s.get("default", &format!("/Observation/{del}"))
            .await
            .status(),
        StatusCode::GONE
    );
    assert_eq!(
        read(&s, &format!("Observation/{keep}")).await["meta"]["versionId"],
        "1"
    );
    // Several matches: the whole transaction fails with 412 naming the entry.
    s.create("default", &pulse_for("Patient/p-keep", 73)).await;
    let before = system_history(&s).await.len();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": named_patient("A", "B", "1999-09-09"),
         "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": "Observation?subject=Patient/p-keep"}}
    ]});
    let oo = outcome(
        post_bundle(&s, &bundle).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    assert!(
        issues_text(&oo).contains("Bundle.entry[1]"),
        "{}",
        issues_text(&oo)
    );
    assert_eq!(system_history(&s).await.len(), before);
}

#[tokio::test]
async fn conditional_references_on_search_criteria() {
    let s = TestServer::start().await;
    let kari = id_of(
        &s.create("default", &named_patient("Kari", "Nordmann", "1970-01-01"))
            .await,
    );
    s.create("default", &named_patient("Ola", "Hansen", "1980-05-05"))
        .await;
    s.create("default", &named_patient("Ola", "Hansen", "1980-05-05"))
        .await;
    let obs_to = |reference: &str| {
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
            {"resource": pulse_for(reference, 70), "request": {"method": "POST", "url": "Observation"}}]})
    };
    // Exactly one: resolved.
    let resp = json(post_bundle(&s, &obs_to("Patient?name=Kari&birthdate=1970-01-01")).await).await;
    assert_eq!(
        statuses(&resp),
        vec!["201 Created", "201 Created"],
        "{resp}"
    );
    let o = read(&s, &rel(&resp["entry"][1])).await;
    assert_eq!(o["subject"]["reference"], format!("Patient/{kari}"));
    let written = system_history(&s).await.len();
    // None: 400; two: 412; either names the entry and writes nothing.
    let oo = outcome(
        post_bundle(&s, &obs_to("Patient?name=Nobody&birthdate=1970-01-01")).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let text = issues_text(&oo);
    assert!(
        text.contains("Bundle.entry[1]") && text.contains("matches no resource"),
        "{text}"
    );
    let oo = outcome(
        post_bundle(&s, &obs_to("Patient?name=Ola&birthdate=1980-05-05")).await,
        StatusCode::PRECONDITION_FAILED,
    )
    .await;
    let text = issues_text(&oo);
    assert!(
        text.contains("Bundle.entry[1]") && text.contains("matches 2"),
        "{text}"
    );
    assert_eq!(system_history(&s).await.len(), written);
    // The same criteria as an entry's ifNoneExist: that entry's resource, new or found.
    let linked = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": pulse_for("Patient?name=Per&birthdate=1990-01-01", 70),
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": named_patient("Per", "Berg", "1990-01-01"),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "name=Per&birthdate=1990-01-01"}}]});
    for expected in ["201 Created", "200 OK"] {
        let resp = json(post_bundle(&s, &linked).await).await;
        assert_eq!(statuses(&resp), vec!["201 Created", expected], "{resp}");
        let o = read(&s, &rel(&resp["entry"][0])).await;
        assert_eq!(o["subject"]["reference"], rel(&resp["entry"][1]));
    }
}

#[tokio::test]
async fn batch_get_entries_run_full_searches() {
    let s = TestServer::start().await;
    for v in [70, 80, 90] {
        s.create("default", &pulse_for("Patient/px", v)).await;
    }
    let mut other = pulse_for("Patient/px", 120);
    other["code"] = json!({"coding": [{"system": "http://loinc.org", "code": "8480-6"}]});
    s.create("default", &other).await;
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET",
                     "url": "Observation?subject=Patient/px&code=http://loinc.org|8867-4&_sort=-value-quantity"}},
        {"request": {"method": "GET", "url": "Observation?subject=Patient/px&code=8867-4&_count=2"}},
        {"request": {"method": "GET", "url": "Observation?subject=Patient/px&bogus=1"}},
        {"request": {"method": "GET", "url": "Observation?date=notadate"}},
        {"request": {"method": "GET", "url": "Observation?patient=px&_summary=count"}}
    ]});
    let resp = json(post_bundle(&s, &bundle).await).await;
    assert_eq!(
        statuses(&resp),
        vec!["200 OK", "200 OK", "200 OK", "400 Bad Request", "200 OK"],
        "{resp}"
    );
    let e = resp["entry"].as_array().unwrap();
    let first = &e[0]["resource"];
    assert_eq!(first["type"], "searchset");
    assert_eq!(first["total"], 3);
    let values: Vec<i64> = first["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["resource"]["valueQuantity"]["value"].as_i64().unwrap())
        .collect();
    assert_eq!(values, vec![90, 80, 70]);
    // Paging works as in a REST search: the next link serves the rest.
    let paged = &e[1]["resource"];
    assert_eq!(paged["entry"].as_array().unwrap().len(), 2);
    let next = next_link(paged).expect("next link");
    let rest = json(s.client.get(&next).send().await.unwrap()).await;
    assert_eq!(rest["entry"].as_array().unwrap().len(), 1, "{rest}");
    // An unknown parameter is ignored and named in an outcome entry, as in REST.
    let lenient = &e[2]["resource"];
    assert_eq!(lenient["total"], 4);
    let last = lenient["entry"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["search"]["mode"], "outcome");
    assert!(last.to_string().contains("bogus"), "{last}");
    // A malformed value is that entry's 400.
    let oo = &e[3]["response"]["outcome"];
    assert!(issues_text(oo).contains("Bundle.entry[3]"), "{oo}");
    assert_eq!(e[4]["resource"]["total"], 4);
    assert!(e[4]["resource"].get("entry").is_none());
    // With Prefer: handling=strict the unknown parameter is an error.
    let r = s
        .client
        .post(s.fhir("default", ""))
        .header("content-type", FHIR_JSON)
        .header("prefer", "handling=strict")
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let strict = json(r).await;
    assert_eq!(strict["entry"][2]["response"]["status"], "400 Bad Request");
}

#[tokio::test]
async fn bad_search_criteria_fail_the_entry_or_the_transaction() {
    let s = TestServer::start().await;
    let entries = |ty: &str| {
        json!({"resourceType": "Bundle", "type": ty, "entry": [
            {"resource": pulse_for("Patient/p1", 70), "request": {"method": "POST", "url": "Observation"}},
            {"resource": named_patient("A", "B", "1970-01-01"),
             "request": {"method": "POST", "url": "Patient", "ifNoneExist": "birthdate=notadate"}},
            {"resource": named_patient("A", "B", "1970-01-01"),
             "request": {"method": "PUT", "url": "Patient?bogus=1"}},
            {"resource": pulse_for("Patient?birthdate=19700101x", 70),
             "request": {"method": "POST", "url": "Observation"}}]})
    };
    let resp = json(post_bundle(&s, &entries("batch")).await).await;
    assert_eq!(
        statuses(&resp),
        vec![
            "201 Created",
            "400 Bad Request",
            "400 Bad Request",
            "400 Bad Request"
        ],
        "{resp}"
    );
    let e = resp["entry"].as_array().unwrap();
    for (i, member) in [
        (1, "Bundle.entry[1].request.ifNoneExist"),
        (2, "Bundle.entry[2].request.url"),
        (3, "Bundle.entry[3].resource"),
    ] {
        let text = issues_text(&e[i]["response"]["outcome"]);
        assert!(text.contains(member), "{i}: {text}");
    }
    assert!(issues_text(&e[2]["response"]["outcome"]).contains("bogus"));
    assert_eq!(system_history(&s).await.len(), 1);
    let oo = outcome(
        post_bundle(&s, &entries("transaction")).await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    let text = issues_text(&oo);
    assert!(
        text.contains("Bundle.entry[1]")
            && text.contains("Bundle.entry[2]")
            && text.contains("Bundle.entry[3]"),
        "{text}"
    );
    assert_eq!(system_history(&s).await.len(), 1);
}

/// Like `the_same_batch_from_eight_clients_yields_each_observation_once`, with `ifNoneExist`
/// criteria the store cannot evaluate itself (identifier and subject; patient, code and date),
/// so that every entry is a search.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_full_criteria_batch_from_eight_clients_yields_each_observation_once() {
    let s = Arc::new(TestServer::start().await);
    let n = 30;
    let entries: Vec<String> = (0..n)
        .map(|i| {
            let v = format!("full-{i}");
            let mut obs: Value =
                serde_json::from_str(&bp_observation(&v, "Patient/p1", "128", "84")).unwrap();
            obs["effectiveDateTime"] = json!(format!("2026-11-23T08:{i:02}:00+01:00"));
            let criteria = if i % 2 == 0 {
                format!("identifier={PHG}|{v}&subject=Patient/p1")
            } else {
                format!("patient=p1&code=http://loinc.org|85354-9&date=2026-11-23T07:{i:02}:00Z")
            };
            json!({"resource": obs,
                   "request": {"method": "POST", "url": "Observation", "ifNoneExist": criteria}})
            .to_string()
        })
        .collect();
    let body = format!(
        r#"{{"resourceType":"Bundle","type":"batch","entry":[{}]}}"#,
        entries.join(",")
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = post_text(&s, body).await;
            assert_eq!(r.status(), StatusCode::OK);
            json(r).await
        }));
    }
    let mut created = 0;
    let mut by_entry: HashMap<usize, HashSet<String>> = HashMap::new();
    for t in tasks {
        let resp = t.await.unwrap();
        for (i, e) in resp["entry"].as_array().unwrap().iter().enumerate() {
            match e["response"]["status"].as_str().unwrap() {
                "201 Created" => created += 1,
                "200 OK" => {}
                other => panic!("entry {i}: {other}: {e}"),
            }
            by_entry.entry(i).or_default().insert(rel(e));
        }
    }
    assert_eq!(created, n, "each Observation created exactly once");
    assert!(
        by_entry.values().all(|ids| ids.len() == 1),
        "every client got the same ids"
    );
    let h = json(s.get("default", "/Observation/_history?_count=1000").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), n);
}
