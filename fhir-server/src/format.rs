//! Content negotiation: which format a client sends and wants, reading bodies within limits,
//! and rendering resources and trees as JSON or XML.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use fhir_core::{IssueType, Json, Resource};

use crate::error::ApiError;

/// A wire format of FHIR resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/fhir+json`
    Json,
    /// `application/fhir+xml`
    Xml,
}

impl Format {
    /// The `Content-Type` of responses in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/fhir+json; charset=utf-8",
            Format::Xml => "application/fhir+xml; charset=utf-8",
        }
    }

    /// The format a media type (or `_format` value) stands for, if any.
    pub fn from_mime(mime: &str) -> Option<Format> {
        let essence = mime
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "json" | "application/json" | "application/fhir+json" | "application/json+fhir" => {
                Some(Format::Json)
            }
            "xml"
            | "text/xml"
            | "application/xml"
            | "application/fhir+xml"
            | "application/xml+fhir" => Some(Format::Xml),
            _ => None,
        }
    }
}

/// What the client asked to get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Output format.
    pub format: Format,
    /// Indented output (`_pretty=true`).
    pub pretty: bool,
}

impl Default for Negotiated {
    fn default() -> Self {
        Negotiated {
            format: Format::Json,
            pretty: false,
        }
    }
}

/// Chooses the output format from `_format` (which wins) and `Accept`.
///
/// An `Accept` naming nothing we serve falls back to JSON, as HAPI does, so browsers and
/// generic clients still get an answer; an explicit `_format` we cannot serve is a 406.
pub fn negotiate(params: &[(String, String)], headers: &HeaderMap) -> Result<Negotiated, ApiError> {
    let mut n = Negotiated::default();
    if let Some((_, v)) = params.iter().find(|(k, _)| k == "_pretty") {
        n.pretty = match v.as_str() {
            "true" => true,
            "false" => false,
            other => {
                return Err(ApiError::bad_request(
                    IssueType::Value,
                    format!("_pretty must be true or false, not '{other}'"),
                ));
            }
        };
    }
    if let Some((_, v)) = params.iter().find(|(k, _)| k == "_format") {
        n.format = Format::from_mime(v).ok_or_else(|| {
            ApiError::NotAcceptable(format!("_format '{v}' is not supported; use json or xml"))
        })?;
        return Ok(n);
    }
    if let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let mime = parts.next().unwrap_or("").trim();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            if let Some(f) = Format::from_mime(mime)
                && q > 0.0
                && best.is_none_or(|(bq, _)| q > bq)
            {
                best = Some((q, f));
            }
        }
        if let Some((_, f)) = best {
            n.format = f;
        }
    }
    Ok(n)
}

/// Reads a request body, refusing more than `limit` bytes with a 413 before reading it all.
pub async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ApiError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // to_bytes reports the length limit through its error source chain.
        let mut src: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = src {
            if s.is::<http_body_util::LengthLimitError>() {
                return ApiError::PayloadTooLarge(limit);
            }
            src = s.source();
        }
        ApiError::bad_request(
            IssueType::Structure,
            format!("could not read the request body: {e}"),
        )
    })
}

/// The format of a request body, from `Content-Type`.
pub fn body_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::UnsupportedMediaType(
                "a Content-Type header is required: application/fhir+json or application/fhir+xml"
                    .into(),
            )
        })?;
    Format::from_mime(ct).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!(
            "Content-Type '{ct}' is not supported; use application/fhir+json or application/fhir+xml"
        ))
    })
}

/// Parses and validates a resource body in the format its `Content-Type` names.
pub fn parse_resource(headers: &HeaderMap, body: &[u8]) -> Result<Resource, ApiError> {
    let format = body_format(headers)?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            IssueType::Required,
            "the request body is empty; a resource is required",
        ));
    }
    Ok(match format {
        Format::Json => Resource::from_json_bytes(body)?,
        Format::Xml => Resource::from_xml_bytes(body)?,
    })
}

fn response(status: StatusCode, format: Format, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    resp
}

/// A JSON tree as a 200 response in the negotiated format.
pub fn render_tree(tree: &Json, format: Format, pretty: bool) -> Response {
    let bytes = match format {
        Format::Json if pretty => tree.to_pretty_bytes(),
        Format::Json => tree.to_bytes(),
        Format::Xml => match fhir_core::xml::to_xml(tree, pretty) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "could not render XML");
                return ApiError::Internal(e.to_string()).into_response_as(Format::Json, false);
            }
        },
    };
    response(StatusCode::OK, format, bytes)
}

/// Stored resource bytes as a 200 response. Compact JSON is served as stored, without
/// re-serialising (design invariant 7).
pub fn render_stored(json: &[u8], format: Format, pretty: bool) -> Response {
    match (format, pretty) {
        (Format::Json, false) => response(StatusCode::OK, format, json.to_vec()),
        _ => match fhir_core::json::parse(json) {
            Ok(tree) => render_tree(&tree, format, pretty),
            Err(e) => ApiError::Internal(format!("stored resource is not JSON: {e}"))
                .into_response_as(Format::Json, false),
        },
    }
}

/// Serialises a tree compactly as JSON (for building bundles around raw resource bytes).
pub fn render_json(tree: &Json, pretty: bool) -> Vec<u8> {
    if pretty {
        tree.to_pretty_bytes()
    } else {
        tree.to_bytes()
    }
}
