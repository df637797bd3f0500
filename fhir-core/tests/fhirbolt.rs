//! The optional fhirbolt typed view (`--features fhirbolt`).
#![cfg(feature = "fhirbolt")]

use fhir_core::Resource;
use fhir_core::typed::to_fhirbolt;
use fhirbolt::model::r4::Resource as Typed;
use fhirbolt::model::r4::resources::{Observation, ObservationValue};
use fhirbolt::model::r4::types::ExtensionValue;

fn observation(value_text: &str) -> String {
    format!(
        r#"{{"resourceType":"Observation","status":"final",
            "code":{{"coding":[{{"system":"http://loinc.org","code":"8867-4"}}],"text":"pulse"}},
            "valueQuantity":{{"value":{value_text},"unit":"/min","system":"http://unitsofmeasure.org","code":"/min"}}}}"#
    )
}

const TRANSACTION: &str = r##"{
      "resourceType": "Bundle", "type": "transaction",
      "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
         "resource": {"resourceType": "Patient", "active": true,
                      "identifier": [{"system": "urn:oid:2.16.578.1.12.4.1.4.1", "value": "13031353453"}],
                      "contained": [{"resourceType": "Organization", "id": "org1", "name": "Sykehuset"}],
                      "managingOrganization": {"reference": "#org1"}},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
                      "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},
                      "valueQuantity": {"value": 72.50, "unit": "/min"}},
         "request": {"method": "POST", "url": "Observation"}}
      ]
    }"##;

const PATIENT: &str = r#"{
      "resourceType": "Patient", "id": "kari",
      "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Kari &amp; Ola</div>"},
      "extension": [
        {"url": "http://hl7.no/fhir/StructureDefinition/no-basis-municipalitycode",
         "valueCoding": {"system": "urn:oid:2.16.578.1.12.4.1.1.3402", "code": "0301"}},
        {"url": "http://example.org/nested",
         "extension": [{"url": "part", "valueString": "inner"}]}
      ],
      "name": [{"family": "Nordmann", "given": ["Kari", null],
                "_given": [null, {"extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-qualifier",
                                                 "valueCode": "CL"}]}]}],
      "birthDate": "2013-03-13",
      "_birthDate": {"id": "bd", "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                                                "valueDateTime": "2013-03-13T14:35:00+01:00"}]},
      "multipleBirthInteger": 2
    }"#;

fn typed_observation(src: &str) -> Box<Observation> {
    let resource = Resource::from_json_bytes(src.as_bytes()).expect("valid Observation");
    match to_fhirbolt(&resource).expect("fhirbolt accepts it") {
        Typed::Observation(o) => o,
        other => panic!("expected an Observation, got {other:?}"),
    }
}

fn quantity_value(o: &Observation) -> Option<String> {
    match &o.value {
        Some(ObservationValue::Quantity(q)) => q.value.as_ref().and_then(|d| d.value.clone()),
        other => panic!("expected valueQuantity, got {other:?}"),
    }
}

#[test]
fn observation_decimals_keep_their_exact_text() {
    for text in ["72.5", "72.50", "0.000", "-1e3"] {
        let o = typed_observation(&observation(text));
        assert_eq!(quantity_value(&o).as_deref(), Some(text));
        assert_eq!(o.status.value.as_deref(), Some("final"));
        assert_eq!(
            o.code.coding[0]
                .code
                .as_ref()
                .and_then(|c| c.value.as_deref()),
            Some("8867-4")
        );
    }
}

#[test]
fn typed_view_agrees_with_fhirbolts_own_parsers() {
    // A cross-check of the element tree this crate builds: fhirbolt's JSON parser (not used by
    // `to_fhirbolt`) and its XML parser fed with our XML must give the same structs.
    for src in [
        observation("72.50"),
        TRANSACTION.to_string(),
        PATIENT.to_string(),
    ] {
        let resource = Resource::from_json_bytes(src.as_bytes()).expect("valid resource");
        let ours = to_fhirbolt(&resource).expect("fhirbolt accepts it");
        let via_json: Typed = fhirbolt::json::from_str(&src, None).expect("fhirbolt JSON");
        assert_eq!(ours, via_json);
        let xml = String::from_utf8(fhir_core::xml::to_xml(&resource.into_json(), false).unwrap())
            .unwrap();
        let via_xml: Typed = fhirbolt::xml::from_str(&xml, None).expect("fhirbolt XML");
        assert_eq!(ours, via_xml);
    }
}

#[test]
fn transaction_bundle_with_resource_before_request_converts() {
    let src = TRANSACTION;
    let resource = Resource::from_json_bytes(src.as_bytes()).expect("valid Bundle");
    let Typed::Bundle(bundle) = to_fhirbolt(&resource).expect("fhirbolt accepts it") else {
        panic!("expected a Bundle");
    };
    assert_eq!(bundle.r#type.value.as_deref(), Some("transaction"));
    assert_eq!(bundle.entry.len(), 2);
    for entry in &bundle.entry {
        let request = entry.request.as_ref().expect("request kept");
        assert_eq!(request.method.value.as_deref(), Some("POST"));
    }
    assert_eq!(
        bundle.entry[0]
            .request
            .as_ref()
            .and_then(|r| r.url.value.as_deref()),
        Some("Patient")
    );
    match &bundle.entry[0].resource {
        Some(Typed::Patient(p)) => {
            assert_eq!(p.active.as_ref().and_then(|a| a.value), Some(true));
            assert_eq!(
                p.identifier[0]
                    .system
                    .as_ref()
                    .and_then(|s| s.value.as_deref()),
                Some("urn:oid:2.16.578.1.12.4.1.4.1")
            );
            match p.contained.first() {
                Some(Typed::Organization(org)) => {
                    assert_eq!(
                        org.id.as_ref().and_then(|i| i.value.as_deref()),
                        Some("org1")
                    );
                }
                other => panic!("expected a contained Organization, got {other:?}"),
            }
        }
        other => panic!("expected a Patient, got {other:?}"),
    }
    match &bundle.entry[1].resource {
        Some(Typed::Observation(o)) => assert_eq!(quantity_value(o).as_deref(), Some("72.50")),
        other => panic!("expected an Observation, got {other:?}"),
    }
}

#[test]
fn patient_with_extensions_converts() {
    let src = PATIENT;
    let resource = Resource::from_json_bytes(src.as_bytes()).expect("valid Patient");
    let Typed::Patient(p) = to_fhirbolt(&resource).expect("fhirbolt accepts it") else {
        panic!("expected a Patient");
    };
    assert_eq!(p.id.as_ref().and_then(|i| i.value.as_deref()), Some("kari"));
    assert_eq!(
        p.text.as_ref().map(|t| t.div.value.as_str()),
        Some(r#"<div xmlns="http://www.w3.org/1999/xhtml">Kari &amp; Ola</div>"#)
    );

    assert_eq!(p.extension.len(), 2);
    assert_eq!(
        p.extension[0].url,
        "http://hl7.no/fhir/StructureDefinition/no-basis-municipalitycode"
    );
    match &p.extension[0].value {
        Some(ExtensionValue::Coding(c)) => {
            assert_eq!(
                c.code.as_ref().and_then(|c| c.value.as_deref()),
                Some("0301")
            )
        }
        other => panic!("expected valueCoding, got {other:?}"),
    }
    assert_eq!(p.extension[1].extension[0].url, "part");

    let given = &p.name[0].given;
    assert_eq!(given.len(), 2);
    assert_eq!(given[0].value.as_deref(), Some("Kari"));
    assert_eq!(given[1].value, None);
    assert_eq!(given[1].extension.len(), 1);

    let birth = p.birth_date.as_ref().expect("birthDate");
    assert_eq!(birth.value.as_deref(), Some("2013-03-13"));
    assert_eq!(birth.id.as_deref(), Some("bd"));
    match &birth.extension[0].value {
        Some(ExtensionValue::DateTime(d)) => {
            assert_eq!(d.value.as_deref(), Some("2013-03-13T14:35:00+01:00"))
        }
        other => panic!("expected valueDateTime, got {other:?}"),
    }
}

#[test]
fn what_fhirbolt_cannot_hold_is_an_error_not_a_panic() {
    // Stored bytes skip validation, so this reaches the conversion as it is.
    let too_big = Resource::from_stored_bytes(
        br#"{"resourceType":"Patient","multipleBirthInteger":3000000000}"#,
    )
    .unwrap();
    match to_fhirbolt(&too_big) {
        Err(fhir_core::FhirError::Invalid(issues)) => {
            assert_eq!(
                issues[0].expression.as_deref(),
                Some("Patient.multipleBirthInteger")
            );
        }
        other => panic!("expected an Invalid error, got {other:?}"),
    }
    let unknown =
        Resource::from_stored_bytes(br#"{"resourceType":"Patient","fooBar":true}"#).unwrap();
    assert!(to_fhirbolt(&unknown).is_err());
}
