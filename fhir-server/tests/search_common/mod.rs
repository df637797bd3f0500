//! Realistic resources for the search tests (Norwegian patients, PHG vital signs, CarePlans,
//! QuestionnaireResponses, Appointments) and helpers to read searchset Bundles.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::common::*;

pub const FNR: &str = "urn:oid:2.16.578.1.12.4.1.4.1";
pub const LOINC: &str = "http://loinc.org";
pub const UCUM: &str = "http://unitsofmeasure.org";

pub fn person(fnr: &str, family: &str, given: &str, birth: &str, gender: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "NI"}],
                     "text": "Fødselsnummer"},
            "system": FNR, "value": fnr
        }],
        "name": [{"family": family, "given": [given]}],
        "gender": gender,
        "birthDate": birth,
        "address": [{"city": "Tromsø", "postalCode": "9008", "country": "NO"}]
    })
}

/// A vital sign: `code` with its LOINC display, a quantity in `ucum` units.
pub fn vital(code: &str, subject: &str, when: &str, value: &str, ucum: &str) -> Value {
    let display = match code {
        "8867-4" => "Heart rate",
        "8480-6" => "Systolic blood pressure",
        "8462-4" => "Diastolic blood pressure",
        "2708-6" => "Oxygen saturation in Arterial blood",
        "29463-7" => "Body weight",
        "15074-8" => "Glucose [Moles/volume] in Blood",
        _ => "Vital sign",
    };
    serde_json::from_str(&format!(
        r#"{{"resourceType":"Observation","status":"final",
        "category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],
        "code":{{"coding":[{{"system":"{LOINC}","code":"{code}","display":"{display}"}}],"text":"{display}"}},
        "subject":{{"reference":"{subject}"}},
        "effectiveDateTime":"{when}",
        "valueQuantity":{{"value":{value},"unit":"{ucum}","system":"{UCUM}","code":"{ucum}"}}}}"#
    ))
    .unwrap()
}

/// A blood pressure panel (85354-9) with systolic and diastolic components.
pub fn blood_pressure(subject: &str, when: &str, sys: &str, dia: &str) -> Value {
    serde_json::from_str(&format!(
        r#"{{"resourceType":"Observation","status":"final",
        "code":{{"coding":[{{"system":"{LOINC}","code":"85354-9","display":"Blood pressure panel"}}]}},
        "subject":{{"reference":"{subject}"}},"effectiveDateTime":"{when}",
        "component":[
          {{"code":{{"coding":[{{"system":"{LOINC}","code":"8480-6"}}]}},
            "valueQuantity":{{"value":{sys},"unit":"mmHg","system":"{UCUM}","code":"mm[Hg]"}}}},
          {{"code":{{"coding":[{{"system":"{LOINC}","code":"8462-4"}}]}},
            "valueQuantity":{{"value":{dia},"unit":"mmHg","system":"{UCUM}","code":"mm[Hg]"}}}}]}}"#
    ))
    .unwrap()
}

pub fn care_plan(
    subject: &str,
    status: &str,
    start: &str,
    end: Option<&str>,
    title: &str,
) -> Value {
    let mut period = json!({"start": start});
    if let Some(e) = end {
        period["end"] = json!(e);
    }
    json!({
        "resourceType": "CarePlan",
        "status": status,
        "intent": "plan",
        "title": title,
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "736353004"}]}],
        "subject": {"reference": subject},
        "period": period
    })
}

pub fn questionnaire_response(
    subject: &str,
    questionnaire: &str,
    authored: &str,
    pain: u32,
) -> Value {
    json!({
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "questionnaire": questionnaire,
        "subject": {"reference": subject},
        "authored": authored,
        "item": [
            {"linkId": "pain", "text": "Smerte (0-10)", "answer": [{"valueInteger": pain}]},
            {"linkId": "mood", "answer": [{"valueCoding": {"system": "urn:test:mood", "code": "ok"}}]}
        ]
    })
}

pub fn appointment(patient: &str, status: &str, start: &str, end: &str) -> Value {
    json!({
        "resourceType": "Appointment",
        "status": status,
        "start": start,
        "end": end,
        "participant": [{"actor": {"reference": patient}, "status": "accepted"}]
    })
}

/// GET a search (path relative to the tenant base), expecting a 200 searchset.
pub async fn search(s: &TestServer, tenant: &str, path: &str) -> Value {
    let r = s.get(tenant, path).await;
    let status = r.status();
    let v = json(r).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {v}");
    assert_eq!(v["type"], "searchset", "GET {path}: {v}");
    v
}

/// Ids of the `match` entries, in order.
pub fn ids(bundle: &Value) -> Vec<String> {
    entries(bundle, "match")
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// `Type/id` of the entries with search mode `mode`.
pub fn keys(bundle: &Value, mode: &str) -> Vec<String> {
    let mut v: Vec<String> = entries(bundle, mode)
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["resource"]["resourceType"].as_str().unwrap(),
                e["resource"]["id"].as_str().unwrap()
            )
        })
        .collect();
    v.sort();
    v
}

pub fn entries<'a>(bundle: &'a Value, mode: &str) -> Vec<&'a Value> {
    bundle["entry"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["search"]["mode"] == mode).collect())
        .unwrap_or_default()
}

/// The ids of a search's matches, sorted.
pub async fn found(s: &TestServer, tenant: &str, path: &str) -> Vec<String> {
    let mut v = ids(&search(s, tenant, path).await);
    v.sort();
    v
}

pub fn sorted<S: AsRef<str>>(ids: &[S]) -> Vec<String> {
    let mut v: Vec<String> = ids.iter().map(|s| s.as_ref().to_string()).collect();
    v.sort();
    v
}

pub fn link(bundle: &Value, rel: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == rel)
        .map(|l| l["url"].as_str().unwrap().to_string())
}

/// The diagnostics of the OperationOutcome entry, if any.
pub fn warnings(bundle: &Value) -> String {
    entries(bundle, "outcome")
        .iter()
        .map(|e| issues_text(&e["resource"]))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Creates and returns the id.
pub async fn make(s: &TestServer, tenant: &str, body: Value) -> String {
    s.create(tenant, &body).await["id"]
        .as_str()
        .unwrap()
        .to_string()
}
