//! `_summary` and `_elements`: the only place search results are re-serialised (design
//! invariant 7 names them as the exception). A shortened resource is marked with the
//! `SUBSETTED` tag, as FHIR asks.

use fhir_core::json::{self, Json, Map};
use fhir_core::schema::Schema;

use crate::request::Summary;

const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Elements every view keeps.
fn always(key: &str) -> bool {
    matches!(key, "resourceType" | "id" | "meta")
}

/// The base element name of a JSON member (`valueQuantity` → `value`, `_status` → `status`).
fn element_of(resource_type: &str, key: &str) -> Option<(String, bool, u32)> {
    let schema = Schema::get();
    let def = schema.type_def(resource_type)?;
    let key = key.strip_prefix('_').unwrap_or(key);
    let (el, _) = def.resolve_json_name(key)?;
    Some((el.name.clone(), el.summary, el.min))
}

fn mark_subsetted(m: &mut Map) {
    let mut meta = match m.remove("meta") {
        Some(Json::Object(meta)) => meta,
        _ => Map::new(),
    };
    let mut tags = match meta.remove("tag") {
        Some(Json::Array(a)) => a,
        _ => Vec::new(),
    };
    let mut tag = Map::new();
    tag.insert("system", Json::str(SUBSETTED_SYSTEM));
    tag.insert("code", Json::str("SUBSETTED"));
    tags.push(Json::Object(tag));
    meta.insert("tag", Json::Array(tags));
    let pos = if m.contains_key("id") { 2 } else { 1 };
    m.insert_at(pos, "meta", Json::Object(meta));
}

/// The resource's stored JSON shaped by `_summary` / `_elements`; `None` if it is served as
/// stored.
pub(crate) fn shape(stored: &[u8], summary: Summary, elements: &[String]) -> Option<Vec<u8>> {
    if matches!(summary, Summary::False | Summary::Count) && elements.is_empty() {
        return None;
    }
    let Ok(Json::Object(mut m)) = json::parse(stored) else {
        return None;
    };
    let rt = m
        .get("resourceType")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_string();
    let keep = |key: &str| -> bool {
        if always(key) {
            return true;
        }
        let el = element_of(&rt, key);
        match summary {
            Summary::True => el.is_some_and(|(_, s, _)| s),
            Summary::Text => key == "text" || el.is_some_and(|(_, _, min)| min > 0),
            Summary::Data => key != "text",
            Summary::False | Summary::Count => {
                // `_elements`: the listed elements plus the mandatory ones.
                // Listed by element name (`value`) or JSON name (`valueQuantity`).
                let json_name = key.strip_prefix('_').unwrap_or(key);
                el.is_some_and(|(name, _, min)| {
                    min > 0 || elements.contains(&name) || elements.iter().any(|e| e == json_name)
                })
            }
        }
    };
    let before = m.len();
    m.retain(|k, _| keep(k));
    if m.len() == before && summary != Summary::True {
        return None;
    }
    mark_subsetted(&mut m);
    Some(Json::Object(m).to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBS: &[u8] = br#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"1"},"text":{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">x</div>"},"status":"final","code":{"text":"pulse"},"valueQuantity":{"value":72.50},"note":[{"text":"after a walk"}]}"#;

    fn keys(b: &[u8]) -> Vec<String> {
        match json::parse(b).unwrap() {
            Json::Object(m) => m.iter().map(|(k, _)| k.to_string()).collect(),
            _ => panic!(),
        }
    }

    #[test]
    fn views() {
        assert_eq!(shape(OBS, Summary::False, &[]), None);
        let t = shape(OBS, Summary::True, &[]).unwrap();
        assert_eq!(
            keys(&t),
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "valueQuantity"
            ]
        );
        assert!(String::from_utf8(t).unwrap().contains("SUBSETTED"));
        let d = shape(OBS, Summary::Data, &[]).unwrap();
        assert!(!keys(&d).contains(&"text".to_string()));
        assert!(String::from_utf8(d).unwrap().contains("72.50"));
        let x = shape(OBS, Summary::Text, &[]).unwrap();
        assert_eq!(
            keys(&x),
            ["resourceType", "id", "meta", "text", "status", "code"]
        );
        for listed in ["value", "valueQuantity"] {
            let e = shape(OBS, Summary::False, &[listed.into()]).unwrap();
            assert_eq!(
                keys(&e),
                [
                    "resourceType",
                    "id",
                    "meta",
                    "status",
                    "code",
                    "valueQuantity"
                ]
            );
        }
    }
}
