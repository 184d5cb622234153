//! Timestamps: microseconds since the Unix epoch in UTC, as Python's
//! datetime has them, and their RFC 3339 text.

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::value::Micros;

/// Python's `datetime.isoformat()` of a UTC datetime: fraction only when
/// there are microseconds, offset written `+00:00`.
pub(crate) fn iso(us: Micros) -> String {
    match DateTime::<Utc>::from_timestamp_micros(us) {
        Some(dt) if us.rem_euclid(1_000_000) == 0 => dt.format("%Y-%m-%dT%H:%M:%S+00:00").to_string(),
        Some(dt) => dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
        None => format!("<out of range: {us} µs>"),
    }
}

/// Parse RFC 3339 / ISO 8601 text; text without an offset is UTC.
pub(crate) fn parse_iso(s: &str) -> Option<Micros> {
    let s = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(s) {
        return Some(dt.timestamp_micros());
    }
    for fmt in [
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%z",
    ] {
        if let Ok(dt) = DateTime::parse_from_str(s, fmt) {
            return Some(dt.timestamp_micros());
        }
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(dt.and_utc().timestamp_micros());
        }
    }
    None
}

/// The system's wall-clock time.
pub(crate) fn now_utc() -> Micros {
    Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_text_matches_python_isoformat() {
        assert_eq!(iso(1_704_067_210_000_000), "2024-01-01T00:00:10+00:00");
        assert_eq!(iso(1_704_067_210_250_000), "2024-01-01T00:00:10.250000+00:00");
        assert_eq!(iso(-1), "1969-12-31T23:59:59.999999+00:00");
    }

    #[test]
    fn iso_parsing_accepts_offsets_z_and_naive_utc() {
        let t = 1_704_067_200_000_000;
        assert_eq!(parse_iso("2024-01-01T00:00:00Z"), Some(t));
        assert_eq!(parse_iso("2024-01-01T02:00:00+02:00"), Some(t));
        assert_eq!(parse_iso("2024-01-01T00:00:00"), Some(t));
        assert_eq!(parse_iso("2024-01-01 00:00:00.5"), Some(t + 500_000));
        assert_eq!(parse_iso("yesterday"), None);
    }
}
