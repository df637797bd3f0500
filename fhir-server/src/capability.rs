//! The CapabilityStatement: what this server really does, per tenant base.

use fhir_core::search_param::{SearchParamRegistry, SearchParamType};
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

/// Whether `t` may be named in `CapabilityStatement.rest.resource.type`.
///
/// The definitions we ship also carry `SubscriptionStatus` (an R5 backport), which the R4
/// ResourceType value set bound to that element does not contain; listing it would make the
/// statement invalid. The server still stores and serves it like any other type.
fn listable(t: ResourceType) -> bool {
    fhir_core::Schema::get()
        .type_def("CapabilityStatement.rest.resource")
        .and_then(|d| d.element("type"))
        .and_then(|e| e.codes.as_ref())
        .is_none_or(|codes| codes.iter().any(|c| c == t.as_str()))
}

/// The R4 search parameters of `t` (`Resource` ones included), as
/// `CapabilityStatement.rest.resource.searchParam`. Tenants' custom SearchParameters are not
/// listed here.
fn search_params(t: ResourceType) -> Json {
    let reg = SearchParamRegistry::r4();
    Json::Array(
        reg.params_for(t)
            .filter(|p| {
                p.kind != SearchParamType::Special && (p.expression.is_some() || p.code == "_text")
            })
            .map(|p| {
                obj(vec![
                    ("name", Json::str(p.code.clone())),
                    ("definition", Json::str(p.url.clone())),
                    ("type", Json::str(p.kind.as_str())),
                ])
            })
            .collect(),
    )
}

/// `_include` values for `t`: `*` and each reference parameter.
fn search_includes(t: ResourceType) -> Json {
    let reg = SearchParamRegistry::r4();
    let mut out = vec![Json::str("*")];
    out.extend(
        reg.params_for(t)
            .filter(|p| p.kind == SearchParamType::Reference)
            .map(|p| Json::str(format!("{t}:{}", p.code))),
    );
    Json::Array(out)
}

/// The parameters of a system-level search (those every resource has, and `_type`).
fn system_search_params() -> Json {
    let mut params: Vec<Json> = [
        "_id",
        "_lastUpdated",
        "_tag",
        "_profile",
        "_security",
        "_source",
    ]
    .iter()
    .filter_map(|code| {
        let p = SearchParamRegistry::r4().get(ResourceType::parse("Patient")?, code)?;
        Some(obj(vec![
            ("name", Json::str(*code)),
            ("definition", Json::str(p.url.clone())),
            ("type", Json::str(p.kind.as_str())),
        ]))
    })
    .collect();
    params.push(obj(vec![
        ("name", Json::str("_type")),
        ("type", Json::str("token")),
        (
            "documentation",
            Json::str("The resource types searched, comma-separated"),
        ),
    ]));
    Json::Array(params)
}

/// The CapabilityStatement for the FHIR base `base`; `security` describes the authorization
/// server when auth is on.
pub fn capability_statement(
    base: &str,
    security: Option<&crate::discovery::SmartDiscovery>,
) -> Json {
    let interactions = [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "history-instance",
        "history-type",
        "create",
        "search-type",
    ];
    let resources: Vec<Json> = ResourceType::all()
        .filter(|t| listable(*t))
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
                ("searchInclude", search_includes(t)),
                ("searchParam", search_params(t)),
            ])
        })
        .collect();
    let mut rest = vec![
        ("mode", Json::str("server")),
        (
            "documentation",
            Json::str(match security {
                Some(_) => "Access needs a SMART on FHIR / HelseID access token; see security.",
                None => "Authentication is switched off (--no-auth): local use only.",
            }),
        ),
    ];
    if let Some(s) = security {
        rest.push(("security", s.security()));
    }
    rest.extend([
        ("resource", Json::Array(resources)),
        (
            "interaction",
            codes(
                &["transaction", "batch", "history-system", "search-system"],
                "code",
            ),
        ),
        ("searchParam", system_search_params()),
    ]);
    let rest = obj(rest);
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
