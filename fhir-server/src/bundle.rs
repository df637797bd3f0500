//! Response Bundles (history, searchset, batch-response, transaction-response) as HTTP
//! responses.
//!
//! The builder itself lives in [`fhir_store::bundle`], so that the library's Bundle processor
//! and the server share it: compact JSON splices the stored bytes of each resource in as they
//! are (design invariant 7); pretty JSON and XML go through the tree.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
pub use fhir_store::bundle::{BundleBuilder, Entry, EntryResponse};

use crate::error::ApiError;
use crate::format::{Format, Negotiated, render_tree};

/// Rendering a [`BundleBuilder`] as a `200` response in the negotiated format.
pub trait BundleResponse {
    /// The Bundle as a response.
    fn into_fhir_response(self, neg: Negotiated) -> Response;
}

impl BundleResponse for BundleBuilder {
    fn into_fhir_response(self, neg: Negotiated) -> Response {
        if neg.format == Format::Json && !neg.pretty {
            let mut resp = Response::new(Body::from(self.to_compact_json()));
            *resp.status_mut() = StatusCode::OK;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(Format::Json.content_type()),
            );
            return resp;
        }
        match self.to_tree() {
            Ok(tree) => render_tree(&tree, neg.format, neg.pretty),
            Err(e) => ApiError::Internal(format!("stored resource: {e}")).into_response(),
        }
    }
}
