//! A real store and a real index in a temporary folder.
#![allow(dead_code)]

use fhir_core::{Resource, ResourceId, ResourceType, TenantId};
use fhir_search::{Handling, IndexOptions, Scope, SearchError, SearchIndex, SearchResult};
use fhir_store::Store;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub store: Store,
    pub index: SearchIndex,
    pub t: TenantId,
}

pub fn env() -> Env {
    env_with(IndexOptions::default())
}

pub fn env_with(opts: IndexOptions) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    let t = TenantId::new("hf").unwrap();
    store.create_tenant(&t, "Helse Test").unwrap();
    let index = SearchIndex::open_with(dir.path().join("index"), store.clone(), opts).unwrap();
    Env {
        dir,
        store,
        index,
        t,
    }
}

/// Creates a resource in the store and returns its id.
pub fn create(store: &Store, t: &TenantId, json: serde_json::Value) -> String {
    let r = Resource::from_json_bytes(json.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("{e}: {json}"));
    store.create(t, r, None).unwrap().resource.id.to_string()
}

pub fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap()
}

impl Env {
    pub fn create(&self, json: serde_json::Value) -> String {
        self.create_in(&self.t, json)
    }

    pub fn create_in(&self, t: &TenantId, json: serde_json::Value) -> String {
        create(&self.store, t, json)
    }

    /// Drops the index (closing it, as a stopped server would), runs `between` on the store,
    /// and opens the index again.
    pub fn reopen(self, opts: IndexOptions, between: impl FnOnce(&Store, &TenantId)) -> Env {
        let Env {
            dir,
            store,
            index,
            t,
        } = self;
        drop(index);
        between(&store, &t);
        let index = SearchIndex::open_with(dir.path().join("index"), store.clone(), opts).unwrap();
        Env {
            dir,
            store,
            index,
            t,
        }
    }

    pub fn update(&self, id: &str, json: serde_json::Value) {
        let mut json = json;
        json["id"] = serde_json::Value::String(id.to_string());
        let r = Resource::from_json_bytes(json.to_string().as_bytes()).unwrap();
        self.store
            .update(&self.t, &ResourceId::new(id).unwrap(), r, None)
            .unwrap();
    }

    pub fn delete(&self, ty: &str, id: &str) {
        self.store
            .delete(&self.t, rt(ty), &ResourceId::new(id).unwrap(), None)
            .unwrap();
    }

    pub fn try_search(&self, scope: Scope, query: &str) -> Result<SearchResult, SearchError> {
        self.try_search_in(&self.t, scope, query, Handling::Lenient)
    }

    pub fn try_search_in(
        &self,
        t: &TenantId,
        scope: Scope,
        query: &str,
        handling: Handling,
    ) -> Result<SearchResult, SearchError> {
        let params: Vec<(String, String)> = form_urlencoded_parse(query);
        let req = self.index.parse(t, &scope, &params, handling)?;
        self.index.search(t, &req)
    }

    pub fn search(&self, ty: &str, query: &str) -> SearchResult {
        self.try_search(Scope::Type(rt(ty)), query)
            .unwrap_or_else(|e| panic!("{ty}?{query}: {e}"))
    }

    /// Ids of the matches, in order.
    pub fn ids(&self, ty: &str, query: &str) -> Vec<String> {
        ids(&self.search(ty, query))
    }

    /// Ids of the matches, sorted.
    pub fn set(&self, ty: &str, query: &str) -> Vec<String> {
        let mut v = self.ids(ty, query);
        v.sort();
        v
    }
}

pub fn ids(r: &SearchResult) -> Vec<String> {
    r.entries
        .iter()
        .filter(|e| e.mode == fhir_search::EntryMode::Match)
        .map(|e| e.resource.id.to_string())
        .collect()
}

pub fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `a=b&c=d` with `%xx` decoding (`+` stays a plus sign, as in FHIR dates with offsets
/// written by hand in these tests).
pub fn form_urlencoded_parse(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

pub fn observation(code: &str, when: &str, value: &str) -> serde_json::Value {
    serde_json::from_str(&format!(
        r#"{{"resourceType":"Observation","status":"final",
        "category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],
        "code":{{"coding":[{{"system":"http://loinc.org","code":"{code}"}}]}},
        "subject":{{"reference":"Patient/p1"}},
        "effectiveDateTime":"{when}",
        "valueQuantity":{{"value":{value},"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}}}"#
    ))
    .unwrap()
}
