use super::*;
use crate::json;

fn resource(text: &str) -> Map {
    match json::parse(text.as_bytes()) {
        Ok(Json::Object(m)) => m,
        other => panic!("test resource is not an object: {other:?}"),
    }
}

/// Evaluates and renders each item: strings and numbers as text, others by type name.
fn eval(expr: &str, res: &Map) -> Vec<String> {
    let e = Expr::parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    e.evaluate(res)
        .iter()
        .map(|i| match i {
            Item::Node(n) => match n.primitive() {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Number(t)) => t.clone(),
                Some(Json::Bool(b)) => b.to_string(),
                _ => format!("<{}>", n.type_name()),
            },
            Item::Bool(b) => b.to_string(),
            Item::Integer(i) => i.to_string(),
            Item::Decimal(d) | Item::String(d) => d.to_string(),
            Item::Resolved(t) => format!("->{t}"),
        })
        .collect()
}

const OBS: &str = r##"{"resourceType":"Observation","id":"bp","status":"final",
  "contained":[{"resourceType":"Patient","id":"p1"}],
  "code":{"coding":[{"system":"http://loinc.org","code":"85354-9"}],"text":"BP"},
  "subject":{"reference":"Patient/123"},
  "performer":[{"reference":"Practitioner/9"},{"reference":"#p1"},{"reference":"urn:uuid:1","type":"Patient"}],
  "effectiveDateTime":"2024-03-01T10:00:00+01:00",
  "_effectiveDateTime":{"extension":[{"url":"http://x/ext","valueString":"e1"}]},
  "valueQuantity":{"value":120.50,"unit":"mm[Hg]"},
  "component":[
    {"code":{"text":"sys"},"valueQuantity":{"value":120}},
    {"code":{"text":"dia"},"valueCodeableConcept":{"text":"high"}},
    {"code":{"text":"flag"},"valueBoolean":false}],
  "extension":[{"url":"http://a","valueCode":"A"},{"url":"http://b","valueReference":{"reference":"Patient/7"}}]}"##;

#[test]
fn paths_and_choice_elements() {
    let r = resource(OBS);
    assert_eq!(eval("Observation.code.coding.code", &r), ["85354-9"]);
    assert_eq!(eval("Resource.id", &r), ["bp"]);
    assert_eq!(eval("DomainResource.status", &r), ["final"]);
    assert_eq!(eval("Patient.id", &r), Vec::<String>::new());
    assert_eq!(eval("Observation.value", &r), ["<Quantity>"]);
    assert_eq!(eval("Observation.value.value", &r), ["120.50"]);
    assert_eq!(
        eval("Observation.component.value", &r),
        ["<Quantity>", "<CodeableConcept>", "false"]
    );
    assert_eq!(
        eval("Observation.effective", &r),
        ["2024-03-01T10:00:00+01:00"]
    );
    assert_eq!(eval("Observation.bogus.more", &r), Vec::<String>::new());
    assert_eq!(eval("Observation.`status`", &r), ["final"]);
}

#[test]
fn type_operators() {
    let r = resource(OBS);
    assert_eq!(eval("(Observation.value as Quantity).unit", &r), ["mm[Hg]"]);
    assert_eq!(
        eval("(Observation.value as CodeableConcept).text", &r),
        Vec::<String>::new()
    );
    assert_eq!(eval("Observation.value.as(Quantity).value", &r), ["120.50"]);
    assert_eq!(
        eval(
            "Observation.component.value.ofType(CodeableConcept).text",
            &r
        ),
        ["high"]
    );
    assert_eq!(
        eval("Observation.effective.as(DateTime)", &r),
        ["2024-03-01T10:00:00+01:00"]
    );
    assert_eq!(
        eval("Observation.effective.as(dateTime)", &r),
        ["2024-03-01T10:00:00+01:00"]
    );
    assert_eq!(
        eval("Observation.effective.as(Period)", &r),
        Vec::<String>::new()
    );
    assert_eq!(eval("Observation.value is Quantity", &r), ["true"]);
    assert_eq!(eval("Observation.value is FHIR.Quantity", &r), ["true"]);
    assert_eq!(eval("Observation.status is code", &r), ["true"]);
    assert_eq!(eval("Observation.status is string", &r), ["true"]);
    assert_eq!(eval("Observation.status is System.String", &r), ["true"]);
    assert_eq!(eval("Observation.value.is(Age)", &r), ["false"]);
    assert_eq!(eval("Observation is DomainResource", &r), ["true"]);

    let cond = resource(r#"{"resourceType":"Condition","onsetAge":{"value":40,"unit":"a"}}"#);
    assert_eq!(
        eval("Condition.onset.as(Age) | Condition.onset.as(Range)", &cond),
        ["<Age>"]
    );
    assert_eq!(eval("Condition.onset.as(Quantity).value", &cond), ["40"]);
}

#[test]
fn resolve_where_and_references() {
    let r = resource(OBS);
    assert_eq!(
        eval(
            "Observation.subject.where(resolve() is Patient).reference",
            &r
        ),
        ["Patient/123"]
    );
    assert_eq!(
        eval("Observation.subject.where(resolve() is Group)", &r),
        Vec::<String>::new()
    );
    // `#p1` resolves to the contained Patient, `urn:uuid:1` by its Reference.type.
    assert_eq!(
        eval(
            "Observation.performer.where(resolve() is Patient).reference",
            &r
        ),
        ["#p1", "urn:uuid:1"]
    );
    assert_eq!(
        eval("Observation.performer.resolve()", &r),
        ["->Practitioner", "<Patient>", "->Patient"]
    );
    assert_eq!(
        eval("Observation.performer.resolve().ofType(Patient).id", &r),
        ["p1"]
    );
    assert_eq!(
        parse_reference("https://fhir.example.no/fhir/Patient/123/_history/4"),
        Some(("Patient", "123", Some("4")))
    );
    assert_eq!(
        parse_reference("http://example.org/Questionnaire/q-1|2.0"),
        Some(("Questionnaire", "q-1", Some("2.0")))
    );
    assert_eq!(parse_reference("urn:uuid:123"), None);
    assert_eq!(parse_reference("Patient/"), None);
    assert_eq!(parse_reference("Bogus/1"), None);
}

#[test]
fn extensions_including_primitive_ones() {
    let r = resource(OBS);
    assert_eq!(eval("Observation.extension('http://a').value", &r), ["A"]);
    assert_eq!(
        eval("Observation.extension.where(url = 'http://a').value", &r),
        ["A"]
    );
    assert_eq!(
        eval(
            "Observation.extension('http://b').value.where(resolve() is Patient).reference",
            &r
        ),
        ["Patient/7"]
    );
    assert_eq!(
        eval("Observation.extension('http://none')", &r),
        Vec::<String>::new()
    );
    assert_eq!(
        eval("Observation.effective.extension('http://x/ext').value", &r),
        ["e1"]
    );
    let p = resource(
        r#"{"resourceType":"Patient","name":[{"given":["A",null,"C"],"_given":[null,{"extension":[{"url":"u","valueString":"B"}]},null]}]}"#,
    );
    assert_eq!(eval("Patient.name.given", &p), ["A", "<string>", "C"]);
    assert_eq!(eval("Patient.name.given.extension('u').value", &p), ["B"]);
    assert_eq!(eval("Patient.name.given.hasValue()", &p), ["false"]);
}

#[test]
fn logic_equality_and_collections() {
    let r = resource(OBS);
    let p = resource(r#"{"resourceType":"Patient","deceasedDateTime":"2020-01-01"}"#);
    let alive = resource(r#"{"resourceType":"Patient","deceasedBoolean":false}"#);
    let unknown = resource(r#"{"resourceType":"Patient"}"#);
    let deceased = "Patient.deceased.exists() and Patient.deceased != false";
    assert_eq!(eval(deceased, &p), ["true"]);
    assert_eq!(eval(deceased, &alive), ["false"]);
    assert_eq!(eval(deceased, &unknown), ["false"]);
    assert_eq!(eval("Observation.status = 'final'", &r), ["true"]);
    assert_eq!(eval("Observation.status != 'final'", &r), ["false"]);
    assert_eq!(eval("Observation.status ~ 'FINAL'", &r), ["true"]);
    assert_eq!(eval("Observation.missing = 'x'", &r), Vec::<String>::new());
    assert_eq!(eval("Observation.value.value > 100", &r), ["true"]);
    assert_eq!(eval("Observation.value.value = 120.5", &r), ["true"]);
    assert_eq!(
        eval("Observation.status in ('final' | 'amended')", &r),
        ["true"]
    );
    assert_eq!(eval("true or {}", &r), ["true"]);
    assert_eq!(eval("false and {}", &r), ["false"]);
    assert_eq!(eval("true and {}", &r), Vec::<String>::new());
    assert_eq!(eval("false implies {}", &r), ["true"]);
    assert_eq!(eval("true xor false", &r), ["true"]);
    assert_eq!(eval("Observation.component.code.text.first()", &r), ["sys"]);
    assert_eq!(eval("Observation.component.code.text.last()", &r), ["flag"]);
    assert_eq!(
        eval("Observation.component.code.text.tail().count()", &r),
        ["2"]
    );
    assert_eq!(eval("Observation.component[1].code.text", &r), ["dia"]);
    assert_eq!(
        eval("Observation.component.skip(2).take(1).code.text", &r),
        ["flag"]
    );
    assert_eq!(
        eval("Observation.component.where(value.exists()).count()", &r),
        ["3"]
    );
    assert_eq!(
        eval("Observation.component.exists(code.text = 'dia')", &r),
        ["true"]
    );
    assert_eq!(
        eval("Observation.component.all(code.exists())", &r),
        ["true"]
    );
    assert_eq!(eval("Observation.note.empty()", &r), ["true"]);
    assert_eq!(eval("Observation.note.exists().not()", &r), ["true"]);
    assert_eq!(
        eval("Observation.component.select(code.text)", &r),
        ["sys", "dia", "flag"]
    );
    // `|` drops the same element reached twice, not equal elements.
    assert_eq!(
        eval("Observation.status | Observation.status | Resource.id", &r),
        ["final", "bp"]
    );
    assert_eq!(
        eval(
            "(Observation.status | Observation.status).distinct().count()",
            &r
        ),
        ["1"]
    );
    assert_eq!(eval("%resource.id", &r), ["bp"]);
    assert_eq!(
        eval(
            "Observation.component.where(%context.id = 'bp').count()",
            &r
        ),
        ["3"]
    );
    assert_eq!(eval("%ucum", &r), ["http://unitsofmeasure.org"]);
    assert_eq!(eval("-1.5", &r), ["-1.5"]);
}

#[test]
fn bundle_entry_resources_take_their_own_type() {
    let b = resource(
        r#"{"resourceType":"Bundle","type":"document","entry":[{"resource":{"resourceType":"Composition","id":"c1","title":"T"}},{"resource":{"resourceType":"Nope","x":1}}]}"#,
    );
    assert_eq!(eval("Bundle.entry[0].resource", &b), ["<Composition>"]);
    assert_eq!(eval("Bundle.entry[0].resource.title", &b), ["T"]);
    assert_eq!(eval("Bundle.entry.resource.x", &b), ["1"]);
    assert_eq!(
        eval("Bundle.entry.resource is Composition", &b),
        Vec::<String>::new()
    );
    assert_eq!(
        eval("Bundle.entry[0].resource is Composition", &b),
        ["true"]
    );
}

#[test]
fn pruning_for_one_resource_type() {
    let e = Expr::parse("AllergyIntolerance.patient | CarePlan.subject.where(resolve() is Patient) | (Observation.value as Quantity)").unwrap();
    assert_eq!(
        e.for_resource_type("CarePlan").unwrap().ex,
        Parser::parse("CarePlan.subject.where(resolve() is Patient)").unwrap()
    );
    assert_eq!(
        e.for_resource_type("Observation").unwrap().ex,
        Parser::parse("Observation.value as Quantity").unwrap()
    );
    assert!(e.for_resource_type("Patient").is_none());
    let r = Expr::parse("Resource.id").unwrap();
    assert!(r.for_resource_type("Patient").is_some());
}

use parser::Parser;

#[test]
fn errors_are_typed_and_positioned() {
    assert!(matches!(Expr::parse(""), Err(FhirPathError::Syntax { .. })));
    assert!(matches!(
        Expr::parse("Observation.code +"),
        Err(FhirPathError::Unsupported { pos: 17, .. })
    ));
    assert!(matches!(
        Expr::parse("a.substring(1)"),
        Err(FhirPathError::Unsupported { .. })
    ));
    assert!(matches!(
        Expr::parse("@2024-01-01"),
        Err(FhirPathError::Unsupported { .. })
    ));
    assert!(matches!(
        Expr::parse("a.where("),
        Err(FhirPathError::Syntax { .. })
    ));
    assert!(matches!(
        Expr::parse("'abc"),
        Err(FhirPathError::Syntax { .. })
    ));
    assert!(matches!(
        Expr::parse("a b"),
        Err(FhirPathError::Syntax { .. })
    ));
    assert!(matches!(
        Expr::parse("a.first(1)"),
        Err(FhirPathError::Syntax { .. })
    ));
    let deep = format!("{}a{}", "(".repeat(500), ")".repeat(500));
    assert!(matches!(
        Expr::parse(&deep),
        Err(FhirPathError::Syntax { .. })
    ));
    let chain = vec!["a"; 100_000].join(" = ");
    assert!(matches!(
        Expr::parse(&chain),
        Err(FhirPathError::Syntax { .. })
    ));
    let wide_union = vec!["a"; 10_000].join(" | ");
    assert!(Expr::parse(&wide_union).is_ok());
    let nested_where = format!("{}a{}", "a.where(".repeat(40), ")".repeat(40));
    assert!(Expr::parse(&nested_where).is_ok());
    let e = Expr::parse("x.where(a = 'it\\'s\\u00e6') // comment").unwrap();
    let Ex::Path(_, steps) = &e.ex else {
        panic!("{e:?}")
    };
    let parser::Step::Where(Ex::Bin(_, _, rhs)) = &steps[1] else {
        panic!("{steps:?}")
    };
    assert_eq!(**rhs, Ex::Str("it's\u{e6}".into()));
}

#[test]
fn never_panics_on_odd_content() {
    let odd = resource(
        r##"{"resourceType":"Observation","code":"not an object","valueQuantity":[1,2],
        "component":{"code":7},"subject":{"reference":42},"_status":[1],"contained":[5,{"id":"x"}],
        "performer":[null,{"reference":"#x"},{"reference":"#"}]}"##,
    );
    for e in [
        "Observation.code.coding.code",
        "Observation.value.value",
        "Observation.component.code.text",
        "Observation.subject.resolve()",
        "Observation.performer.resolve()",
        "Observation.status.extension",
        "Observation.contained.id",
    ] {
        let _ = eval(e, &odd);
    }
    assert_eq!(eval("Observation.performer.resolve().count()", &odd), ["2"]);
    let no_type = resource(r#"{"id":"x"}"#);
    assert_eq!(eval("Resource.id", &no_type), Vec::<String>::new());
    assert_eq!(eval("id", &no_type), ["x"]);
}
