//! Payload decoders: the one place where bytes from a message or a frame
//! become items. MQTT payloads use it today and serial frames will; the
//! file source shares its CSV cell typing.
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
}

impl Format {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Cbor => "cbor",
            Format::Csv { .. } => "csv",
            Format::Kv => "kv",
            Format::Raw => "raw",
        }
    }
}

/// Decodes payloads of one format, keeping what repeats between them
/// (shared field names) to save allocations.
pub(crate) struct PayloadDecoder {
    format: Format,
    json: json::Decoder,
}

/// Why (part of) a payload was skipped.
pub(crate) type Reason = String;

impl PayloadDecoder {
    pub(crate) fn new(format: Format) -> PayloadDecoder {
        PayloadDecoder {
            format,
            json: json::Decoder::default(),
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
            Format::Kv => {
                let Ok(text) = std::str::from_utf8(payload) else {
                    return skip("not UTF-8".into());
                };
                let mut any = false;
                for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    any = true;
                    match kv_line(line) {
                        Ok(v) => out.push(v),
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
                for line in lines {
                    rows += 1;
                    match csv_cells(line) {
                        Ok(cells) if cells.len() == header.len() => out.push(row(&header, &cells)),
                        Ok(cells) => skip(format!("{} cells, but the header has {}", cells.len(), header.len())),
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
pub(crate) fn row<C: AsRef<str>>(names: &[Arc<str>], cells: &[C]) -> Value {
    let mut fields: Vec<(Arc<str>, Value)> = Vec::with_capacity(names.len());
    for (name, c) in names.iter().zip(cells) {
        set_field(&mut fields, name.clone(), cell(c.as_ref()));
    }
    Value::Map(fields)
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
