//! The CapabilityStatement: what this server really does, per tenant base.

use fhir_core::{Json, Map, ResourceType};

fn obj(members: Vec<(&str, Json)>) -> Json {
    let mut m = Map::new();
    for (k, v) in members {
        m.insert(k, v);
    }
    Json::Object(m)
}

fn codes(items: &[&str], key: &str) -> Json {
    Json::Array(
        items
            .iter()
            .map(|c| obj(vec![(key, Json::str(*c))]))
            .collect(),
    )
}

/// The CapabilityStatement for the FHIR base `base`.
pub fn capability_statement(base: &str) -> Json {
    let interactions = [
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    let search_params = Json::Array(vec![
        obj(vec![
            ("name", Json::str("_id")),
            ("type", Json::str("token")),
            ("documentation", Json::str("Logical id of the resource")),
        ]),
        obj(vec![
            ("name", Json::str("identifier")),
            ("type", Json::str("token")),
            (
                "documentation",
                Json::str("Business identifier: system|value, value or |value"),
            ),
        ]),
    ]);
    let resources: Vec<Json> = ResourceType::all()
        .map(|t| {
            obj(vec![
                ("type", Json::str(t.as_str())),
                ("interaction", codes(&interactions, "code")),
                ("versioning", Json::str("versioned-update")),
                ("readHistory", Json::Bool(true)),
                ("updateCreate", Json::Bool(true)),
                ("conditionalCreate", Json::Bool(true)),
                ("conditionalRead", Json::str("full-support")),
                ("conditionalUpdate", Json::Bool(true)),
                ("conditionalDelete", Json::str("single")),
                ("searchParam", search_params.clone()),
            ])
        })
        .collect();
    let rest = obj(vec![
        ("mode", Json::str("server")),
        (
            "documentation",
            Json::str(
                "Unauthenticated: authorization arrives with SMART on FHIR / HelseID support.",
            ),
        ),
        ("resource", Json::Array(resources)),
        ("interaction", codes(&["history-system"], "code")),
    ]);
    obj(vec![
        ("resourceType", Json::str("CapabilityStatement")),
        ("status", Json::str("active")),
        ("date", Json::str(crate::now_instant())),
        ("publisher", Json::str("fhir-server")),
        ("kind", Json::str("instance")),
        (
            "software",
            obj(vec![
                ("name", Json::str("fhir-server")),
                ("version", Json::str(env!("CARGO_PKG_VERSION"))),
            ]),
        ),
        (
            "implementation",
            obj(vec![
                (
                    "description",
                    Json::str("FHIR R4 server for digital home follow-up"),
                ),
                ("url", Json::str(base)),
            ]),
        ),
        ("fhirVersion", Json::str("4.0.1")),
        (
            "format",
            Json::Array(vec![
                Json::str("application/fhir+json"),
                Json::str("application/fhir+xml"),
            ]),
        ),
        ("rest", Json::Array(vec![rest])),
    ])
}
