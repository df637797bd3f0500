//! FHIR `instant`s as microseconds since the Unix epoch.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

use crate::error::StoreError;

/// Now, in µs since the epoch.
pub(crate) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// `2026-11-23T03:22:46.123456Z`: UTC, always six fractional digits, so that the text of two
/// instants orders like the instants.
pub(crate) fn format_micros(micros: i64) -> String {
    match DateTime::<Utc>::from_timestamp_micros(micros) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Micros, true),
        // Only reachable with corrupt data (±262,000 years); keep serving rather than fail.
        None => "1970-01-01T00:00:00.000000Z".to_string(),
    }
}

/// Parses a FHIR `instant` (or a `dateTime` with seconds and zone, or a plain date, taken as
/// midnight UTC) to µs since the epoch.
pub(crate) fn parse_instant(s: &str) -> Result<i64, StoreError> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().timestamp_micros());
    }
    Err(StoreError::InvalidCondition(format!(
        "'{}' is not a valid instant for _since (expected e.g. 2026-11-23T03:22:46Z or \
         2026-11-23)",
        s.chars().take(64).collect::<String>()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants() {
        let m = parse_instant("2026-11-23T03:22:46.123456Z").unwrap();
        assert_eq!(format_micros(m), "2026-11-23T03:22:46.123456Z");
        assert_eq!(
            parse_instant("2026-11-23T04:22:46.123456+01:00").unwrap(),
            m
        );
        assert_eq!(
            format_micros(parse_instant("2026-11-23").unwrap()),
            "2026-11-23T00:00:00.000000Z"
        );
        assert!(parse_instant("yesterday").is_err());
    }
}
