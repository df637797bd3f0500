//! The index and the store agree: read-your-writes under concurrent writers, stable paging
//! while others write, no stale entries after updates and deletes, tenants that never see each
//! other (also when one is removed and created again), custom SearchParameters with
//! `$reindex`, and conditional operations on full search criteria under concurrency.

mod common;
mod search_common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;
use reqwest::StatusCode;
use search_common::*;
use serde_json::{Value, json};

fn with_identifier(mut v: Value, value: &str) -> Value {
    v["identifier"] = json!([{"system": "urn:test:ryw", "value": value}]);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_search_sees_every_write_acknowledged_before_it() {
    let s = Arc::new(TestServer::start().await);
    let stop = Arc::new(AtomicBool::new(false));
    // Other writers keep the index busy all along.
    let mut noise = Vec::new();
    for w in 0..2 {
        let (s, stop) = (s.clone(), stop.clone());
        noise.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = vital(
                    "8867-4",
                    &format!("Patient/noise-{w}"),
                    "2024-03-01",
                    &n.to_string(),
                    "/min",
                );
                assert_eq!(
                    s.post("default", "/Observation", &body).await.status(),
                    StatusCode::CREATED
                );
            }
            n
        }));
    }
    let misses = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (s, misses) = (s.clone(), misses.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..125 {
                let key = format!("ryw-{t}-{i}");
                let body = with_identifier(
                    vital(
                        "29463-7",
                        &format!("Patient/ryw-{t}"),
                        "2024-03-01",
                        "80",
                        "kg",
                    ),
                    &key,
                );
                let created = s.create("default", &body).await;
                let id = created["id"].as_str().unwrap().to_string();
                let b = search(
                    &s,
                    "default",
                    &format!("/Observation?identifier=urn:test:ryw|{key}"),
                )
                .await;
                if ids(&b) != [id.as_str()] {
                    misses.fetch_add(1, Ordering::Relaxed);
                }
                if i % 25 == 0 {
                    // An update is seen too: the old value no longer matches, the new one does.
                    let mut changed = with_identifier(body.clone(), &format!("{key}-v2"));
                    changed["id"] = json!(id);
                    assert_eq!(
                        s.put("default", &format!("/Observation/{id}"), &changed)
                            .await
                            .status(),
                        StatusCode::OK
                    );
                    let old = search(
                        &s,
                        "default",
                        &format!("/Observation?identifier=urn:test:ryw|{key}"),
                    )
                    .await;
                    let new = search(
                        &s,
                        "default",
                        &format!("/Observation?identifier=urn:test:ryw|{key}-v2"),
                    )
                    .await;
                    if !ids(&old).is_empty() || ids(&new) != [id.as_str()] {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut noisy = 0;
    for n in noise {
        noisy += n.await.unwrap();
    }
    assert_eq!(
        misses.load(Ordering::Relaxed),
        0,
        "searches missed acknowledged writes"
    );
    assert!(noisy > 0);
    // Everything written is searchable, and the total counts it exactly.
    let b = search(&s, "default", "/Observation?_summary=count").await;
    assert_eq!(b["total"], 1000 + noisy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_never_repeat_or_skip_while_others_write() {
    let s = Arc::new(TestServer::start().await);
    let mut original = BTreeMap::new();
    for i in 0..40 {
        let v = format!("{}", 50 + i);
        let id = make(
            &s,
            "default",
            vital(
                "8867-4",
                "Patient/pager",
                "2024-03-01T08:00:00+01:00",
                &v,
                "/min",
            ),
        )
        .await;
        original.insert(id, v);
    }
    let first = search(
        &s,
        "default",
        "/Observation?subject=Patient/pager&_sort=value-quantity&_count=7",
    )
    .await;
    assert_eq!(first["total"], 40);
    let mut seen: Vec<String> = ids(&first);
    let mut values: Vec<f64> = entries(&first, "match")
        .iter()
        .map(|e| e["resource"]["valueQuantity"]["value"].as_f64().unwrap())
        .collect();
    // Meanwhile: new matches, updates that move resources across pages, deletes.
    let victims: Vec<String> = original.keys().cloned().collect();
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            for (n, id) in victims.iter().enumerate() {
                match n % 3 {
                    0 => {
                        make(
                            &s,
                            "default",
                            vital("8867-4", "Patient/pager", "2024-03-01", "55.5", "/min"),
                        )
                        .await;
                    }
                    1 => {
                        let mut body = vital("8867-4", "Patient/pager", "2024-03-01", "1", "/min");
                        body["id"] = json!(id);
                        assert_eq!(
                            s.put("default", &format!("/Observation/{id}"), &body)
                                .await
                                .status(),
                            StatusCode::OK
                        );
                    }
                    _ => {
                        assert_eq!(
                            s.delete("default", &format!("/Observation/{id}"))
                                .await
                                .status(),
                            StatusCode::NO_CONTENT
                        );
                    }
                }
            }
        })
    };
    let mut next = link(&first, "next");
    let mut pages = 1;
    while let Some(url) = next {
        let r = s.client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let b: Value = json(r).await;
        assert_eq!(b["total"], 40, "the total of the snapshot");
        seen.extend(ids(&b));
        values.extend(
            entries(&b, "match")
                .iter()
                .map(|e| e["resource"]["valueQuantity"]["value"].as_f64().unwrap()),
        );
        next = link(&b, "next");
        pages += 1;
        // Let the writer make progress between pages.
        tokio::task::yield_now().await;
    }
    writer.await.unwrap();
    assert_eq!(pages, 6);
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a match was repeated");
    assert_eq!(
        unique.into_iter().cloned().collect::<Vec<_>>(),
        original.keys().cloned().collect::<Vec<_>>(),
        "a match was skipped or added"
    );
    // Every page served the version of the snapshot, in the snapshot's order.
    let mut sorted_values = values.clone();
    sorted_values.sort_by(f64::total_cmp);
    assert_eq!(values, sorted_values);
    for (id, v) in seen.iter().zip(&values) {
        assert_eq!(original[id].parse::<f64>().unwrap(), *v);
    }
    // A new search sees the writes.
    let b = search(
        &s,
        "default",
        "/Observation?subject=Patient/pager&_summary=count",
    )
    .await;
    assert_eq!(b["total"], 40 - 13 + 14);
}

#[tokio::test]
async fn updates_and_deletes_leave_no_stale_entries() {
    let s = TestServer::start().await;
    let id = make(
        &s,
        "default",
        person("13031353453", "Nordmann", "Kari", "1970-01-01", "female"),
    )
    .await;
    assert_eq!(
        found(&s, "default", "/Patient?name=kari").await,
        [id.as_str()]
    );
    let mut p = person("13031353453", "Nordmann", "Ingrid", "1970-01-01", "female");
    p["id"] = json!(id);
    assert_eq!(
        s.put("default", &format!("/Patient/{id}"), &p)
            .await
            .status(),
        StatusCode::OK
    );
    assert!(
        found(&s, "default", "/Patient?name=kari").await.is_empty(),
        "matched on an old version's value"
    );
    assert_eq!(
        found(&s, "default", "/Patient?name=ingrid").await,
        [id.as_str()]
    );
    assert_eq!(
        search(&s, "default", "/Patient?_summary=count").await["total"],
        1
    );
    assert_eq!(
        s.delete("default", &format!("/Patient/{id}"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    for q in [
        "name=ingrid".to_string(),
        format!("_id={id}"),
        "identifier=13031353453".into(),
        String::new(),
    ] {
        assert!(
            found(&s, "default", &format!("/Patient?{q}"))
                .await
                .is_empty(),
            "deleted resource found by {q}"
        );
    }
    // Brought back by an update: found again, with its new content only.
    assert_eq!(
        s.put("default", &format!("/Patient/{id}"), &p)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        found(&s, "default", "/Patient?name=ingrid").await,
        [id.as_str()]
    );
    let b = search(&s, "default", "/Patient?name=ingrid").await;
    assert_eq!(
        entries(&b, "match")[0]["resource"]["meta"]["versionId"],
        "4"
    );
}

#[tokio::test]
async fn tenants_never_see_each_others_resources() {
    let s = TestServer::start().await;
    s.create_tenant("hf-a").await;
    s.create_tenant("hf-b").await;
    let mut pa = person("13031353453", "Nordmann", "Kari", "1970-01-01", "female");
    pa["id"] = json!("same-id");
    let mut pb = person("13031353453", "Nordmann", "Kari", "1970-01-01", "female");
    pb["id"] = json!("same-id");
    pb["gender"] = json!("other");
    assert_eq!(
        s.put("hf-a", "/Patient/same-id", &pa).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        s.put("hf-b", "/Patient/same-id", &pb).await.status(),
        StatusCode::CREATED
    );
    for i in 0..3 {
        make(
            &s,
            "hf-a",
            vital(
                "8867-4",
                "Patient/same-id",
                "2024-03-01",
                &format!("{}", 70 + i),
                "/min",
            ),
        )
        .await;
    }
    let a = search(&s, "hf-a", "/Patient?identifier=13031353453").await;
    let b = search(&s, "hf-b", "/Patient?identifier=13031353453").await;
    assert_eq!(entries(&a, "match").len(), 1);
    assert_eq!(entries(&a, "match")[0]["resource"]["gender"], "female");
    assert_eq!(entries(&b, "match")[0]["resource"]["gender"], "other");
    assert!(
        entries(&a, "match")[0]["fullUrl"]
            .as_str()
            .unwrap()
            .contains("/fhir/hf-a/")
    );
    assert!(found(&s, "hf-b", "/Observation").await.is_empty());
    assert!(
        found(&s, "hf-b", "/Patient?_has:Observation:subject:code=8867-4")
            .await
            .is_empty()
    );
    assert_eq!(
        found(&s, "hf-a", "/Patient?_has:Observation:subject:code=8867-4").await,
        ["same-id"]
    );
    assert!(
        found(&s, "hf-b", "/Patient/same-id/Observation")
            .await
            .is_empty()
    );
    // A page of one tenant's search is not served to another.
    let page = search(&s, "hf-a", "/Observation?_count=1").await;
    let next = link(&page, "next").unwrap();
    let other = next.replace("/fhir/hf-a", "/fhir/hf-b");
    let r = s.client.get(&other).send().await.unwrap();
    outcome(r, StatusCode::GONE).await;
    assert_eq!(
        s.client.get(&next).send().await.unwrap().status(),
        StatusCode::OK
    );

    // Removed and created again: the new tenant's log starts at 1 again, and nothing of the
    // old index may show.
    let r = s
        .client
        .delete(format!("{}/admin/tenants/hf-a", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    outcome(s.get("hf-a", "/Observation").await, StatusCode::NOT_FOUND).await;
    let r = s.client.get(&next).send().await.unwrap();
    outcome(r, StatusCode::NOT_FOUND).await;
    s.create_tenant("hf-a").await;
    assert!(found(&s, "hf-a", "/Observation").await.is_empty());
    let fresh = make(
        &s,
        "hf-a",
        vital("2708-6", "Patient/x", "2024-03-01", "97", "%"),
    )
    .await;
    assert_eq!(found(&s, "hf-a", "/Observation").await, [fresh]);
    assert!(found(&s, "hf-a", "/Patient").await.is_empty());
    assert_eq!(found(&s, "hf-b", "/Patient").await, ["same-id"]);
}

#[tokio::test]
async fn custom_search_parameters_work_after_reindex() {
    let s = TestServer::start().await;
    s.create_tenant("hf-other").await;
    let p = "Patient/p1";
    let q = "http://helse-nord.no/fhir/Questionnaire/smerte";
    let r1 = make(
        &s,
        "default",
        questionnaire_response(p, q, "2024-03-01T08:00:00+01:00", 3),
    )
    .await;
    let r2 = make(
        &s,
        "default",
        questionnaire_response(p, q, "2024-03-02T08:00:00+01:00", 7),
    )
    .await;
    let r3 = make(
        &s,
        "default",
        questionnaire_response(p, q, "2024-03-03T08:00:00+01:00", 8),
    )
    .await;
    let strict = |tenant: &'static str, path: &'static str| {
        s.client
            .get(s.fhir(tenant, path))
            .header("prefer", "handling=strict")
            .send()
    };
    outcome(
        strict("default", "/QuestionnaireResponse?pain=ge7")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;

    let sp = json!({
        "resourceType": "SearchParameter",
        "url": "http://helse-nord.no/fhir/SearchParameter/qr-pain",
        "name": "pain", "status": "active",
        "description": "The answer to the pain question (0-10)",
        "code": "pain", "base": ["QuestionnaireResponse"], "type": "number",
        "expression": "QuestionnaireResponse.item.where(linkId='pain').answer.value"
    });
    let sp_id = make(&s, "default", sp).await;
    make(
        &s,
        "default",
        json!({
            "resourceType": "SearchParameter",
            "url": "http://helse-nord.no/fhir/SearchParameter/qr-mood",
            "name": "mood", "status": "active", "description": "The mood answer",
            "code": "mood", "base": ["QuestionnaireResponse"], "type": "token",
            "expression": "QuestionnaireResponse.item.where(linkId='mood').answer.value"
        }),
    )
    .await;
    // Known at once; resources written from now on have its values, older ones after $reindex.
    let r4 = make(
        &s,
        "default",
        questionnaire_response(p, q, "2024-03-04T08:00:00+01:00", 9),
    )
    .await;
    assert_eq!(
        found(&s, "default", "/QuestionnaireResponse?pain=ge7").await,
        [r4.as_str()]
    );
    let r = s
        .client
        .post(s.fhir("default", "/QuestionnaireResponse/$reindex"))
        .send()
        .await
        .unwrap();
    let oo = outcome(r, StatusCode::OK).await;
    assert!(
        issues_text(&oo).contains("reindexed 4 QuestionnaireResponse"),
        "{oo}"
    );
    assert_eq!(
        found(&s, "default", "/QuestionnaireResponse?pain=ge7").await,
        sorted(&[&r2, &r3, &r4])
    );
    assert_eq!(
        found(&s, "default", "/QuestionnaireResponse?pain=3").await,
        [r1.as_str()]
    );
    assert_eq!(
        found(
            &s,
            "default",
            "/QuestionnaireResponse?mood=urn:test:mood|ok&pain=lt8"
        )
        .await,
        sorted(&[&r1, &r2])
    );
    assert_eq!(
        ids(&search(&s, "default", "/QuestionnaireResponse?_sort=-pain").await),
        [r4.clone(), r3.clone(), r2.clone(), r1.clone()]
    );
    // Only in its own tenant.
    outcome(
        strict("hf-other", "/QuestionnaireResponse?pain=ge7")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
    // System-level $reindex works too; a deleted SearchParameter is gone.
    let r = s
        .client
        .post(s.fhir("default", "/$reindex"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        s.delete("default", &format!("/SearchParameter/{sp_id}"))
            .await
            .status(),
        StatusCode::NO_CONTENT
    );
    make(
        &s,
        "default",
        questionnaire_response(p, q, "2024-03-05T08:00:00+01:00", 1),
    )
    .await;
    outcome(
        strict("default", "/QuestionnaireResponse?pain=ge7")
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conditional_operations_on_any_criteria_stay_atomic() {
    let s = Arc::new(TestServer::start().await);
    let criteria =
        "code=http://loinc.org|8867-4&subject=Patient/p-cc&date=2024-03-01T10:00:00%2B01:00";
    let body = vital(
        "8867-4",
        "Patient/p-cc",
        "2024-03-01T10:00:00+01:00",
        "72",
        "/min",
    );
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (s, body) = (s.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let r = s
                .client
                .post(s.fhir("default", "/Observation"))
                .header("content-type", FHIR_JSON)
                .header("if-none-exist", criteria)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status();
            (status, json(r).await["id"].as_str().unwrap().to_string())
        }));
    }
    let mut created = 0;
    let mut seen = BTreeSet::new();
    for t in tasks {
        let (status, id) = t.await.unwrap();
        match status {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}"),
        }
        seen.insert(id);
    }
    assert_eq!(created, 1, "exactly one conditional create creates");
    assert_eq!(seen.len(), 1, "every answer names the same resource");
    let id = seen.into_iter().next().unwrap();
    assert_eq!(
        found(&s, "default", "/Observation?subject=Patient/p-cc").await,
        [id.as_str()]
    );

    // Conditional update and delete on search criteria.
    let upd = vital(
        "8867-4",
        "Patient/p-cc",
        "2024-03-01T10:00:00+01:00",
        "75",
        "/min",
    );
    let r = s
        .put(
            "default",
            "/Observation?subject=Patient/p-cc&code=8867-4",
            &upd,
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await["id"], json!(id));
    let r = s
        .put(
            "default",
            "/Observation?subject=Patient/p-cc&value-quantity=gt100",
            &upd,
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "no match creates");
    let r = s
        .put(
            "default",
            "/Observation?subject=Patient/p-cc&code=8867-4",
            &upd,
        )
        .await;
    outcome(r, StatusCode::PRECONDITION_FAILED).await;
    let r = s
        .delete("default", "/Observation?subject=Patient/p-cc&code=8867-4")
        .await;
    outcome(r, StatusCode::PRECONDITION_FAILED).await;
    let r = s
        .delete(
            "default",
            &format!("/Observation?subject=Patient/p-cc&_lastUpdated=ge2020&_id={id}"),
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        found(&s, "default", "/Observation?subject=Patient/p-cc")
            .await
            .len(),
        1
    );
    let r = s
        .delete("default", "/Observation?subject=Patient/nobody&code=8867-4")
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // Criteria are checked strictly: an unknown parameter is an error, not "match all".
    let r = s.delete("default", "/Observation?colour=blue").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
}
