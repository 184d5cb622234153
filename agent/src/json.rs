//! JSON in and out: decoding source records straight into `Value` (no
//! intermediate tree) and writing items the way `runnel replay` promises:
//! tuples as arrays, datetimes as RFC 3339 text, window metadata as objects.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::time;
use crate::value::Value;

/// Decodes JSON text into a `Value`, sharing the `Arc<str>` of field names
/// that repeat from record to record (sensor payloads all look alike).
#[derive(Default)]
pub(crate) struct Decoder {
    names: Names,
}

/// Field names and short text values seen before, shared instead of
/// allocated again: sensor ids and field names repeat on every line, and a
/// shared `Arc<str>` also lets the Python thread reuse one Python string.
#[derive(Default)]
struct Names {
    known: rustc_hash::FxHashMap<Box<str>, Arc<str>>,
    /// The field names of the previous object, by position: JSON lines
    /// usually repeat them in the same order, so one compare finds them.
    previous_keys: Vec<Arc<str>>,
}

/// Texts longer than this are not shared (they rarely repeat).
const SHARE_UP_TO: usize = 32;
/// Forget everything past this many distinct texts (bounded memory).
const SHARE_MAX: usize = 4096;

impl Names {
    fn key(&mut self, position: usize, s: &str) -> Arc<str> {
        if let Some(k) = self.previous_keys.get(position) {
            if &**k == s {
                return k.clone();
            }
        }
        let k = self.get(s);
        if position < self.previous_keys.len() {
            self.previous_keys[position] = k.clone();
        } else if position == self.previous_keys.len() && position < 64 {
            self.previous_keys.push(k.clone());
        }
        k
    }

    fn get(&mut self, s: &str) -> Arc<str> {
        if s.len() > SHARE_UP_TO {
            return Arc::from(s);
        }
        if let Some(a) = self.known.get(s) {
            return a.clone();
        }
        if self.known.len() >= SHARE_MAX {
            self.known.clear();
        }
        let a: Arc<str> = Arc::from(s);
        self.known.insert(Box::from(s), a.clone());
        a
    }
}

impl Decoder {
    pub(crate) fn decode(&mut self, text: &[u8]) -> Result<Value, serde_json::Error> {
        // Validating the whole line at once is cheaper than string by string.
        match std::str::from_utf8(text) {
            Ok(text) => self.finish(serde_json::Deserializer::from_str(text)),
            Err(_) => self.finish(serde_json::Deserializer::from_slice(text)),
        }
    }

    fn finish<'de, R: serde_json::de::Read<'de>>(
        &mut self,
        mut de: serde_json::Deserializer<R>,
    ) -> Result<Value, serde_json::Error> {
        let v = ValueSeed { names: &mut self.names }.deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    }
}

struct ValueSeed<'a> {
    names: &'a mut Names,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Value, E> {
        Ok(Value::Int(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Value, E> {
        Ok(i64::try_from(n).map(Value::Int).unwrap_or(Value::Float(n as f64)))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Value, E> {
        Ok(Value::Float(n))
    }
    fn visit_str<E>(self, s: &str) -> Result<Value, E> {
        Ok(Value::Str(self.names.get(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(v) = seq.next_element_seed(ValueSeed { names: self.names })? {
            out.push(v);
        }
        Ok(Value::List(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out: Vec<(Arc<str>, Value)> = Vec::with_capacity(map.size_hint().unwrap_or(4));
        while let Some(name) = map.next_key_seed(KeySeed {
            names: self.names,
            position: out.len(),
        })? {
            let v = map.next_value_seed(ValueSeed { names: self.names })?;
            // Like Python's json.loads, a repeated name keeps the last value.
            if let Some(slot) = out.iter_mut().find(|(n, _)| *n == name) {
                slot.1 = v;
            } else {
                out.push((name, v));
            }
        }
        Ok(Value::Map(out))
    }
}

/// A field name, shared through `Names` without an intermediate `String`.
struct KeySeed<'a> {
    names: &'a mut Names,
    position: usize,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Arc<str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Arc<str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Arc<str>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E>(self, s: &str) -> Result<Arc<str>, E> {
        Ok(self.names.key(self.position, s))
    }
}

/// Append `v` as JSON. `Value::Py` must have been resolved on the Python
/// thread first (`python::convert::resolve_for_json`); if one slips
/// through it is written as a placeholder string rather than panicking.
pub(crate) fn write(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(x) => write_float(*x, out),
        Value::Str(s) => write_str(s, out),
        Value::List(xs) | Value::Tuple(xs) => {
            out.push('[');
            for (i, x) in xs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write(x, out);
            }
            out.push(']');
        }
        Value::Map(fs) => {
            out.push('{');
            for (i, (k, x)) in fs.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(k, out);
                out.push_str(": ");
                write(x, out);
            }
            out.push('}');
        }
        Value::DateTime(us) => write_str(&time::iso(*us), out),
        Value::Meta(m) => {
            out.push_str("{\"open_time\": ");
            write_str(&time::iso(m.open), out);
            out.push_str(", \"close_time\": ");
            write_str(&time::iso(m.close), out);
            out.push_str(", \"merged_ids\": [");
            let mut ids = m.merged_ids.clone();
            ids.sort_unstable();
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let _ = write!(out, "{id}");
            }
            out.push_str("]}");
        }
        Value::Py(_) => out.push_str("\"<python object>\""),
    }
}

fn write_float(x: f64, out: &mut String) {
    if x.is_finite() {
        // ryu via serde_json: shortest text that round-trips, `1.0` keeps its point.
        out.push_str(&serde_json::to_string(&x).unwrap_or_else(|_| "null".into()));
    } else {
        out.push_str("null");
    }
}

fn write_str(s: &str, out: &mut String) {
    // serde_json's escaping is correct and fast; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
}

/// One line of `runnel replay` output: `{"step": ..., "item": ...}`.
pub(crate) fn replay_line(step_id: &str, item: &Value, out: &mut String) {
    out.push_str("{\"step\": ");
    write_str(step_id, out);
    out.push_str(", \"item\": ");
    write(item, out);
    out.push_str("}\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(text: &str) -> String {
        let v = Decoder::default().decode(text.as_bytes()).unwrap();
        let mut s = String::new();
        write(&v, &mut s);
        s
    }

    #[test]
    fn decoding_keeps_field_order_types_and_the_last_of_repeated_names() {
        assert_eq!(
            roundtrip(r#"{"b": 1, "a": [true, null, 2.5, "x"], "b": 3}"#),
            r#"{"b": 3, "a": [true, null, 2.5, "x"]}"#
        );
    }

    #[test]
    fn whole_floats_keep_a_decimal_point_like_python() {
        assert_eq!(roundtrip("[1.0, 1e20, -0.5, 7]"), "[1.0, 1e+20, -0.5, 7]");
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        assert!(d.decode(b"{\"a\": ").is_err());
        assert!(d.decode(b"{} trailing").is_err());
        assert!(d.decode(&[0xff, 0xfe]).is_err());
    }
}
