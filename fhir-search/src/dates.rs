//! Dates as intervals, and the calendar units that make `eq` an exact term match.
//!
//! FHIR compares a date search value and a resource's date as intervals at their precision:
//! `eq` means the search value's interval contains the resource's. A search value is always one
//! whole UTC calendar unit: `2024` is a UTC year, `2024-03-01` a UTC day (values without a
//! zone are UTC, see [`fhir_core::search_param::date_bounds`]), and a value with a time has a
//! zone offset in whole minutes, so its minute or second is also a UTC minute or second. So
//! each indexed interval gets one term per unit (year, month, day, minute, second) that holds
//! it whole, and `eq` is a single term query. Other prefixes compare the interval's ends,
//! which are indexed separately.

use chrono::{DateTime, Datelike, Timelike, Utc};

/// How precise a date search value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// `2024`
    Year,
    /// `2024-03`
    Month,
    /// `2024-03-01`
    Day,
    /// `2024-03-01T10:00+01:00`
    Minute,
    /// `2024-03-01T10:00:00+01:00`
    Second,
    /// `2024-03-01T10:00:00.5+01:00`
    Fraction,
}

impl Precision {
    /// The precision of a text that [`fhir_core::search_param::date_bounds`] accepted.
    pub fn of(text: &str) -> Precision {
        match text.len() {
            4 => Precision::Year,
            7 => Precision::Month,
            10 => Precision::Day,
            _ => {
                let time = text.get(11..).unwrap_or("");
                let b = time.as_bytes();
                if b.get(5) != Some(&b':') {
                    Precision::Minute
                } else if b.get(8) == Some(&b'.') {
                    Precision::Fraction
                } else {
                    Precision::Second
                }
            }
        }
    }
}

fn utc(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// The term of the UTC calendar unit of `precision` that contains `micros`, if the precision
/// has units (not [`Precision::Fraction`]).
pub(crate) fn unit_term(micros: i64, precision: Precision) -> Option<String> {
    let t = utc(micros)?;
    Some(match precision {
        Precision::Year => format!("Y{:04}", t.year()),
        Precision::Month => format!("M{:04}-{:02}", t.year(), t.month()),
        Precision::Day => format!("D{:04}-{:02}-{:02}", t.year(), t.month(), t.day()),
        Precision::Minute => format!(
            "m{:04}-{:02}-{:02}T{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Precision::Second => format!(
            "s{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Precision::Fraction => return None,
    })
}

/// The unit terms of every unit that holds the whole interval `[start, end]`.
pub(crate) fn unit_terms(start: i64, end: i64) -> Vec<String> {
    let mut out = Vec::new();
    if start == i64::MIN || end == i64::MAX || end < start {
        return out;
    }
    for p in [
        Precision::Year,
        Precision::Month,
        Precision::Day,
        Precision::Minute,
        Precision::Second,
    ] {
        match (unit_term(start, p), unit_term(end, p)) {
            (Some(a), Some(b)) if a == b => out.push(a),
            // A unit that does not hold the interval has no smaller one that does.
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhir_core::search_param::date_bounds;

    #[test]
    fn precision_of_text() {
        assert_eq!(Precision::of("2024"), Precision::Year);
        assert_eq!(Precision::of("2024-03"), Precision::Month);
        assert_eq!(Precision::of("2024-03-01"), Precision::Day);
        assert_eq!(Precision::of("2024-03-01T10:00+01:00"), Precision::Minute);
        assert_eq!(Precision::of("2024-03-01T10:00Z"), Precision::Minute);
        assert_eq!(Precision::of("2024-03-01T10:00"), Precision::Minute);
        assert_eq!(Precision::of("2024-03-01T10:00:00Z"), Precision::Second);
        assert_eq!(
            Precision::of("2024-03-01T10:00:00.25Z"),
            Precision::Fraction
        );
    }

    #[test]
    fn units_hold_the_interval() {
        let (s, e) = date_bounds("2024-03-01T10:00:00+01:00").unwrap();
        assert_eq!(
            unit_terms(s, e),
            [
                "Y2024",
                "M2024-03",
                "D2024-03-01",
                "m2024-03-01T09:00",
                "s2024-03-01T09:00:00"
            ]
        );
        // Local midnight in Oslo is the previous UTC day.
        let (s, e) = date_bounds("2024-03-01T00:30:00+01:00").unwrap();
        assert_eq!(unit_terms(s, e)[2], "D2024-02-29");
        let (s, e) = date_bounds("2024-03").unwrap();
        assert_eq!(unit_terms(s, e), ["Y2024", "M2024-03"]);
        assert!(unit_terms(i64::MIN, e).is_empty());
        let (s, _) = date_bounds("2023-12-31").unwrap();
        let (_, e) = date_bounds("2024-01-01").unwrap();
        assert!(unit_terms(s, e).is_empty());
    }
}
