//! Payload decoders: the one place where bytes from a message or a frame
//! become items. MQTT payloads and serial frames use it; the file source
//! shares its CSV cell typing. The serial source's framing (lines, COBS) is
//! here too: a byte stream cut into frames, each then decoded as a payload.
//!
//! A decoder never panics on input: whatever the bytes, it returns values
//! or a short reason the payload (or one of its lines) was skipped, which
//! the source counts and logs.

use std::sync::Arc;

use crate::json;
use crate::value::{set_field, Value};

/// How a payload is turned into items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// The whole payload is one JSON value.
    Json,
    /// The whole payload is one CBOR data item.
    Cbor,
    /// Each non-empty line is a row; without `columns` the first line of a
    /// payload is its header.
    Csv { columns: Option<Vec<Arc<str>>> },
    /// Each non-empty line is `k=v` tokens (whitespace or commas between).
    Kv,
    /// The payload as text.
    Raw,
    /// NMEA 0183: each line a sentence; GGA and RMC (any talker) become
    /// items, checksums verified; other sentences are passed over.
    Nmea,
}

impl Format {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::Csv { .. } => "csv",
            Format::Kv => "kv",
            Format::Raw => "raw",
            Format::Nmea => "nmea",
        }
    }
}

/// Decodes payloads of one format, keeping what repeats between them
/// (shared field names) to save allocations.
pub(crate) struct PayloadDecoder {
    format: Format,
    json: json::Decoder,
    /// Only these fields of each item, when the flow reads only them.
    fields: Option<Arc<[Arc<str>]>>,
}

/// Why (part of) a payload was skipped.
pub(crate) type Reason = String;

impl PayloadDecoder {
    pub(crate) fn new(format: Format) -> PayloadDecoder {
        PayloadDecoder::reading(format, None)
    }

    /// A decoder whose items keep only `fields` (`None`: all), see
    /// `engine::read_fields`.
    pub(crate) fn reading(format: Format, fields: Option<Arc<[Arc<str>]>>) -> PayloadDecoder {
        PayloadDecoder {
            format,
            json: json::Decoder::reading(fields.clone()),
            fields,
        }
    }

    /// Decode `payload`, pushing its items onto `out`. A payload can hold
    /// several items (CSV and kv lines); each line that does not decode is
    /// reported to `skip` and the rest still decode.
    pub(crate) fn decode(&mut self, payload: &[u8], out: &mut Vec<Value>, skip: &mut dyn FnMut(Reason)) {
        match &self.format {
            Format::Json => match self.json.decode(payload.trim_ascii()) {
                Ok(v) => out.push(v),
                Err(e) => skip(match std::str::from_utf8(payload) {
                    Err(u) => format!("not UTF-8 ({u})"),
                    Ok(t) if t.trim().is_empty() => "empty payload".into(),
                    Ok(_) => format!("not JSON ({e})"),
                }),
            },
            Format::Cbor if payload.is_empty() => skip("empty payload".into()),
            Format::Cbor => match self.json.decode_cbor(payload) {
                Ok(v) => out.push(v),
                Err(e) => skip(format!("not CBOR ({e})")),
            },
            Format::Raw => match std::str::from_utf8(payload) {
                Ok(t) => out.push(Value::str(t)),
                Err(u) => skip(format!("not UTF-8 ({u})")),
            },
            Format::Nmea => {
                let Ok(text) = std::str::from_utf8(payload) else {
                    return skip("not UTF-8".into());
                };
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    match nmea_sentence(line) {
                        Ok(Some(v)) => out.push(keep(v, self.fields.as_deref())),
                        Ok(None) => {}
                        Err(e) => skip(e),
                    }
                }
            }
            Format::Kv => {
                let Ok(text) = std::str::from_utf8(payload) else {
                    return skip("not UTF-8".into());
                };
                let mut any = false;
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    any = true;
                    match kv_line(line) {
                        Ok(v) => out.push(keep(v, self.fields.as_deref())),
                        Err(e) => skip(e),
                    }
                }
                if !any {
                    skip("empty payload".into());
                }
            }
            Format::Csv { columns } => {
                let Ok(text) = std::str::from_utf8(payload) else {
                    return skip("not UTF-8".into());
                };
                let mut lines = text.lines().filter(|l| !l.trim().is_empty());
                let header: Vec<Arc<str>> = match columns {
                    Some(c) => c.clone(),
                    None => match lines.next() {
                        Some(h) => match csv_cells(h) {
                            Ok(cells) => cells.iter().map(|c| Arc::from(c.trim())).collect(),
                            Err(e) => return skip(format!("header: {e}")),
                        },
                        None => return skip("empty payload".into()),
                    },
                };
                let mut rows = 0;
                let mut plain: Vec<&str> = Vec::with_capacity(header.len());
                for line in lines {
                    rows += 1;
                    let wrong = |n: usize| format!("{n} cells, but the header has {}", header.len());
                    // Without quotes (or a carriage return, which ends a
                    // record for the csv reader) a row is its commas' cells,
                    // as the csv reader would split it, without its
                    // allocations; it also drops a byte order mark.
                    let line = line.strip_prefix('\u{feff}').unwrap_or(line);
                    if !line.contains(['"', '\r']) {
                        plain.clear();
                        plain.extend(line.split(','));
                        match plain.len() == header.len() {
                            true => out.push(row(&header, &plain, self.fields.as_deref())),
                            false => skip(wrong(plain.len())),
                        }
                        continue;
                    }
                    match csv_cells(line) {
                        Ok(cells) if cells.len() == header.len() => {
                            out.push(row(&header, &cells, self.fields.as_deref()))
                        }
                        Ok(cells) => skip(wrong(cells.len())),
                        Err(e) => skip(e),
                    }
                }
                if rows == 0 {
                    skip("no rows".into());
                }
            }
        }
    }
}

/// How a byte stream (a serial port) is cut into frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Lines ending in `\n`, `\r\n` or `\r`; empty lines are passed over.
    Lines,
    /// COBS-encoded frames, each ended by a zero byte.
    Cobs,
}

impl Framing {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Framing::Lines => "lines",
            Framing::Cobs => "cobs",
        }
    }
}

/// A frame's bytes, or why it was dropped.
pub(crate) type Frame<'a> = Result<&'a [u8], Reason>;

/// Cuts a byte stream into frames of at most `max` bytes (as they arrive:
/// a line without its ending; a COBS frame encoded, one byte more per 254
/// than its payload). Keeps the partial frame between reads.
pub(crate) struct Framer {
    framing: Framing,
    max: usize,
    buf: Vec<u8>,
    /// The frame being read is over `max`: its bytes are dropped up to its end.
    overlong: bool,
    decoded: Vec<u8>,
}

impl Framer {
    pub(crate) fn new(framing: Framing, max: usize) -> Framer {
        Framer {
            framing,
            max,
            buf: Vec::new(),
            overlong: false,
            decoded: Vec::new(),
        }
    }

    /// Feed bytes; every frame they complete goes to `frame`, or the reason
    /// it was dropped (over `max`, a broken COBS encoding). A frame over
    /// `max` is reported as soon as it is (a device that never ends its
    /// frames, wrong `framing`, shows at once), and its bytes are dropped up
    /// to its end.
    pub(crate) fn push(&mut self, mut bytes: &[u8], frame: &mut dyn FnMut(Frame<'_>)) {
        while !bytes.is_empty() {
            let end = match self.framing {
                // `\n`, `\r\n`, or a lone `\r` (some devices end lines so);
                // the empty frame between `\r` and `\n` is passed over.
                Framing::Lines => memchr::memchr2(b'\n', b'\r', bytes),
                Framing::Cobs => memchr::memchr(0, bytes),
            };
            let (chunk, done) = match end {
                Some(i) => (&bytes[..i], true),
                None => (bytes, false),
            };
            bytes = &bytes[chunk.len() + done as usize..];
            if !self.overlong {
                if self.buf.len() + chunk.len() > self.max {
                    self.overlong = true;
                    self.buf.clear();
                    frame(Err(format!(
                        "frame longer than max_frame ({} bytes); if every frame is, check `framing` and the device's line endings",
                        self.max
                    )));
                } else {
                    self.buf.extend_from_slice(chunk);
                }
            }
            if !done {
                return;
            }
            if self.overlong {
                self.overlong = false;
                continue;
            }
            match self.framing {
                Framing::Lines if self.buf.trim_ascii().is_empty() => {}
                Framing::Lines => frame(Ok(&self.buf)),
                Framing::Cobs if self.buf.is_empty() => {}
                Framing::Cobs => match cobs_decode(&self.buf, &mut self.decoded) {
                    Ok(()) => frame(Ok(&self.decoded)),
                    Err(e) => frame(Err(e)),
                },
            }
            self.buf.clear();
        }
    }

    /// The stream was cut (the device went away): drop the partial frame,
    /// returning its length (0 if there was none, or it was reported as
    /// over `max` already).
    pub(crate) fn cut(&mut self) -> usize {
        let n = if self.overlong { 0 } else { self.buf.len() };
        self.buf.clear();
        self.overlong = false;
        n
    }
}

/// Decode one COBS frame (its zero delimiter already removed) into `out`.
fn cobs_decode(frame: &[u8], out: &mut Vec<u8>) -> Result<(), Reason> {
    out.clear();
    let mut i = 0;
    while i < frame.len() {
        let code = frame[i] as usize;
        if code == 0 {
            return Err("COBS frame has a zero byte inside".into());
        }
        let block = frame.get(i + 1..i + code).ok_or_else(|| {
            format!(
                "COBS frame is cut short (a block of {} bytes, {} left)",
                code - 1,
                frame.len() - i - 1
            )
        })?;
        out.extend_from_slice(block);
        i += code;
        if code < 0xFF && i < frame.len() {
            out.push(0);
        }
    }
    Ok(())
}

/// The column names of a CSV header line.
pub(crate) fn csv_header(line: &[u8]) -> Result<Vec<Arc<str>>, Reason> {
    let text = std::str::from_utf8(line).map_err(|u| format!("header: not UTF-8 ({u})"))?;
    let cells = csv_cells(text).map_err(|e| format!("header: {e}"))?;
    Ok(cells.iter().map(|c| Arc::from(c.trim())).collect())
}

/// One NMEA 0183 sentence: GGA and RMC as dicts, `None` for the other
/// kinds, an error for a missing or wrong checksum or a malformed field.
///
/// GGA: `sentence`, `talker`, `utc` (`"hh:mm:ss.ss"` text: GGA has no
/// date), `lat`, `lon` (decimal degrees, south and west negative), `fix`
/// (the fix quality, 0 = none), `sats`, `hdop`, `alt` (metres).
/// RMC: `sentence`, `talker`, `utc` (a datetime), `lat`, `lon`, `fix` (1 if
/// the status is A, else 0), `speed_kn`, `course`. Empty fields are `None`.
fn nmea_sentence(line: &str) -> Result<Option<Value>, Reason> {
    let Some(body) = line.strip_prefix('$') else {
        return Err(format!("NMEA sentence does not start with '$': {:?}", short(line)));
    };
    let Some((data, sum)) = body.rsplit_once('*') else {
        return Err(format!("NMEA sentence without a checksum: {:?}", short(line)));
    };
    let want = u8::from_str_radix(sum.trim(), 16).map_err(|_| format!("NMEA checksum {sum:?} is not hex"))?;
    let got = data.bytes().fold(0u8, |a, b| a ^ b);
    if got != want {
        return Err(format!(
            "NMEA checksum mismatch (computed {got:02X}, the sentence says {want:02X})"
        ));
    }
    let f: Vec<&str> = data.split(',').collect();
    let id = f[0];
    if id.len() != 5 || !id.is_ascii() || id.starts_with('P') {
        return Ok(None); // proprietary or unknown: passed over
    }
    let (talker, kind) = id.split_at(2);
    let field = |i: usize| f.get(i).copied().unwrap_or("");
    // Field `i` parsed as `T` and wrapped, `None` if empty.
    fn parsed<T: std::str::FromStr>(t: &str, i: usize, kind: &str, wrap: fn(T) -> Value) -> Result<Value, Reason> {
        match t {
            "" => Ok(Value::Null),
            t => t
                .parse::<T>()
                .map(wrap)
                .map_err(|_| format!("NMEA {kind} field {i} is not a number: {t:?}")),
        }
    }
    let num = |i: usize| parsed::<f64>(field(i), i, kind, Value::Float);
    let int = |i: usize| parsed::<i64>(field(i), i, kind, Value::Int);
    // ddmm.mmmm (lat) or dddmm.mmmm (lon) and a hemisphere.
    let coord = |i: usize, neg: char| -> Result<Value, Reason> {
        let (t, h) = (field(i), field(i + 1));
        if t.is_empty() {
            return Ok(Value::Null);
        }
        let v: f64 = t
            .parse()
            .map_err(|_| format!("NMEA {kind} coordinate {t:?} is not a number"))?;
        let deg = (v / 100.0).trunc();
        let d = deg + (v - deg * 100.0) / 60.0;
        Ok(Value::Float(if h.starts_with(neg) { -d } else { d }))
    };
    let time_text = |t: &str| -> Result<Value, Reason> {
        if t.is_empty() {
            return Ok(Value::Null);
        }
        if t.len() < 6 || !t.as_bytes()[..6].iter().all(u8::is_ascii_digit) {
            return Err(format!("NMEA time {t:?} is not hhmmss"));
        }
        Ok(Value::str(&format!("{}:{}:{}", &t[0..2], &t[2..4], &t[4..])))
    };
    let base = |fields: &mut Vec<(Arc<str>, Value)>| {
        set_field(fields, "sentence", Value::str(kind));
        set_field(fields, "talker", Value::str(talker));
    };
    let mut fields = Vec::with_capacity(10);
    match kind {
        "GGA" => {
            base(&mut fields);
            set_field(&mut fields, "utc", time_text(field(1))?);
            set_field(&mut fields, "lat", coord(2, 'S')?);
            set_field(&mut fields, "lon", coord(4, 'W')?);
            set_field(&mut fields, "fix", int(6)?);
            set_field(&mut fields, "sats", int(7)?);
            set_field(&mut fields, "hdop", num(8)?);
            set_field(&mut fields, "alt", num(9)?);
        }
        "RMC" => {
            base(&mut fields);
            set_field(&mut fields, "utc", rmc_utc(field(1), field(9))?);
            set_field(&mut fields, "lat", coord(3, 'S')?);
            set_field(&mut fields, "lon", coord(5, 'W')?);
            set_field(&mut fields, "fix", Value::Int((field(2) == "A") as i64));
            set_field(&mut fields, "speed_kn", num(7)?);
            set_field(&mut fields, "course", num(8)?);
        }
        _ => return Ok(None),
    }
    Ok(Some(Value::Map(fields)))
}

/// RMC's time (hhmmss.ss) and date (ddmmyy) as a UTC datetime (years 80-99
/// are the 1900s, as NMEA receivers count them).
fn rmc_utc(time: &str, date: &str) -> Result<Value, Reason> {
    if time.is_empty() || date.is_empty() {
        return Ok(Value::Null);
    }
    let bad = || format!("NMEA RMC time {time:?} and date {date:?} are not hhmmss and ddmmyy");
    let digits = |s: &str, n: usize| s.len() >= n && s.as_bytes()[..n].iter().all(u8::is_ascii_digit);
    if !digits(time, 6) || date.len() != 6 || !digits(date, 6) {
        return Err(bad());
    }
    let p = |s: &str, a: usize| s[a..a + 2].parse::<u32>().unwrap_or(99);
    let yy = p(date, 4) as i32;
    let year = if yy >= 80 { 1900 + yy } else { 2000 + yy };
    let secs: f64 = time[4..].parse().map_err(|_| bad())?;
    let day = chrono::NaiveDate::from_ymd_opt(year, p(date, 2), p(date, 0)).ok_or_else(bad)?;
    let at = day.and_hms_opt(p(time, 0), p(time, 2), 0).ok_or_else(bad)?;
    let us = at.and_utc().timestamp_micros() + (secs * 1e6).round() as i64;
    Ok(Value::DateTime(us))
}

fn short(s: &str) -> String {
    s.chars().take(40).collect()
}

/// A CSV cell as a flow sees it: `int`, `float`, `None` for empty, else `str`.
pub(crate) fn cell(s: &str) -> Value {
    if s.is_empty() {
        return Value::Null;
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = s.parse::<i64>() {
            return Value::Int(n);
        }
    }
    if s.bytes().any(|b| b.is_ascii_digit()) {
        if let Ok(x) = s.parse::<f64>() {
            return Value::Float(x);
        }
    }
    Value::str(s)
}

/// One dict from header names and cells; a repeated name keeps its last
/// cell, as Python's `csv.DictReader` does.
pub(crate) fn row<C: AsRef<str>>(names: &[Arc<str>], cells: &[C], only: Option<&[Arc<str>]>) -> Value {
    let mut fields: Vec<(Arc<str>, Value)> = Vec::with_capacity(only.map_or(names.len(), <[_]>::len));
    for (name, c) in names.iter().zip(cells) {
        if only.is_none_or(|only| only.contains(name)) {
            set_field(&mut fields, name.clone(), cell(c.as_ref()));
        }
    }
    Value::Map(fields)
}

/// `v` with only the fields `only` names, if it is a dict (`None`: all).
pub(crate) fn keep(v: Value, only: Option<&[Arc<str>]>) -> Value {
    match (v, only) {
        (Value::Map(mut fields), Some(only)) => {
            fields.retain(|(name, _)| only.contains(name));
            Value::Map(fields)
        }
        (v, _) => v,
    }
}

fn csv_cells(line: &str) -> Result<Vec<String>, Reason> {
    // A reader per line (its default 8 KiB buffer would be allocated per
    // message): a buffer the size of the line is enough.
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(line.len() + 1)
        .from_reader(line.as_bytes());
    let mut rec = csv::StringRecord::new();
    match rdr.read_record(&mut rec) {
        Ok(true) => Ok(rec.iter().map(str::to_string).collect()),
        Ok(false) => Err("empty line".into()),
        Err(e) => Err(format!("not CSV ({e})")),
    }
}

fn kv_line(line: &str) -> Result<Value, Reason> {
    let mut fields: Vec<(Arc<str>, Value)> = Vec::new();
    for token in line
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        let Some((k, v)) = token.split_once('=') else {
            return Err(format!("{token:?} is not key=value"));
        };
        if k.is_empty() {
            return Err(format!("{token:?} has no key"));
        }
        set_field(&mut fields, k, cell(v));
    }
    Ok(Value::Map(fields))
}

/// CBOR for an output value, shaped as its JSON is (maps in order,
/// tuples as arrays, datetimes as RFC 3339 text, window metadata as a map).
pub(crate) fn to_cbor(v: &Value) -> Vec<u8> {
    serde_cbor::to_vec(&Cbor(v)).unwrap_or_default()
}

struct Cbor<'a>(&'a Value);

impl serde::Serialize for Cbor<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match self.0 {
            Value::Null | Value::Py(_) => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(n) => s.serialize_i64(*n),
            Value::Float(x) => s.serialize_f64(*x),
            Value::Str(t) => s.serialize_str(t),
            Value::List(xs) | Value::Tuple(xs) => {
                let mut seq = s.serialize_seq(Some(xs.len()))?;
                for x in xs {
                    seq.serialize_element(&Cbor(x))?;
                }
                seq.end()
            }
            Value::Map(fs) => {
                let mut m = s.serialize_map(Some(fs.len()))?;
                for (k, x) in fs {
                    m.serialize_entry(&**k, &Cbor(x))?;
                }
                m.end()
            }
            Value::DateTime(us) => s.serialize_str(&crate::time::iso(*us)),
            Value::Meta(meta) => {
                let mut ids = meta.merged_ids.clone();
                ids.sort_unstable();
                let mut m = s.serialize_map(Some(3))?;
                m.serialize_entry("open_time", &crate::time::iso(meta.open))?;
                m.serialize_entry("close_time", &crate::time::iso(meta.close))?;
                m.serialize_entry("merged_ids", &ids)?;
                m.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: Format, payload: &[u8]) -> (Vec<Value>, Vec<String>) {
        let mut d = PayloadDecoder::new(format);
        let mut out = Vec::new();
        let mut bad = Vec::new();
        d.decode(payload, &mut out, &mut |r| bad.push(r));
        (out, bad)
    }

    fn show(vs: &[Value]) -> String {
        vs.iter()
            .map(|v| {
                let mut s = String::new();
                json::write(v, &mut s);
                s
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    #[test]
    fn csv_cells_become_numbers_none_or_text() {
        assert!(matches!(cell("42"), Value::Int(42)));
        assert!(matches!(cell("-7"), Value::Int(-7)));
        assert!(matches!(cell("1.5"), Value::Float(x) if x == 1.5));
        assert!(matches!(cell("1e3"), Value::Float(x) if x == 1000.0));
        assert!(matches!(cell(""), Value::Null));
        assert!(matches!(cell("inf"), Value::Str(_)));
        assert!(matches!(cell("s1"), Value::Str(_)));
    }

    #[test]
    fn kv_lines_are_typed_like_csv_cells() {
        let (out, bad) = run(Format::Kv, b"id=a1 t=21.5 h=40\n\nid=b2,t=-3\nnonsense here\n");
        assert_eq!(
            show(&out),
            r#"{"id": "a1", "t": 21.5, "h": 40} | {"id": "b2", "t": -3}"#
        );
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(bad[0].contains("nonsense"), "{bad:?}");
    }

    #[test]
    fn csv_payloads_use_their_header_or_the_given_columns() {
        let (out, bad) = run(Format::Csv { columns: None }, b"ts,temp\n1,20.5\n2,x,9\n3,\n");
        assert_eq!(show(&out), r#"{"ts": 1, "temp": 20.5} | {"ts": 3, "temp": null}"#);
        assert_eq!(bad, vec!["3 cells, but the header has 2".to_string()]);
        let cols = Some(vec![Arc::from("a"), Arc::from("b")]);
        let (out, bad) = run(Format::Csv { columns: cols }, b"1,\"two, quoted\"\r\n");
        assert_eq!(show(&out), r#"{"a": 1, "b": "two, quoted"}"#);
        assert!(bad.is_empty());
        // Rows with and without quotes give the same cells as the csv reader.
        for line in [
            "x,,-3, y ,2.50",
            "\"x\",,-3,\" y \",2.50",
            ",,,,",
            "a,b c,d;e,f\t,g",
            "\u{feff}1,2,3,4,5",
        ] {
            let cols: Vec<Arc<str>> = (0..5).map(|i| Arc::from(format!("c{i}").as_str())).collect();
            let (fast, bad) = run(
                Format::Csv {
                    columns: Some(cols.clone()),
                },
                line.as_bytes(),
            );
            assert!(bad.is_empty(), "{line}: {bad:?}");
            let cells = csv_cells(line).unwrap();
            assert_eq!(show(&fast), show(&[row(&cols, &cells, None)]), "{line}");
        }
    }

    #[test]
    fn json_raw_and_cbor_payloads() {
        let (out, _) = run(Format::Json, b" {\"a\": [1, 2.5, null]} ");
        assert_eq!(show(&out), r#"{"a": [1, 2.5, null]}"#);
        let (out, _) = run(Format::Raw, "héllo".as_bytes());
        assert_eq!(show(&out), r#""héllo""#);
        // {"t": 21.5, "id": "a", "n": [1, -2]} written by hand in CBOR.
        let bytes = [
            0xa3, 0x61, b't', 0xfb, 0x40, 0x35, 0x80, 0, 0, 0, 0, 0, 0x62, b'i', b'd', 0x61, b'a', 0x61, b'n', 0x82,
            0x01, 0x21,
        ];
        let (out, bad) = run(Format::Cbor, &bytes);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(show(&out), r#"{"t": 21.5, "id": "a", "n": [1, -2]}"#);
        let round = to_cbor(&out[0]);
        assert_eq!(show(&run(Format::Cbor, &round).0), show(&out));
    }

    #[test]
    fn nmea_gga_and_rmc_become_fields_and_checksums_are_verified() {
        let text = b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47\r\n\
$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\r\n\
$GPGSV,2,1,08,01,40,083,46,02,17,308,41,12,07,344,39,14,22,228,45*75\r\n\
$GNRMC,000000,V,,,,,,,010100,,*2F\r\n";
        let (out, bad) = run(Format::Nmea, text);
        assert_eq!(bad, Vec::<String>::new());
        assert_eq!(out.len(), 3, "GSV is passed over: {}", show(&out));
        let gga = &out[0];
        assert_eq!(gga.field("sentence").map(|v| v.type_name()), Some("str"));
        let f = |v: &Value, k: &str| match v.field(k) {
            Some(Value::Float(x)) => *x,
            other => panic!("{k}: {other:?}"),
        };
        assert!((f(gga, "lat") - (48.0 + 7.038 / 60.0)).abs() < 1e-9);
        assert!((f(gga, "lon") - (11.0 + 31.0 / 60.0)).abs() < 1e-9);
        assert_eq!(f(gga, "alt"), 545.4);
        assert!(matches!(gga.field("fix"), Some(Value::Int(1))));
        assert!(matches!(gga.field("utc"), Some(Value::Str(s)) if &**s == "12:35:19"));
        let rmc = &out[1];
        assert_eq!(f(rmc, "speed_kn"), 22.4);
        // 1994-03-23T12:35:19Z
        assert!(matches!(rmc.field("utc"), Some(Value::DateTime(764_426_119_000_000))));
        let void = &out[2];
        assert!(matches!(void.field("fix"), Some(Value::Int(0))));
        assert!(matches!(void.field("lat"), Some(Value::Null)));
        // South and west are negative.
        let (out, _) = run(
            Format::Nmea,
            &with_checksum("GPGGA,000001,3351.000,S,15112.000,W,1,05,1.0,10.0,M,,M,,"),
        );
        assert!(f(&out[0], "lat") < 0.0 && f(&out[0], "lon") < 0.0);
        // A wrong checksum, no checksum, garbage: reasons, and the next line still decodes.
        let (out, bad) = run(
            Format::Nmea,
            b"$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*48\n$GPGGA,1\nnoise\x01\n$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A\n",
        );
        assert_eq!(out.len(), 1);
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(bad[0].contains("checksum mismatch"), "{bad:?}");
        for junk in [
            &b"$*00"[..],
            b"$GPRMC,99,A,,,,,,,99,,*",
            b"$GPRMC,1,A,,,,,,,xx,,*00",
            b"\xff$",
            b"$GPGGA,12,x,N,,,,,,,,,,,,",
        ] {
            let _ = run(Format::Nmea, junk);
        }
    }

    fn with_checksum(body: &str) -> Vec<u8> {
        let sum = body.bytes().fold(0u8, |a, b| a ^ b);
        format!("${body}*{sum:02X}\n").into_bytes()
    }

    /// COBS encoding, written from the specification (for the tests).
    fn cobs_encode(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8];
        let mut code_at = 0;
        let mut code = 1u8;
        for &b in data {
            if b == 0 {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            } else {
                out.push(b);
                code += 1;
                if code == 0xFF {
                    out[code_at] = code;
                    code_at = out.len();
                    out.push(0);
                    code = 1;
                }
            }
        }
        out[code_at] = code;
        out
    }

    fn frames(framing: Framing, max: usize, chunks: &[&[u8]]) -> Vec<Result<Vec<u8>, String>> {
        let mut f = Framer::new(framing, max);
        let mut got = Vec::new();
        for c in chunks {
            f.push(c, &mut |r| got.push(r.map(|b| b.to_vec())));
        }
        got
    }

    #[test]
    fn lines_are_framed_across_reads_with_a_bound() {
        let got = frames(
            Framing::Lines,
            8,
            &[b"ab", b"c\r\n\n12345678\r\n1234", b"56789\nxy", b"z\rcr only\r"],
        );
        assert_eq!(
            got,
            vec![
                Ok(b"abc".to_vec()),
                Ok(b"12345678".to_vec()),
                Err("frame longer than max_frame (8 bytes); if every frame is, check `framing` and the device's line endings".into()),
                Ok(b"xyz".to_vec()),
                Ok(b"cr only".to_vec()),
            ]
        );
        // A frame that never ends is reported at once, and once.
        let got = frames(Framing::Lines, 8, &[&[b'x'; 20], &[b'y'; 30], b"\nok\n"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].is_err() && got[1] == Ok(b"ok".to_vec()), "{got:?}");
        // A cut keeps nothing of the partial frame, and says how long it was.
        let mut f = Framer::new(Framing::Lines, 100);
        let mut n = 0;
        f.push(b"ok\npart", &mut |_| n += 1);
        assert_eq!((n, f.cut(), f.cut()), (1, 4, 0));
        f.push(b"next\n", &mut |r| assert_eq!(r.unwrap(), b"next"));
    }

    #[test]
    fn cobs_frames_decode_to_their_bytes_and_broken_ones_are_reasons() {
        let long: Vec<u8> = (0..600u32).map(|i| (i % 7) as u8).collect();
        let payloads: Vec<Vec<u8>> = vec![
            b"hello".to_vec(),
            vec![0, 0, 1, 0],
            vec![0x11; 254],
            vec![0x22; 255],
            long,
            vec![],
        ];
        let mut stream = Vec::new();
        for p in &payloads {
            stream.extend(cobs_encode(p));
            stream.push(0);
        }
        // Fed a byte at a time and all at once: the same frames.
        let one: Vec<&[u8]> = stream.chunks(1).collect();
        for got in [
            frames(Framing::Cobs, 4096, &one),
            frames(Framing::Cobs, 4096, &[&stream]),
        ] {
            let want: Vec<Result<Vec<u8>, String>> = payloads.iter().map(|p| Ok(p.clone())).collect();
            assert_eq!(got, want);
        }
        // A block longer than what is left, an empty frame (two zeros in a row: skipped), over max.
        let got = frames(
            Framing::Cobs,
            8,
            &[&[0x05, 1, 2, 0, 0, 0x02, 9, 0, 0x0a, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]],
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].as_ref().is_err_and(|e| e.contains("cut short")), "{got:?}");
        assert_eq!(got[1], Ok(vec![9]));
        assert!(got[2].as_ref().is_err_and(|e| e.contains("max_frame")), "{got:?}");
        // A CBOR reading inside COBS.
        let v = run(Format::Json, br#"{"id": "m1", "pm25": 7.5}"#).0.remove(0);
        let wire = cobs_encode(&to_cbor(&v));
        let got = frames(Framing::Cobs, 4096, &[&wire, &[0]]);
        assert_eq!(
            show(&run(Format::Cbor, got[0].as_ref().unwrap()).0),
            r#"{"id": "m1", "pm25": 7.5}"#
        );
    }

    #[test]
    fn a_csv_header_line_gives_the_columns() {
        let cols = csv_header(b" ts , temp,\"r h\"").unwrap();
        assert_eq!(cols.iter().map(|c| &**c).collect::<Vec<_>>(), ["ts", "temp", "r h"]);
        assert!(csv_header(b"\xff,a").is_err());
    }

    #[test]
    fn bad_payloads_are_reasons_not_panics() {
        for (format, payload) in [
            (Format::Json, &b"{\"a\": "[..]),
            (Format::Json, &b""[..]),
            (Format::Json, &b"\xff\xfe"[..]),
            (Format::Cbor, &b""[..]),
            (Format::Cbor, &b"\xff\x00\x13"[..]),
            (Format::Cbor, &[0xa1, 0x01, 0x02][..]),
            (Format::Cbor, &[0x42, 0xff, 0xfe][..]),
            // Headers claiming 4 billion elements, with nothing behind them.
            (Format::Cbor, &[0x9a, 0xff, 0xff, 0xff, 0xff][..]),
            (Format::Cbor, &[0xba, 0xff, 0xff, 0xff, 0xff][..]),
            (Format::Raw, &b"\xc3\x28"[..]),
            (Format::Kv, &b"\xff"[..]),
            (Format::Kv, &b"   "[..]),
            (Format::Csv { columns: None }, &b"a,b"[..]),
        ] {
            let (out, bad) = run(format.clone(), payload);
            assert!(
                out.is_empty() && bad.len() == 1,
                "{format:?} {payload:?}: {out:?} {bad:?}"
            );
        }
        // Deep CBOR nesting is refused, not recursed into without bound.
        let mut deep = vec![0x81u8; 10_000];
        deep.push(0x01);
        let (out, bad) = run(Format::Cbor, &deep);
        assert!(out.is_empty() && bad.len() == 1, "{bad:?}");
    }
}
