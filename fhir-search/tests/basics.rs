mod common;
use common::*;
use serde_json::json;

#[test]
fn codes_dates_values_sorting_and_names() {
    let e = env();
    let a = e.create(observation("8867-4", "2024-03-01T10:00:00+01:00", "72.5"));
    let b = e.create(observation("8480-6", "2024-03-02T10:00:00+01:00", "120"));
    assert_eq!(e.ids("Observation", "code=8867-4"), [a.as_str()]);
    assert_eq!(
        e.ids("Observation", "code=http://loinc.org|8480-6"),
        [b.as_str()]
    );
    assert_eq!(
        e.set("Observation", "date=2024-03"),
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(e.ids("Observation", "date=2024-03-01"), [a.as_str()]);
    assert_eq!(e.ids("Observation", "value-quantity=gt100"), [b.as_str()]);
    assert_eq!(e.ids("Observation", "_sort=-date"), [b.clone(), a.clone()]);
    let p =
        e.create(json!({"resourceType":"Patient","name":[{"family":"Nordmann","given":["Kåre"]}]}));
    assert_eq!(e.ids("Patient", "name=kare"), [p.as_str()]);
    assert_eq!(e.ids("Patient", "name=nord"), [p.as_str()]);
}
