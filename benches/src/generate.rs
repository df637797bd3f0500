//! Deterministic test data: patients with Norwegian fødselsnummer and the home measurements a
//! Personal Health Gateway (PHG) sends for them, plus CarePlans, QuestionnaireResponses and
//! Appointments.
//!
//! Everything follows from a [`DatasetConfig`]: the same seed gives the same bytes, on every
//! machine and run. Each patient draws from its own random stream (seeded from the dataset seed
//! and the patient's index), so patient 17 is the same whether 20 or 20,000 patients are
//! generated, and a workload can name a patient's data without generating it
//! ([`PatientProfile::new`]).
//!
//! Measurements follow the VKP Observation code table (HL7 Norway `hl7.fhir.no.vkp.observation`):
//! blood pressure panel 85354-9 with components 8480-6/8462-4, heart rate 8867-4, SpO2 2708-6,
//! body weight 29463-7, blood glucose 15074-8 and body temperature 8310-5. Each patient follows
//! one home follow-up program that decides which of them are measured and how often (about five
//! a day). `subject` carries both a literal reference (`Patient/{id}`, so `_include` and
//! `patient=` work) and the fødselsnummer as a logical identifier, as the PHG sends it.
//!
//! ```
//! use benches::generate::{Dataset, DatasetConfig};
//! let cfg = DatasetConfig { patients: 2, days: 3, ..DatasetConfig::default() };
//! let a: Vec<_> = Dataset::new(cfg.clone()).resources().collect();
//! let b: Vec<_> = Dataset::new(cfg).resources().collect();
//! assert_eq!(a, b);
//! assert!(a.iter().any(|r| r.resource_type == "Observation"));
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, NaiveTime, Weekday};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::BenchError;

/// `Identifier.system` of the Norwegian fødselsnummer (FNR).
pub const FNR_SYSTEM: &str = "urn:oid:2.16.578.1.12.4.1.4.1";
/// `Identifier.system` of the measurement ids the (simulated) PHG assigns; conditional creates
/// match on it.
pub const MEASUREMENT_SYSTEM: &str = "https://phg.example.no/fhir/NamingSystem/measurement-id";
/// `Identifier.system` of the home-monitoring devices' serial numbers.
pub const DEVICE_SYSTEM: &str = "https://phg.example.no/fhir/NamingSystem/device-serial";
/// `Identifier.system` of the generated CarePlans, QuestionnaireResponses and Appointments.
pub const RECORD_SYSTEM: &str = "https://dho.example.no/fhir/NamingSystem/record-id";
/// LOINC.
pub const LOINC: &str = "http://loinc.org";

/// The measurement kinds, with the LOINC code of `Observation.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Measurement {
    /// Blood pressure panel 85354-9 (systolic 8480-6, diastolic 8462-4 as components).
    BloodPressure,
    /// Heart rate 8867-4.
    HeartRate,
    /// Oxygen saturation 2708-6.
    Spo2,
    /// Body weight 29463-7.
    BodyWeight,
    /// Blood glucose 15074-8.
    Glucose,
    /// Body temperature 8310-5.
    Temperature,
}

impl Measurement {
    /// All kinds.
    pub const ALL: [Measurement; 6] = [
        Measurement::BloodPressure,
        Measurement::HeartRate,
        Measurement::Spo2,
        Measurement::BodyWeight,
        Measurement::Glucose,
        Measurement::Temperature,
    ];

    /// The LOINC code of `Observation.code`.
    pub fn loinc(self) -> &'static str {
        match self {
            Measurement::BloodPressure => "85354-9",
            Measurement::HeartRate => "8867-4",
            Measurement::Spo2 => "2708-6",
            Measurement::BodyWeight => "29463-7",
            Measurement::Glucose => "15074-8",
            Measurement::Temperature => "8310-5",
        }
    }

    fn display(self) -> &'static str {
        match self {
            Measurement::BloodPressure => "Blood pressure panel with all children optional",
            Measurement::HeartRate => "Heart rate",
            Measurement::Spo2 => "Oxygen saturation in Arterial blood",
            Measurement::BodyWeight => "Body weight",
            Measurement::Glucose => "Glucose [Moles/volume] in Blood",
            Measurement::Temperature => "Body temperature",
        }
    }

    fn norwegian(self) -> &'static str {
        match self {
            Measurement::BloodPressure => "Blodtrykk",
            Measurement::HeartRate => "Puls",
            Measurement::Spo2 => "Oksygenmetning",
            Measurement::BodyWeight => "Vekt",
            Measurement::Glucose => "Blodsukker",
            Measurement::Temperature => "Temperatur",
        }
    }

    fn category(self) -> (&'static str, &'static str) {
        match self {
            Measurement::Glucose => ("laboratory", "Laboratory"),
            _ => ("vital-signs", "Vital Signs"),
        }
    }

    fn device(self) -> &'static str {
        match self {
            Measurement::BloodPressure | Measurement::HeartRate => "Omron M7 Intelli IT",
            Measurement::Spo2 => "Nonin 3230 Bluetooth",
            Measurement::BodyWeight => "A&D UC-352BLE",
            Measurement::Glucose => "Contour Next One",
            Measurement::Temperature => "Braun ThermoScan 7",
        }
    }
}

/// A home follow-up program: which measurements a patient takes, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Program {
    /// Hypertension: blood pressure and pulse morning and evening, weight every third day.
    Hypertension,
    /// Heart failure: blood pressure, pulse, weight and SpO2 every morning.
    HeartFailure,
    /// COPD: SpO2 and pulse twice a day, temperature every morning.
    Copd,
    /// Diabetes: glucose four times a day, blood pressure and pulse daily, weight weekly.
    Diabetes,
}

impl Program {
    const ALL: [Program; 4] = [
        Program::Hypertension,
        Program::HeartFailure,
        Program::Copd,
        Program::Diabetes,
    ];

    /// The measurements of this program.
    pub fn measurements(self) -> &'static [Measurement] {
        use Measurement::*;
        match self {
            Program::Hypertension => &[BloodPressure, HeartRate, BodyWeight],
            Program::HeartFailure => &[BloodPressure, HeartRate, BodyWeight, Spo2],
            Program::Copd => &[Spo2, HeartRate, Temperature],
            Program::Diabetes => &[Glucose, BloodPressure, HeartRate, BodyWeight],
        }
    }

    fn title(self) -> &'static str {
        match self {
            Program::Hypertension => "Digital hjemmeoppfølging: hypertensjon",
            Program::HeartFailure => "Digital hjemmeoppfølging: hjertesvikt",
            Program::Copd => "Digital hjemmeoppfølging: KOLS",
            Program::Diabetes => "Digital hjemmeoppfølging: diabetes",
        }
    }

    /// The (measurement, local time window in minutes after midnight) of one day `d` (days since
    /// the start of the data window).
    fn schedule(self, d: u32) -> Vec<(Measurement, u32, u32)> {
        use Measurement::*;
        const MORNING: (u32, u32) = (6 * 60 + 30, 9 * 60);
        const NOON: (u32, u32) = (11 * 60 + 30, 13 * 60);
        const AFTERNOON: (u32, u32) = (16 * 60, 18 * 60);
        const EVENING: (u32, u32) = (19 * 60, 22 * 60);
        let mut s = Vec::with_capacity(6);
        let mut at = |m, (a, b): (u32, u32)| s.push((m, a, b));
        match self {
            Program::Hypertension => {
                at(BloodPressure, MORNING);
                at(HeartRate, MORNING);
                at(BloodPressure, EVENING);
                at(HeartRate, EVENING);
                if d.is_multiple_of(3) {
                    at(BodyWeight, MORNING);
                }
            }
            Program::HeartFailure => {
                at(BodyWeight, MORNING);
                at(BloodPressure, MORNING);
                at(HeartRate, MORNING);
                at(Spo2, MORNING);
            }
            Program::Copd => {
                at(Spo2, MORNING);
                at(HeartRate, MORNING);
                at(Temperature, MORNING);
                at(Spo2, AFTERNOON);
                at(HeartRate, AFTERNOON);
            }
            Program::Diabetes => {
                at(Glucose, MORNING);
                at(Glucose, NOON);
                at(Glucose, AFTERNOON);
                at(Glucose, EVENING);
                at(BloodPressure, MORNING);
                at(HeartRate, MORNING);
                if d.is_multiple_of(7) {
                    at(BodyWeight, MORNING);
                }
            }
        }
        s
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetConfig {
    /// Number of patients.
    pub patients: usize,
    /// Index of the first patient: a dataset of patients `first_patient..first_patient +
    /// patients`. A later offset gives fresh patients with the same seed.
    pub first_patient: usize,
    /// Days of measurements per patient, ending the day before `end`.
    pub days: u32,
    /// The (exclusive) last day of the data window. Fixed rather than "today" so that a seed
    /// always gives the same bytes.
    pub end: NaiveDate,
    /// The seed.
    pub seed: u64,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            patients: 100,
            first_patient: 0,
            days: 30,
            end: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap_or_default(),
            seed: 42,
        }
    }
}

impl DatasetConfig {
    /// The first day of the data window.
    pub fn start(&self) -> NaiveDate {
        self.end - Duration::days(i64::from(self.days))
    }

    /// The patient indexes of this dataset.
    pub fn patient_indexes(&self) -> std::ops::Range<usize> {
        self.first_patient..self.first_patient + self.patients
    }
}

/// One generated resource, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenResource {
    /// `resourceType`.
    pub resource_type: &'static str,
    /// A client-chosen id: created with `PUT {type}/{id}` (patients, so that measurements can
    /// reference them before the server has answered). `None`: `POST` with a server id.
    pub id: Option<String>,
    /// The conditional-create criteria (`identifier=system|value`, not URL-encoded) that make a
    /// retry idempotent, as the PHG does.
    pub if_none_exist: Option<String>,
    /// A `urn:uuid:` for `Bundle.entry.fullUrl`.
    pub full_url: String,
    /// Compact JSON.
    pub json: String,
}

/// The stable facts of one patient, cheap to compute without generating their data.
#[derive(Debug, Clone, PartialEq)]
pub struct PatientProfile {
    /// Patient index in the dataset.
    pub index: usize,
    /// `Patient.id`.
    pub id: String,
    /// Synthetic fødselsnummer.
    pub fnr: String,
    /// `female` or `male`, as the fødselsnummer says.
    pub gender: &'static str,
    /// Birth date.
    pub birth_date: NaiveDate,
    /// Given name.
    pub given: &'static str,
    /// Family name.
    pub family: &'static str,
    /// Follow-up program.
    pub program: Program,
}

impl PatientProfile {
    /// Patient `index` of a dataset with this seed.
    pub fn new(seed: u64, index: usize) -> PatientProfile {
        let mut rng = stream(seed, index, 0);
        let birth_date = NaiveDate::from_ymd_opt(1930, 1, 1).unwrap_or_default()
            + Duration::days(rng.gen_range(0..(75 * 365)));
        let (fnr, male) = fodselsnummer(&mut rng, birth_date);
        let (gender, given) = if male {
            ("male", pick(&mut rng, MALE_NAMES))
        } else {
            ("female", pick(&mut rng, FEMALE_NAMES))
        };
        PatientProfile {
            index,
            id: format!("p{seed}-{index}"),
            fnr,
            gender,
            birth_date,
            given,
            family: pick(&mut rng, FAMILY_NAMES),
            program: Program::ALL[rng.gen_range(0..Program::ALL.len())],
        }
    }

    /// `Patient/{id}`
    pub fn reference(&self) -> String {
        format!("Patient/{}", self.id)
    }
}

/// A dataset: the resources of every patient, in patient order.
#[derive(Debug, Clone)]
pub struct Dataset {
    cfg: DatasetConfig,
}

impl Dataset {
    /// A dataset of `cfg`.
    pub fn new(cfg: DatasetConfig) -> Dataset {
        Dataset { cfg }
    }

    /// Its configuration.
    pub fn config(&self) -> &DatasetConfig {
        &self.cfg
    }

    /// Every resource: per patient the Patient first, then its measurements in time order, then
    /// its CarePlans, QuestionnaireResponses and Appointments.
    pub fn resources(&self) -> impl Iterator<Item = GenResource> + '_ {
        self.cfg
            .patient_indexes()
            .flat_map(move |i| patient_resources(&self.cfg, i))
    }

    /// Counts per resource type and in total (generates the data once).
    pub fn summary(&self) -> DatasetSummary {
        let mut s = DatasetSummary::new(&self.cfg);
        for r in self.resources() {
            s.add(&r);
        }
        s
    }
}

/// What a dataset holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DatasetSummary {
    /// Patients.
    pub patients: usize,
    /// Days per patient.
    pub days: u32,
    /// Seed.
    pub seed: u64,
    /// First day of the window.
    pub start: String,
    /// Exclusive last day.
    pub end: String,
    /// Resources per type.
    pub counts: BTreeMap<String, u64>,
    /// All resources.
    pub total: u64,
    /// Bytes of compact JSON of all resources.
    pub json_bytes: u64,
}

impl DatasetSummary {
    /// An empty summary of `cfg`.
    pub fn new(cfg: &DatasetConfig) -> DatasetSummary {
        DatasetSummary {
            patients: cfg.patients,
            days: cfg.days,
            seed: cfg.seed,
            start: cfg.start().to_string(),
            end: cfg.end.to_string(),
            ..DatasetSummary::default()
        }
    }

    /// Counts one resource.
    pub fn add(&mut self, r: &GenResource) {
        *self.counts.entry(r.resource_type.to_string()).or_default() += 1;
        self.total += 1;
        self.json_bytes += r.json.len() as u64;
    }
}

/// A random stream of its own for (seed, patient, purpose), so that patients are independent.
fn stream(seed: u64, index: usize, purpose: u64) -> ChaCha8Rng {
    let mut z = seed
        ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ purpose.wrapping_mul(0xD1B5_4A32_D192_ED03);
    // splitmix64 finaliser: neighbouring indexes get unrelated seeds.
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ChaCha8Rng::seed_from_u64(z ^ (z >> 31))
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

fn urn_uuid(rng: &mut ChaCha8Rng) -> String {
    let bytes: [u8; 16] = rng.r#gen();
    format!(
        "urn:uuid:{}",
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    )
}

/// A JSON string literal.
fn js(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

// ---------------------------------------------------------------------------- fødselsnummer

/// A synthetic fødselsnummer for `birth` with valid check digits; also whether it is a man's.
///
/// Layout `DDMMYYIIIKK`: birth date, a three-digit individual number (its range says the
/// century; its last digit is odd for men), and two modulo-11 check digits. The month has 80
/// added, the convention of the Norwegian synthetic test population (Tenor), so a generated
/// number can never be a real person's.
fn fodselsnummer(rng: &mut ChaCha8Rng, birth: NaiveDate) -> (String, bool) {
    let year = birth.year();
    let individual_range = if year >= 2000 { 500..1000 } else { 0..500 };
    loop {
        let individual: u32 = rng.gen_range(individual_range.clone());
        let base = format!(
            "{:02}{:02}{:02}{:03}",
            birth.day(),
            birth.month() + 80,
            year % 100,
            individual
        );
        if let Some(fnr) = with_check_digits(&base) {
            return (fnr, individual % 2 == 1);
        }
    }
}

/// Appends the two modulo-11 check digits to nine digits; `None` when a check digit would be
/// 10 (no valid number with this individual number).
fn with_check_digits(nine: &str) -> Option<String> {
    const W1: [u32; 9] = [3, 7, 6, 1, 8, 9, 4, 5, 2];
    const W2: [u32; 10] = [5, 4, 3, 2, 7, 6, 5, 4, 3, 2];
    let d: Vec<u32> = nine
        .chars()
        .map(|c| c.to_digit(10))
        .collect::<Option<_>>()?;
    if d.len() != 9 {
        return None;
    }
    let check = |sum: u32| match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        k => Some(k),
    };
    let k1 = check(d.iter().zip(W1).map(|(a, w)| a * w).sum())?;
    let k2 = check(
        d.iter()
            .chain([k1].iter())
            .zip(W2)
            .map(|(a, w)| a * w)
            .sum(),
    )?;
    Some(format!("{nine}{k1}{k2}"))
}

/// Whether `s` is 11 digits with valid fødselsnummer check digits.
pub fn fnr_is_valid(s: &str) -> bool {
    s.len() == 11 && s.is_char_boundary(9) && with_check_digits(&s[..9]).as_deref() == Some(s)
}

// ---------------------------------------------------------------------------- time

/// Europe/Oslo's UTC offset on a day: CEST from the last Sunday of March to the last Sunday of
/// October. Exact to the day, which is all a measurement between 06:30 and 22:00 needs.
fn oslo_offset(day: NaiveDate) -> &'static str {
    let last_sunday = |month: u32| {
        let mut d = NaiveDate::from_ymd_opt(day.year(), month, 31).unwrap_or(day);
        while d.weekday() != Weekday::Sun {
            d -= Duration::days(1);
        }
        d
    };
    if day >= last_sunday(3) && day < last_sunday(10) {
        "+02:00"
    } else {
        "+01:00"
    }
}

fn local_datetime(day: NaiveDate, minutes: u32, seconds: u32) -> String {
    let t = NaiveTime::from_num_seconds_from_midnight_opt(minutes * 60 + seconds, 0)
        .unwrap_or_default();
    format!(
        "{}{}",
        NaiveDateTime::new(day, t).format("%Y-%m-%dT%H:%M:%S"),
        oslo_offset(day)
    )
}

// ---------------------------------------------------------------------------- resources

/// Per-patient physiology, so that a patient's values wander around their own baseline.
struct Baseline {
    systolic: f64,
    diastolic: f64,
    pulse: f64,
    spo2: f64,
    weight: f64,
    glucose: f64,
}

/// All resources of patient `index`.
pub fn patient_resources(cfg: &DatasetConfig, index: usize) -> Vec<GenResource> {
    let p = PatientProfile::new(cfg.seed, index);
    let mut rng = stream(cfg.seed, index, 1);
    let mut out = Vec::with_capacity(cfg.days as usize * 5 + 16);
    out.push(patient(&p, &mut rng));

    let base = Baseline {
        systolic: rng.gen_range(112.0..158.0),
        diastolic: rng.gen_range(68.0..96.0),
        pulse: rng.gen_range(56.0..92.0),
        spo2: if p.program == Program::Copd {
            rng.gen_range(88.0..95.0)
        } else {
            rng.gen_range(95.0..99.0)
        },
        weight: rng.gen_range(52.0..128.0),
        glucose: rng.gen_range(5.0..10.0),
    };
    let devices: Vec<(Measurement, String)> = p
        .program
        .measurements()
        .iter()
        .map(|&m| (m, format!("SN{:08}", rng.gen_range(0..100_000_000u32))))
        .collect();
    let subject = format!(
        r#"{{"reference":"{}","identifier":{{"system":"{FNR_SYSTEM}","value":"{}"}},"display":{}}}"#,
        p.reference(),
        p.fnr,
        js(&format!("{} {}", p.given, p.family))
    );
    let start = cfg.start();
    let mut n = 0u32;
    let mut weight = base.weight;
    for d in 0..cfg.days {
        let day = start + Duration::days(i64::from(d));
        // Weight drifts slowly (fluid retention in heart failure shows up as a trend).
        weight += rng.gen_range(-0.3..0.32);
        for (m, from, to) in p.program.schedule(d) {
            // Home measurement adherence is never perfect.
            if rng.gen_bool(0.08) {
                continue;
            }
            n += 1;
            let minute = rng.gen_range(from..to);
            let when = local_datetime(day, minute, rng.gen_range(0..60));
            // Pulse comes from the blood-pressure cuff or, in COPD, from the oximeter.
            let source = match m {
                Measurement::HeartRate if p.program == Program::Copd => Measurement::Spo2,
                Measurement::HeartRate => Measurement::BloodPressure,
                other => other,
            };
            let device = devices
                .iter()
                .find(|(dm, _)| *dm == source)
                .map(|(_, sn)| sn.as_str())
                .unwrap_or("SN00000000");
            let value = measurement_value(&mut rng, m, &base, weight);
            let ident = format!("m-{}-{}-{n}", cfg.seed, p.index);
            out.push(observation(
                &mut rng,
                m,
                &ident,
                &subject,
                &when,
                (source.device(), device),
                &value,
            ));
        }
    }
    out.extend(care_plans(cfg, &p, &mut rng));
    out.extend(questionnaire_responses(cfg, &p, &mut rng));
    out.extend(appointments(cfg, &p, &mut rng));
    out
}

fn patient(p: &PatientProfile, rng: &mut ChaCha8Rng) -> GenResource {
    let (city, postal) = pick(rng, CITIES);
    let street = pick(rng, STREETS);
    let json = format!(
        concat!(
            r#"{{"resourceType":"Patient","id":"{id}","#,
            r#""meta":{{"profile":["http://hl7.no/fhir/StructureDefinition/no-basis-Patient"]}},"#,
            r#""identifier":[{{"use":"official","system":"{sys}","value":"{fnr}"}}],"#,
            r#""active":true,"name":[{{"use":"official","family":{family},"given":[{given}]}}],"#,
            r#""telecom":[{{"system":"phone","value":"+47 9{phone:07}","use":"mobile"}}],"#,
            r#""gender":"{gender}","birthDate":"{birth}","#,
            r#""address":[{{"use":"home","line":[{line}],"postalCode":"{postal}","city":{city},"country":"NO"}}]}}"#
        ),
        id = p.id,
        sys = FNR_SYSTEM,
        fnr = p.fnr,
        family = js(p.family),
        given = js(p.given),
        phone = rng.gen_range(0..10_000_000u32),
        gender = p.gender,
        birth = p.birth_date,
        line = js(&format!("{street} {}", rng.gen_range(1..120))),
        postal = postal,
        city = js(city),
    );
    GenResource {
        resource_type: "Patient",
        id: Some(p.id.clone()),
        if_none_exist: None,
        full_url: urn_uuid(rng),
        json,
    }
}

/// The value part of an Observation (`valueQuantity` or `component`), as JSON members.
fn measurement_value(rng: &mut ChaCha8Rng, m: Measurement, b: &Baseline, weight: f64) -> String {
    let q = |value: String, unit: &str, code: &str| {
        format!(
            r#""valueQuantity":{{"value":{value},"unit":"{unit}","system":"http://unitsofmeasure.org","code":"{code}"}}"#
        )
    };
    match m {
        Measurement::BloodPressure => {
            let sys = (b.systolic + rng.gen_range(-14.0..14.0))
                .round()
                .clamp(85.0, 220.0);
            let dia = (b.diastolic + rng.gen_range(-9.0..9.0))
                .round()
                .clamp(45.0, sys - 20.0);
            let comp = |code: &str, display: &str, v: f64| {
                format!(
                    r#"{{"code":{{"coding":[{{"system":"{LOINC}","code":"{code}","display":"{display}"}}]}},{}}}"#,
                    q(format!("{v:.0}"), "mmHg", "mm[Hg]")
                )
            };
            format!(
                r#""component":[{},{}]"#,
                comp("8480-6", "Systolic blood pressure", sys),
                comp("8462-4", "Diastolic blood pressure", dia)
            )
        }
        Measurement::HeartRate => {
            let v = (b.pulse + rng.gen_range(-12.0..16.0))
                .round()
                .clamp(38.0, 170.0);
            q(format!("{v:.0}"), "beats/minute", "/min")
        }
        Measurement::Spo2 => {
            let v = (b.spo2 + rng.gen_range(-3.0..2.0))
                .round()
                .clamp(80.0, 100.0);
            q(format!("{v:.0}"), "%", "%")
        }
        Measurement::BodyWeight => q(format!("{:.1}", weight.clamp(35.0, 220.0)), "kg", "kg"),
        Measurement::Glucose => {
            let v = (b.glucose + rng.gen_range(-2.5..5.0)).clamp(2.8, 25.0);
            q(format!("{v:.1}"), "mmol/L", "mmol/L")
        }
        Measurement::Temperature => {
            // Now and then a fever, as COPD exacerbations go.
            let v = if rng.gen_bool(0.05) {
                rng.gen_range(37.8..39.5)
            } else {
                rng.gen_range(36.1..37.4)
            };
            q(format!("{v:.1}"), "Cel", "Cel")
        }
    }
}

fn observation(
    rng: &mut ChaCha8Rng,
    m: Measurement,
    ident: &str,
    subject: &str,
    when: &str,
    (device, device_sn): (&str, &str),
    value: &str,
) -> GenResource {
    let (cat, cat_display) = m.category();
    let json = format!(
        concat!(
            r#"{{"resourceType":"Observation","#,
            r#""identifier":[{{"system":"{msys}","value":"{ident}"}}],"#,
            r#""status":"final","#,
            r#""category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"{cat}","display":"{cat_display}"}}]}}],"#,
            r#""code":{{"coding":[{{"system":"{loinc_sys}","code":"{code}","display":"{display}"}}],"text":"{text}"}},"#,
            r#""subject":{subject},"effectiveDateTime":"{when}","#,
            r#""device":{{"identifier":{{"system":"{dsys}","value":"{sn}"}},"display":"{device}"}},"#,
            r#"{value}}}"#
        ),
        msys = MEASUREMENT_SYSTEM,
        ident = ident,
        cat = cat,
        cat_display = cat_display,
        loinc_sys = LOINC,
        code = m.loinc(),
        display = m.display(),
        text = m.norwegian(),
        subject = subject,
        when = when,
        dsys = DEVICE_SYSTEM,
        sn = device_sn,
        device = device,
        value = value,
    );
    GenResource {
        resource_type: "Observation",
        id: None,
        if_none_exist: Some(format!("identifier={MEASUREMENT_SYSTEM}|{ident}")),
        full_url: urn_uuid(rng),
        json,
    }
}

fn patient_ref(p: &PatientProfile) -> String {
    format!(
        r#"{{"reference":"{}","display":{}}}"#,
        p.reference(),
        js(&format!("{} {}", p.given, p.family))
    )
}

fn record(
    rng: &mut ChaCha8Rng,
    resource_type: &'static str,
    ident: String,
    json: String,
) -> GenResource {
    GenResource {
        resource_type,
        id: None,
        if_none_exist: Some(format!("identifier={RECORD_SYSTEM}|{ident}")),
        full_url: urn_uuid(rng),
        json,
    }
}

/// An active plan for the program over the data window; half of the patients also have an
/// earlier, completed plan.
fn care_plans(cfg: &DatasetConfig, p: &PatientProfile, rng: &mut ChaCha8Rng) -> Vec<GenResource> {
    let start = cfg.start();
    let mut plans = vec![("active", start, None)];
    if rng.gen_bool(0.5) {
        let earlier = start - Duration::days(rng.gen_range(90..400));
        plans.push(("completed", earlier, Some(start - Duration::days(1))));
    }
    let activities: Vec<String> = p
        .program
        .measurements()
        .iter()
        .map(|m| {
            format!(
                r#"{{"detail":{{"code":{{"coding":[{{"system":"{LOINC}","code":"{}","display":"{}"}}]}},"status":"{}","description":{}}}}}"#,
                m.loinc(),
                m.display(),
                "in-progress",
                js(&format!("Mål {} som avtalt", m.norwegian().to_lowercase()))
            )
        })
        .collect();
    plans
        .into_iter()
        .enumerate()
        .map(|(k, (status, from, to))| {
            let ident = format!("cp-{}-{}-{k}", cfg.seed, p.index);
            let period = match to {
                Some(to) => format!(r#"{{"start":"{from}","end":"{to}"}}"#),
                None => format!(r#"{{"start":"{from}"}}"#),
            };
            let json = format!(
                concat!(
                    r#"{{"resourceType":"CarePlan","identifier":[{{"system":"{rsys}","value":"{ident}"}}],"#,
                    r#""status":"{status}","intent":"plan","title":{title},"#,
                    r#""subject":{subject},"period":{period},"created":"{created}","#,
                    r#""activity":[{activities}]}}"#
                ),
                rsys = RECORD_SYSTEM,
                ident = ident,
                status = status,
                title = js(p.program.title()),
                subject = patient_ref(p),
                period = period,
                created = local_datetime(from, 10 * 60, 0),
                activities = activities.join(","),
            );
            record(rng, "CarePlan", ident, json)
        })
        .collect()
}

/// A weekly self-report (how are you, more short of breath, a comment).
fn questionnaire_responses(
    cfg: &DatasetConfig,
    p: &PatientProfile,
    rng: &mut ChaCha8Rng,
) -> Vec<GenResource> {
    const COMMENTS: &[&str] = &[
        "Alt vel.",
        "Litt sliten i dag.",
        "Sov dårlig i natt.",
        "Hovne ankler om kvelden.",
        "Føler meg bedre enn forrige uke.",
        "Glemte å måle i går.",
    ];
    let start = cfg.start();
    (0..cfg.days.div_ceil(7))
        .filter_map(|w| {
            let day = start + Duration::days(i64::from(w * 7 + rng.gen_range(0..7)));
            if day >= cfg.end {
                return None;
            }
            let ident = format!("qr-{}-{}-{w}", cfg.seed, p.index);
            let json = format!(
                concat!(
                    r#"{{"resourceType":"QuestionnaireResponse","identifier":{{"system":"{rsys}","value":"{ident}"}},"#,
                    r#""questionnaire":"https://dho.example.no/fhir/Questionnaire/ukentlig-egenrapport","#,
                    r#""status":"completed","subject":{subject},"authored":"{authored}","#,
                    r#""item":[{{"linkId":"1","text":"Hvordan har du det i dag (1-5)?","answer":[{{"valueInteger":{score}}}]}},"#,
                    r#"{{"linkId":"2","text":"Er du mer tungpust enn vanlig?","answer":[{{"valueBoolean":{breath}}}]}},"#,
                    r#"{{"linkId":"3","text":"Kommentar","answer":[{{"valueString":{comment}}}]}}]}}"#
                ),
                rsys = RECORD_SYSTEM,
                ident = ident,
                subject = patient_ref(p),
                authored = local_datetime(day, rng.gen_range(17 * 60..22 * 60), rng.gen_range(0..60)),
                score = rng.gen_range(1..=5),
                breath = rng.gen_bool(0.2),
                comment = js(pick(rng, COMMENTS)),
            );
            Some(record(rng, "QuestionnaireResponse", ident, json))
        })
        .collect()
}

/// A video consultation every other week; past ones fulfilled (or now and then cancelled), the
/// one after the window booked.
fn appointments(cfg: &DatasetConfig, p: &PatientProfile, rng: &mut ChaCha8Rng) -> Vec<GenResource> {
    let start = cfg.start();
    (0..=cfg.days / 14)
        .map(|k| {
            let day = start + Duration::days(i64::from(k * 14 + rng.gen_range(0..5)));
            let status = if day >= cfg.end {
                "booked"
            } else if rng.gen_bool(0.1) {
                "cancelled"
            } else {
                "fulfilled"
            };
            let minute = rng.gen_range(8 * 4..15 * 4) * 15;
            let ident = format!("ap-{}-{}-{k}", cfg.seed, p.index);
            let json = format!(
                concat!(
                    r#"{{"resourceType":"Appointment","identifier":[{{"system":"{rsys}","value":"{ident}"}}],"#,
                    r#""status":"{status}","#,
                    r#""serviceType":[{{"text":"Digital hjemmeoppfølging"}}],"#,
                    r#""description":"Videokonsultasjon med sykepleier","#,
                    r#""start":"{start}","end":"{end}","minutesDuration":20,"#,
                    r#""participant":[{{"actor":{subject},"required":"required","status":"accepted"}},"#,
                    r#"{{"actor":{{"display":"Sykepleier, Digital hjemmeoppfølging"}},"required":"required","status":"accepted"}}]}}"#
                ),
                rsys = RECORD_SYSTEM,
                ident = ident,
                status = status,
                start = local_datetime(day, minute, 0),
                end = local_datetime(day, minute + 20, 0),
                subject = patient_ref(p),
            );
            record(rng, "Appointment", ident, json)
        })
        .collect()
}

// ---------------------------------------------------------------------------- bundles, files

/// `Bundle.type` of generated Bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum BundleType {
    /// Each entry on its own (what the PHG sends).
    Batch,
    /// All or nothing.
    Transaction,
}

impl BundleType {
    fn as_str(self) -> &'static str {
        match self {
            BundleType::Batch => "batch",
            BundleType::Transaction => "transaction",
        }
    }
}

/// A batch or transaction Bundle of `entries`: patients as `PUT Patient/{id}`, everything else
/// as `POST {type}` with `ifNoneExist` on its identifier.
pub fn bundle(bundle_type: BundleType, entries: &[GenResource]) -> String {
    let mut s =
        String::with_capacity(entries.iter().map(|e| e.json.len() + 200).sum::<usize>() + 64);
    let _ = write!(
        s,
        r#"{{"resourceType":"Bundle","type":"{}","entry":["#,
        bundle_type.as_str()
    );
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            r#"{{"fullUrl":"{}","resource":{},"request":"#,
            e.full_url, e.json
        );
        match (&e.id, &e.if_none_exist) {
            (Some(id), _) => {
                let _ = write!(
                    s,
                    r#"{{"method":"PUT","url":"{}/{id}"}}}}"#,
                    e.resource_type
                );
            }
            (None, Some(cond)) => {
                let _ = write!(
                    s,
                    r#"{{"method":"POST","url":"{}","ifNoneExist":{}}}}}"#,
                    e.resource_type,
                    js(cond)
                );
            }
            (None, None) => {
                let _ = write!(s, r#"{{"method":"POST","url":"{}"}}}}"#, e.resource_type);
            }
        }
    }
    s.push_str("]}");
    s
}

/// What [`write_files`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum OutputFormat {
    /// One `{Type}.ndjson` per resource type (the FHIR bulk-data layout).
    Ndjson,
    /// `bundle-000001.json`, … of `batch_size` entries each.
    Bundles,
    /// Both.
    Both,
}

/// Writes the dataset to `dir` and returns its summary.
pub fn write_files(
    dataset: &Dataset,
    dir: &Path,
    format: OutputFormat,
    bundle_type: BundleType,
    batch_size: usize,
) -> Result<DatasetSummary, BenchError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| BenchError::new(format!("cannot create {}: {e}", dir.display())))?;
    let open = |name: String| -> Result<std::io::BufWriter<std::fs::File>, BenchError> {
        let path = dir.join(&name);
        std::fs::File::create(&path)
            .map(std::io::BufWriter::new)
            .map_err(|e| BenchError::new(format!("cannot write {}: {e}", path.display())))
    };
    let ndjson = matches!(format, OutputFormat::Ndjson | OutputFormat::Both);
    let bundles = matches!(format, OutputFormat::Bundles | OutputFormat::Both);
    let batch_size = batch_size.max(1);
    let mut files: BTreeMap<&'static str, std::io::BufWriter<std::fs::File>> = BTreeMap::new();
    let mut pending: Vec<GenResource> = Vec::with_capacity(batch_size);
    let mut bundle_no = 0usize;
    let mut summary = DatasetSummary::new(dataset.config());
    let io = |e: std::io::Error| BenchError::new(format!("writing to {}: {e}", dir.display()));
    let mut flush = |pending: &mut Vec<GenResource>| -> Result<(), BenchError> {
        if pending.is_empty() {
            return Ok(());
        }
        bundle_no += 1;
        let mut f = open(format!("bundle-{bundle_no:06}.json"))?;
        f.write_all(bundle(bundle_type, pending).as_bytes())
            .and_then(|_| f.flush())
            .map_err(io)?;
        pending.clear();
        Ok(())
    };
    for r in dataset.resources() {
        summary.add(&r);
        if ndjson {
            let f = match files.entry(r.resource_type) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(open(format!("{}.ndjson", r.resource_type))?)
                }
            };
            f.write_all(r.json.as_bytes())
                .and_then(|_| f.write_all(b"\n"))
                .map_err(io)?;
        }
        if bundles {
            pending.push(r);
            if pending.len() == batch_size {
                flush(&mut pending)?;
            }
        }
    }
    flush(&mut pending)?;
    for f in files.values_mut() {
        f.flush().map_err(io)?;
    }
    Ok(summary)
}

// ---------------------------------------------------------------------------- name lists

const FEMALE_NAMES: &[&str] = &[
    "Anne",
    "Inger",
    "Kari",
    "Marit",
    "Ingrid",
    "Liv",
    "Eva",
    "Berit",
    "Astrid",
    "Bjørg",
    "Hilde",
    "Anna",
    "Solveig",
    "Marianne",
    "Randi",
    "Ida",
    "Nina",
    "Ragnhild",
    "Elisabeth",
    "Kristin",
    "Nora",
    "Emma",
    "Sofie",
    "Åse",
    "Gunn",
];
const MALE_NAMES: &[&str] = &[
    "Jan", "Per", "Bjørn", "Ole", "Lars", "Kjell", "Knut", "Arne", "Svein", "Thomas", "Hans",
    "Geir", "Tor", "Morten", "Terje", "Odd", "Erik", "Martin", "Andreas", "John", "Jakob", "Emil",
    "Håkon", "Øyvind", "Sindre",
];
const FAMILY_NAMES: &[&str] = &[
    "Hansen",
    "Johansen",
    "Olsen",
    "Larsen",
    "Andersen",
    "Pedersen",
    "Nilsen",
    "Kristiansen",
    "Jensen",
    "Karlsen",
    "Johnsen",
    "Pettersen",
    "Eriksen",
    "Berg",
    "Haugen",
    "Hagen",
    "Johannessen",
    "Andreassen",
    "Jacobsen",
    "Dahl",
    "Jørgensen",
    "Halvorsen",
    "Henriksen",
    "Lund",
    "Sørensen",
    "Strand",
    "Solberg",
    "Bakken",
    "Lie",
    "Moen",
    "Ødegård",
    "Aas",
];
const CITIES: &[(&str, &str)] = &[
    ("Oslo", "0155"),
    ("Bergen", "5003"),
    ("Trondheim", "7011"),
    ("Stavanger", "4006"),
    ("Tromsø", "9008"),
    ("Kristiansand", "4610"),
    ("Drammen", "3015"),
    ("Fredrikstad", "1606"),
    ("Bodø", "8006"),
    ("Ålesund", "6002"),
    ("Hamar", "2317"),
    ("Lillehammer", "2609"),
];
const STREETS: &[&str] = &[
    "Storgata",
    "Kirkegata",
    "Skolegata",
    "Parkveien",
    "Fjordveien",
    "Bjørkeveien",
    "Granveien",
    "Solbakken",
    "Strandveien",
    "Industrivegen",
    "Løkkeveien",
    "Åsveien",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DatasetConfig {
        DatasetConfig {
            patients: 8,
            days: 15,
            ..DatasetConfig::default()
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a: Vec<_> = Dataset::new(small()).resources().collect();
        let b: Vec<_> = Dataset::new(small()).resources().collect();
        assert_eq!(a, b);
        let c: Vec<_> = Dataset::new(DatasetConfig { seed: 7, ..small() })
            .resources()
            .collect();
        assert_ne!(a[1].json, c[1].json);
    }

    #[test]
    fn a_patient_does_not_depend_on_the_dataset_size() {
        let big = DatasetConfig {
            patients: 30,
            ..small()
        };
        let one = DatasetConfig {
            patients: 1,
            first_patient: 17,
            ..small()
        };
        let from_big: Vec<_> = Dataset::new(big)
            .resources()
            .filter(|r| r.json.contains("\"p42-17\"") || r.json.contains("Patient/p42-17\""))
            .collect();
        let alone: Vec<_> = Dataset::new(one).resources().collect();
        assert_eq!(from_big, alone);
    }

    #[test]
    fn fodselsnummer_have_valid_check_digits_and_synthetic_months() {
        for i in 0..500 {
            let p = PatientProfile::new(3, i);
            assert!(fnr_is_valid(&p.fnr), "{}", p.fnr);
            let month: u32 = p.fnr[2..4].parse().unwrap();
            assert!((81..=92).contains(&month), "{}", p.fnr);
            assert_eq!(p.fnr[..2].parse::<u32>().unwrap(), p.birth_date.day());
            let individual: u32 = p.fnr[6..9].parse().unwrap();
            assert_eq!(individual % 2 == 1, p.gender == "male");
        }
        // A published example of the check-digit rule (month without the synthetic offset).
        assert!(fnr_is_valid("01010750160"));
        assert!(!fnr_is_valid("01010750161"));
        assert!(!fnr_is_valid("0101075016"));
    }

    #[test]
    fn every_resource_and_bundle_is_valid_fhir_r4() {
        let data: Vec<_> = Dataset::new(small()).resources().collect();
        for r in &data {
            let parsed = fhir_core::Resource::from_json_bytes(r.json.as_bytes())
                .unwrap_or_else(|e| panic!("{}: {e}\n{}", r.resource_type, r.json));
            assert_eq!(parsed.resource_type().as_str(), r.resource_type);
        }
        for t in [BundleType::Batch, BundleType::Transaction] {
            let b = bundle(t, &data[..40]);
            fhir_core::Resource::from_json_bytes(b.as_bytes())
                .unwrap_or_else(|e| panic!("bundle: {e}"));
        }
    }

    #[test]
    fn measurements_are_realistic() {
        let data: Vec<_> = Dataset::new(small()).resources().collect();
        let mut seen = std::collections::BTreeSet::new();
        let start = small().start().to_string();
        for r in data.iter().filter(|r| r.resource_type == "Observation") {
            let v: serde_json::Value = serde_json::from_str(&r.json).unwrap();
            let code = v["code"]["coding"][0]["code"].as_str().unwrap().to_string();
            let when = v["effectiveDateTime"].as_str().unwrap();
            assert!(
                when.ends_with("+01:00") || when.ends_with("+02:00"),
                "{when}"
            );
            assert!(when[..10] >= start[..], "{when}");
            assert!(v["device"]["identifier"]["value"].is_string());
            assert!(v["identifier"][0]["value"].is_string());
            let num = |q: &serde_json::Value| q["valueQuantity"]["value"].as_f64().unwrap();
            let ok = match code.as_str() {
                "85354-9" => {
                    let s = num(&v["component"][0]);
                    let d = num(&v["component"][1]);
                    (85.0..=220.0).contains(&s) && (45.0..s).contains(&d)
                }
                "8867-4" => (38.0..=170.0).contains(&num(&v)),
                "2708-6" => (80.0..=100.0).contains(&num(&v)),
                "29463-7" => (35.0..=220.0).contains(&num(&v)),
                "15074-8" => (2.8..=25.0).contains(&num(&v)),
                "8310-5" => (35.5..=40.0).contains(&num(&v)),
                other => panic!("unexpected code {other}"),
            };
            assert!(ok, "{}", r.json);
            seen.insert(code);
        }
        assert!(seen.len() >= 5, "{seen:?}");
        let per_day = data
            .iter()
            .filter(|r| r.resource_type == "Observation")
            .count() as f64
            / (8.0 * 15.0);
        assert!((3.0..7.0).contains(&per_day), "{per_day}");
    }

    #[test]
    fn every_program_measures_what_its_care_plan_says() {
        for p in Program::ALL {
            let scheduled: std::collections::BTreeSet<_> = (0..21)
                .flat_map(|d| p.schedule(d))
                .map(|(m, _, _)| m)
                .collect();
            let listed: std::collections::BTreeSet<_> = p.measurements().iter().copied().collect();
            assert_eq!(scheduled, listed, "{p:?}");
        }
    }

    #[test]
    fn oslo_offsets_follow_daylight_saving_time() {
        let d = |y, m, day| NaiveDate::from_ymd_opt(y, m, day).unwrap();
        assert_eq!(oslo_offset(d(2026, 1, 15)), "+01:00");
        assert_eq!(oslo_offset(d(2026, 3, 28)), "+01:00");
        assert_eq!(oslo_offset(d(2026, 3, 29)), "+02:00");
        assert_eq!(oslo_offset(d(2026, 10, 24)), "+02:00");
        assert_eq!(oslo_offset(d(2026, 10, 25)), "+01:00");
    }

    #[test]
    fn files_hold_every_resource() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Dataset::new(small());
        let s = write_files(&ds, dir.path(), OutputFormat::Both, BundleType::Batch, 100).unwrap();
        let mut lines = 0u64;
        let mut entries = 0u64;
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let path = f.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            if path.extension().is_some_and(|e| e == "ndjson") {
                lines += text.lines().count() as u64;
            } else {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                entries += v["entry"].as_array().unwrap().len() as u64;
            }
        }
        assert_eq!(lines, s.total);
        assert_eq!(entries, s.total);
        assert_eq!(s.counts["Patient"], 8);
    }
}
