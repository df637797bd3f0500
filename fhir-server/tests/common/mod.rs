//! A real server on a loopback socket over a temporary data folder, and small HTTP helpers.
#![allow(dead_code)]

pub mod auth;
pub mod binary;

use fhir_core::TenantId;
use fhir_server::{AppState, ServerConfig};
use fhir_store::Store;
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;

pub const FHIR_JSON: &str = "application/fhir+json";
pub const FHIR_XML: &str = "application/fhir+xml";

pub struct TestServer {
    /// `http://127.0.0.1:port`
    pub url: String,
    pub client: Client,
    pub store: Store,
    pub search: fhir_search::SearchIndex,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(ServerConfig::default()).await
    }

    pub async fn start_with(config: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        store
            .create_tenant(&TenantId::new("default").unwrap(), "Default")
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = AppState::open(store.clone(), config, &dir.path().join("index")).unwrap();
        let search = state.search.clone();
        tokio::spawn(async move {
            axum::serve(listener, fhir_server::app(state))
                .await
                .unwrap();
        });
        TestServer {
            url: format!("http://{addr}"),
            client: Client::new(),
            store,
            search,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:port/fhir/{tenant}` + path
    pub fn fhir(&self, tenant: &str, path: &str) -> String {
        format!("{}/fhir/{tenant}{path}", self.url)
    }

    pub async fn create_tenant(&self, id: &str) {
        let r = self
            .client
            .post(format!("{}/admin/tenants", self.url))
            .json(&serde_json::json!({"id": id, "name": format!("Trust {id}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "creating tenant {id}");
    }

    pub async fn post(&self, tenant: &str, path: &str, body: &Value) -> Response {
        self.client
            .post(self.fhir(tenant, path))
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn put(&self, tenant: &str, path: &str, body: &Value) -> Response {
        self.client
            .put(self.fhir(tenant, path))
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, tenant: &str, path: &str) -> Response {
        self.client
            .get(self.fhir(tenant, path))
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, tenant: &str, path: &str) -> Response {
        self.client
            .delete(self.fhir(tenant, path))
            .send()
            .await
            .unwrap()
    }

    /// Creates a resource and returns its JSON as stored.
    pub async fn create(&self, tenant: &str, body: &Value) -> Value {
        let rt = body["resourceType"].as_str().unwrap();
        let r = self.post(tenant, &format!("/{rt}"), body).await;
        assert_eq!(r.status(), StatusCode::CREATED, "create {rt}");
        r.json().await.unwrap()
    }
}

pub async fn json(r: Response) -> Value {
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// Asserts an OperationOutcome response with `status` and returns the outcome.
pub async fn outcome(r: Response, status: StatusCode) -> Value {
    assert_eq!(r.status(), status, "status");
    let ct = r
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let v = json(r).await;
    assert_eq!(v["resourceType"], "OperationOutcome", "body: {v}");
    assert!(ct.starts_with("application/fhir+json"), "content-type {ct}");
    v
}

/// All diagnostics and expressions of an OperationOutcome, joined, for `contains` checks.
pub fn issues_text(oo: &Value) -> String {
    oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            format!(
                "{} {} {}",
                i["code"].as_str().unwrap_or(""),
                i["diagnostics"].as_str().unwrap_or(""),
                i["expression"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn observation(system_value: &str, value: &str) -> Value {
    let v: Value = serde_json::from_str(&format!(
        r#"{{
        "resourceType": "Observation",
        "identifier": [{{"system": "urn:oid:2.16.578.1.12.4.1.1.9999", "value": "{system_value}"}}],
        "status": "final",
        "category": [{{"coding": [{{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}}]}}],
        "code": {{"coding": [{{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}}]}},
        "subject": {{"reference": "Patient/p1"}},
        "effectiveDateTime": "2024-03-01T10:00:00+01:00",
        "valueQuantity": {{"value": {value}, "unit": "beats/minute", "system": "http://unitsofmeasure.org", "code": "/min"}}
    }}"#
    ))
    .unwrap();
    v
}

pub fn patient(fnr: &str) -> Value {
    serde_json::json!({
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": fnr}],
        "name": [{"family": "Nordmann", "given": ["Kari"]}],
        "gender": "female",
        "birthDate": "1970-01-01"
    })
}

/// The `next` link of a Bundle, if it has one.
pub fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}
