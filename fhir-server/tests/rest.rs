//! The FHIR REST interactions over HTTP against a real server on 127.0.0.1.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn create_then_read_keeps_decimals_and_sets_meta() {
    let s = TestServer::start().await;
    // Sent as text: serde_json would turn 72.50 into 72.5 before it left the client.
    let obs = r#"{"resourceType":"Observation","id":"client-chosen","status":"final",
        "code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
        "valueQuantity":{"value":72.50,"unit":"/min"}}"#;
    let r = s
        .client
        .post(s.fhir("default", "/Observation"))
        .header("content-type", FHIR_JSON)
        .body(obs)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(r.headers().contains_key("last-modified"));
    assert_eq!(etag, "W/\"1\"");
    let text = r.text().await.unwrap();
    assert!(
        text.contains("\"value\":72.50"),
        "decimal text kept: {text}"
    );
    let created: Value = serde_json::from_str(&text).unwrap();
    let id = created["id"].as_str().unwrap();
    assert_ne!(id, "client-chosen", "the server assigns ids on create");
    assert_eq!(id.len(), 36, "a uuid");
    assert_eq!(created["meta"]["versionId"], "1");
    assert!(
        created["meta"]["lastUpdated"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(
        location,
        format!("{}/Observation/{id}/_history/1", s.fhir("default", ""))
    );

    let r = s.get("default", &format!("/Observation/{id}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let body = r.text().await.unwrap();
    assert_eq!(body, text, "read serves exactly the stored bytes");
}

#[tokio::test]
async fn update_vread_history_and_update_as_create() {
    let s = TestServer::start().await;
    let created = s.create("default", &observation("m-2", "60")).await;
    let id = created["id"].as_str().unwrap().to_string();
    let mut v2 = observation("m-2", "61.0");
    v2["id"] = json!(id);
    let r = s.put("default", &format!("/Observation/{id}"), &v2).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "W/\"2\"");

    let r = s
        .get("default", &format!("/Observation/{id}/_history/1"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("\"value\":60"));
    let r = s
        .get("default", &format!("/Observation/{id}/_history/2"))
        .await;
    assert!(r.text().await.unwrap().contains("\"value\":61.0"));
    let r = s
        .get("default", &format!("/Observation/{id}/_history/3"))
        .await;
    outcome(r, StatusCode::NOT_FOUND).await;
    let r = s
        .get("default", &format!("/Observation/{id}/_history/x"))
        .await;
    outcome(r, StatusCode::BAD_REQUEST).await;

    let h = json(
        s.get("default", &format!("/Observation/{id}/_history"))
            .await,
    )
    .await;
    assert_eq!(h["type"], "history");
    let entries = h["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[0]["resource"]["meta"]["versionId"], "2",
        "newest first"
    );
    assert_eq!(entries[0]["request"]["method"], "PUT");
    assert_eq!(entries[1]["request"]["method"], "POST");
    assert_eq!(entries[1]["response"]["etag"], "W/\"1\"");

    // Update-as-create with a client-chosen id.
    let mut p = patient("12345678901");
    p["id"] = json!("kari");
    let r = s.put("default", "/Patient/kari", &p).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with("/Patient/kari/_history/1")
    );
    let r = s.get("default", "/Patient/kari").await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn delete_is_logical_and_reads_answer_gone() {
    let s = TestServer::start().await;
    let created = s.create("default", &patient("01010112345")).await;
    let id = created["id"].as_str().unwrap();
    let r = s.delete("default", &format!("/Patient/{id}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.get("default", &format!("/Patient/{id}")).await;
    let oo = outcome(r, StatusCode::GONE).await;
    assert!(issues_text(&oo).contains("deleted"));
    // The old version stays readable, and history records the deletion.
    let r = s.get("default", &format!("/Patient/{id}/_history/1")).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.get("default", &format!("/Patient/{id}/_history/2")).await;
    assert_eq!(r.status(), StatusCode::GONE);
    let h = json(s.get("default", &format!("/Patient/{id}/_history")).await).await;
    let e = h["entry"].as_array().unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0]["request"]["method"], "DELETE");
    assert!(e[0].get("resource").is_none());
    // Deleting again changes nothing.
    let r = s.delete("default", &format!("/Patient/{id}")).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let h = json(s.get("default", &format!("/Patient/{id}/_history")).await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 2);
    // A deleted resource can be recreated by update; numbering continues.
    let mut p = patient("01010112345");
    p["id"] = json!(id);
    let r = s.put("default", &format!("/Patient/{id}"), &p).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["etag"], "W/\"3\"");
    // A resource that never existed.
    let r = s.get("default", "/Patient/never-was").await;
    outcome(r, StatusCode::NOT_FOUND).await;
    let r = s.get("default", "/Patient/never-was/_history").await;
    outcome(r, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn type_and_system_history_page_with_since_and_next_links() {
    let s = TestServer::start().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let c = s
            .create("default", &observation(&format!("h-{i}"), "70"))
            .await;
        ids.push(c["id"].as_str().unwrap().to_string());
    }
    let since = json(s.get("default", &format!("/Observation/{}", ids[3])).await).await["meta"]
        ["lastUpdated"]
        .as_str()
        .unwrap()
        .to_string();
    s.create("default", &patient("11111111111")).await;

    // Walk the type history three at a time by following next links.
    let mut seen = Vec::new();
    let mut url = s.fhir("default", "/Observation/_history?_count=3");
    let mut pages = 0;
    loop {
        let page: Value = s
            .client
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        for e in page["entry"].as_array().into_iter().flatten() {
            assert_eq!(e["resource"]["resourceType"], "Observation");
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        match common::next_link(&page) {
            Some(next) => url = next,
            None => break,
        }
        assert!(pages < 10, "paging must end");
    }
    let mut expected = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every entry once, newest first");

    let q = url_encode(&since);
    let h = json(
        s.get("default", &format!("/Observation/_history?_since={q}"))
            .await,
    )
    .await;
    assert_eq!(
        h["entry"].as_array().unwrap().len(),
        4,
        "_since includes the boundary"
    );

    let h = json(s.get("default", "/_history").await).await;
    let types: Vec<_> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types.len(), 8);
    assert_eq!(types[0], "Patient");

    let r = s.get("default", "/_history?_since=yesterday").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s.get("default", "/_history?_count=many").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
}

fn url_encode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test]
async fn if_match_and_conditional_reads() {
    let s = TestServer::start().await;
    let c = s.create("default", &observation("c-1", "80")).await;
    let id = c["id"].as_str().unwrap().to_string();
    let mut body = c.clone();
    body["status"] = json!("amended");
    let put = |etag: &'static str| {
        s.client
            .put(s.fhir("default", &format!("/Observation/{id}")))
            .header("content-type", FHIR_JSON)
            .header("if-match", etag)
            .body(body.to_string())
    };
    let r = put("W/\"2\"").send().await.unwrap();
    let oo = outcome(r, StatusCode::PRECONDITION_FAILED).await;
    assert!(issues_text(&oo).contains("version"));
    let r = put("W/\"1\"").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = put("W/\"1\"").send().await.unwrap();
    assert_eq!(
        r.status(),
        StatusCode::PRECONDITION_FAILED,
        "stale version loses"
    );
    let r = put("not-an-etag").send().await.unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;

    let get = |h: &'static str, v: String| {
        s.client
            .get(s.fhir("default", &format!("/Observation/{id}")))
            .header(h, v)
    };
    let r = get("if-none-match", "W/\"2\"".into()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = get("if-none-match", "W/\"1\"".into()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let last_modified = r.headers()["last-modified"].to_str().unwrap().to_string();
    let r = get("if-modified-since", last_modified)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    let r = get("if-modified-since", "Mon, 01 Jan 2001 00:00:00 GMT".into())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Delete with a stale If-Match is refused and deletes nothing.
    let r = s
        .client
        .delete(s.fhir("default", &format!("/Observation/{id}")))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        s.get("default", &format!("/Observation/{id}"))
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn conditional_create_update_delete() {
    let s = TestServer::start().await;
    let sys = "urn:oid:2.16.578.1.12.4.1.4.1";
    let post_if_none_exist = |cond: String, body: Value| {
        s.client
            .post(s.fhir("default", "/Patient"))
            .header("content-type", FHIR_JSON)
            .header("if-none-exist", cond)
            .body(body.to_string())
    };
    let r = post_if_none_exist(
        format!("identifier={sys}|22222222222"),
        patient("22222222222"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let first = json(r).await;
    let r = post_if_none_exist(
        format!("identifier={sys}|22222222222"),
        patient("22222222222"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "a match is returned, not created"
    );
    assert_eq!(json(r).await["id"], first["id"]);
    let r = post_if_none_exist(
        "Patient?identifier=22222222222".into(),
        patient("22222222222"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "value without system matches too"
    );
    // Any search criteria work (evaluated by the search index), not only identifiers.
    let r = post_if_none_exist("name=Kari".into(), patient("22222222222"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "name=Kari matches the patient");
    assert_eq!(json(r).await["id"], first["id"]);
    let r = post_if_none_exist("birthdate=1970-13".into(), patient("22222222222"))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;

    // Conditional update: no match creates, one match updates, two matches fail.
    let q = format!("/Patient?identifier={sys}%7C33333333333");
    let r = s.put("default", &q, &patient("33333333333")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let created = json(r).await;
    let mut p = patient("33333333333");
    p["gender"] = json!("male");
    let r = s.put("default", &q, &p).await;
    assert_eq!(r.status(), StatusCode::OK);
    let updated = json(r).await;
    assert_eq!(updated["id"], created["id"]);
    assert_eq!(updated["meta"]["versionId"], "2");
    s.create("default", &patient("44444444444")).await;
    s.create("default", &patient("44444444444")).await;
    let r = s
        .put(
            "default",
            "/Patient?identifier=44444444444",
            &patient("44444444444"),
        )
        .await;
    outcome(r, StatusCode::PRECONDITION_FAILED).await;
    let r = s.put("default", "/Patient", &patient("44444444444")).await;
    outcome(r, StatusCode::BAD_REQUEST).await;

    // Conditional delete.
    let r = s
        .delete(
            "default",
            &format!("/Patient?_id={}", created["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s
        .get(
            "default",
            &format!("/Patient/{}", created["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let r = s.delete("default", "/Patient?identifier=44444444444").await;
    outcome(r, StatusCode::PRECONDITION_FAILED).await;
    let r = s.delete("default", "/Patient?identifier=nobody").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_conditional_creates_make_one_resource() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let r = s
                .client
                .post(s.fhir("default", "/Observation"))
                .header("content-type", FHIR_JSON)
                .header(
                    "if-none-exist",
                    "identifier=urn:oid:2.16.578.1.12.4.1.1.9999|phg-42",
                )
                .body(observation("phg-42", "98").to_string())
                .send()
                .await
                .unwrap();
            let status = r.status();
            let body: Value = r.json().await.unwrap();
            (status, body["id"].as_str().unwrap().to_string())
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (status, id) = t.await.unwrap();
        if status == StatusCode::CREATED {
            created += 1;
        } else {
            assert_eq!(status, StatusCode::OK);
        }
        ids.insert(id);
    }
    assert_eq!(created, 1);
    assert_eq!(ids.len(), 1, "everyone got the same resource");
    let found = json(s.get("default", "/Observation?identifier=phg-42").await).await;
    assert_eq!(found["total"], 1);
    let h = json(s.get("default", "/Observation/_history").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_updates_lose_nothing() {
    let s = std::sync::Arc::new(TestServer::start().await);
    let c = s.create("default", &observation("u-1", "1")).await;
    let id = c["id"].as_str().unwrap().to_string();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let s = s.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let mut body = observation("u-1", &(w * 10 + i + 2).to_string());
                body["id"] = json!(id);
                let r = s.put("default", &format!("/Observation/{id}"), &body).await;
                assert_eq!(r.status(), StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let r = s.get("default", &format!("/Observation/{id}")).await;
    assert_eq!(r.headers()["etag"], "W/\"81\"");
    let h = json(
        s.get(
            "default",
            &format!("/Observation/{id}/_history?_count=1000"),
        )
        .await,
    )
    .await;
    let versions: Vec<u64> = h["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["meta"]["versionId"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(versions, (1..=81).rev().collect::<Vec<u64>>());
}

#[tokio::test]
async fn prefer_return_minimal_and_operation_outcome() {
    let s = TestServer::start().await;
    let r = s
        .client
        .post(s.fhir("default", "/Observation"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=minimal")
        .body(observation("p-1", "1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(r.headers().contains_key("location"));
    assert!(r.text().await.unwrap().is_empty());
    let r = s
        .client
        .post(s.fhir("default", "/Observation"))
        .header("content-type", FHIR_JSON)
        .header("prefer", "return=OperationOutcome")
        .body(observation("p-2", "1").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let v = json(r).await;
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["severity"], "information");
}

#[tokio::test]
async fn xml_in_and_out_and_pretty_json() {
    let s = TestServer::start().await;
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Patient xmlns="http://hl7.org/fhir">
  <identifier>
    <system value="urn:oid:2.16.578.1.12.4.1.4.1"/>
    <value value="13031353453"/>
  </identifier>
  <name>
    <family value="Nordmann"/>
    <given value="Ola"/>
  </name>
  <birthDate value="2013-03-13"/>
</Patient>"#;
    let r = s
        .client
        .post(s.fhir("default", "/Patient"))
        .header("content-type", FHIR_XML)
        .header("accept", FHIR_XML)
        .body(xml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/fhir+xml")
    );
    let back = r.text().await.unwrap();
    assert!(back.contains("<family value=\"Nordmann\"/>"), "{back}");
    assert!(back.contains("<versionId value=\"1\"/>"), "{back}");
    let id = back
        .split("<id value=\"")
        .nth(1)
        .and_then(|t| t.split('"').next())
        .unwrap()
        .to_string();

    let v = json(s.get("default", &format!("/Patient/{id}")).await).await;
    assert_eq!(v["name"][0]["given"][0], "Ola");
    assert_eq!(v["identifier"][0]["value"], "13031353453");

    let r = s
        .get("default", &format!("/Patient/{id}?_format=xml"))
        .await;
    assert!(r.text().await.unwrap().starts_with("<?xml"));
    let r = s
        .get(
            "default",
            &format!("/Patient/{id}?_format=json&_pretty=true"),
        )
        .await;
    let t = r.text().await.unwrap();
    assert!(t.contains("\n  \"resourceType\": \"Patient\""), "{t}");
    let r = s
        .get("default", &format!("/Patient/{id}?_format=text/html"))
        .await;
    outcome(r, StatusCode::NOT_ACCEPTABLE).await;

    // XML errors come back as 400 OperationOutcomes too.
    let r = s
        .client
        .post(s.fhir("default", "/Patient"))
        .header("content-type", FHIR_XML)
        .body("<Patient xmlns=\"http://hl7.org/fhir\"><birthDate value=\"1970-13-01\"/></Patient>")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s
        .client
        .post(s.fhir("default", "/Patient"))
        .header("content-type", FHIR_XML)
        .body("<Patient xmlns=\"http://hl7.org/fhir\"><birthDate value=")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;

    // History as XML.
    let r = s.get("default", "/Patient/_history?_format=xml").await;
    let t = r.text().await.unwrap();
    assert!(t.contains("<type value=\"history\"/>"), "{t}");
}

#[tokio::test]
async fn capability_statement_describes_the_server() {
    let s = TestServer::start().await;
    let r = s.get("default", "/metadata").await;
    assert_eq!(r.status(), StatusCode::OK);
    let cs = json(r).await;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    assert_eq!(cs["kind"], "instance");
    let resources = cs["rest"][0]["resource"].as_array().unwrap();
    // Every R4 type but SubscriptionStatus, which the R4 ResourceType value set lacks.
    assert_eq!(resources.len(), 146);
    // The statement is valid R4 by our own validator.
    let text = serde_json::to_vec(&cs).unwrap();
    fhir_core::Resource::from_json_bytes(&text)
        .unwrap_or_else(|e| panic!("CapabilityStatement invalid: {:?}", e.issues()));
    let obs = resources
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    assert_eq!(obs["conditionalCreate"], true);
    assert_eq!(obs["updateCreate"], true);
    let r = s.get("default", "/metadata?_format=xml").await;
    assert!(r.text().await.unwrap().contains("<CapabilityStatement"));
    let r = s.get("nope", "/metadata").await;
    outcome(r, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn health_and_ready() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(format!("{}/health", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .client
        .get(format!("{}/ready", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_resource_type_can_be_created_and_read() {
    // Minimal valid instances of a few structurally different types.
    let s = TestServer::start().await;
    let samples = [
        json!({"resourceType": "CarePlan", "status": "active", "intent": "plan",
               "subject": {"reference": "Patient/p1"},
               "activity": [{"detail": {"status": "scheduled", "code": {"text": "Measure blood pressure"}}}]}),
        json!({"resourceType": "QuestionnaireResponse", "status": "completed",
               "authored": "2024-03-01T10:00:00+01:00",
               "item": [{"linkId": "1", "answer": [{"valueInteger": 3}],
                         "item": [{"linkId": "1.1", "answer": [{"valueString": "ok"}]}]}]}),
        json!({"resourceType": "Appointment", "status": "booked",
               "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"}]}),
        json!({"resourceType": "Basic", "code": {"text": "x"}}),
    ];
    for body in samples {
        let c = s.create("default", &body).await;
        let rt = body["resourceType"].as_str().unwrap();
        let r = s
            .get("default", &format!("/{rt}/{}", c["id"].as_str().unwrap()))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{rt}");
    }
}
