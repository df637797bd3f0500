//! The access log over HTTP: writes audited in their own commit (naming what the server
//! assigned), patients taken from search results, the auditor's search (paging, sorting,
//! totals) and its own logging, admin API calls, and nothing at all with `--no-auth`.

mod common;

use std::sync::{Arc, Mutex};

use common::auth::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// The auditor's view of `tenant`'s log for `query`, read once (no polling): for what must be
/// there as soon as a write's response has arrived.
async fn log_now(s: &AuthServer, tenant: &str, query: &str) -> Vec<Value> {
    let auditor = sign(
        &keys().rsa,
        &claims("user/AuditEvent.rs", json!({"tenant": tenant})),
    );
    let r = s
        .req(
            Method::GET,
            tenant,
            &format!("/AuditEvent?{query}"),
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{query}");
    let b = body(r).await;
    b["entry"]
        .as_array()
        .map(|a| a.iter().map(|e| e["resource"].clone()).collect())
        .unwrap_or_default()
}

/// A short form of events for failure messages: subtype, action, outcome, patients.
fn summary(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {:?}",
                e["subtype"][0]["code"].as_str().unwrap_or("?"),
                e["action"].as_str().unwrap_or("?"),
                e["outcome"].as_str().unwrap_or("?"),
                patients_of(e)
            )
        })
        .collect()
}

fn references(ev: &Value) -> Vec<String> {
    ev["entity"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["what"]["reference"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn patients_of(ev: &Value) -> Vec<String> {
    ev["entity"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["role"]["code"] == "1")
                .filter_map(|e| e["what"]["reference"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn clinician() -> String {
    sign(
        &keys().rsa,
        &claims(
            "user/*.cruds",
            json!({"jti": "jti-writer", "client_id": "ehr-app"}),
        ),
    )
}

fn obs_without_id(patient: &str) -> Value {
    let mut o = obs("x", patient);
    if let Some(m) = o.as_object_mut() {
        m.remove("id");
    }
    o
}

#[tokio::test]
async fn every_access_is_logged_as_a_balp_audit_event() {
    let s = start().await;
    compartment_data(&s).await;
    let clinician = sign(
        &keys().rsa,
        &claims(
            "user/*.cruds",
            json!({
                "jti": "jti-clinician",
                "client_id": "ehr-app",
                "helseid://claims/identity/pid": "01017012345",
                "helseid://claims/hpr/hpr_number": "1234567",
                "purpose_of_use": "TREAT",
            }),
        ),
    );
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation/o1",
            Some(&clinician),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o1",
            Some(&clinician),
            Some(&obs("o1", "p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?subject=Patient/p1",
            Some(&clinician),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    // A failed attempt: no token.
    let r = s
        .req(Method::GET, "trust-a", "/Patient/p1", None, None)
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // The auditor's own reads of the log are logged under p1 too: pick the clinician's.
    let theirs =
        |x: &Value| x["agent"][0]["policy"][0] == "urn:ietf:params:oauth:jti:jti-clinician";
    let events = audit_events(&s, "patient=p1&date=ge2020-01-01", |e| {
        e.iter().any(|x| has_subtype(x, "read") && theirs(x))
            && e.iter().any(|x| has_subtype(x, "update") && theirs(x))
            && e.iter().any(|x| has_subtype(x, "search-type") && theirs(x))
            && e.iter().any(|x| x["outcome"] == "4")
    })
    .await;
    let read = events
        .iter()
        .find(|e| has_subtype(e, "read") && e["outcome"] == "0")
        .expect("the read");
    assert_eq!(read["type"]["code"], "rest");
    assert_eq!(read["action"], "R");
    let user = &read["agent"][0];
    assert_eq!(user["who"]["identifier"]["value"], "01017012345");
    assert_eq!(user["policy"][0], "urn:ietf:params:oauth:jti:jti-clinician");
    assert_eq!(read["agent"][1]["who"]["identifier"]["value"], "ehr-app");
    assert_eq!(read["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
    let entities: Vec<&str> = read["entity"]
        .as_array()
        .expect("entities")
        .iter()
        .filter_map(|e| e["what"]["reference"].as_str())
        .collect();
    assert!(entities.contains(&"Patient/p1"), "{entities:?}");
    assert!(entities.contains(&"Observation/o1"), "{entities:?}");
    let update = events
        .iter()
        .find(|e| has_subtype(e, "update") && theirs(e))
        .expect("the update");
    assert_eq!(update["action"], "U");
    // The update names the version it wrote.
    assert!(references(update).contains(&"Observation/o1/_history/2".to_string()));
    let search = events
        .iter()
        .find(|e| has_subtype(e, "search-type") && theirs(e))
        .expect("the search");
    assert_eq!(search["action"], "E");
    let failed = events
        .iter()
        .find(|e| e["outcome"] == "4")
        .expect("the failed attempt");
    assert_eq!(failed["outcomeDesc"], "HTTP 401");

    // Another patient's log does not list them; a date range before today is empty.
    let other = audit_events(&s, "patient=p2", |_| true).await;
    assert!(!other.iter().any(|e| e["agent"][0]["policy"][0]
        == "urn:ietf:params:oauth:jti:jti-clinician"
        && has_subtype(e, "read")));
    let old = audit_events(&s, "patient=p1&date=lt2020-01-01", |_| true).await;
    assert!(old.is_empty());
}

#[tokio::test]
async fn a_create_is_logged_in_its_own_commit_naming_the_assigned_id() {
    let s = start().await;
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "/Observation",
            Some(&clinician()),
            Some(&obs_without_id("p1")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = body(r).await["id"].as_str().expect("id").to_string();
    // No polling: the record was committed with the write, before the response.
    let events = log_now(&s, "trust-a", "patient=p1").await;
    let creates: Vec<&Value> = events.iter().filter(|e| has_subtype(e, "create")).collect();
    assert_eq!(creates.len(), 1, "{:?}", summary(&events));
    let ev = creates[0];
    assert_eq!(ev["action"], "C");
    assert_eq!(ev["outcome"], "0");
    assert_eq!(
        ev["agent"][0]["policy"][0],
        "urn:ietf:params:oauth:jti:jti-writer"
    );
    let refs = references(ev);
    assert!(
        refs.contains(&format!("Observation/{id}/_history/1")),
        "{refs:?}"
    );
    assert_eq!(patients_of(ev), vec!["Patient/p1".to_string()]);
    // The event itself is a valid AuditEvent.
    fhir_core::Resource::from_json_bytes(ev.to_string().as_bytes()).expect("valid AuditEvent");
    // One record: the write's commit made it, the middleware added none.
    let all = log_now(&s, "trust-a", "date=ge2020-01-01").await;
    assert_eq!(
        all.iter().filter(|e| has_subtype(e, "create")).count(),
        1,
        "{:?}",
        summary(&all)
    );
}

#[tokio::test]
async fn updates_deletes_and_conditional_writes_name_what_they_touched() {
    let s = start().await;
    compartment_data(&s).await;
    let token = clinician();
    // An update that moves o2 from p2 to p3.
    let r = s
        .req(
            Method::PUT,
            "trust-a",
            "/Observation/o2",
            Some(&token),
            Some(&obs("o2", "p3")),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let ev = log_now(&s, "trust-a", "patient=p3").await;
    let update = ev
        .iter()
        .find(|e| has_subtype(e, "update"))
        .expect("the update under p3");
    assert_eq!(update["action"], "U");
    assert!(references(update).contains(&"Observation/o2/_history/2".to_string()));
    // A delete is about the patient of the content it deleted, though the URL names none.
    let r = s
        .req(
            Method::DELETE,
            "trust-a",
            "/Observation/o2",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let ev = log_now(&s, "trust-a", "patient=p3").await;
    let delete = ev
        .iter()
        .find(|e| has_subtype(e, "delete"))
        .expect("the delete under p3");
    assert_eq!(delete["action"], "D");
    assert!(references(delete).contains(&"Observation/o2/_history/3".to_string()));
    // A conditional create that creates, then one that matches (nothing written: a read).
    let mut measured = obs_without_id("p4");
    measured["identifier"] = json!([{"system": "urn:phg", "value": "m-1"}]);
    for want in [StatusCode::CREATED, StatusCode::OK] {
        let r = s
            .client
            .post(s.fhir("trust-a", "/Observation"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/fhir+json")
            .header("if-none-exist", "identifier=urn:phg|m-1")
            .body(measured.to_string())
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), want);
    }
    let ev = log_now(&s, "trust-a", "patient=p4").await;
    let mut actions: Vec<&str> = ev
        .iter()
        .filter(|e| has_subtype(e, "create"))
        .filter_map(|e| e["action"].as_str())
        .collect();
    actions.sort();
    assert_eq!(actions, vec!["C", "R"], "{:?}", summary(&ev));
    // A conditional delete, through the search index's own store handle, names the deleted
    // resource and its patient.
    let r = s
        .req(
            Method::DELETE,
            "trust-a",
            "/Observation?identifier=urn:phg|m-1",
            Some(&token),
            None,
        )
        .await;
    assert!(r.status().is_success(), "{}", r.status());
    let ev = log_now(&s, "trust-a", "patient=p4").await;
    let deleted = ev
        .iter()
        .find(|e| has_subtype(e, "delete"))
        .expect("the conditional delete under p4");
    assert_eq!(deleted["action"], "D");
    assert!(
        references(deleted)
            .iter()
            .any(|r| r.ends_with("/_history/2")),
        "{deleted}"
    );
}

#[tokio::test]
async fn a_failed_write_writes_nothing_and_is_logged_as_a_failure_at_once() {
    let s = start().await;
    compartment_data(&s).await;
    let r = s
        .client
        .put(s.fhir("trust-a", "/Observation/o1"))
        .header("authorization", format!("Bearer {}", clinician()))
        .header("content-type", "application/fhir+json")
        .header("if-match", "W/\"9\"")
        .body(obs("o1", "p1").to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::PRECONDITION_FAILED);
    let ev = log_now(&s, "trust-a", "date=ge2020-01-01").await;
    let failed: Vec<&Value> = ev
        .iter()
        .filter(|e| has_subtype(e, "update") && e["outcome"] == "4")
        .collect();
    assert_eq!(failed.len(), 1, "{:?}", summary(&ev));
    assert_eq!(failed[0]["outcomeDesc"], "HTTP 412");
    // Nothing was written: o1 is still at version 1 (seeded once), and no success was logged.
    assert!(!ev.iter().any(|e| {
        has_subtype(e, "update")
            && e["outcome"] == "0"
            && references(e)
                .iter()
                .any(|r| r.starts_with("Observation/o1/_history/2"))
    }));
}

#[tokio::test]
async fn a_batch_gets_one_event_per_patient_in_its_commit() {
    let s = start().await;
    let entry = |p: &str| json!({"resource": obs_without_id(p), "request": {"method": "POST", "url": "Observation"}});
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [entry("p6"), entry("p6"), entry("p7"), {"request": {"method": "GET", "url": "Observation/none"}}],
    });
    let r = s
        .req(
            Method::POST,
            "trust-a",
            "",
            Some(&clinician()),
            Some(&bundle),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert_eq!(b["type"], "batch-response", "{b}");
    let p6 = log_now(&s, "trust-a", "patient=p6").await;
    let batch: Vec<&Value> = p6.iter().filter(|e| has_subtype(e, "batch")).collect();
    assert_eq!(batch.len(), 1, "{:?}", summary(&p6));
    assert_eq!(batch[0]["action"], "E");
    assert_eq!(patients_of(batch[0]), vec!["Patient/p6".to_string()]);
    let written: Vec<String> = references(batch[0])
        .into_iter()
        .filter(|r| r.starts_with("Observation/"))
        .collect();
    assert_eq!(written.len(), 2, "{written:?}");
    let p7 = log_now(&s, "trust-a", "patient=p7").await;
    let batch: Vec<&Value> = p7.iter().filter(|e| has_subtype(e, "batch")).collect();
    assert_eq!(batch.len(), 1, "{:?}", summary(&p7));
    // p7's event does not show p6's data or id.
    assert!(!batch[0].to_string().contains("p6"));

    // A transaction is named as one.
    let tx = json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [entry("p8")],
    });
    let r = s
        .req(Method::POST, "trust-a", "", Some(&clinician()), Some(&tx))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let p8 = log_now(&s, "trust-a", "patient=p8").await;
    assert_eq!(
        p8.iter().filter(|e| has_subtype(e, "transaction")).count(),
        1,
        "{:?}",
        summary(&p8)
    );

    // Reads inside a Bundle are logged under their patients (after the response), and entries
    // the token may not run are logged as refused.
    s.seed("trust-a", "/Observation/o10", obs("o10", "p10"))
        .await;
    s.seed("trust-a", "/Observation/o12", obs("o12", "p12"))
        .await;
    let reader = sign(
        &keys().rsa,
        &claims("user/Observation.rs", json!({"jti": "jti-bundle-reader"})),
    );
    let mixed = json!({
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "Observation/o10"}},
            {"resource": patient("p11"), "request": {"method": "PUT", "url": "Patient/p11"}},
            // A search entry: the patients of its searchset were read too.
            {"request": {"method": "GET", "url": "Observation?code=8867-4&subject=Patient/p12"}},
        ],
    });
    let r = s
        .req(Method::POST, "trust-a", "", Some(&reader), Some(&mixed))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let theirs =
        |x: &Value| x["agent"][0]["policy"][0] == "urn:ietf:params:oauth:jti:jti-bundle-reader";
    let ev = audit_events(&s, "patient=p10", |e| {
        e.iter().any(|x| has_subtype(x, "batch") && theirs(x))
    })
    .await;
    assert!(
        ev.iter().any(|x| has_subtype(x, "batch") && theirs(x)),
        "the read in the batch was not logged for p10: {:?}",
        summary(&ev)
    );
    let ev = audit_events(&s, "patient=p12", |e| {
        e.iter().any(|x| has_subtype(x, "batch") && theirs(x))
    })
    .await;
    assert!(
        ev.iter().any(|x| has_subtype(x, "batch") && theirs(x)),
        "the search in the batch was not logged for p12: {:?}",
        summary(&ev)
    );
    let ev = audit_events(&s, "date=ge2020-01-01", |e| {
        e.iter().any(|x| theirs(x) && x["outcome"] == "4")
    })
    .await;
    let refused = ev
        .iter()
        .find(|x| theirs(x) && x["outcome"] == "4")
        .expect("the refused entry");
    assert_eq!(refused["outcomeDesc"], "HTTP 403");
}

#[tokio::test]
async fn searches_log_every_patient_in_their_results() {
    let s = start().await;
    compartment_data(&s).await;
    s.seed("trust-a", "/Patient/p3", patient("p3")).await;
    s.seed("trust-a", "/Observation/o3", obs("o3", "p3")).await;
    let reader = sign(
        &keys().rsa,
        &claims("user/*.rs", json!({"jti": "jti-searcher"})),
    );
    let mine = |e: &Value| e["agent"][0]["policy"][0] == "urn:ietf:params:oauth:jti:jti-searcher";
    // A search across patients: the URL names none of them.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?code=http://loinc.org|8867-4",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    for p in ["p1", "p2", "p3"] {
        let ev = audit_events(&s, &format!("patient={p}"), |e| {
            e.iter().any(|x| has_subtype(x, "search-type") && mine(x))
        })
        .await;
        let search = ev
            .iter()
            .find(|x| has_subtype(x, "search-type") && mine(x))
            .unwrap_or_else(|| panic!("no search event for {p}: {:?}", summary(&ev)));
        assert_eq!(search["action"], "E");
        // One event per patient (BALP): only this patient is named.
        assert_eq!(patients_of(search), vec![format!("Patient/{p}")]);
    }

    // XML results, an _include, and the second page of a paged search.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_id=o3&_format=xml",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let ev = audit_events(&s, "patient=p3", |e| {
        e.iter()
            .filter(|x| has_subtype(x, "search-type") && mine(x))
            .count()
            >= 2
    })
    .await;
    assert!(
        ev.iter()
            .filter(|x| has_subtype(x, "search-type") && mine(x))
            .count()
            >= 2,
        "the XML search was not logged for p3: {:?}",
        summary(&ev)
    );

    // Results cut down by _elements leave the subject out; the patient is still logged.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_id=o3&_elements=status",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    assert!(
        b["entry"][0]["resource"].get("subject").is_none(),
        "the test needs a result without its subject: {b}"
    );
    let ev = audit_events(&s, "patient=p3", |e| {
        e.iter()
            .filter(|x| has_subtype(x, "search-type") && mine(x))
            .count()
            >= 3
    })
    .await;
    assert!(
        ev.iter()
            .filter(|x| has_subtype(x, "search-type") && mine(x))
            .count()
            >= 3,
        "the _elements search was not logged for p3: {:?}",
        summary(&ev)
    );

    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/Observation?_count=1",
            Some(&reader),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let b = body(r).await;
    let next = common::next_link(&b).expect("next link");
    let r = s
        .call(Method::GET, next, Some(&format!("Bearer {reader}")), None)
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let page2 = body(r).await;
    let on_page2 = page2["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .expect("page 2 has an observation")
        .trim_start_matches("Patient/")
        .to_string();
    let ev = audit_events(&s, &format!("patient={on_page2}"), |e| {
        e.iter().any(|x| has_subtype(x, "search-system") && mine(x))
    })
    .await;
    assert!(
        ev.iter()
            .any(|x| has_subtype(x, "search-system") && mine(x)),
        "the _getpages page was not logged for {on_page2}: {:?}",
        summary(&ev)
    );
}

#[tokio::test]
async fn the_access_log_pages_sorts_and_counts() {
    let s = start().await;
    let token = clinician();
    for _ in 0..7 {
        let r = s
            .req(
                Method::POST,
                "trust-a",
                "/Observation",
                Some(&token),
                Some(&obs_without_id("p9")),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    // The auditor's own reads are logged under p9 too, later: leave them out by time.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let cutoff = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let auditor = token_for_auditor();
    let first = format!(
        "{}?patient=p9&date=lt{}&_count=3&_total=accurate",
        s.fhir("trust-a", "/AuditEvent"),
        cutoff
    );
    let mut url = Some(first);
    let mut seen: Vec<Value> = Vec::new();
    let mut pages = 0;
    let mut total = None;
    while let Some(u) = url.take() {
        let r = s
            .call(Method::GET, u, Some(&format!("Bearer {auditor}")), None)
            .await;
        assert_eq!(r.status(), StatusCode::OK);
        let b = body(r).await;
        if pages == 0 {
            total = b["total"].as_u64();
        }
        pages += 1;
        let entries = b["entry"].as_array().cloned().unwrap_or_default();
        assert!(entries.len() <= 3);
        seen.extend(entries.into_iter().map(|e| e["resource"].clone()));
        url = common::next_link(&b);
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(total, Some(7));
    assert_eq!(seen.len(), 7);
    assert_eq!(pages, 3);
    let mut ids: Vec<&str> = seen.iter().filter_map(|e| e["id"].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 7, "a page repeated an event");
    // Newest first by default.
    let recorded: Vec<&str> = seen.iter().filter_map(|e| e["recorded"].as_str()).collect();
    let mut newest_first = recorded.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(recorded, newest_first);
    // Oldest first when asked.
    let asc = log_now(
        &s,
        "trust-a",
        &format!("patient=p9&date=lt{cutoff}&_sort=date"),
    )
    .await;
    let recorded: Vec<&str> = asc.iter().filter_map(|e| e["recorded"].as_str()).collect();
    let mut oldest_first = recorded.clone();
    oldest_first.sort();
    assert_eq!(recorded, oldest_first);
    assert_eq!(recorded.len(), 7);
    // Bad parameters are refused.
    for q in [
        "patient=p9&_sort=recorded",
        "patient=p9&_cursor=not-a-cursor",
        "patient=p9&_total=maybe",
        "patient=p9&action=C",
    ] {
        let r = s
            .req(
                Method::GET,
                "trust-a",
                &format!("/AuditEvent?{q}"),
                Some(&auditor),
                None,
            )
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{q}");
    }
}

fn token_for_auditor() -> String {
    sign(
        &keys().rsa,
        &claims("user/AuditEvent.rs", json!({"jti": "jti-auditor"})),
    )
}

#[tokio::test]
async fn the_auditors_reads_are_logged_under_the_patient_asked_about() {
    let s = start().await;
    let auditor = token_for_auditor();
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/AuditEvent?patient=Patient/p5",
            Some(&auditor),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let ev = audit_events(&s, "patient=p5", |e| {
        e.iter().any(|x| {
            x["agent"][0]["policy"][0] == "urn:ietf:params:oauth:jti:jti-auditor"
                && has_subtype(x, "search-type")
        })
    })
    .await;
    let read = ev
        .iter()
        .find(|x| x["agent"][0]["policy"][0] == "urn:ietf:params:oauth:jti:jti-auditor")
        .expect("the auditor's read of p5's log");
    assert_eq!(patients_of(read), vec!["Patient/p5".to_string()]);
    assert!(references(read).contains(&"AuditEvent".to_string()));
    // A refused attempt to read the log is logged as well.
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/AuditEvent?patient=p5",
            Some(&clinician()),
            None,
        )
        .await;
    assert_403(r, "a clinician reading the log").await;
    let ev = audit_events(&s, "patient=p5", |e| e.iter().any(|x| x["outcome"] == "4")).await;
    assert!(
        ev.iter()
            .any(|x| x["outcome"] == "4" && x["outcomeDesc"] == "HTTP 403")
    );
}

#[tokio::test]
async fn the_access_log_is_for_auditors_and_append_only() {
    let s = start().await;
    let clinician = token("user/*.cruds");
    let r = s
        .req(
            Method::GET,
            "trust-a",
            "/AuditEvent?patient=p1",
            Some(&clinician),
            None,
        )
        .await;
    assert_403(r, "clinician reading the log").await;
    let auditor = token("user/AuditEvent.cruds system/*.cruds");
    let ev = json!({"resourceType": "AuditEvent", "id": "x"});
    for (m, path) in [
        (Method::PUT, "/AuditEvent/x"),
        (Method::DELETE, "/AuditEvent/x"),
        (Method::POST, "/AuditEvent"),
        (Method::DELETE, "/AuditEvent?patient=p1"),
    ] {
        let b = (m == Method::PUT || m == Method::POST).then_some(&ev);
        let r = s.req(m.clone(), "trust-a", path, Some(&auditor), b).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{m} {path}");
    }
    // A cross-tenant attempt lands in the attacked tenant's log.
    let r = s
        .req(
            Method::GET,
            "trust-b",
            "/Patient/p1",
            Some(&clinician),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let mut found = false;
    for _ in 0..100 {
        // The auditor's own reads are in this log too (outcome 0): look for the attempt.
        let ev = log_now(&s, "trust-b", "patient=p1").await;
        if ev
            .iter()
            .any(|e| e["outcome"] == "4" && has_subtype(e, "read"))
        {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(found, "the cross-tenant attempt was logged in trust-b");
}

/// Captures what the server logs through `tracing` on this thread (the test's runtime is
/// single-threaded, so the middleware runs here).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test]
async fn admin_calls_are_logged_with_target_audit_and_in_the_tenants_log() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(captured.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("audit=info"))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let s = start().await;
    let admin = sign(
        &keys().rsa,
        &claims(
            "system/*.cruds",
            json!({"sub": "ops-1", "client_id": "ops-tool"}),
        ),
    );
    let r = s
        .call(
            Method::POST,
            format!("{}/admin/tenants", s.url),
            Some(&format!("Bearer {admin}")),
            Some(&json!({"id": "trust-c", "name": "Trust C"})),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // A refused call: no admin scope.
    let r = s
        .call(
            Method::DELETE,
            format!("{}/admin/tenants/trust-c", s.url),
            Some(&format!("Bearer {}", token("user/Observation.rs"))),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .call(
            Method::GET,
            format!("{}/admin/tenants", s.url),
            Some(&format!("Bearer {admin}")),
            None,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    let text = String::from_utf8(captured.0.lock().expect("log").clone()).expect("utf-8");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains(" audit:")).collect();
    assert!(
        lines.iter().any(|l| l.contains("action=\"create-tenant\"")
            && l.contains("subject=ops-1")
            && l.contains("client=ops-tool")
            && l.contains("tenant=trust-c")
            && l.contains("status=201")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("action=\"remove-tenant\"") && l.contains("status=403")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("action=\"list-tenants\"") && l.contains("status=200")),
        "{text}"
    );
    // And as AuditEvents in the new tenant's own log, the refused removal included.
    let ev = log_now(&s, "trust-c", "date=ge2020-01-01").await;
    let admin_events: Vec<&Value> = ev
        .iter()
        .filter(|e| {
            e["outcomeDesc"]
                .as_str()
                .is_some_and(|d| d.contains("admin API"))
        })
        .collect();
    assert!(
        admin_events
            .iter()
            .any(|e| e["action"] == "C" && e["outcome"] == "0"),
        "{:?}",
        summary(&ev)
    );
    assert!(
        admin_events
            .iter()
            .any(|e| e["action"] == "D" && e["outcome"] == "4"),
        "{:?}",
        summary(&ev)
    );
}

#[tokio::test]
async fn without_auth_nothing_is_logged() {
    let s = common::TestServer::start().await;
    let r = s
        .post("default", "/Observation", &obs_without_id("p1"))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .client
        .get(s.fhir("default", "/Observation?code=8867-4"))
        .send()
        .await
        .expect("search");
    assert_eq!(r.status(), StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let t = fhir_core::TenantId::new("default").expect("tenant");
    assert!(
        s.store
            .audit_records(&t, None, 0, i64::MAX, 10)
            .expect("audit area")
            .is_empty()
    );
}
