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
    if let Some(us) = parse_iso_common(s.as_bytes()) {
        return Some(us);
    }
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

/// The form sensors send, `2024-01-01T02:00:00.051+02:00` (or `Z`, any
/// number of fraction digits, years 1970 to 9999), read without chrono: a
/// reading's clock parses one per item. Anything else, or anything out of
/// range, is left to chrono (`None`), so both give the same answers.
fn parse_iso_common(b: &[u8]) -> Option<Micros> {
    fn num(b: &[u8], at: usize, len: usize) -> Option<i64> {
        let digits = b.get(at..at + len)?;
        digits
            .iter()
            .try_fold(0i64, |n, &c| c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0')))
    }
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (num(b, 0, 4)?, num(b, 5, 2)?, num(b, 8, 2)?);
    let (hour, minute, second) = (num(b, 11, 2)?, num(b, 14, 2)?, num(b, 17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if year < 1970 || !(1..=12).contains(&month) || day < 1 || day > month_days[month as usize - 1] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 6 {
                micros = micros * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        let n = i - start;
        if n == 0 {
            return None;
        }
        for _ in n..6 {
            micros *= 10;
        }
    }
    let offset_s = match b.get(i..)? {
        [b'Z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(b, i + 1, 2)?, num(b, i + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3600 + m * 60;
            if *sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Some(secs * 1_000_000 + micros)
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

    #[test]
    fn the_common_form_reads_as_chrono_reads_it() {
        let chrono_us = |s: &str| DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_micros());
        let mut cases = vec![
            "2024-01-01T02:00:00.051+02:00".to_string(),
            "2024-02-29T23:59:59.999999999Z".into(),
            "1970-01-01T00:00:00Z".into(),
            "1970-01-01T00:30:00+01:00".into(),
            "2023-12-31T19:00:00.5-05:00".into(),
            "9999-12-31T23:59:59.123456+14:00".into(),
            "2100-03-01T00:00:00.0000001-00:30".into(),
        ];
        // Every day of four years (a leap year and a century among them), at odd times and offsets.
        for (n, year) in [1999, 2000, 2024, 2100].into_iter().enumerate() {
            for month in 1..=12 {
                for day in 1..=31 {
                    let off = [("+", 0, 0), ("-", 5, 0), ("+", 5, 30), ("-", 9, 45)][(day + n) % 4];
                    cases.push(format!(
                        "{year}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}{}{:02}:{:02}",
                        day % 24,
                        (day * 7) % 60,
                        (day * 13) % 60,
                        day * 31,
                        off.0,
                        off.1,
                        off.2
                    ));
                }
            }
        }
        for s in &cases {
            assert_eq!(parse_iso_common(s.as_bytes()), chrono_us(s), "{s}");
        }
        // Out of its range or form: chrono decides (and rejects what it can't read).
        for s in [
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T23:59:60Z",
            "2024-01-01 00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2024-01-01T00:00:00+24:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0100",
        ] {
            assert_eq!(parse_iso_common(s.as_bytes()), None, "{s}");
        }
        assert_eq!(parse_iso("2024-01-01T23:59:60Z"), chrono_us("2024-01-01T23:59:60Z"));
    }
}
