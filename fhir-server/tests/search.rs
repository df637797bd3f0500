//! FHIR search over HTTP against a real server: each parameter type with its prefixes and
//! modifiers, OR/AND, chains, `_has`, includes, sorting, result controls, unknown parameters,
//! system, compartment and `POST _search`.

mod common;
mod search_common;

use common::*;
use reqwest::StatusCode;
use search_common::*;
use serde_json::json;

#[tokio::test]
async fn dates_at_every_precision_and_across_time_zones() {
    let s = TestServer::start().await;
    let p = "Patient/p1";
    let o1 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-01T10:00:00+01:00", "70", "/min"),
    )
    .await;
    let o2 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-01T23:30:00+01:00", "71", "/min"),
    )
    .await;
    // Local 2 March in Oslo, but 1 March in UTC.
    let o3 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-02T00:30:00+01:00", "72", "/min"),
    )
    .await;
    let o4 = make(&s, "default", vital("8867-4", p, "2024-03", "73", "/min")).await;
    let o5 = make(&s, "default", vital("8867-4", p, "2024", "74", "/min")).await;
    let o6 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-02-29T12:00:00Z", "75", "/min"),
    )
    .await;
    let o7 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-04-01T08:00:00+02:00", "76", "/min"),
    )
    .await;
    let o8 = make(
        &s,
        "default",
        vital("8867-4", p, "2020-01-01T12:00:00Z", "77", "/min"),
    )
    .await;
    let ids = |v: &[&String]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("date=2024-03-01", ids(&[&o1, &o2, &o3])),
        ("date=eq2024-03-01", ids(&[&o1, &o2, &o3])),
        ("date=2024-03", ids(&[&o1, &o2, &o3, &o4])),
        ("date=2024", ids(&[&o1, &o2, &o3, &o4, &o5, &o6, &o7])),
        ("date=2024-03-01T10:00:00%2B01:00", ids(&[&o1])),
        ("date=2024-03-01T09:00Z", ids(&[&o1])),
        ("date=2024-03-01T10:00%2B01:00", ids(&[&o1])),
        ("date=2024-03-02T00:30:00%2B01:00", ids(&[&o3])),
        ("date=2024-03-01T23:30:00Z", ids(&[&o3])),
        ("date=2024-03-01T18:30:00-05:00", ids(&[&o3])),
        ("date=ge2024-03-02", ids(&[&o4, &o5, &o7])),
        ("date=gt2024-03-01", ids(&[&o4, &o5, &o7])),
        ("date=lt2024-03-01", ids(&[&o5, &o6, &o8])),
        ("date=le2024-03-01", ids(&[&o1, &o2, &o3, &o5, &o6, &o8])),
        ("date=sa2024-03-01", ids(&[&o7])),
        ("date=eb2024-03-01", ids(&[&o6, &o8])),
        ("date=ne2024-03-01", ids(&[&o4, &o5, &o6, &o7, &o8])),
        (
            "date=lt2024-03-01T10:00:00%2B01:00",
            ids(&[&o4, &o5, &o6, &o8]),
        ),
        (
            "date=ge2024-03-01T10:00:00%2B01:00",
            ids(&[&o1, &o2, &o3, &o4, &o5, &o7]),
        ),
        (
            "date=gt2024-03-01T10:00:00%2B01:00",
            ids(&[&o2, &o3, &o4, &o5, &o7]),
        ),
        // Repeated parameters are AND: a day as a range (the month and year overlap it).
        (
            "date=ge2024-03-01&date=lt2024-03-02",
            ids(&[&o1, &o2, &o3, &o4, &o5]),
        ),
        // Comma is OR.
        ("date=2024-02-29,2020", ids(&[&o6, &o8])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }
    let ap = found(&s, "default", "/Observation?date=ap2024-03-01").await;
    assert!(
        ap.contains(&o1) && ap.contains(&o6) && !ap.contains(&o8),
        "{ap:?}"
    );

    // Periods: an open end reaches into the future.
    let c1 = make(
        &s,
        "default",
        care_plan(p, "active", "2024-01-01", Some("2024-06-30"), "KOLS"),
    )
    .await;
    let c2 = make(
        &s,
        "default",
        care_plan(p, "active", "2024-03-01", None, "Hjertesvikt"),
    )
    .await;
    let c3 = make(
        &s,
        "default",
        care_plan(p, "completed", "2023-01-01", Some("2023-12-31"), "Diabetes"),
    )
    .await;
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("date=2024-03-01", vec![]),
        ("date=2024", ids(&[&c1])),
        ("date=ge2024-07-01", ids(&[&c2])),
        ("date=lt2024-01-01", ids(&[&c3])),
        ("date=sa2023-12-31", ids(&[&c1, &c2])),
        ("date=eb2024-01-01", ids(&[&c3])),
        ("date=le2024-03-01", ids(&[&c1, &c3])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/CarePlan?{q}")).await,
            want,
            "{q}"
        );
    }

    // Appointments by start; _lastUpdated is a date parameter like any other.
    let a1 = make(
        &s,
        "default",
        appointment(
            p,
            "booked",
            "2024-05-02T09:00:00+02:00",
            "2024-05-02T09:30:00+02:00",
        ),
    )
    .await;
    make(
        &s,
        "default",
        appointment(
            p,
            "booked",
            "2024-05-03T09:00:00+02:00",
            "2024-05-03T09:30:00+02:00",
        ),
    )
    .await;
    assert_eq!(
        found(&s, "default", "/Appointment?date=2024-05-02").await,
        [a1.as_str()]
    );
    assert_eq!(
        found(&s, "default", "/Appointment?date=2024-05")
            .await
            .len(),
        2
    );
    let all = found(&s, "default", "/Observation?_lastUpdated=ge2020-01-01").await;
    assert_eq!(all.len(), 8);
    assert!(
        found(&s, "default", "/Observation?_lastUpdated=lt2020-01-01")
            .await
            .is_empty()
    );

    for bad in [
        "date=2024-13",
        "date=xx2024",
        "date=2024-02-30",
        "date=ge",
        "date=2024-03-01T25:00Z",
        "_lastUpdated=yesterday",
    ] {
        let r = s.get("default", &format!("/Observation?{bad}")).await;
        let oo = outcome(r, StatusCode::BAD_REQUEST).await;
        assert!(issues_text(&oo).contains("not a date"), "{bad}: {oo}");
    }
}

#[tokio::test]
async fn numbers_and_quantities_with_and_without_units() {
    let s = TestServer::start().await;
    let p = "Patient/p1";
    let q1 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-01", "72.5", "/min"),
    )
    .await;
    let q2 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-01", "100", "/min"),
    )
    .await;
    let q3 = make(
        &s,
        "default",
        vital("8867-4", p, "2024-03-01", "99.6", "/min"),
    )
    .await;
    let q4 = make(
        &s,
        "default",
        vital("29463-7", p, "2024-03-01", "80.0", "kg"),
    )
    .await;
    let q5 = make(
        &s,
        "default",
        vital("15074-8", p, "2024-03-01", "5.4", "mmol/L"),
    )
    .await;
    let set = |v: &[&String]| {
        let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
        v.sort();
        v
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        // eq uses the search value's precision: 100 is [99.5, 100.5), 100.0 is [99.95, 100.05).
        ("value-quantity=100", set(&[&q2, &q3])),
        ("value-quantity=100.0", set(&[&q2])),
        ("value-quantity=72.5", set(&[&q1])),
        ("value-quantity=72.50", set(&[&q1])),
        ("value-quantity=7.25e1", set(&[&q1])),
        ("value-quantity=gt99.6", set(&[&q2])),
        ("value-quantity=ge99.6", set(&[&q2, &q3])),
        ("value-quantity=lt72.5", set(&[&q5])),
        ("value-quantity=le72.5", set(&[&q1, &q5])),
        ("value-quantity=ne100", set(&[&q1, &q4, &q5])),
        ("value-quantity=sa99", set(&[&q2, &q3])),
        ("value-quantity=eb10", set(&[&q5])),
        ("value-quantity=ap80", set(&[&q1, &q4])),
        // Units: system and code, or code (or unit text) in any system.
        (
            "value-quantity=80|http://unitsofmeasure.org|kg",
            set(&[&q4]),
        ),
        ("value-quantity=80||kg", set(&[&q4])),
        ("value-quantity=80|http://unitsofmeasure.org|/min", vec![]),
        ("value-quantity=gt50||/min", set(&[&q1, &q2, &q3])),
        (
            "value-quantity=5.4|http://unitsofmeasure.org|mmol/L",
            set(&[&q5]),
        ),
        (
            "value-quantity=gt1|http://unitsofmeasure.org|mmol%2FL",
            set(&[&q5]),
        ),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }

    // A number parameter (RiskAssessment.prediction.probability).
    let risk = |p: &str| {
        json!({"resourceType": "RiskAssessment", "status": "final",
               "subject": {"reference": "Patient/p1"},
               "prediction": [{"probabilityDecimal": p.parse::<f64>().unwrap()}]})
    };
    let r1 = make(&s, "default", risk("0.25")).await;
    let r2 = make(&s, "default", risk("0.7")).await;
    assert_eq!(
        found(&s, "default", "/RiskAssessment?probability=0.25").await,
        [r1.as_str()]
    );
    assert_eq!(
        found(&s, "default", "/RiskAssessment?probability=0.3").await,
        [r1.as_str()]
    );
    assert!(
        found(&s, "default", "/RiskAssessment?probability=0.2")
            .await
            .is_empty()
    );
    assert_eq!(
        found(&s, "default", "/RiskAssessment?probability=gt0.5").await,
        [r2.as_str()]
    );
    assert_eq!(
        found(&s, "default", "/RiskAssessment?probability=le0.25").await,
        [r1]
    );

    for bad in [
        "value-quantity=abc",
        "value-quantity=gt",
        "value-quantity=1|a|b|c",
        "value-quantity=xx5",
    ] {
        let r = s.get("default", &format!("/Observation?{bad}")).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn tokens_strings_and_their_modifiers() {
    let s = TestServer::start().await;
    let pa = make(
        &s,
        "default",
        person("13031353453", "Nordmann", "Kari", "1970-01-01", "female"),
    )
    .await;
    let pb = make(
        &s,
        "default",
        person("17058512345", "Ødegård", "Søren", "1985-05-17", "male"),
    )
    .await;
    let pc = make(
        &s,
        "default",
        person("24120112345", "Hansen", "Ola", "2001-12-24", "male"),
    )
    .await;
    let nameless = make(
        &s,
        "default",
        json!({"resourceType": "Patient", "active": true}),
    )
    .await;
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("name=kari", sorted(&[&pa])),
        ("name=KARI", sorted(&[&pa])),
        ("name=sor", sorted(&[&pb])),
        ("name=S%C3%98R", sorted(&[&pb])),
        ("name=odeg", sorted(&[&pb])),
        ("family=nord", sorted(&[&pa])),
        ("family=mann", vec![]),
        ("family:exact=Nordmann", sorted(&[&pa])),
        ("family:exact=nordmann", vec![]),
        ("family:exact=%C3%98deg%C3%A5rd", sorted(&[&pb])),
        ("name:contains=ega", sorted(&[&pb])),
        ("name:contains=ANS", sorted(&[&pc])),
        ("address-city=tromso", sorted(&[&pa, &pb, &pc])),
        ("name:missing=true", sorted(&[&nameless])),
        ("name:missing=false", sorted(&[&pa, &pb, &pc])),
        ("name=kari,ola", sorted(&[&pa, &pc])),
        ("gender=female", sorted(&[&pa])),
        ("gender:not=female", sorted(&[&pb, &pc, &nameless])),
        ("gender:missing=true", sorted(&[&nameless])),
        ("birthdate=1970", sorted(&[&pa])),
        ("birthdate=ge2000", sorted(&[&pc])),
        ("identifier=13031353453", sorted(&[&pa])),
        (
            "identifier=urn:oid:2.16.578.1.12.4.1.4.1|13031353453",
            sorted(&[&pa]),
        ),
        (
            "identifier=urn:oid:2.16.578.1.12.4.1.4.1%7C13031353453",
            sorted(&[&pa]),
        ),
        ("identifier=|13031353453", vec![]),
        (
            "identifier=urn:oid:2.16.578.1.12.4.1.4.1|",
            sorted(&[&pa, &pb, &pc]),
        ),
        ("identifier=urn:other|13031353453", vec![]),
        (
            "identifier:of-type=http://terminology.hl7.org/CodeSystem/v2-0203|NI|17058512345",
            sorted(&[&pb]),
        ),
        ("identifier:text=fodsel", sorted(&[&pa, &pb, &pc])),
        ("active=true", sorted(&[&nameless])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Patient?{q}")).await,
            want,
            "{q}"
        );
    }
    assert_eq!(
        found(&s, "default", &format!("/Patient?_id={pa},{pc}")).await,
        sorted(&[&pa, &pc])
    );

    // Observation codes: system|code, code, |code, system|, :text, :not, :in (refused).
    let p = format!("Patient/{pa}");
    let hr = make(
        &s,
        "default",
        vital("8867-4", &p, "2024-03-01", "72", "/min"),
    )
    .await;
    let spo2 = make(&s, "default", vital("2708-6", &p, "2024-03-01", "97", "%")).await;
    let weight = make(
        &s,
        "default",
        vital("29463-7", &p, "2024-03-01", "80", "kg"),
    )
    .await;
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("code=8867-4", sorted(&[&hr])),
        ("code=http://loinc.org|8867-4", sorted(&[&hr])),
        ("code=|8867-4", vec![]),
        ("code=http://loinc.org|", sorted(&[&hr, &spo2, &weight])),
        ("code=http://snomed.info/sct|8867-4", vec![]),
        ("code=8867-4,29463-7", sorted(&[&hr, &weight])),
        ("code:not=8867-4", sorted(&[&spo2, &weight])),
        ("code:text=heart", sorted(&[&hr])),
        ("code:text=WEIGHT", sorted(&[&weight])),
        ("category=vital-signs", sorted(&[&hr, &spo2, &weight])),
        ("category=vital-signs&code=2708-6", sorted(&[&spo2])),
        ("status=final", sorted(&[&hr, &spo2, &weight])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }
    for (q, what) in [
        ("code:in=http://example.org/ValueSet/x", "terminology"),
        ("code:below=http://loinc.org|8867", "terminology"),
        ("code:not-in=http://example.org/ValueSet/x", "terminology"),
        ("code:exact=8867-4", "not supported"),
        ("subject:below=Patient/1", "not supported"),
        ("code=a|b|c", "more than one"),
        ("status:missing=maybe", "true or false"),
    ] {
        let r = s.get("default", &format!("/Observation?{q}")).await;
        let oo = outcome(r, StatusCode::BAD_REQUEST).await;
        assert!(issues_text(&oo).contains(what), "{q}: {oo}");
    }

    // Meta: _tag, _profile, _security, _source.
    let tagged = make(
        &s,
        "default",
        json!({"resourceType": "Patient",
               "meta": {"tag": [{"system": "urn:test:tags", "code": "phg"}],
                        "profile": ["http://hl7.no/fhir/StructureDefinition/no-basis-Patient"],
                        "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}],
                        "source": "urn:phg:device-1"}}),
    )
    .await;
    for q in [
        "_tag=urn:test:tags|phg",
        "_tag=phg",
        "_profile=http://hl7.no/fhir/StructureDefinition/no-basis-Patient",
        "_security=http://terminology.hl7.org/CodeSystem/v3-Confidentiality|R",
        "_source=urn:phg:device-1",
    ] {
        assert_eq!(
            found(&s, "default", &format!("/Patient?{q}")).await,
            [tagged.as_str()],
            "{q}"
        );
    }
    assert!(
        found(&s, "default", "/Patient?_tag=urn:test:tags|other")
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn references_uris_and_composites() {
    let s = TestServer::start().await;
    let pa = make(
        &s,
        "default",
        person("13031353453", "Nordmann", "Kari", "1970-01-01", "female"),
    )
    .await;
    let pb = make(
        &s,
        "default",
        person("17058512345", "Ødegård", "Søren", "1985-05-17", "male"),
    )
    .await;
    let oa = make(
        &s,
        "default",
        vital(
            "8867-4",
            &format!("Patient/{pa}"),
            "2024-03-01",
            "72",
            "/min",
        ),
    )
    .await;
    let ob = make(
        &s,
        "default",
        vital(
            "8867-4",
            &format!("Patient/{pb}"),
            "2024-03-01",
            "64",
            "/min",
        ),
    )
    .await;
    let mut logical = vital("8867-4", "Patient/x", "2024-03-01", "60", "/min");
    logical["subject"] = json!({"identifier": {"system": FNR, "value": "24120112345"}});
    let ol = make(&s, "default", logical).await;
    let mut none = vital("8867-4", "Patient/x", "2024-03-01", "61", "/min");
    none.as_object_mut().unwrap().remove("subject");
    let on = make(&s, "default", none).await;
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("subject=Patient/{pa}"), sorted(&[&oa])),
        (format!("subject={pa}"), sorted(&[&oa])),
        (format!("subject:Patient={pa}"), sorted(&[&oa])),
        (format!("patient={pa}"), sorted(&[&oa])),
        (
            format!("patient=Patient/{pa},Patient/{pb}"),
            sorted(&[&oa, &ob]),
        ),
        (
            format!("subject=https://fhir.example.no/fhir/default/Patient/{pa}"),
            sorted(&[&oa]),
        ),
        (format!("subject:Group={pa}"), vec![]),
        (
            format!("subject:identifier={FNR}|24120112345"),
            sorted(&[&ol]),
        ),
        ("subject:identifier=24120112345".into(), sorted(&[&ol])),
        ("subject:missing=true".into(), sorted(&[&on])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }

    // uri, with :below and :above; a canonical reference (QuestionnaireResponse.questionnaire).
    let q1 = make(
        &s,
        "default",
        json!({"resourceType": "Questionnaire", "status": "active",
        "url": "http://helse-nord.no/fhir/Questionnaire/kols-egenvurdering"}),
    )
    .await;
    let q2 = make(
        &s,
        "default",
        json!({"resourceType": "Questionnaire", "status": "active",
        "url": "http://helse-nord.no/fhir/Questionnaire/hjertesvikt"}),
    )
    .await;
    let q3 = make(
        &s,
        "default",
        json!({"resourceType": "Questionnaire", "status": "active",
        "url": "http://helse-nord.no/fhir"}),
    )
    .await;
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "url=http://helse-nord.no/fhir/Questionnaire/hjertesvikt",
            sorted(&[&q2]),
        ),
        ("url=http://helse-nord.no/fhir/Questionnaire", vec![]),
        (
            "url:below=http://helse-nord.no/fhir/Questionnaire",
            sorted(&[&q1, &q2]),
        ),
        (
            "url:above=http://helse-nord.no/fhir/Questionnaire/kols-egenvurdering",
            sorted(&[&q1, &q3]),
        ),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Questionnaire?{q}")).await,
            want,
            "{q}"
        );
    }
    let canonical = "http://helse-nord.no/fhir/Questionnaire/kols-egenvurdering";
    let r1 = make(
        &s,
        "default",
        questionnaire_response(
            &format!("Patient/{pa}"),
            &format!("{canonical}|1.0"),
            "2024-03-01T08:00:00+01:00",
            3,
        ),
    )
    .await;
    make(
        &s,
        "default",
        questionnaire_response(
            &format!("Patient/{pa}"),
            "http://helse-nord.no/fhir/Questionnaire/hjertesvikt",
            "2024-03-01T08:00:00+01:00",
            3,
        ),
    )
    .await;
    assert_eq!(
        found(
            &s,
            "default",
            &format!("/QuestionnaireResponse?questionnaire={canonical}")
        )
        .await,
        [r1.as_str()]
    );
    assert_eq!(
        found(
            &s,
            "default",
            &format!(
                "/QuestionnaireResponse?questionnaire=Questionnaire/kols-egenvurdering&patient={pa}"
            )
        )
        .await,
        [r1]
    );

    // Composites: the components must match in the same row.
    let bp1 = make(
        &s,
        "default",
        blood_pressure(
            &format!("Patient/{pa}"),
            "2024-03-01T08:00:00+01:00",
            "142",
            "91",
        ),
    )
    .await;
    let bp2 = make(
        &s,
        "default",
        blood_pressure(
            &format!("Patient/{pa}"),
            "2024-03-02T08:00:00+01:00",
            "118",
            "142",
        ),
    )
    .await;
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "component-code-value-quantity=http://loinc.org|8480-6$gt140",
            sorted(&[&bp1]),
        ),
        (
            "component-code-value-quantity=8480-6$gt140",
            sorted(&[&bp1]),
        ),
        // bp2's diastolic is 142, but not its systolic: no match.
        ("component-code-value-quantity=8480-6$142", sorted(&[&bp1])),
        (
            "component-code-value-quantity=8462-4$ge90",
            sorted(&[&bp1, &bp2]),
        ),
        (
            "component-code-value-quantity=8462-4$gt100|http://unitsofmeasure.org|mm[Hg]",
            sorted(&[&bp2]),
        ),
        (
            "component-code-value-quantity=8480-6$lt120,8462-4$lt90",
            sorted(&[&bp2]),
        ),
        (
            "code-value-quantity=http://loinc.org|8867-4$ge70",
            sorted(&[&oa]),
        ),
        ("code-value-quantity=8867-4$lt62", sorted(&[&ol, &on])),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }
    for bad in [
        "component-code-value-quantity=8480-6",
        "component-code-value-quantity=8480-6$x",
    ] {
        let r = s.get("default", &format!("/Observation?{bad}")).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }
}

#[tokio::test]
async fn chains_reverse_chains_and_includes() {
    let s = TestServer::start().await;
    let org = make(
        &s,
        "default",
        json!({"resourceType": "Organization",
        "name": "Universitetssykehuset Nord-Norge HF"}),
    )
    .await;
    let mut a = person("13031353453", "Nordmann", "Kari", "1970-01-01", "female");
    a["managingOrganization"] = json!({"reference": format!("Organization/{org}")});
    let pa = make(&s, "default", a).await;
    let pb = make(
        &s,
        "default",
        person("17058512345", "Ødegård", "Søren", "1985-05-17", "male"),
    )
    .await;
    let oa = make(
        &s,
        "default",
        vital(
            "8867-4",
            &format!("Patient/{pa}"),
            "2024-03-01",
            "72",
            "/min",
        ),
    )
    .await;
    let oa2 = make(
        &s,
        "default",
        vital(
            "29463-7",
            &format!("Patient/{pa}"),
            "2024-03-01",
            "80",
            "kg",
        ),
    )
    .await;
    let ob = make(
        &s,
        "default",
        vital("2708-6", &format!("Patient/{pb}"), "2024-03-01", "97", "%"),
    )
    .await;
    let cp = make(
        &s,
        "default",
        care_plan(
            &format!("Patient/{pa}"),
            "active",
            "2024-01-01",
            None,
            "KOLS",
        ),
    )
    .await;

    // Chains, one and two levels, with and without a type.
    let cases: Vec<(String, Vec<String>)> = vec![
        (
            format!("subject:Patient.identifier={FNR}|13031353453"),
            sorted(&[&oa, &oa2]),
        ),
        ("subject.name=soren".into(), sorted(&[&ob])),
        ("patient.gender=female&code=8867-4".into(), sorted(&[&oa])),
        (
            "subject:Patient.organization.name=universitetssykehuset".into(),
            sorted(&[&oa, &oa2]),
        ),
        ("subject:Patient.organization.name=nobody".into(), vec![]),
    ];
    for (q, want) in cases {
        assert_eq!(
            found(&s, "default", &format!("/Observation?{q}")).await,
            want,
            "{q}"
        );
    }
    assert_eq!(
        found(
            &s,
            "default",
            "/CarePlan?subject:Patient.identifier=13031353453"
        )
        .await,
        [cp.as_str()]
    );
    // Reverse chains, also nested.
    assert_eq!(
        found(
            &s,
            "default",
            "/Patient?_has:Observation:subject:code=8867-4"
        )
        .await,
        [pa.as_str()]
    );
    assert_eq!(
        found(
            &s,
            "default",
            "/Patient?_has:Observation:patient:code=2708-6,8867-4"
        )
        .await,
        sorted(&[&pa, &pb])
    );
    assert_eq!(
        found(
            &s,
            "default",
            "/Patient?_has:CarePlan:subject:status=active&gender=female"
        )
        .await,
        [pa.as_str()]
    );
    assert_eq!(
        found(
            &s,
            "default",
            "/Organization?_has:Patient:organization:_has:Observation:subject:code=29463-7"
        )
        .await,
        [org.as_str()]
    );
    assert!(
        found(
            &s,
            "default",
            "/Patient?_has:Observation:subject:code=1234-5"
        )
        .await
        .is_empty()
    );
    for bad in [
        "_has:Observation:code=1",
        "_has:Nope:subject:code=1",
        "_has:Observation:status:code=1",
        "gender.name=x",
    ] {
        let r = s.get("default", &format!("/Patient?{bad}")).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }

    // _include, with a target type, *, and :iterate; _revinclude.
    let b = search(
        &s,
        "default",
        &format!("/Observation?_id={oa}&_include=Observation:subject"),
    )
    .await;
    assert_eq!(ids(&b), [oa.as_str()]);
    assert_eq!(keys(&b, "include"), [format!("Patient/{pa}")]);
    assert_eq!(b["total"], 1, "includes do not count");
    let b = search(
        &s,
        "default",
        &format!("/Observation?_id={oa}&_include=Observation:subject:Group"),
    )
    .await;
    assert!(keys(&b, "include").is_empty());
    let b = search(&s, "default", &format!("/Observation?_id={oa}&_include=*")).await;
    assert_eq!(keys(&b, "include"), [format!("Patient/{pa}")]);
    let b = search(
        &s,
        "default",
        &format!("/Observation?_id={oa}&_include=Observation:patient&_include:iterate=Patient:organization"),
    )
    .await;
    assert_eq!(
        keys(&b, "include"),
        sorted(&[&format!("Organization/{org}"), &format!("Patient/{pa}")])
    );
    let b = search(
        &s,
        "default",
        &format!("/Patient?_id={pa}&_revinclude=Observation:subject"),
    )
    .await;
    assert_eq!(ids(&b), [pa.as_str()]);
    assert_eq!(
        keys(&b, "include"),
        sorted(&[&format!("Observation/{oa}"), &format!("Observation/{oa2}")])
    );
    let b = search(&s, "default", &format!("/Patient?_id={pa}&_revinclude=*")).await;
    assert_eq!(
        keys(&b, "include"),
        sorted(&[
            &format!("Observation/{oa}"),
            &format!("Observation/{oa2}"),
            &format!("CarePlan/{cp}")
        ])
    );
    let b = search(
        &s,
        "default",
        &format!("/Organization?_id={org}&_revinclude=Patient:organization&_revinclude:iterate=Observation:subject"),
    )
    .await;
    assert_eq!(
        keys(&b, "include"),
        sorted(&[
            &format!("Patient/{pa}"),
            &format!("Observation/{oa}"),
            &format!("Observation/{oa2}")
        ])
    );
    for bad in [
        "_include=Observation",
        "_include=Observation:status",
        "_include=Nope:subject",
        "_include:deep=*",
    ] {
        let r = s.get("default", &format!("/Observation?{bad}")).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }

    // Compartment search.
    let b = search(&s, "default", &format!("/Patient/{pa}/Observation")).await;
    assert_eq!(ids(&b).len(), 2);
    assert_eq!(
        found(
            &s,
            "default",
            &format!("/Patient/{pa}/Observation?code=29463-7")
        )
        .await,
        [oa2.as_str()]
    );
    assert_eq!(
        found(&s, "default", &format!("/Patient/{pb}/CarePlan")).await,
        Vec::<String>::new()
    );
    let r = s
        .get("default", &format!("/Encounter/{pa}/Observation"))
        .await;
    outcome(r, StatusCode::BAD_REQUEST).await;
    let r = s
        .get("default", &format!("/Patient/{pa}/Organization"))
        .await;
    outcome(r, StatusCode::BAD_REQUEST).await;
}

#[tokio::test]
async fn sorting_paging_totals_and_summaries() {
    let s = TestServer::start().await;
    let pa = make(
        &s,
        "default",
        person("13031353453", "Nordmann", "Kari", "1970-01-01", "female"),
    )
    .await;
    let pb = make(
        &s,
        "default",
        person("17058512345", "Ødegård", "Søren", "1985-05-17", "male"),
    )
    .await;
    let pc = make(
        &s,
        "default",
        person("24120112345", "Hansen", "Ola", "2001-12-24", "male"),
    )
    .await;
    let pn = make(
        &s,
        "default",
        json!({"resourceType": "Patient", "gender": "male"}),
    )
    .await;
    assert_eq!(
        ids(&search(&s, "default", "/Patient?_sort=family").await),
        [pc.clone(), pa.clone(), pb.clone(), pn.clone()]
    );
    assert_eq!(
        ids(&search(&s, "default", "/Patient?_sort=-family").await),
        [pb.clone(), pa.clone(), pc.clone(), pn.clone()]
    );
    assert_eq!(
        ids(&search(&s, "default", "/Patient?_sort=-birthdate").await),
        [pc.clone(), pb.clone(), pa.clone(), pn.clone()]
    );
    assert_eq!(
        ids(&search(&s, "default", "/Patient?_sort=gender,-birthdate").await),
        [pa.clone(), pc.clone(), pb.clone(), pn.clone()]
    );

    let mut heart = Vec::new();
    for i in 0..23 {
        let when = format!("2024-03-{:02}T08:00:00+01:00", i + 1);
        let value = format!("{}", 60 + (i * 7) % 23);
        heart.push((
            make(
                &s,
                "default",
                vital("8867-4", &format!("Patient/{pa}"), &when, &value, "/min"),
            )
            .await,
            when,
            value,
        ));
    }
    let by_value: Vec<String> = {
        let mut v = heart.clone();
        v.sort_by(|a, b| {
            a.2.parse::<f64>()
                .unwrap()
                .total_cmp(&b.2.parse::<f64>().unwrap())
        });
        v.into_iter().map(|h| h.0).collect()
    };
    assert_eq!(
        ids(&search(
            &s,
            "default",
            "/Observation?_sort=value-quantity&_count=100"
        )
        .await),
        by_value
    );
    let newest_first: Vec<String> = heart.iter().rev().map(|h| h.0.clone()).collect();
    assert_eq!(
        ids(&search(&s, "default", "/Observation?_sort=-date&_count=100").await),
        newest_first
    );

    // Paging: next links until done, previous links back; every match once.
    let mut url = Some("/Observation?code=8867-4&_sort=-date&_count=5".to_string());
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut last = json!(null);
    while let Some(u) = url {
        let path = u
            .strip_prefix(&s.fhir("default", ""))
            .unwrap_or(&u)
            .to_string();
        let b = search(&s, "default", &path).await;
        assert_eq!(b["total"], 23);
        seen.extend(ids(&b));
        pages += 1;
        url = link(&b, "next");
        last = b;
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, newest_first);
    let prev = link(&last, "previous").expect("a previous link on the last page");
    let path = prev
        .strip_prefix(&s.fhir("default", ""))
        .unwrap()
        .to_string();
    assert_eq!(
        ids(&search(&s, "default", &path).await),
        newest_first[15..20].to_vec()
    );

    // Totals and summaries.
    let b = search(&s, "default", "/Observation?_total=none&_count=2").await;
    assert!(b.get("total").is_none());
    let b = search(&s, "default", "/Observation?_summary=count").await;
    assert_eq!(b["total"], 23);
    assert!(b.get("entry").is_none());
    let b = search(&s, "default", "/Observation?_count=0").await;
    assert_eq!(b["total"], 23);
    assert!(b.get("entry").is_none());
    let b = search(&s, "default", "/Observation?_summary=true&_count=1").await;
    let r = &entries(&b, "match")[0]["resource"];
    // value[x] is a summary element, category is not.
    assert!(r.get("valueQuantity").is_some() && r.get("category").is_none());
    assert_eq!(r["meta"]["tag"][0]["code"], "SUBSETTED");
    let b = search(&s, "default", "/Observation?_elements=status,code&_count=1").await;
    let r = &entries(&b, "match")[0]["resource"];
    assert!(
        r.get("valueQuantity").is_none() && r.get("code").is_some() && r.get("status").is_some()
    );
    assert_eq!(r["meta"]["tag"][0]["code"], "SUBSETTED");
    let b = search(&s, "default", "/Patient?_summary=text&_count=1").await;
    assert!(entries(&b, "match")[0]["resource"].get("name").is_none());
    let b = search(&s, "default", "/Observation?_summary=data&_count=1").await;
    assert!(
        entries(&b, "match")[0]["resource"]
            .get("valueQuantity")
            .is_some()
    );
    let b = search(&s, "default", "/Observation?_count=5000").await;
    assert_eq!(ids(&b).len(), 23);

    for bad in [
        "_sort=nope",
        "_sort=component-code-value-quantity",
        "_count=-1",
        "_count=lots",
        "_total=maybe",
        "_summary=some",
    ] {
        let r = s.get("default", &format!("/Observation?{bad}")).await;
        outcome(r, StatusCode::BAD_REQUEST).await;
    }
    let r = s
        .get("default", "?_getpages=0123456789abcdef&_getpagesoffset=5")
        .await;
    outcome(r, StatusCode::GONE).await;
}

#[tokio::test]
async fn unknown_parameters_warn_or_fail_strictly() {
    let s = TestServer::start().await;
    let id = make(
        &s,
        "default",
        vital("8867-4", "Patient/p1", "2024-03-01", "72", "/min"),
    )
    .await;
    let b = search(
        &s,
        "default",
        "/Observation?code=8867-4&colour=blue&_contained=true&near=1",
    )
    .await;
    assert_eq!(ids(&b), [id.as_str()], "unknown parameters are ignored");
    let w = warnings(&b);
    assert!(
        w.contains("colour") && w.contains("_contained") && w.contains("near"),
        "{w}"
    );
    let out = entries(&b, "outcome");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0]["resource"]["resourceType"], "OperationOutcome");
    assert_eq!(out[0]["resource"]["issue"][0]["severity"], "warning");
    let r = s
        .client
        .get(s.fhir("default", "/Observation?code=8867-4&colour=blue"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    let oo = outcome(r, StatusCode::BAD_REQUEST).await;
    assert!(issues_text(&oo).contains("colour"));
    let r = s
        .client
        .get(s.fhir("default", "/Observation?code=8867-4"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // An empty value is ignored with a warning.
    let b = search(&s, "default", "/Observation?code=").await;
    assert!(warnings(&b).contains("no value"));
    // Unknown resource types and tenants.
    outcome(s.get("default", "/Nope?x=1").await, StatusCode::NOT_FOUND).await;
    outcome(
        s.get("nope", "/Observation?code=1").await,
        StatusCode::NOT_FOUND,
    )
    .await;
}

#[tokio::test]
async fn post_search_system_search_and_capabilities() {
    let s = TestServer::start().await;
    let pa = make(
        &s,
        "default",
        person("13031353453", "Nordmann", "Kari", "1970-01-01", "female"),
    )
    .await;
    let oa = make(
        &s,
        "default",
        vital(
            "8867-4",
            &format!("Patient/{pa}"),
            "2024-03-01",
            "72",
            "/min",
        ),
    )
    .await;
    let r = s
        .client
        .post(s.fhir("default", "/Observation/_search?_count=10"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("code=http%3A%2F%2Floinc.org%7C8867-4&date=ge2024-01-01")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(ids(&json(r).await), [oa.as_str()]);
    let r = s
        .client
        .post(s.fhir("default", "/Observation/_search"))
        .header("content-type", "application/fhir+json")
        .body("{}")
        .send()
        .await
        .unwrap();
    outcome(r, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;

    // System level: _type, common parameters, and POST.
    let b = search(&s, "default", &format!("?_id={pa},{oa}")).await;
    assert_eq!(
        keys(&b, "match"),
        sorted(&[&format!("Observation/{oa}"), &format!("Patient/{pa}")])
    );
    let b = search(&s, "default", &format!("?_type=Patient&_id={pa},{oa}")).await;
    assert_eq!(ids(&b), [pa.as_str()]);
    let b = search(
        &s,
        "default",
        "?_type=Patient,Observation&_lastUpdated=ge2020&_sort=_lastUpdated",
    )
    .await;
    assert_eq!(ids(&b), [pa.clone(), oa.clone()]);
    // A parameter only Observation has narrows a multi-type search to Observation.
    let b = search(&s, "default", "?_type=Patient,Observation&code=8867-4").await;
    assert_eq!(ids(&b), [oa.as_str()]);
    let r = s
        .client
        .post(s.fhir("default", "/_search"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("_type=Observation&subject=Patient/{pa}"))
        .send()
        .await
        .unwrap();
    assert_eq!(ids(&json(r).await), [oa.as_str()]);
    outcome(
        s.get("default", "?_type=Nope").await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    // XML output goes through the tree; paging links carry _format.
    make(
        &s,
        "default",
        vital("2708-6", "Patient/x", "2024-03-01", "97", "%"),
    )
    .await;
    let r = s.get("default", "/Observation?_count=1&_format=xml").await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("<Bundle xmlns=\"http://hl7.org/fhir\">"),
        "{text}"
    );
    assert!(text.contains("<type value=\"searchset\"/>"), "{text}");
    assert!(text.contains("_format=xml"), "{text}");

    // The CapabilityStatement lists the real parameters and system search.
    let cs = json(s.get("default", "/metadata").await).await;
    let rest = &cs["rest"][0];
    let obs = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    let names: Vec<&str> = obs["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for n in [
        "code",
        "date",
        "value-quantity",
        "subject",
        "component-code-value-quantity",
        "_id",
        "_lastUpdated",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    assert!(
        obs["searchInclude"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i == "Observation:subject")
    );
    assert!(
        rest["interaction"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["code"] == "search-system")
    );
}

#[tokio::test]
async fn hostile_search_input_is_a_client_error_never_a_500() {
    let s = TestServer::start().await;
    let id = make(
        &s,
        "default",
        vital(
            "8867-4",
            "Patient/p1",
            "2024-03-01T10:00:00+01:00",
            "72",
            "/min",
        ),
    )
    .await;
    // An unencoded '+' in a zone offset arrives as a space; it is still understood.
    assert_eq!(
        found(&s, "default", "/Observation?date=2024-03-01T10:00:00+01:00").await,
        [id.as_str()]
    );
    let long = "a".repeat(5000);
    let commas = vec!["x"; 1001].join(",");
    let deep_chain = "subject.subject.subject.subject.subject.name=x";
    let deep_has = "_has:Observation:subject:_has:Observation:subject:_has:Observation:subject:_has:Observation:subject:_has:Observation:subject:code=1";
    for q in [
        format!("/Patient?name={long}"),
        format!("/Observation?code={commas}"),
        format!("/Observation?{deep_chain}"),
        format!("/Patient?{deep_has}"),
        "/Observation?_count=99999999999999999999999".into(),
        "/Observation?value-quantity=1e999".into(),
        "/Observation?date=ge".into(),
        "/Observation?subject:Patient=not/an/id".into(),
        "/Observation?component-code-value-quantity=$$$".into(),
        "?_getpages=x&_getpagesoffset=-1".into(),
    ] {
        let r = s.get("default", &q).await;
        let status = r.status();
        assert!(status.is_client_error(), "{q}: {status}");
        let oo = json(r).await;
        assert_eq!(oo["resourceType"], "OperationOutcome", "{q}");
    }
    // Odd but harmless input is a normal search.
    for q in [
        "/Patient?name:contains=(.*%5C",
        "/Patient?name=%FF%FE",
        "/Patient?name:contains=a%2Ab",
        "/Patient?family:exact=%00",
        "/Observation?code=%7C%7C%7C%5C%7C",
    ] {
        let r = s.get("default", q).await;
        assert!(
            r.status() == StatusCode::OK || r.status() == StatusCode::BAD_REQUEST,
            "{q}: {}",
            r.status()
        );
    }
}
