//! The limit: a minimal axum server that answers every request with the bytes the real server
//! gave for it, held in memory — no parsing, no validation, no store, no index.
//!
//! It runs the same HTTP stack (axum, hyper, tokio) on the same machine, so the figure of the
//! real server divided by the baseline's is the share of the machine's HTTP capacity that FHIR
//! work leaves: a ratio near 1 means the server is as fast as serving bytes from memory can be.
//!
//! Request bodies are read to the end, as the real server must, and then dropped. Responses are
//! looked up by [`record_key`]; anything not recorded is a 404.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::Response;

use crate::load::{Recorded, record_key};

/// The baseline router over recorded responses.
pub fn router(responses: HashMap<String, Recorded>) -> Router {
    Router::new()
        .fallback(serve)
        .layer(DefaultBodyLimit::disable())
        .with_state(Arc::new(responses))
}

async fn serve(
    State(responses): State<Arc<HashMap<String, Recorded>>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    // The body has been read in full by the extractor; that is all the work it gets.
    drop(body);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(r) = responses.get(&record_key(method.as_str(), path)) else {
        let mut resp = Response::new(Body::from("not recorded"));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return resp;
    };
    let mut resp = Response::new(Body::from(r.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::OK);
    if let Some(ct) = r
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::RunningServer;

    #[test]
    fn serves_recorded_bytes_and_404_otherwise() {
        let mut m = HashMap::new();
        m.insert(
            record_key("GET", "/fhir/t/Observation?code=a%7Cb"),
            Recorded {
                status: 200,
                content_type: Some("application/fhir+json".into()),
                body: Bytes::from_static(b"{\"resourceType\":\"Bundle\"}"),
            },
        );
        m.insert(
            record_key("POST", "/fhir/t"),
            Recorded {
                status: 200,
                content_type: None,
                body: Bytes::from_static(b"batch"),
            },
        );
        let server = RunningServer::router(router(m), "baseline-test").unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let c = crate::load::client(1, None).unwrap();
            let r = c
                .get(format!("{}/fhir/t/Observation?code=a%7Cb", server.origin()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(
                r.headers()["content-type"].to_str().unwrap(),
                "application/fhir+json"
            );
            assert_eq!(r.text().await.unwrap(), "{\"resourceType\":\"Bundle\"}");
            let r = c
                .post(format!("{}/fhir/t", server.origin()))
                .body(vec![b'x'; 100_000])
                .send()
                .await
                .unwrap();
            assert_eq!(r.text().await.unwrap(), "batch");
            let r = c
                .get(format!("{}/fhir/t/Patient", server.origin()))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 404);
        });
    }
}
