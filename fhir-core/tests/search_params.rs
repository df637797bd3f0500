//! The search-parameter registry and value extraction, on the official R4 definitions and on
//! realistic resources.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use fhir_core::fhirpath::Expr;
use fhir_core::json::{self, Json, Map};
use fhir_core::schema::{Schema, TypeKind};
use fhir_core::search_param::{
    DecimalValue, SearchParam, SearchParamError, SearchParamRegistry, SearchParamType, SearchValue,
    patient_compartment_params,
};
use fhir_core::{Resource, ResourceType};

const S: i64 = 1_000_000;

fn obj(text: &str) -> Map {
    match json::parse(text.as_bytes()) {
        Ok(Json::Object(m)) => m,
        other => panic!("test JSON is not an object: {other:?}"),
    }
}

fn rt(name: &str) -> ResourceType {
    ResourceType::parse(name).unwrap_or_else(|| panic!("{name}"))
}

/// The values of parameter `code` on `resource`, via the whole-resource extraction.
fn values(resource: &Map, code: &str) -> Vec<SearchValue> {
    let reg = SearchParamRegistry::r4();
    reg.extract(resource)
        .into_iter()
        .find(|(p, _)| p.code == code)
        .map(|(_, v)| v)
        .unwrap_or_default()
}

fn token(system: Option<&str>, code: Option<&str>, text: Option<&str>) -> SearchValue {
    SearchValue::Token {
        system: system.map(str::to_string),
        code: code.map(str::to_string),
        text: text.map(str::to_string),
        of_type: Vec::new(),
    }
}

fn reference(r: &str, ty: &str, id: &str) -> SearchValue {
    SearchValue::Reference {
        reference: Some(r.to_string()),
        resource_type: Some(rt(ty)),
        id: Some(id.to_string()),
        version: None,
        identifier: None,
    }
}

fn date(start: Option<i64>, end: Option<i64>) -> SearchValue {
    SearchValue::Date { start, end }
}

fn strings(v: &[SearchValue]) -> Vec<&str> {
    v.iter()
        .map(|v| match v {
            SearchValue::String(s) => s.as_str(),
            other => panic!("not a string value: {other:?}"),
        })
        .collect()
}

fn data_file() -> Json {
    json::parse(include_bytes!("../data/r4-search-parameters.json")).expect("data file parses")
}

#[test]
fn every_official_expression_compiles() {
    let data = data_file();
    let params = data
        .get("searchParameters")
        .and_then(Json::as_array)
        .expect("params");
    assert_eq!(params.len(), 1378);
    let mut expressions = 0;
    for p in params {
        let code = p.get("code").and_then(Json::as_str).unwrap_or("?");
        if let Some(e) = p.get("expression").and_then(Json::as_str) {
            Expr::parse(e).unwrap_or_else(|err| panic!("{code}: {e}: {err}"));
            expressions += 1;
        }
        for c in p
            .get("component")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let e = c
                .get("expression")
                .and_then(Json::as_str)
                .expect("component expression");
            Expr::parse(e).unwrap_or_else(|err| panic!("{code} component: {e}: {err}"));
            expressions += 1;
        }
    }
    // 1,375 parameter expressions (all but _text, _content, _query) and 96 component ones (42 composites of two, 4 of three).
    assert_eq!(expressions, 1375 + 96);
    let reg = SearchParamRegistry::r4();
    assert_eq!(reg.len(), 1378);
    assert_eq!(reg.all().filter(|p| p.expression.is_some()).count(), 1375);
    // Every composite's components name known parameters.
    for p in reg.all().filter(|p| p.kind == SearchParamType::Composite) {
        assert!(p.components.len() >= 2, "{}", p.url);
        assert!(p.components.iter().all(|c| c.kind.is_some()), "{}", p.url);
    }
}

#[test]
fn every_expression_evaluates_on_minimal_resources_of_its_bases() {
    let reg = SearchParamRegistry::r4();
    let mut evaluations = 0;
    for p in reg.all() {
        for base in &p.base {
            let types: Vec<ResourceType> = match base.as_str() {
                "Resource" | "DomainResource" => ResourceType::all().collect(),
                b => vec![rt(b)],
            };
            for t in types {
                let minimal = obj(&format!(r#"{{"resourceType":"{t}","id":"x1"}}"#));
                if let Some(e) = &p.expression {
                    let _ = e.evaluate(&minimal);
                }
                let v = reg.extract_param(p, &minimal);
                // Only `_id` and `deceased` (false when absent) have a value on a bare resource.
                assert!(
                    v.is_empty() || p.code == "_id" || p.code == "deceased",
                    "{} on {t}: {v:?}",
                    p.url
                );
                evaluations += 1;
            }
        }
    }
    assert!(evaluations > 3000, "{evaluations}");
    for t in ResourceType::all() {
        let minimal = obj(&format!(r#"{{"resourceType":"{t}","id":"x1"}}"#));
        let got = reg.extract(&minimal);
        assert!(got.iter().any(|(p, _)| p.code == "_id"), "{t}");
    }
}

/// Sample JSON for an element of type `ty`, built from the schema: every element filled, with
/// the `variant`-th choice type and coded value, so that the official expressions find data.
fn sample(ty: &str, variant: usize, path: &mut Vec<String>) -> Option<Json> {
    let schema = Schema::get();
    const REFS: [&str; 8] = [
        "Patient/p1",
        "Practitioner/d1",
        "Organization/o1",
        "Location/l1",
        "Group/g1",
        "Device/dev1",
        "RelatedPerson/r1",
        "PractitionerRole/pr1",
    ];
    let s = |v: &str| Some(Json::str(v));
    match ty {
        "boolean" => return Some(Json::Bool(variant.is_multiple_of(2))),
        "integer" | "unsignedInt" | "positiveInt" => return Some(Json::Number("7".into())),
        "decimal" => return Some(Json::Number("1.50".into())),
        "date" => return s("2024-03-01"),
        "dateTime" => return s("2024-03-01T10:00:00+01:00"),
        "instant" => return s("2024-03-01T09:00:00Z"),
        "time" => return s("10:00:00"),
        "uri" | "url" => return s("http://example.org/fhir/ValueSet/v1"),
        "canonical" => return s("http://example.org/fhir/Questionnaire/q1|1.0"),
        "oid" => return s("urn:oid:1.2.3"),
        "uuid" => return s("urn:uuid:6b6c0e1a-6f3e-4bb0-a6d3-2f6c1f9e0c11"),
        "id" => return s("x1"),
        "code" => return s("c"),
        "base64Binary" => return s("AAAA"),
        "xhtml" => return s(r#"<div xmlns="http://www.w3.org/1999/xhtml">x</div>"#),
        "string" | "markdown" => return s("text"),
        "Reference" => {
            let mut m = Map::new();
            m.insert("reference", Json::str(REFS[variant % REFS.len()]));
            m.insert("identifier", sample("Identifier", variant, path)?);
            return Some(Json::Object(m));
        }
        // Bundle.entry.resource: the document and message parameters read the first entry.
        "Resource" if path.len() < 3 => {
            let embedded = if variant.is_multiple_of(2) {
                "Composition"
            } else {
                "MessageHeader"
            };
            return sample(embedded, variant, path);
        }
        "Extension" | "Resource" => return None,
        _ => {}
    }
    let td = schema.type_def(ty)?;
    // No type twice on one path: recursive structures (Identifier.assigner, item.item) stop.
    if path.iter().any(|p| p == ty) || path.len() > 7 {
        return None;
    }
    path.push(ty.to_string());
    let mut m = Map::new();
    if td.kind == TypeKind::Resource {
        m.insert("resourceType", Json::str(ty));
    }
    for el in &td.elements {
        if matches!(
            el.name.as_str(),
            "extension" | "modifierExtension" | "contained"
        ) {
            continue;
        }
        let t = &el.types[variant % el.types.len()];
        let value = match &el.codes {
            Some(codes) if !codes.is_empty() => Json::str(codes[variant % codes.len()].as_str()),
            _ => match sample(t, variant, path) {
                Some(v) => v,
                None => continue,
            },
        };
        let value = if el.is_array() {
            Json::Array(vec![value])
        } else {
            value
        };
        m.insert(el.json_name(t), value);
    }
    path.pop();
    Some(Json::Object(m))
}

fn kind_matches(kind: SearchParamType, v: &SearchValue) -> bool {
    matches!(
        (kind, v),
        (SearchParamType::Token, SearchValue::Token { .. })
            | (SearchParamType::String, SearchValue::String(_))
            | (SearchParamType::Date, SearchValue::Date { .. })
            | (SearchParamType::Number, SearchValue::Number(_))
            | (SearchParamType::Quantity, SearchValue::Quantity { .. })
            | (SearchParamType::Reference, SearchValue::Reference { .. })
            | (SearchParamType::Uri, SearchValue::Uri(_))
            | (SearchParamType::Composite, SearchValue::Composite(_))
    )
}

#[test]
fn synthetic_resources_give_values_for_every_parameter() {
    let reg = SearchParamRegistry::r4();
    const VARIANTS: usize = 12;
    let mut with_values: BTreeSet<(String, String)> = BTreeSet::new();
    let mut applicable: BTreeSet<(String, String)> = BTreeSet::new();
    let mut total_values = 0;
    for t in ResourceType::all() {
        for p in reg
            .params_for(t)
            .filter(|p| p.expression.is_some() && p.kind != SearchParamType::Special)
        {
            applicable.insert((t.to_string(), p.code.clone()));
        }
        for variant in 0..VARIANTS {
            let Some(Json::Object(resource)) = sample(t.as_str(), variant, &mut Vec::new()) else {
                panic!("no sample for {t}");
            };
            for (p, vals) in reg.extract(&resource) {
                assert!(!vals.is_empty());
                for v in &vals {
                    assert!(kind_matches(p.kind, v), "{t}.{}: {v:?}", p.code);
                    if let SearchValue::Composite(rows) = v {
                        assert_eq!(rows.len(), p.components.len(), "{t}.{}", p.code);
                        for (c, vs) in p.components.iter().zip(rows) {
                            let kind = c.kind.expect("component kind");
                            assert!(
                                vs.iter().all(|v| kind_matches(kind, v)),
                                "{t}.{}: {vs:?}",
                                p.code
                            );
                        }
                    }
                }
                total_values += vals.len();
                with_values.insert((t.to_string(), p.code.clone()));
            }
        }
    }
    let missing: Vec<_> = applicable.difference(&with_values).collect();
    println!(
        "{} of {} (type, parameter) pairs got values ({total_values} values); without: {missing:?}",
        applicable.len() - missing.len(),
        applicable.len()
    );
    assert!(
        missing.is_empty(),
        "{} without values: {missing:?}",
        missing.len()
    );
    assert_eq!(applicable.len(), 2581);
}

#[test]
fn registry_has_the_r4_parameters_per_type() {
    let reg = SearchParamRegistry::r4();
    assert!(reg.len() >= 1378);
    let obs = rt("Observation");
    let codes: BTreeSet<&str> = reg.params_for(obs).map(|p| p.code.as_str()).collect();
    for c in [
        "code",
        "date",
        "subject",
        "patient",
        "value-quantity",
        "component-code-value-quantity",
        "identifier",
        "_lastUpdated",
        "_id",
        "_tag",
        "_profile",
        "_security",
        "_source",
        "_text",
        "_content",
        "combo-code-value-quantity",
        "category",
        "status",
        "performer",
    ] {
        assert!(codes.contains(c), "Observation lacks {c}");
    }
    // `_text` is a DomainResource parameter: Bundle is no DomainResource.
    assert!(reg.get(rt("Bundle"), "_text").is_none());
    assert!(reg.get(rt("Bundle"), "_id").is_some());
    let subject = reg.get(obs, "subject").unwrap();
    assert_eq!(subject.kind, SearchParamType::Reference);
    assert_eq!(subject.targets, ["Group", "Device", "Patient", "Location"]);
    assert_eq!(
        subject.expression.as_ref().unwrap().source().len(),
        "Observation.subject".len()
    );
    let date = reg.get(obs, "date").unwrap();
    assert_eq!(date.kind, SearchParamType::Date);
    assert!(date.comparators.iter().any(|c| c == "sa"));
    assert_eq!(
        date.url,
        "http://hl7.org/fhir/SearchParameter/clinical-date"
    );
    assert!(date.base.len() > 10);
    let ccvq = reg.get(obs, "component-code-value-quantity").unwrap();
    assert_eq!(ccvq.components.len(), 2);
    assert_eq!(ccvq.components[0].kind, Some(SearchParamType::Token));
    assert_eq!(ccvq.components[1].kind, Some(SearchParamType::Quantity));
    assert_eq!(ccvq.multiple_or, Some(false));
    assert_eq!(
        reg.get(obs, "code").unwrap().supported_modifiers(),
        SearchParamType::Token.default_modifiers()
    );
    // "target":"all" in the data file expands to every target type.
    assert_eq!(
        reg.get(rt("Provenance"), "target").unwrap().targets.len(),
        145
    );
    assert_eq!(
        reg.get(rt("Patient"), "phonetic")
            .unwrap()
            .xpath_usage
            .as_deref(),
        Some("phonetic")
    );
    assert_eq!(
        reg.get(rt("Location"), "near").unwrap().kind,
        SearchParamType::Special
    );
    assert!(
        reg.by_url("http://hl7.org/fhir/SearchParameter/Resource-lastUpdated")
            .is_some()
    );
    // Every type has `_id`, `_lastUpdated` … but not another type's parameters.
    for t in ResourceType::all() {
        assert!(reg.get(t, "_lastUpdated").is_some(), "{t}");
    }
    assert!(reg.get(rt("Patient"), "component-code").is_none());
}

const BLOOD_PRESSURE: &str = r#"{"resourceType":"Observation","id":"bp1",
  "meta":{"lastUpdated":"2024-03-01T09:05:00Z","profile":["http://hl7.org/fhir/StructureDefinition/bp"],
    "tag":[{"system":"urn:tag","code":"t1"}]},
  "identifier":[{"system":"urn:oid:2.16.578.1.12.4.1.2.1","value":"obs-1"}],
  "status":"final",
  "category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}]}],
  "code":{"coding":[{"system":"http://loinc.org","code":"85354-9","display":"Blood pressure panel"}],"text":"Blood pressure"},
  "subject":{"reference":"Patient/123"},
  "effectiveDateTime":"2024-03-01T10:00:00+01:00",
  "performer":[{"reference":"Practitioner/55"}],
  "component":[
    {"code":{"coding":[{"system":"http://loinc.org","code":"8480-6","display":"Systolic blood pressure"}]},
     "valueQuantity":{"value":120,"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}},
    {"code":{"coding":[{"system":"http://loinc.org","code":"8462-4","display":"Diastolic blood pressure"}]},
     "valueQuantity":{"value":80.5,"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}]}"#;

fn mmhg(text: &str, value: f64, low: f64, high: f64) -> SearchValue {
    SearchValue::Quantity {
        value: DecimalValue {
            text: text.into(),
            value,
            low,
            high,
        },
        system: Some("http://unitsofmeasure.org".into()),
        code: Some("mm[Hg]".into()),
        unit: Some("mmHg".into()),
    }
}

#[test]
fn blood_pressure_observation_values() {
    let resource = Resource::from_json_bytes(BLOOD_PRESSURE.as_bytes()).expect("valid Observation");
    let reg = SearchParamRegistry::r4();
    let all = reg.extract_resource(&resource);
    let get = |code: &str| -> Vec<SearchValue> {
        all.iter()
            .find(|(p, _)| p.code == code)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let loinc = Some("http://loinc.org");
    assert_eq!(
        get("code"),
        [
            token(loinc, Some("85354-9"), Some("Blood pressure panel")),
            token(None, None, Some("Blood pressure")),
        ]
    );
    let nine = 1_709_283_600 * S; // 2024-03-01T09:00:00Z
    assert_eq!(get("date"), [date(Some(nine), Some(nine + S - 1))]);
    assert_eq!(get("subject"), [reference("Patient/123", "Patient", "123")]);
    assert_eq!(get("patient"), [reference("Patient/123", "Patient", "123")]);
    assert_eq!(
        get("performer"),
        [reference("Practitioner/55", "Practitioner", "55")]
    );
    assert_eq!(
        get("identifier"),
        [token(
            Some("urn:oid:2.16.578.1.12.4.1.2.1"),
            Some("obs-1"),
            None
        )]
    );
    assert_eq!(get("status"), [token(None, Some("final"), None)]);
    assert_eq!(get("_id"), [token(None, Some("bp1"), None)]);
    assert_eq!(get("_tag"), [token(Some("urn:tag"), Some("t1"), None)]);
    assert_eq!(
        get("_profile"),
        [SearchValue::Uri(
            "http://hl7.org/fhir/StructureDefinition/bp".into()
        )]
    );
    let five_past = nine + 300 * S;
    assert_eq!(
        get("_lastUpdated"),
        [date(Some(five_past), Some(five_past + S - 1))]
    );
    assert_eq!(
        get("category"),
        [token(
            Some("http://terminology.hl7.org/CodeSystem/observation-category"),
            Some("vital-signs"),
            None
        )]
    );
    let systolic = vec![
        vec![token(
            loinc,
            Some("8480-6"),
            Some("Systolic blood pressure"),
        )],
        vec![mmhg("120", 120.0, 119.5, 120.5)],
    ];
    let diastolic = vec![
        vec![token(
            loinc,
            Some("8462-4"),
            Some("Diastolic blood pressure"),
        )],
        vec![mmhg("80.5", 80.5, 80.45, 80.55)],
    ];
    let expected = [
        SearchValue::Composite(systolic),
        SearchValue::Composite(diastolic),
    ];
    assert_eq!(get("component-code-value-quantity"), expected);
    // `Observation | Observation.component`: the panel itself has no value, so only the components.
    assert_eq!(get("combo-code-value-quantity"), expected);
    assert_eq!(get("component-code").len(), 2);
    assert_eq!(get("combo-code").len(), 4);
    assert_eq!(get("combo-value-quantity").len(), 2);
    // No value[x] on the panel: these parameters are absent, not empty.
    for absent in [
        "value-quantity",
        "code-value-quantity",
        "value-concept",
        "value-string",
    ] {
        assert!(all.iter().all(|(p, _)| p.code != absent), "{absent}");
    }
    assert_eq!(reg.patient_compartment(resource.json()), ["123"]);
}

#[test]
fn patient_with_norwegian_identifier_name_and_birth_year() {
    let p = obj(r#"{"resourceType":"Patient","id":"123",
        "identifier":[{"use":"official","type":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v2-0203","code":"NNNOR"}],"text":"Fødselsnummer"},
            "system":"urn:oid:2.16.578.1.12.4.1.4.1","value":"12345678901"}],
        "name":[{"use":"official","family":"Nordmann","given":["Kari","Anne"],"prefix":["Dr."]}],
        "telecom":[{"system":"phone","value":"+4712345678"},{"system":"email","value":"kari@example.no"}],
        "gender":"female","birthDate":"1970",
        "address":[{"line":["Storgata 1"],"city":"Oslo","postalCode":"0150","country":"NO"}],
        "managingOrganization":{"reference":"Organization/hf1"},
        "link":[{"other":{"reference":"Patient/456"},"type":"seealso"}]}"#);
    assert_eq!(
        values(&p, "identifier"),
        [SearchValue::Token {
            system: Some("urn:oid:2.16.578.1.12.4.1.4.1".into()),
            code: Some("12345678901".into()),
            text: Some("Fødselsnummer".into()),
            of_type: vec![(
                Some("http://terminology.hl7.org/CodeSystem/v2-0203".into()),
                Some("NNNOR".into())
            )],
        }]
    );
    assert_eq!(
        strings(&values(&p, "name")),
        ["Nordmann", "Kari", "Anne", "Dr."]
    );
    assert_eq!(strings(&values(&p, "family")), ["Nordmann"]);
    assert_eq!(strings(&values(&p, "given")), ["Kari", "Anne"]);
    assert_eq!(
        strings(&values(&p, "address")),
        ["Storgata 1", "Oslo", "0150", "NO"]
    );
    assert_eq!(strings(&values(&p, "address-city")), ["Oslo"]);
    // The whole of 1970, UTC.
    assert_eq!(
        values(&p, "birthdate"),
        [date(Some(0), Some(31_536_000 * S - 1))]
    );
    assert_eq!(values(&p, "gender"), [token(None, Some("female"), None)]);
    assert_eq!(
        values(&p, "phone"),
        [token(Some("phone"), Some("+4712345678"), None)]
    );
    assert_eq!(
        values(&p, "email"),
        [token(Some("email"), Some("kari@example.no"), None)]
    );
    assert_eq!(values(&p, "telecom").len(), 2);
    assert_eq!(values(&p, "deceased"), [token(None, Some("false"), None)]);
    assert_eq!(
        values(&p, "organization"),
        [reference("Organization/hf1", "Organization", "hf1")]
    );
    assert_eq!(
        values(&p, "link"),
        [reference("Patient/456", "Patient", "456")]
    );
    let reg = SearchParamRegistry::r4();
    assert_eq!(reg.patient_compartment(&p), ["123", "456"]);

    let dead = obj(r#"{"resourceType":"Patient","deceasedDateTime":"2020-05-01"}"#);
    assert_eq!(values(&dead, "deceased"), [token(None, Some("true"), None)]);
    assert_eq!(
        values(&dead, "death-date"),
        [date(Some(1_588_291_200 * S), Some(1_588_377_600 * S - 1))]
    );
}

#[test]
fn careplan_subject_status_and_activity_dates() {
    let cp = obj(
        r#"{"resourceType":"CarePlan","id":"cp1","status":"active","intent":"plan",
        "subject":{"reference":"Patient/123"},"period":{"start":"2024-04-01"},
        "activity":[
          {"detail":{"status":"scheduled","scheduledTiming":{"event":["2024-05-10","2024-05-12T10:00:00Z"],
             "repeat":{"boundsPeriod":{"start":"2024-04-01","end":"2024-06-30"}}}}},
          {"detail":{"status":"scheduled","scheduledPeriod":{"start":"2024-05-20T10:30:00+02:00"}}},
          {"detail":{"status":"scheduled","scheduledTiming":{"event":["2024-05-10","2024-05-12"]}}},
          {"detail":{"status":"scheduled","scheduledString":"every day"}}]}"#,
    );
    assert_eq!(
        values(&cp, "subject"),
        [reference("Patient/123", "Patient", "123")]
    );
    assert_eq!(
        values(&cp, "patient"),
        [reference("Patient/123", "Patient", "123")]
    );
    assert_eq!(values(&cp, "status"), [token(None, Some("active"), None)]);
    let april = 1_711_929_600 * S;
    assert_eq!(values(&cp, "date"), [date(Some(april), None)]);
    assert_eq!(
        values(&cp, "activity-date"),
        [
            // Outer limits of the schedule: bounds start .. end of 2024-06-30.
            date(Some(april), Some((1_719_705_600 + 86_400) * S - 1)),
            // 10:30+02:00 = 08:30Z; an open end.
            date(Some(1_716_193_800 * S), None),
            // First event's start .. last event's end.
            date(
                Some(1_715_299_200 * S),
                Some((1_715_472_000 + 86_400) * S - 1)
            ),
        ]
    );
    assert_eq!(SearchParamRegistry::r4().patient_compartment(&cp), ["123"]);
}

#[test]
fn questionnaire_response_authored_subject_and_canonical_questionnaire() {
    let qr = obj(
        r#"{"resourceType":"QuestionnaireResponse","status":"completed",
        "questionnaire":"http://helsenorge.no/fhir/Questionnaire/phq9|1.0",
        "subject":{"reference":"https://fhir.example.no/fhir/Patient/123/_history/2"},
        "authored":"2024-02-15T13:34:56+01:00"}"#,
    );
    let t = 1_708_000_496 * S; // 12:34:56Z
    assert_eq!(values(&qr, "authored"), [date(Some(t), Some(t + S - 1))]);
    let subject = SearchValue::Reference {
        reference: Some("https://fhir.example.no/fhir/Patient/123/_history/2".into()),
        resource_type: Some(rt("Patient")),
        id: Some("123".into()),
        version: Some("2".into()),
        identifier: None,
    };
    assert_eq!(values(&qr, "subject"), std::slice::from_ref(&subject));
    assert_eq!(values(&qr, "patient"), [subject]);
    assert_eq!(
        values(&qr, "questionnaire"),
        [SearchValue::Reference {
            reference: Some("http://helsenorge.no/fhir/Questionnaire/phq9".into()),
            resource_type: Some(rt("Questionnaire")),
            id: Some("phq9".into()),
            version: Some("1.0".into()),
            identifier: None,
        }]
    );
    assert_eq!(SearchParamRegistry::r4().patient_compartment(&qr), ["123"]);
}

#[test]
fn appointment_date_and_actors() {
    let a = obj(r#"{"resourceType":"Appointment","status":"booked",
        "start":"2024-05-20T10:00:00+02:00","end":"2024-05-20T10:30:00+02:00",
        "participant":[
          {"actor":{"reference":"Patient/123","display":"Kari"},"status":"accepted"},
          {"actor":{"reference":"Practitioner/55"},"status":"accepted"},
          {"actor":{"identifier":{"system":"urn:oid:2.16.578.1.12.4.1.4.4","value":"9144900"},"type":"Practitioner"},"status":"tentative"}]}"#);
    let eight = 1_716_192_000 * S; // 08:00Z
    assert_eq!(values(&a, "date"), [date(Some(eight), Some(eight + S - 1))]);
    let logical = SearchValue::Reference {
        reference: None,
        resource_type: Some(rt("Practitioner")),
        id: None,
        version: None,
        identifier: Some((
            Some("urn:oid:2.16.578.1.12.4.1.4.4".into()),
            Some("9144900".into()),
        )),
    };
    assert_eq!(
        values(&a, "actor"),
        [
            reference("Patient/123", "Patient", "123"),
            reference("Practitioner/55", "Practitioner", "55"),
            logical.clone(),
        ]
    );
    assert_eq!(
        values(&a, "patient"),
        [reference("Patient/123", "Patient", "123")]
    );
    // The identifier-only actor is a Practitioner by its Reference.type.
    assert_eq!(
        values(&a, "practitioner"),
        [reference("Practitioner/55", "Practitioner", "55"), logical]
    );
    assert_eq!(values(&a, "status"), [token(None, Some("booked"), None)]);
    assert_eq!(patient_compartment_params(rt("Appointment")), ["actor"]);
    assert_eq!(SearchParamRegistry::r4().patient_compartment(&a), ["123"]);
}

#[test]
fn choice_types_and_composites_on_values() {
    let coded = obj(
        r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://snomed.info/sct","code":"365858006"}]},
        "valueCodeableConcept":{"coding":[{"system":"http://snomed.info/sct","code":"260385009","display":"Negative"}],"text":"negativ"}}"#,
    );
    let sct = Some("http://snomed.info/sct");
    assert_eq!(
        values(&coded, "value-concept"),
        [
            token(sct, Some("260385009"), Some("Negative")),
            token(None, None, Some("negativ"))
        ]
    );
    assert_eq!(strings(&values(&coded, "value-string")), ["negativ"]);
    assert!(values(&coded, "value-quantity").is_empty());
    assert_eq!(
        values(&coded, "code-value-concept"),
        [SearchValue::Composite(vec![
            vec![token(sct, Some("365858006"), None)],
            vec![
                token(sct, Some("260385009"), Some("Negative")),
                token(None, None, Some("negativ"))
            ],
        ])]
    );

    let period = obj(
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},
        "valuePeriod":{"start":"2023","end":"2024-01"},"valueString":null}"#,
    );
    let y2023 = 1_672_531_200 * S;
    let feb2024 = 1_706_745_600 * S;
    assert_eq!(
        values(&period, "value-date"),
        [date(Some(y2023), Some(feb2024 - 1))]
    );
    assert_eq!(
        values(&period, "code-value-date"),
        [SearchValue::Composite(vec![
            vec![token(None, None, Some("x"))],
            vec![date(Some(y2023), Some(feb2024 - 1))]
        ])]
    );

    let quantity = obj(
        r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4"}]},
        "valueQuantity":{"value":72.50,"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}"#,
    );
    let got = values(&quantity, "value-quantity");
    let [SearchValue::Quantity { value, code, .. }] = got.as_slice() else {
        panic!("{got:?}");
    };
    assert_eq!(
        (value.text.as_str(), value.value, code.as_deref()),
        ("72.50", 72.5, Some("/min"))
    );
    assert!((value.low - 72.495).abs() < 1e-9 && (value.high - 72.505).abs() < 1e-9);
    assert_eq!(values(&quantity, "code-value-quantity").len(), 1);

    let string = obj(
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"valueString":"positiv"}"#,
    );
    assert_eq!(strings(&values(&string, "value-string")), ["positiv"]);

    let age = obj(
        r#"{"resourceType":"Condition","subject":{"reference":"Patient/1"},"onsetAge":{"value":40,"unit":"years","system":"http://unitsofmeasure.org","code":"a"}}"#,
    );
    let got = values(&age, "onset-age");
    let [SearchValue::Quantity { value, code, .. }] = got.as_slice() else {
        panic!("{got:?}");
    };
    assert_eq!((value.value, code.as_deref()), (40.0, Some("a")));
    let onset_range = obj(
        r#"{"resourceType":"Condition","subject":{"reference":"Patient/1"},"onsetRange":{"low":{"value":40,"code":"a"},"high":{"value":50,"code":"a"}}}"#,
    );
    let got = values(&onset_range, "onset-age");
    let [SearchValue::Quantity { value, code, .. }] = got.as_slice() else {
        panic!("{got:?}");
    };
    assert_eq!(
        (value.text.as_str(), value.value, value.low, value.high),
        ("40..50", 45.0, 39.5, 50.5)
    );
    assert_eq!(code.as_deref(), Some("a"));
    let onset_period = obj(
        r#"{"resourceType":"Condition","subject":{"reference":"Patient/1"},"onsetPeriod":{"start":"2024-03-01"}}"#,
    );
    assert_eq!(
        values(&onset_period, "onset-date"),
        [date(Some(1_709_251_200 * S), None)]
    );
    assert!(values(&onset_period, "onset-age").is_empty());
}

#[test]
fn where_resolve_is_patient_and_contained_references() {
    let obs = obj(
        r##"{"resourceType":"Observation","status":"final","code":{"text":"x"},
        "contained":[{"resourceType":"Patient","id":"p1"}],
        "subject":{"reference":"#p1"},
        "performer":[{"reference":"Patient/9"},{"reference":"Organization/o"},{"reference":"urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0","type":"Patient"}]}"##,
    );
    // A contained subject is a Patient, but it has no id of its own on this server.
    assert_eq!(
        values(&obs, "patient"),
        [SearchValue::Reference {
            reference: Some("#p1".into()),
            resource_type: Some(rt("Patient")),
            id: None,
            version: None,
            identifier: None,
        }]
    );
    let performers = values(&obs, "performer");
    assert_eq!(performers.len(), 3);
    assert_eq!(
        performers[2],
        SearchValue::Reference {
            reference: Some("urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0".into()),
            resource_type: Some(rt("Patient")),
            id: None,
            version: None,
            identifier: None,
        }
    );
    // The compartment holds only Patient references with an id.
    assert_eq!(SearchParamRegistry::r4().patient_compartment(&obs), ["9"]);
    assert_eq!(
        patient_compartment_params(rt("Observation")),
        ["subject", "performer"]
    );
    assert!(patient_compartment_params(rt("Organization")).is_empty());

    let group_subject = obj(
        r#"{"resourceType":"Observation","status":"final","code":{"text":"x"},"subject":{"reference":"Group/g"}}"#,
    );
    assert!(values(&group_subject, "patient").is_empty());
    assert_eq!(
        values(&group_subject, "subject"),
        [reference("Group/g", "Group", "g")]
    );

    let bundle = obj(
        r#"{"resourceType":"Bundle","type":"document","entry":[{"resource":{"resourceType":"Composition","id":"c1","status":"final","type":{"text":"x"},"date":"2024","author":[{"reference":"Practitioner/1"}],"title":"t"}}]}"#,
    );
    assert_eq!(
        values(&bundle, "composition"),
        [reference("Composition/c1", "Composition", "c1")]
    );
    assert_eq!(
        values(&bundle, "type"),
        [token(None, Some("document"), None)]
    );
}

fn search_parameter(code: &str, base: &str, ty: &str, expression: &str) -> Json {
    json::parse(
        format!(
            r#"{{"resourceType":"SearchParameter","url":"http://example.no/SearchParameter/{code}","name":"{code}",
            "status":"active","description":"test","code":"{code}","base":["{base}"],"type":"{ty}","expression":"{expression}"}}"#
        )
        .as_bytes(),
    )
    .expect("valid JSON")
}

#[test]
fn custom_extension_parameters_can_be_added() {
    const MUNICIPALITY: &str = "http://hl7.no/fhir/StructureDefinition/no-basis-municipalitycode";
    let mut reg = SearchParamRegistry::r4().clone();
    let by_function = SearchParam::from_resource(&search_parameter(
        "municipality",
        "Patient",
        "token",
        &format!("Patient.extension('{MUNICIPALITY}').value"),
    ))
    .expect("parses");
    reg.add(by_function).expect("adds");
    let by_where = SearchParam::from_resource(&search_parameter(
        "municipality-ext",
        "Patient",
        "token",
        &format!("Patient.extension.where(url = '{MUNICIPALITY}')"),
    ))
    .expect("parses");
    reg.add(by_where).expect("adds");
    let birth_time = SearchParam::from_resource(&search_parameter(
        "birth-time",
        "Patient",
        "date",
        "Patient.birthDate.extension('http://hl7.org/fhir/StructureDefinition/patient-birthTime').value",
    ))
    .expect("parses");
    reg.add(birth_time).expect("adds");
    assert_eq!(reg.len(), 1381);
    assert_eq!(
        SearchParamRegistry::r4().len(),
        1378,
        "the shared registry is untouched"
    );

    let p = obj(&format!(
        r#"{{"resourceType":"Patient","birthDate":"1970-05-17",
        "_birthDate":{{"extension":[{{"url":"http://hl7.org/fhir/StructureDefinition/patient-birthTime","valueDateTime":"1970-05-17T14:30:00+01:00"}}]}},
        "extension":[{{"url":"{MUNICIPALITY}","valueCoding":{{"system":"urn:oid:2.16.578.1.12.4.1.1.3402","code":"0301","display":"Oslo"}}}}]}}"#
    ));
    let got: HashMap<&str, Vec<SearchValue>> = reg
        .extract(&p)
        .into_iter()
        .map(|(p, v)| (p.code.as_str(), v))
        .collect();
    let oslo = [token(
        Some("urn:oid:2.16.578.1.12.4.1.1.3402"),
        Some("0301"),
        Some("Oslo"),
    )];
    assert_eq!(got["municipality"], oslo);
    assert_eq!(got["municipality-ext"], oslo);
    let t = (136 * 86_400 + 13 * 3600 + 30 * 60) * S; // 1970-05-17T13:30:00Z
    assert_eq!(got["birth-time"], [date(Some(t), Some(t + S - 1))]);

    // A custom parameter with an official code replaces it for that type only.
    let custom_gender = SearchParam::from_resource(&search_parameter(
        "gender",
        "Patient",
        "token",
        "Patient.gender.extension('x').value",
    ))
    .expect("parses");
    reg.add(custom_gender).expect("adds");
    assert_eq!(
        reg.get(rt("Patient"), "gender").unwrap().url,
        "http://example.no/SearchParameter/gender"
    );
    assert_eq!(
        reg.params_for(rt("Patient"))
            .filter(|p| p.code == "gender")
            .count(),
        1
    );
    assert_eq!(
        reg.get(rt("Person"), "gender").unwrap().url,
        "http://hl7.org/fhir/SearchParameter/individual-gender"
    );
    // Re-adding a URL replaces the earlier definition.
    let again = SearchParam::from_resource(&search_parameter(
        "municipality",
        "Patient",
        "string",
        "Patient.extension('x').value",
    ))
    .expect("parses");
    reg.add(again).expect("adds");
    assert_eq!(
        reg.get(rt("Patient"), "municipality").unwrap().kind,
        SearchParamType::String
    );
    assert_eq!(
        reg.params_for(rt("Patient"))
            .filter(|p| p.code == "municipality")
            .count(),
        1
    );
}

#[test]
fn bad_search_parameters_are_rejected_with_reasons() {
    let err = |j: Json| SearchParam::from_resource(&j).expect_err("invalid");
    assert_eq!(
        err(json::parse(br#"{"resourceType":"Patient"}"#).unwrap()),
        SearchParamError::NotASearchParameter
    );
    assert_eq!(
        err(search_parameter("x", "Nope", "token", "Patient.id")),
        SearchParamError::UnknownBase("Nope".into())
    );
    assert_eq!(
        err(search_parameter("x", "Patient", "fuzzy", "Patient.id")),
        SearchParamError::UnknownType("fuzzy".into())
    );
    assert!(matches!(
        err(search_parameter(
            "x",
            "Patient",
            "string",
            "Patient.name.family.substring(0, 2)"
        )),
        SearchParamError::Expression { .. }
    ));
    assert_eq!(
        err(search_parameter("", "Patient", "string", "Patient.id")),
        SearchParamError::Missing("code")
    );
}

#[test]
fn timing_of_extraction() {
    let obs = obj(BLOOD_PRESSURE);
    let reg = SearchParamRegistry::r4();
    let mut n = reg.extract(&obs).len();
    let rounds = 2000;
    let start = Instant::now();
    for _ in 0..rounds {
        n += reg.extract(&obs).len();
    }
    let per = start.elapsed() / rounds;
    let params = reg.params_for(rt("Observation")).count();
    println!(
        "extract(blood-pressure Observation): {per:?} per resource ({params} parameters, {} with values)",
        n / (rounds as usize + 1)
    );
    // Generous, so that unoptimised builds on a loaded machine pass; `--release` is far below.
    assert!(per.as_millis() < 20, "{per:?}");
}
