//! Building response Bundles (history, searchset) around stored resource bytes.
//!
//! For compact JSON the stored bytes of each resource are spliced in as they are, so a page of
//! history costs no parse or re-serialisation per resource (design invariant 7). Pretty JSON
//! and XML go through the tree.

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use fhir_core::{Json, Map};

use crate::error::ApiError;
use crate::format::{Format, Negotiated, render_tree};

/// `Bundle.entry.response`
#[derive(Debug, Clone)]
pub struct EntryResponse {
    /// e.g. `201 Created`
    pub status: String,
    /// `W/"n"`
    pub etag: Option<String>,
    /// instant
    pub last_modified: Option<String>,
    /// Location of a created resource.
    pub location: Option<String>,
}

/// One entry of a response Bundle.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// `Bundle.entry.fullUrl`
    pub full_url: Option<String>,
    /// Stored JSON bytes of the resource, if any.
    pub resource: Option<Vec<u8>>,
    /// `Bundle.entry.search.mode`
    pub search_mode: Option<&'static str>,
    /// `Bundle.entry.request` (method, url)
    pub request: Option<(String, String)>,
    /// `Bundle.entry.response`
    pub response: Option<EntryResponse>,
}

/// A Bundle to send back.
#[derive(Debug, Clone)]
pub struct BundleBuilder {
    /// `Bundle.type`
    pub bundle_type: &'static str,
    /// `Bundle.total`
    pub total: Option<u64>,
    /// `Bundle.link` (relation, url)
    pub links: Vec<(&'static str, String)>,
    /// The entries.
    pub entries: Vec<Entry>,
}

impl BundleBuilder {
    /// An empty Bundle of the given type.
    pub fn new(bundle_type: &'static str) -> BundleBuilder {
        BundleBuilder {
            bundle_type,
            total: None,
            links: Vec::new(),
            entries: Vec::new(),
        }
    }

    fn head(&self) -> Map {
        let mut root = Map::new();
        root.insert("resourceType", Json::str("Bundle"));
        root.insert("id", Json::str(uuid::Uuid::new_v4().to_string()));
        let mut meta = Map::new();
        meta.insert("lastUpdated", Json::str(crate::now_instant()));
        root.insert("meta", Json::Object(meta));
        root.insert("type", Json::str(self.bundle_type));
        if let Some(t) = self.total {
            root.insert("total", Json::Number(t.to_string()));
        }
        if !self.links.is_empty() {
            let links = self
                .links
                .iter()
                .map(|(rel, url)| {
                    let mut m = Map::new();
                    m.insert("relation", Json::str(*rel));
                    m.insert("url", Json::str(url.clone()));
                    Json::Object(m)
                })
                .collect();
            root.insert("link", Json::Array(links));
        }
        root
    }

    /// The entry's members other than `fullUrl` and `resource`, in FHIR order.
    fn entry_tail(e: &Entry) -> Map {
        let mut m = Map::new();
        if let Some(mode) = e.search_mode {
            let mut s = Map::new();
            s.insert("mode", Json::str(mode));
            m.insert("search", Json::Object(s));
        }
        if let Some((method, url)) = &e.request {
            let mut r = Map::new();
            r.insert("method", Json::str(method.clone()));
            r.insert("url", Json::str(url.clone()));
            m.insert("request", Json::Object(r));
        }
        if let Some(resp) = &e.response {
            let mut r = Map::new();
            r.insert("status", Json::str(resp.status.clone()));
            if let Some(l) = &resp.location {
                r.insert("location", Json::str(l.clone()));
            }
            if let Some(t) = &resp.etag {
                r.insert("etag", Json::str(t.clone()));
            }
            if let Some(t) = &resp.last_modified {
                r.insert("lastModified", Json::str(t.clone()));
            }
            m.insert("response", Json::Object(r));
        }
        m
    }

    /// The Bundle as a tree (parses each resource).
    pub fn to_tree(&self) -> Result<Json, ApiError> {
        let mut root = self.head();
        if !self.entries.is_empty() {
            let mut entries = Vec::with_capacity(self.entries.len());
            for e in &self.entries {
                let mut m = Map::new();
                if let Some(u) = &e.full_url {
                    m.insert("fullUrl", Json::str(u.clone()));
                }
                if let Some(raw) = &e.resource {
                    let tree = fhir_core::json::parse(raw)
                        .map_err(|err| ApiError::Internal(format!("stored resource: {err}")))?;
                    m.insert("resource", tree);
                }
                for (k, v) in Self::entry_tail(e).iter() {
                    m.insert(k, v.clone());
                }
                entries.push(Json::Object(m));
            }
            root.insert("entry", Json::Array(entries));
        }
        Ok(Json::Object(root))
    }

    /// Compact JSON with the stored resource bytes spliced in.
    pub fn to_compact_json(&self) -> Vec<u8> {
        let head = Json::Object(self.head()).to_bytes();
        if self.entries.is_empty() {
            return head;
        }
        let mut out = Vec::with_capacity(
            head.len()
                + self
                    .entries
                    .iter()
                    .map(|e| e.resource.as_ref().map_or(0, Vec::len) + 200)
                    .sum::<usize>(),
        );
        // `head` is an object serialisation and so ends with '}'.
        out.extend_from_slice(&head[..head.len() - 1]);
        out.extend_from_slice(b",\"entry\":[");
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'{');
            let mut first = true;
            if let Some(u) = &e.full_url {
                let mut s = String::new();
                fhir_core::json::write_string(&mut s, u);
                out.extend_from_slice(b"\"fullUrl\":");
                out.extend_from_slice(s.as_bytes());
                first = false;
            }
            if let Some(raw) = &e.resource {
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(b"\"resource\":");
                out.extend_from_slice(raw);
                first = false;
            }
            let tail = Json::Object(Self::entry_tail(e)).to_bytes();
            // `tail` is `{...}`: splice its members in after ours.
            if tail.len() > 2 {
                if !first {
                    out.push(b',');
                }
                out.extend_from_slice(&tail[1..tail.len() - 1]);
            }
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// The Bundle as a response in the negotiated format.
    pub fn into_response(self, neg: Negotiated) -> Response {
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
            Err(e) => e.into_response(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_splice_equals_tree_serialisation() {
        let mut b = BundleBuilder::new("history");
        b.links.push(("self", "http://x/fhir/t/_history".into()));
        b.entries.push(Entry {
            full_url: Some("http://x/fhir/t/Patient/1".into()),
            resource: Some(
                br#"{"resourceType":"Patient","id":"1","birthDate":"1970-01-01"}"#.to_vec(),
            ),
            request: Some(("PUT".into(), "Patient/1".into())),
            response: Some(EntryResponse {
                status: "200 OK".into(),
                etag: Some("W/\"2\"".into()),
                last_modified: Some("2024-01-01T00:00:00Z".into()),
                location: None,
            }),
            ..Entry::default()
        });
        b.entries.push(Entry {
            full_url: Some("http://x/fhir/t/Patient/2".into()),
            request: Some(("DELETE".into(), "Patient/2".into())),
            ..Entry::default()
        });
        let compact = fhir_core::json::parse(&b.to_compact_json()).unwrap();
        let mut tree = b.to_tree().unwrap();
        // The two renderings were made at different moments: compare all but id/meta.
        tree.as_object_mut().unwrap().remove("id");
        tree.as_object_mut().unwrap().remove("meta");
        let mut compact = compact;
        compact.as_object_mut().unwrap().remove("id");
        compact.as_object_mut().unwrap().remove("meta");
        assert_eq!(compact, tree);
        assert_eq!(
            compact.get("entry").unwrap().as_array().unwrap()[0]
                .get("resource")
                .unwrap()
                .get("birthDate")
                .unwrap()
                .as_str(),
            Some("1970-01-01")
        );
    }
}
