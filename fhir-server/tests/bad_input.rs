//! Bad input gets a 4xx OperationOutcome saying what is wrong and where, and writes nothing.

mod common;

use common::*;
use fhir_server::ServerConfig;
use reqwest::StatusCode;
use serde_json::json;

async fn post_raw(
    s: &TestServer,
    path: &str,
    ct: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut rb = s.client.post(s.fhir("default", path)).body(body);
    if let Some(ct) = ct {
        rb = rb.header("content-type", ct);
    }
    rb.send().await.unwrap()
}

async fn assert_nothing_written(s: &TestServer) {
    let h = json(s.get("default", "/_history").await).await;
    assert!(h.get("entry").is_none(), "nothing may be written: {h}");
}

#[tokio::test]
async fn malformed_and_invalid_bodies_are_400_with_location() {
    let s = TestServer::start().await;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed JSON",
            "{\"resourceType\": \"Observation\",".into(),
            "malformed JSON",
        ),
        ("not an object", "[1,2]".into(), "object"),
        (
            "unknown element",
            observation_with("fooBar", json!(1)),
            "Observation.fooBar",
        ),
        (
            "wrong type",
            observation_with("status", json!(1)),
            "Observation.status",
        ),
        (
            "quoted decimal",
            observation_with("valueQuantity", json!({"value": "72.5"})),
            "Observation.valueQuantity.value",
        ),
        (
            "bad date",
            observation_with("effectiveDateTime", json!("2024-13-01")),
            "Observation.effective",
        ),
        (
            "not a date",
            observation_with("effectiveDateTime", json!("not-a-date")),
            "Observation.effective",
        ),
        (
            "bad code",
            observation_with("status", json!("bogus")),
            "Observation.status",
        ),
        (
            "empty string",
            observation_with("language", json!("")),
            "Observation.language",
        ),
        (
            "empty array",
            observation_with("category", json!([])),
            "Observation.category",
        ),
        ("missing status", without("status"), "Observation.status"),
        (
            "missing resourceType",
            without("resourceType"),
            "resourceType",
        ),
    ];
    for (what, body, needle) in cases {
        let r = post_raw(&s, "/Observation", Some(FHIR_JSON), body).await;
        let oo = outcome(r, StatusCode::BAD_REQUEST).await;
        let text = issues_text(&oo);
        assert!(
            text.contains(needle),
            "{what}: expected '{needle}' in {text}"
        );
    }
    assert_nothing_written(&s).await;
}

fn observation_with(key: &str, value: serde_json::Value) -> String {
    let mut o = observation("bad", "1");
    o[key] = value;
    o.to_string()
}

fn without(key: &str) -> String {
    let mut o = observation("bad", "1");
    o.as_object_mut().unwrap().remove(key);
    o.to_string()
}

#[tokio::test]
async fn url_and_body_must_agree() {
    let s = TestServer::start().await;
    // resourceType not matching the URL.
    let r = s.post("default", "/Patient", &observation("x", "1")).await;
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert!(issues_text(&oo).contains("Observation"));
    // Update: id in body must match the URL, and must be there.
    let mut p = patient("12345678901");
    p["id"] = json!("a");
    let r = s.put("default", "/Patient/b", &p).await;
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert!(issues_text(&oo).contains("does not match"));
    let r = s
        .put("default", "/Patient/b", &patient("12345678901"))
        .await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s.put("default", "/Patient/bad$id", &p).await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    // Unknown resource type.
    let r = s
        .post("default", "/Foo", &json!({"resourceType": "Foo"}))
        .await;
    let oo = outcome(r, StatusCode::NOT_FOUND).await;
    assert!(issues_text(&oo).contains("Foo"));
    let r = s.get("default", "/Foo/1").await;
    outcome(r, StatusCode::NOT_FOUND).await;
    // An abstract type is not a resource type either.
    let r = s.get("default", "/DomainResource/1").await;
    outcome(r, StatusCode::NOT_FOUND).await;
    assert_nothing_written(&s).await;
}

#[tokio::test]
async fn content_type_and_size_limits() {
    let s = TestServer::start_with(ServerConfig {
        max_body_bytes: 4096,
        ..ServerConfig::default()
    })
    .await;
    let body = observation("ct", "1").to_string();
    let r = post_raw(&s, "/Observation", Some("text/plain"), body.clone()).await;
    outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = post_raw(&s, "/Observation", None, body.clone()).await;
    outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let r = post_raw(&s, "/Observation", Some("application/json"), body.clone()).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "plain application/json is FHIR JSON"
    );
    let r = post_raw(&s, "/Observation", Some(FHIR_JSON), "").await;
    outcome(r, StatusCode::BAD_REQUEST).await;

    let mut big = observation("big", "1");
    big["note"] = json!([{"text": "x".repeat(10_000)}]);
    let r = post_raw(&s, "/Observation", Some(FHIR_JSON), big.to_string()).await;
    outcome(r, StatusCode::PAYLOAD_TOO_LARGE).await;
    // Without Content-Length (chunked), the limit still holds.
    let payload = big.to_string();
    let (head, tail) = payload.split_at(3000);
    let raw = format!(
        "POST /fhir/default/Observation HTTP/1.1\r\nHost: localhost\r\nContent-Type: {FHIR_JSON}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{head}\r\n{:x}\r\n{tail}\r\n0\r\n\r\n",
        head.len(),
        tail.len()
    );
    let answer = raw_http(&s, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("OperationOutcome"), "{answer}");
    let h = json(s.get("default", "/Observation/_history").await).await;
    assert_eq!(h["entry"].as_array().unwrap().len(), 1, "only the good one");
}

async fn raw_http(s: &TestServer, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = s.url.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn unknown_routes_methods_and_formats() {
    let s = TestServer::start().await;
    let r = s
        .client
        .get(format!("{}/nothing/here", s.url))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::NOT_FOUND).await;
    let r = s
        .client
        .patch(s.fhir("default", "/_history"))
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::METHOD_NOT_ALLOWED).await;
    let r = s.get("default", "/Patient/1?_pretty=maybe").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s.get("default", "/_history?_unknown=1").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    // A search without criteria lists every Patient; a malformed value is the client's error.
    let r = s.get("default", "/Patient").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(json(r).await["type"], "searchset");
    let r = s.get("default", "/Patient?birthdate=not-a-date").await;
    outcome(r, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn hostile_json_never_hurts() {
    let s = TestServer::start().await;
    let deep = format!(
        "{{\"resourceType\":\"Basic\",\"code\":{}1{}}}",
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let bad_utf8 = b"{\"resourceType\":\"Basic\",\"code\":{\"text\":\"\xff\"}}".to_vec();
    for body in [
        deep.into_bytes(),
        bad_utf8,
        b"\0\0\0".to_vec(),
        b"{\"resourceType\":\"Basic\",\"code\":{\"text\":\"a\"},\"code\":{}}".to_vec(),
    ] {
        let r = post_raw(&s, "/Basic", Some(FHIR_JSON), body).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }
    assert_nothing_written(&s).await;
}
