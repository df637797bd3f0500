//! FHIR XML <-> JSON through the public API.

use fhir_core::json::{Json, Map, parse};
use fhir_core::xml::{from_xml, json_bytes_to_xml, to_xml};
use fhir_core::{FhirError, IssueType, Resource};

/// XML reorders members into the spec's order, so trees are compared with members sorted.
fn sorted(j: &Json) -> Json {
    match j {
        Json::Object(m) => {
            let mut entries: Vec<(String, Json)> =
                m.iter().map(|(k, v)| (k.to_string(), sorted(v))).collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Json::Object(entries.into_iter().collect::<Map>())
        }
        Json::Array(items) => Json::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn json(text: &str) -> Json {
    parse(text.as_bytes()).expect("test JSON is valid")
}

fn xml_text(j: &Json, pretty: bool) -> String {
    String::from_utf8(to_xml(j, pretty).expect("serialises")).expect("UTF-8")
}

/// JSON -> XML -> JSON, compact and pretty; returns the compact XML.
fn assert_round_trip(src: &str) -> String {
    let original = json(src);
    let compact = xml_text(&original, false);
    let back = from_xml(compact.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{compact}"));
    assert_eq!(sorted(&back), sorted(&original), "compact XML:\n{compact}");
    let pretty = xml_text(&original, true);
    let back = from_xml(pretty.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{pretty}"));
    assert_eq!(sorted(&back), sorted(&original), "pretty XML:\n{pretty}");
    compact
}

fn position(haystack: &str, needle: &str) -> usize {
    haystack
        .find(needle)
        .unwrap_or_else(|| panic!("'{needle}' not found in:\n{haystack}"))
}

fn invalid_expression(err: &FhirError) -> Option<String> {
    match err {
        FhirError::Invalid(issues) => issues.first().and_then(|i| i.expression.clone()),
        _ => None,
    }
}

const BLOOD_PRESSURE: &str = r#"{
  "resourceType": "Observation",
  "id": "bp-1",
  "meta": {"profile": ["http://hl7.org/fhir/StructureDefinition/bp"]},
  "status": "final",
  "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
    "code": "vital-signs", "display": "Vital Signs"}]}],
  "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9",
    "display": "Blood pressure panel with all children optional"}], "text": "Blood pressure"},
  "subject": {"reference": "Patient/example"},
  "effectiveDateTime": "2024-05-01T08:30:00+02:00",
  "component": [
    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
     "valueQuantity": {"value": 120.50, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
    {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4", "display": "Diastolic blood pressure"}]},
     "valueQuantity": {"value": 80, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}
  ]
}"#;

#[test]
fn blood_pressure_observation_round_trips_with_exact_decimals() {
    let xml = assert_round_trip(BLOOD_PRESSURE);
    assert!(xml.starts_with(
        r#"<?xml version="1.0" encoding="UTF-8"?><Observation xmlns="http://hl7.org/fhir">"#
    ));
    assert!(xml.contains(r#"<value value="120.50"/>"#), "{xml}");
    assert!(xml.contains(r#"<effectiveDateTime value="2024-05-01T08:30:00+02:00"/>"#));
    assert!(xml.contains(r#"<valueQuantity><value value="80"/>"#));
    let back = from_xml(xml.as_bytes()).unwrap();
    let systolic = &back.get("component").and_then(Json::as_array).unwrap()[0];
    assert_eq!(
        systolic.get("valueQuantity").and_then(|q| q.get("value")),
        Some(&Json::Number("120.50".into()))
    );
    // The resource id is an element, not an attribute, and comes first.
    assert!(position(&xml, r#"<id value="bp-1"/>"#) < position(&xml, "<meta>"));
}

#[test]
fn xml_follows_the_spec_order_not_the_json_order() {
    let obs = json(
        r#"{"component": [{"valueQuantity": {"unit": "mmHg", "value": 1}, "code": {"text": "x"}}],
            "effectiveDateTime": "2024-01-01", "code": {"text": "bp"}, "status": "final",
            "resourceType": "Observation", "id": "o"}"#,
    );
    let xml = xml_text(&obs, false);
    let order = [
        "<id ",
        "<status ",
        "<code>",
        "<effectiveDateTime ",
        "<component>",
    ];
    let positions: Vec<usize> = order.iter().map(|n| position(&xml, n)).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{xml}");
    // Inside the component: code before value[x]; inside the quantity: value before unit.
    assert!(position(&xml, "<code><text value=\"x\"/>") < position(&xml, "<valueQuantity>"));
    assert!(position(&xml, "<value value=\"1\"/>") < position(&xml, "<unit value=\"mmHg\"/>"));
    assert_eq!(sorted(&from_xml(xml.as_bytes()).unwrap()), sorted(&obs));
}

const PATIENT: &str = r#"{
  "resourceType": "Patient",
  "id": "kari",
  "extension": [{"url": "http://hl7.no/fhir/StructureDefinition/no-basis-municipalitycode",
                 "valueCoding": {"system": "urn:oid:2.16.578.1.12.4.1.1.3402", "code": "0301"}}],
  "identifier": [{"use": "official", "system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "13031353453"}],
  "active": true,
  "name": [{"use": "official", "family": "Nordmann",
            "given": ["Kari", null, "Marie"],
            "_given": [{"id": "g1"}, {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier",
                                                   "valueCode": "CL"}]}, null]}],
  "gender": "female",
  "birthDate": "2013-03-13",
  "_birthDate": {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                "valueDateTime": "2013-03-13T14:35:00+01:00"}]},
  "multipleBirthInteger": 2
}"#;

#[test]
fn patient_with_fodselsnummer_and_primitive_extensions_round_trips() {
    let xml = assert_round_trip(PATIENT);
    assert!(xml.contains(
        r#"<system value="urn:oid:2.16.578.1.12.4.1.4.1"/><value value="13031353453"/>"#
    ));
    assert!(xml.contains(r#"<given id="g1" value="Kari"/>"#), "{xml}");
    // The second given name has only an extension: no value attribute.
    assert!(xml.contains(
        r#"<given><extension url="http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier"><valueCode value="CL"/></extension></given>"#
    ), "{xml}");
    assert!(xml.contains(r#"<birthDate value="2013-03-13"><extension url="http://hl7.org/fhir/StructureDefinition/patient-birthTime">"#));
    assert!(xml.contains(r#"<active value="true"/>"#));
    assert!(xml.contains(r#"<multipleBirthInteger value="2"/>"#));

    let back = from_xml(xml.as_bytes()).unwrap();
    let name = &back.get("name").and_then(Json::as_array).unwrap()[0];
    assert_eq!(
        name.get("given"),
        Some(&Json::Array(vec![
            Json::str("Kari"),
            Json::Null,
            Json::str("Marie")
        ]))
    );
    let under = name.get("_given").and_then(Json::as_array).unwrap();
    assert_eq!(under.len(), 3);
    assert_eq!(under[2], Json::Null);
    assert_eq!(back.get("active"), Some(&Json::Bool(true)));
    assert_eq!(
        back.get("multipleBirthInteger"),
        Some(&Json::Number("2".into()))
    );
}

#[test]
fn narrative_div_is_kept_exactly() {
    let div = r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>Blood pressure <b>120/80</b> mmHg &amp; pulse &lt; 100</p><ul class="x"><li>one</li><li><br/>two</li></ul></div>"#;
    let mut obs = json(r#"{"resourceType":"Observation","status":"final","code":{"text":"bp"}}"#);
    let mut text = Map::new();
    text.insert("status", Json::str("generated"));
    text.insert("div", Json::str(div));
    obs.as_object_mut()
        .unwrap()
        .insert("text", Json::Object(text));
    let src = obs.to_string();
    let xml = assert_round_trip(&src);
    assert!(
        xml.contains(&format!("<text><status value=\"generated\"/>{div}</text>")),
        "{xml}"
    );
    let back = from_xml(xml_text(&obs, true).as_bytes()).unwrap();
    assert_eq!(
        back.get("text")
            .and_then(|t| t.get("div"))
            .and_then(Json::as_str),
        Some(div)
    );
}

#[test]
fn div_with_a_prefix_is_normalised_to_the_default_namespace() {
    let xml = r#"<Patient xmlns="http://hl7.org/fhir" xmlns:h="http://www.w3.org/1999/xhtml">
      <text><status value="generated"/><h:div><h:p class='a"b'>Kari &amp; Ola</h:p></h:div></text>
    </Patient>"#;
    let j = from_xml(xml.as_bytes()).unwrap();
    assert_eq!(
        j.get("text")
            .and_then(|t| t.get("div"))
            .and_then(Json::as_str),
        Some(
            r#"<div xmlns="http://www.w3.org/1999/xhtml"><p class="a&quot;b">Kari &amp; Ola</p></div>"#
        )
    );
}

#[test]
fn div_without_its_namespace_is_rejected_on_read_and_repaired_on_write() {
    let xml = r#"<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/><div>x</div></text></Patient>"#;
    let err = from_xml(xml.as_bytes()).unwrap_err();
    assert_eq!(
        invalid_expression(&err).as_deref(),
        Some("Patient.text.div")
    );

    let j = json(
        r#"{"resourceType":"Patient","text":{"status":"generated","div":"<div><p>x</p></div>"}}"#,
    );
    let out = xml_text(&j, false);
    assert!(
        out.contains(r#"<div xmlns="http://www.w3.org/1999/xhtml"><p>x</p></div>"#),
        "{out}"
    );
    let broken =
        json(r#"{"resourceType":"Patient","text":{"status":"generated","div":"<div><p>x</div>"}}"#);
    assert!(matches!(to_xml(&broken, false), Err(FhirError::Invalid(_))));
    let injected =
        json(r#"{"resourceType":"Patient","text":{"status":"generated","div":"<div/><evil/>"}}"#);
    assert!(to_xml(&injected, false).is_err());
}

#[test]
fn questionnaire_with_nested_items_round_trips() {
    let xml = assert_round_trip(
        r#"{
      "resourceType": "Questionnaire", "id": "phq", "url": "http://example.org/Questionnaire/phq",
      "status": "active", "title": "Helse & trivsel",
      "item": [
        {"linkId": "1", "text": "Om deg", "type": "group", "repeats": false,
         "item": [
           {"linkId": "1.1", "text": "Alder", "type": "integer", "required": true, "maxLength": 3},
           {"linkId": "1.2", "text": "Røyker du?", "type": "choice",
            "answerOption": [{"valueCoding": {"code": "y", "display": "Ja"}},
                             {"valueCoding": {"code": "n", "display": "Nei"}}],
            "item": [{"linkId": "1.2.1", "text": "Hvor mye?", "type": "decimal",
                      "enableWhen": [{"question": "1.2", "operator": "=", "answerCoding": {"code": "y"}}],
                      "initial": [{"valueDecimal": 0.0}]}]}
         ]}
      ]
    }"#,
    );
    assert!(xml.contains(r#"<title value="Helse &amp; trivsel"/>"#));
    assert!(xml.contains(r#"<valueDecimal value="0.0"/>"#));
    assert!(xml.contains(r#"<required value="true"/>"#));
}

const TRANSACTION: &str = r##"{
  "resourceType": "Bundle", "type": "transaction",
  "entry": [
    {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
     "resource": {"resourceType": "Patient", "active": true,
                  "contained": [{"resourceType": "Organization", "id": "org1", "name": "Sykehuset"}],
                  "managingOrganization": {"reference": "#org1"}},
     "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:oid:2.16.578.1.12.4.1.4.1|13031353453"}},
    {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
     "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                  "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                  "valueQuantity": {"value": 72.50, "unit": "/min"}},
     "request": {"method": "POST", "url": "Observation"}},
    {"request": {"method": "DELETE", "url": "Observation/old"}}
  ]
}"##;

#[test]
fn transaction_bundle_with_contained_resource_round_trips() {
    let xml = assert_round_trip(TRANSACTION);
    assert!(
        xml.contains(r#"<resource><Patient><contained><Organization><id value="org1"/>"#),
        "{xml}"
    );
    assert!(
        !xml.contains(r#"<Patient xmlns"#),
        "only the root declares the namespace"
    );
    // entry.resource comes before entry.request in the spec order.
    assert!(
        position(&xml, "<resource><Observation>")
            < position(&xml, r#"<method value="POST"/><url value="Observation"/>"#)
    );
    assert!(xml.contains("identifier=urn:oid:2.16.578.1.12.4.1.4.1|13031353453"));
    let back = from_xml(xml.as_bytes()).unwrap();
    let entries = back.get("entry").and_then(Json::as_array).unwrap();
    assert_eq!(entries.len(), 3);
    let contained = entries[0]
        .get("resource")
        .and_then(|r| r.get("contained"))
        .and_then(Json::as_array)
        .unwrap();
    assert_eq!(
        contained[0].get("resourceType"),
        Some(&Json::str("Organization"))
    );
}

#[test]
fn extension_with_nested_extensions_round_trips() {
    let xml = assert_round_trip(
        r#"{"resourceType": "Patient", "id": "p",
        "extension": [{"id": "race", "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
          "extension": [
            {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
            {"url": "detail", "extension": [{"url": "deeper", "valueBoolean": false}]},
            {"url": "text", "valueString": "White \"and\" <other>\nline two\tend"}
          ]}]}"#,
    );
    assert!(xml.contains(
        r#"<extension id="race" url="http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"><extension url="ombCategory">"#
    ), "{xml}");
    assert!(xml.contains(r#"<extension url="detail"><extension url="deeper"><valueBoolean value="false"/></extension></extension>"#));
    assert!(
        xml.contains(r#"value="White &quot;and&quot; &lt;other&gt;&#10;line two&#9;end""#),
        "{xml}"
    );
}

#[test]
fn hand_written_xml_parses_to_the_known_json() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- published examples carry comments and schema hints -->
<Observation xmlns="http://hl7.org/fhir" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
             xsi:schemaLocation="http://hl7.org/fhir fhir-single.xsd">
  <id value="pulse"/>
  <text>
    <status value="generated"/>
    <div xmlns="http://www.w3.org/1999/xhtml">Pulse <b>72.50</b>/min</div>
  </text>
  <?some-pi ignored?>
  <status value="final"/>
  <code id="c1">
    <coding>
      <system value="http://loinc.org"/>
      <code value="8867-4"/>
      <display value="Heart rate &amp; &quot;rhythm&quot;&#10;second line"/>
    </coding>
  </code>
  <subject><reference value="Patient/kari"/></subject>
  <effectiveDateTime value="2024-05-01T08:30:00Z"/>
  <valueQuantity>
    <value value="72.50"/>
    <unit value="beats/minute"/>
  </valueQuantity>
  <note><text value="a&#x9;b c"/></note>
</Observation>
"#;
    let expected = json(
        r#"{"resourceType": "Observation", "id": "pulse",
        "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Pulse <b>72.50</b>/min</div>"},
        "status": "final",
        "code": {"id": "c1", "coding": [{"system": "http://loinc.org", "code": "8867-4",
                                         "display": "Heart rate & \"rhythm\"\nsecond line"}]},
        "subject": {"reference": "Patient/kari"},
        "effectiveDateTime": "2024-05-01T08:30:00Z",
        "valueQuantity": {"value": 72.50, "unit": "beats/minute"},
        "note": [{"text": "a\tb c"}]}"#,
    );
    let parsed = from_xml(xml.as_bytes()).unwrap();
    assert_eq!(sorted(&parsed), sorted(&expected));
    // Members come out in document order, each primitive's `_name` right after it.
    let keys: Vec<&str> = parsed.as_object().unwrap().iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "resourceType",
            "id",
            "text",
            "status",
            "code",
            "subject",
            "effectiveDateTime",
            "valueQuantity",
            "note"
        ]
    );
}

#[test]
fn resource_from_xml_bytes_gives_the_same_resource_as_json() {
    let xml = to_xml(&json(BLOOD_PRESSURE), true).unwrap();
    let from_xml_res = Resource::from_xml_bytes(&xml).unwrap();
    let from_json_res = Resource::from_json_bytes(BLOOD_PRESSURE.as_bytes()).unwrap();
    assert_eq!(from_xml_res.resource_type().as_str(), "Observation");
    assert_eq!(from_xml_res.id(), Some("bp-1"));
    assert_eq!(
        sorted(&from_xml_res.into_json()),
        sorted(&from_json_res.into_json())
    );
}

#[test]
fn json_bytes_to_xml_serves_stored_json() {
    let stored = json(TRANSACTION).to_bytes();
    let xml = json_bytes_to_xml(&stored, false).unwrap();
    assert_eq!(xml, to_xml(&json(TRANSACTION), false).unwrap());
    assert!(matches!(
        json_bytes_to_xml(b"{not json", false),
        Err(FhirError::Json(_))
    ));
}

#[test]
fn pretty_xml_is_indented_with_two_spaces() {
    let xml = xml_text(&json(BLOOD_PRESSURE), true);
    assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Observation xmlns=\"http://hl7.org/fhir\">\n  <id value=\"bp-1\"/>\n"), "{xml}");
    assert!(xml.contains("\n  <component>\n    <code>\n      <coding>\n        <system value=\"http://loinc.org\"/>"), "{xml}");
    assert!(xml.ends_with("</Observation>\n"));
}

#[test]
fn to_xml_refuses_what_xml_cannot_express() {
    let unknown = json(r#"{"resourceType":"Observation","status":"final","fooBar":1}"#);
    let err = to_xml(&unknown, false).unwrap_err();
    assert_eq!(
        invalid_expression(&err).as_deref(),
        Some("Observation.fooBar")
    );
    let control = json(r#"{"resourceType":"Patient","gender":"a\u0001b"}"#);
    assert!(matches!(
        to_xml(&control, false),
        Err(FhirError::Invalid(_))
    ));
    let not_resource = json(r#"{"resourceType":"NoSuchThing"}"#);
    assert!(matches!(
        to_xml(&not_resource, false),
        Err(FhirError::UnknownResourceType(_))
    ));
    assert!(to_xml(&Json::Array(vec![]), false).is_err());
}

#[test]
fn root_outside_the_fhir_namespace_is_rejected() {
    for xml in [
        r#"<Patient xmlns="http://hl7.org/fhir/wrong"><active value="true"/></Patient>"#,
        r#"<Patient><active value="true"/></Patient>"#,
        r#"<f:Patient xmlns:f="http://example.org"/>"#,
    ] {
        match from_xml(xml.as_bytes()) {
            Err(FhirError::Xml(msg)) => assert!(msg.contains("http://hl7.org/fhir"), "{msg}"),
            other => panic!("expected an XML error for {xml}, got {other:?}"),
        }
    }
    // A prefix bound to the FHIR namespace is fine.
    let ok = from_xml(
        br#"<f:Patient xmlns:f="http://hl7.org/fhir"><f:active value="true"/></f:Patient>"#,
    )
    .unwrap();
    assert_eq!(ok.get("active"), Some(&Json::Bool(true)));
    assert!(matches!(
        from_xml(br#"<Nonsense xmlns="http://hl7.org/fhir"/>"#),
        Err(FhirError::UnknownResourceType(t)) if t == "Nonsense"
    ));
}

#[test]
fn unknown_elements_are_reported_with_their_path() {
    let err = from_xml(br#"<Observation xmlns="http://hl7.org/fhir"><status value="final"/><fooBar value="1"/></Observation>"#)
        .unwrap_err();
    assert_eq!(
        invalid_expression(&err).as_deref(),
        Some("Observation.fooBar")
    );
    let FhirError::Invalid(issues) = &err else {
        unreachable!()
    };
    assert_eq!(issues[0].code, IssueType::Structure);

    let nested = from_xml(
        br#"<Observation xmlns="http://hl7.org/fhir"><code><coding><system value="x"/></coding><coding><bogus/></coding></code></Observation>"#,
    )
    .unwrap_err();
    assert_eq!(
        invalid_expression(&nested).as_deref(),
        Some("Observation.code.coding[1].bogus")
    );

    // Element.id is an attribute; as an element it is unknown.
    let id_element = from_xml(
        br#"<Observation xmlns="http://hl7.org/fhir"><code><id value="x"/></code></Observation>"#,
    )
    .unwrap_err();
    assert_eq!(
        invalid_expression(&id_element).as_deref(),
        Some("Observation.code.id")
    );

    let wrong_ns = from_xml(
        br#"<Observation xmlns="http://hl7.org/fhir"><status xmlns="http://example.org" value="final"/></Observation>"#,
    )
    .unwrap_err();
    assert_eq!(
        invalid_expression(&wrong_ns).as_deref(),
        Some("Observation.status")
    );

    let attr = from_xml(br#"<Observation xmlns="http://hl7.org/fhir"><status value="final" foo="x"/></Observation>"#)
        .unwrap_err();
    assert_eq!(
        invalid_expression(&attr).as_deref(),
        Some("Observation.status")
    );
}

#[test]
fn values_that_do_not_fit_the_json_kind_are_rejected() {
    let err = from_xml(
        br#"<Observation xmlns="http://hl7.org/fhir"><valueQuantity><value value="72,5"/></valueQuantity></Observation>"#,
    )
    .unwrap_err();
    assert_eq!(
        invalid_expression(&err).as_deref(),
        Some("Observation.valueQuantity.value")
    );
    assert!(err.to_string().contains("72,5"), "{err}");
    for bad in ["", " 1", "1.", "+1", "0x10", "NaN", "01"] {
        let xml = format!(
            r#"<Observation xmlns="http://hl7.org/fhir"><valueInteger value="{bad}"/></Observation>"#
        );
        assert!(
            matches!(from_xml(xml.as_bytes()), Err(FhirError::Invalid(_))),
            "{bad:?}"
        );
    }
    let boolean =
        from_xml(br#"<Patient xmlns="http://hl7.org/fhir"><active value="yes"/></Patient>"#)
            .unwrap_err();
    assert_eq!(
        invalid_expression(&boolean).as_deref(),
        Some("Patient.active")
    );
    let repeated = from_xml(
        br#"<Patient xmlns="http://hl7.org/fhir"><active value="true"/><active value="false"/></Patient>"#,
    )
    .unwrap_err();
    assert_eq!(
        invalid_expression(&repeated).as_deref(),
        Some("Patient.active")
    );
    let text =
        from_xml(br#"<Patient xmlns="http://hl7.org/fhir"><gender>female</gender></Patient>"#)
            .unwrap_err();
    assert_eq!(invalid_expression(&text).as_deref(), Some("Patient.gender"));
}

#[test]
fn doctype_and_entity_declarations_are_rejected() {
    let billion_laughs = br#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
]>
<Patient xmlns="http://hl7.org/fhir"><gender value="&lol2;"/></Patient>"#;
    match from_xml(billion_laughs) {
        Err(FhirError::Xml(msg)) => assert!(msg.contains("DOCTYPE"), "{msg}"),
        other => panic!("expected a DOCTYPE error, got {other:?}"),
    }
    let xxe = br#"<!DOCTYPE p [<!ENTITY x SYSTEM "file:///etc/passwd">]><Patient xmlns="http://hl7.org/fhir"><gender value="&x;"/></Patient>"#;
    assert!(matches!(from_xml(xxe), Err(FhirError::Xml(_))));
    // Without a DTD an undefined entity is simply an error.
    let undefined = br#"<Patient xmlns="http://hl7.org/fhir"><gender value="&x;"/></Patient>"#;
    assert!(from_xml(undefined).is_err());
    let undefined_in_div = br#"<Patient xmlns="http://hl7.org/fhir"><text><status value="generated"/><div xmlns="http://www.w3.org/1999/xhtml">a&nbsp;b</div></text></Patient>"#;
    assert!(matches!(from_xml(undefined_in_div), Err(FhirError::Xml(_))));
}

#[test]
fn other_encodings_and_trailing_content_are_rejected() {
    assert!(
        from_xml(
            br#"<?xml version="1.0" encoding="ISO-8859-1"?><Patient xmlns="http://hl7.org/fhir"/>"#
        )
        .is_err()
    );
    assert!(
        from_xml(b"<Patient xmlns=\"http://hl7.org/fhir\"><gender value=\"\xff\"/></Patient>")
            .is_err()
    );
    assert!(
        from_xml(
            br#"<Patient xmlns="http://hl7.org/fhir"/><Patient xmlns="http://hl7.org/fhir"/>"#
        )
        .is_err()
    );
    assert!(from_xml(br#"<Patient xmlns="http://hl7.org/fhir"/>trailing"#).is_err());
    let bom = b"\xEF\xBB\xBF<Patient xmlns=\"http://hl7.org/fhir\"/>";
    assert_eq!(
        from_xml(bom).unwrap().get("resourceType"),
        Some(&Json::str("Patient"))
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let depth = 5_000;
    let mut xml = String::from(r#"<Patient xmlns="http://hl7.org/fhir">"#);
    for _ in 0..depth {
        xml.push_str(r#"<extension url="x">"#);
    }
    for _ in 0..depth {
        xml.push_str("</extension>");
    }
    xml.push_str("</Patient>");
    match from_xml(xml.as_bytes()) {
        Err(FhirError::Xml(msg)) => assert!(msg.contains("deeper than"), "{msg}"),
        other => panic!("expected a depth error, got {other:?}"),
    }
    let mut bundle = String::new();
    for _ in 0..depth {
        bundle.push_str(r#"<Bundle xmlns="http://hl7.org/fhir"><entry><resource>"#);
    }
    assert!(from_xml(bundle.as_bytes()).is_err());
}

#[test]
fn garbage_and_truncated_input_never_panics() {
    let full = to_xml(&json(TRANSACTION), true).unwrap();
    assert!(from_xml(&full).is_ok());
    // Only the trailing newline of pretty output may go.
    let last_tag_end = full.iter().rposition(|&b| b == b'>').unwrap() + 1;
    let mut ok_prefixes = 0;
    for cut in 0..last_tag_end {
        if from_xml(&full[..cut]).is_ok() {
            ok_prefixes += 1;
        }
    }
    assert_eq!(ok_prefixes, 0, "a truncated document must not parse");

    // Deterministic garbage: flip, drop and duplicate bytes of a valid document.
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"<>/=\"'&;#x:! ?-[]abcdivxmlns\n\xff\x00";
    for _ in 0..3_000 {
        let mut doc = full.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = (next() as usize) % doc.len().max(1);
            match next() % 3 {
                0 => doc[i] = alphabet[(next() as usize) % alphabet.len()],
                1 => {
                    doc.remove(i);
                }
                _ => {
                    let b = doc[i];
                    doc.insert(i, b);
                }
            }
        }
        let _ = from_xml(&doc);
    }
    for junk in [
        &b""[..],
        b"   ",
        b"<",
        b"<?xml",
        b"<Patient",
        b"<Patient xmlns=\"http://hl7.org/fhir\"",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><text><div xmlns=\"http://www.w3.org/1999/xhtml\"><p>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"></Observation>",
        b"<Patient xmlns=\"http://hl7.org/fhir\" xmlns=\"x\"/>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><active value='true' value='false'/></Patient>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"&#0;\"/></Patient>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><active value=\"&#xFFFFFFFF;\"/></Patient>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><contained></contained></Patient>",
        b"<Patient xmlns=\"http://hl7.org/fhir\"><contained><Patient/><Patient/></contained></Patient>",
        b"<![CDATA[x]]>",
        b"\xEF\xBB\xBF",
    ] {
        assert!(from_xml(junk).is_err(), "{:?}", String::from_utf8_lossy(junk));
    }
}
