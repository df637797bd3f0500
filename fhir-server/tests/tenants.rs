//! Tenants: admin API, and strict isolation between hospital trusts.

mod common;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn admin_api_creates_lists_and_removes_tenants() {
    let s = TestServer::start().await;
    s.create_tenant("hf-a").await;
    let r = s
        .client
        .post(format!("{}/admin/tenants", s.url))
        .json(&json!({"id": "hf-a", "name": "again"}))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::CONFLICT).await;
    let r = s
        .client
        .post(format!("{}/admin/tenants", s.url))
        .json(&json!({"id": "bad id!", "name": "x"}))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s
        .client
        .post(format!("{}/admin/tenants", s.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::BAD_REQUEST).await;
    let list: Vec<Value> = s
        .client
        .get(format!("{}/admin/tenants", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<_> = list.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["default", "hf-a"]);
    assert_eq!(list[1]["name"], "Trust hf-a");

    let c = s.create("hf-a", &patient("12345678901")).await;
    let id = c["id"].as_str().unwrap();
    let r = s
        .client
        .delete(format!("{}/admin/tenants/hf-a", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.get("hf-a", &format!("/Patient/{id}")).await;
    let oo = outcome(r, StatusCode::NOT_FOUND).await;
    assert!(issues_text(&oo).contains("unknown tenant"));
    let r = s
        .client
        .delete(format!("{}/admin/tenants/hf-a", s.url))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::NOT_FOUND).await;
    // Re-creating the tenant does not bring old data back.
    s.create_tenant("hf-a").await;
    let r = s.get("hf-a", &format!("/Patient/{id}")).await;
    outcome(r, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn unknown_tenant_is_404_everywhere() {
    let s = TestServer::start().await;
    for (method, path) in [
        ("GET", "/Patient/1"),
        ("GET", "/Patient/1/_history"),
        ("GET", "/Patient/_history"),
        ("GET", "/_history"),
        ("GET", "/metadata"),
        ("POST", "/Patient"),
        ("DELETE", "/Patient/1"),
    ] {
        let rb = match method {
            "GET" => s.client.get(s.fhir("hf-nowhere", path)),
            "DELETE" => s.client.delete(s.fhir("hf-nowhere", path)),
            _ => s
                .client
                .post(s.fhir("hf-nowhere", path))
                .header("content-type", FHIR_JSON)
                .body(patient("1").to_string()),
        };
        let r = rb.send().await.unwrap();
        let oo = outcome(r, StatusCode::NOT_FOUND).await;
        assert!(issues_text(&oo).contains("hf-nowhere"), "{method} {path}");
    }
    let r = s.get("bad%20tenant", "/Patient/1").await;
    outcome(r, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn same_id_in_two_tenants_is_two_resources() {
    let s = TestServer::start().await;
    s.create_tenant("hf-a").await;
    s.create_tenant("hf-b").await;
    let mut pa = patient("11111111111");
    pa["id"] = json!("shared");
    let mut pb = patient("22222222222");
    pb["id"] = json!("shared");
    assert_eq!(
        s.put("hf-a", "/Patient/shared", &pa).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        s.put("hf-b", "/Patient/shared", &pb).await.status(),
        StatusCode::CREATED
    );
    let a = json(s.get("hf-a", "/Patient/shared").await).await;
    let b = json(s.get("hf-b", "/Patient/shared").await).await;
    assert_eq!(a["identifier"][0]["value"], "11111111111");
    assert_eq!(b["identifier"][0]["value"], "22222222222");
    assert_eq!(a["meta"]["versionId"], "1");
    assert_eq!(b["meta"]["versionId"], "1");

    // A's only-resource is invisible from B: read, vread, history, conditional ops, errors.
    let only_a = s.create("hf-a", &patient("33333333333")).await;
    let id = only_a["id"].as_str().unwrap();
    let r = s.get("hf-b", &format!("/Patient/{id}")).await;
    let oo = outcome(r, StatusCode::NOT_FOUND).await;
    assert!(
        !issues_text(&oo).contains("hf-a"),
        "no mention of the other tenant"
    );
    let r = s.get("hf-b", &format!("/Patient/{id}/_history/1")).await;
    outcome(r, StatusCode::NOT_FOUND).await;
    let r = s.get("hf-b", &format!("/Patient/{id}/_history")).await;
    outcome(r, StatusCode::NOT_FOUND).await;
    let h = json(s.get("hf-b", "/_history").await).await;
    let entries = h["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0]["resource"]["identifier"][0]["value"],
        "22222222222"
    );
    let found = json(s.get("hf-b", "/Patient?identifier=33333333333").await).await;
    assert_eq!(found["total"], 0);
    // Conditional create in B does not see A's identifier.
    let r = s
        .client
        .post(s.fhir("hf-b", "/Patient"))
        .header("content-type", FHIR_JSON)
        .header("if-none-exist", "identifier=33333333333")
        .body(patient("33333333333").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // Deleting in B leaves A alone.
    assert_eq!(
        s.delete("hf-b", "/Patient/shared").await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        s.get("hf-a", "/Patient/shared").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        s.get("hf-b", "/Patient/shared").await.status(),
        StatusCode::GONE
    );
}
