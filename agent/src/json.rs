//! JSON in and out: decoding source records straight into `Value` (no
//! intermediate tree) and writing items the way `runnel replay` promises:
//! tuples as arrays, datetimes as RFC 3339 text, window metadata as objects.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::time;
use crate::value::{set_field, Value};

/// Decodes JSON text into a `Value`, sharing the `Arc<str>` of field names
/// that repeat from record to record (sensor payloads all look alike).
///
/// With `fields` set (the plan's native steps read only those, see
/// `engine::read_fields`), an object keeps just those fields: the others
/// are checked and skipped without being built. The result is always the
/// full decoding with the other fields left out.
#[derive(Default)]
pub(crate) struct Decoder {
    names: Names,
    fields: Option<Arc<[Arc<str>]>>,
}

#[derive(Default)]
struct Names {
    known: rustc_hash::FxHashMap<Box<str>, Arc<str>>,
    /// The field names of the previous object, by position: JSON lines
    /// usually repeat them in the same order, so one compare finds them.
    previous_keys: Vec<Arc<str>>,
    /// Per top-level position, how many text values in a row were new:
    /// a field whose values never repeat (a timestamp, a message id) is
    /// not shared, so it neither costs a lookup nor pushes the sensor ids
    /// out of `known`. It is tried again after `RETRY_AFTER` values.
    misses: Vec<u16>,
}

/// New values in a row after which a field's texts are not shared.
const MISSES: u16 = 16;
const RETRY_AFTER: u16 = 1024;

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

    /// A text value of the top-level field at `position`.
    fn value_at(&mut self, position: usize, s: &str) -> Arc<str> {
        if position >= self.misses.len() {
            if position >= 64 {
                return self.get(s);
            }
            self.misses.resize(position + 1, 0);
        }
        let misses = self.misses[position];
        if misses >= MISSES {
            self.misses[position] = if misses >= MISSES + RETRY_AFTER { 0 } else { misses + 1 };
            return Arc::from(s);
        }
        let before = self.known.len();
        let a = self.get(s);
        // A new entry (or a cleared table) means it was not known.
        self.misses[position] = if self.known.len() != before { misses + 1 } else { 0 };
        a
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
    /// A decoder that keeps only `fields` of each object (`None`: all).
    pub(crate) fn reading(fields: Option<Arc<[Arc<str>]>>) -> Decoder {
        Decoder {
            names: Names::default(),
            fields,
        }
    }

    pub(crate) fn decode(&mut self, text: &[u8]) -> Result<Value, serde_json::Error> {
        // Validating the whole line at once is cheaper than string by string.
        let full = match std::str::from_utf8(text) {
            Ok(text) => match self.decode_fast(text.as_bytes()) {
                Some(v) => return Ok(v),
                None => self.finish(serde_json::Deserializer::from_str(text)),
            },
            Err(_) => self.finish(serde_json::Deserializer::from_slice(text)),
        }?;
        Ok(self.keep_fields(full))
    }

    /// `v` with only the wanted fields, if it is an object.
    fn keep_fields(&self, v: Value) -> Value {
        crate::decode::keep(v, self.fields.as_deref())
    }

    /// The common case, fast: a JSON value whose strings have no escapes,
    /// nested at most `MAX_DEPTH` deep. Anything else (escapes, deeper
    /// nesting, and every error) returns `None` and goes to serde_json,
    /// which then decides. Numbers are read with Rust's correctly rounded
    /// parser, as Python's json module reads them.
    fn decode_fast(&mut self, b: &[u8]) -> Option<Value> {
        let i = skip_ws(b, 0);
        let (v, next) = if b.get(i) == Some(&b'{') {
            self.object(b, i, 0)?
        } else {
            self.value(b, i, 1)?
        };
        (skip_ws(b, next) == b.len()).then_some(v)
    }

    /// The object at `b[i] == '{'`; `depth` 0 is the top level, whose
    /// field names are looked up by position and which keeps only the
    /// wanted fields.
    fn object(&mut self, b: &[u8], i: usize, depth: usize) -> Option<(Value, usize)> {
        let mut i = skip_ws(b, i + 1);
        let capacity = match (&self.fields, depth) {
            (Some(wanted), 0) => wanted.len().max(1),
            (None, 0) => self.names.previous_keys.len().max(1),
            _ => 4,
        };
        let mut fields: Vec<(Arc<str>, Value)> = Vec::with_capacity(capacity);
        if b.get(i) == Some(&b'}') {
            return Some((Value::Map(fields), i + 1));
        }
        let mut position = 0;
        loop {
            let (key, next) = flat_str(b, i)?;
            i = skip_ws(b, next);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
            let wanted = match (&self.fields, depth) {
                (Some(w), 0) => w.iter().any(|f| **f == *key),
                _ => true,
            };
            if wanted {
                let name = if depth == 0 {
                    self.names.key(position, key)
                } else {
                    self.names.get(key)
                };
                let (value, next) = if depth == 0 && b.get(i) == Some(&b'"') {
                    let (text, next) = flat_str(b, i)?;
                    (Value::Str(self.names.value_at(position, text)), next)
                } else {
                    self.value(b, i, depth + 1)?
                };
                // Like Python's json.loads, a repeated name keeps the last value.
                set_field(&mut fields, name, value);
                i = skip_ws(b, next);
            } else {
                if depth == 0 {
                    self.names.key(position, key);
                }
                i = skip_ws(b, skip_value(b, i, depth + 1)?);
            }
            position += 1;
            match b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b'}' => return Some((Value::Map(fields), i + 1)),
                _ => return None,
            }
        }
    }

    /// The value at `b[i]` (not whitespace).
    fn value(&mut self, b: &[u8], i: usize, depth: usize) -> Option<(Value, usize)> {
        Some(match *b.get(i)? {
            b'"' => {
                let (text, next) = flat_str(b, i)?;
                (Value::Str(self.names.get(text)), next)
            }
            b'{' if depth < MAX_DEPTH => self.object(b, i, depth)?,
            b'[' if depth < MAX_DEPTH => {
                let mut items = Vec::new();
                let mut i = skip_ws(b, i + 1);
                if b.get(i) == Some(&b']') {
                    return Some((Value::List(items), i + 1));
                }
                loop {
                    let (v, next) = self.value(b, i, depth + 1)?;
                    items.push(v);
                    i = skip_ws(b, next);
                    match b.get(i)? {
                        b',' => i = skip_ws(b, i + 1),
                        b']' => return Some((Value::List(items), i + 1)),
                        _ => return None,
                    }
                }
            }
            b't' if b[i..].starts_with(b"true") => (Value::Bool(true), i + 4),
            b'f' if b[i..].starts_with(b"false") => (Value::Bool(false), i + 5),
            b'n' if b[i..].starts_with(b"null") => (Value::Null, i + 4),
            b'-' | b'0'..=b'9' => flat_number(b, i)?,
            _ => return None,
        })
    }

    /// Decode one CBOR data item with the same sharing of names; maps keep
    /// their order, byte strings become text if they are UTF-8, tags are
    /// ignored, and keys that are not text are an error.
    pub(crate) fn decode_cbor(&mut self, bytes: &[u8]) -> Result<Value, serde_cbor::Error> {
        let mut de = serde_cbor::Deserializer::from_slice(bytes);
        let v = ValueSeed { names: &mut self.names }.deserialize(&mut de)?;
        de.end()?;
        Ok(self.keep_fields(v))
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

/// Deeper values go to serde_json (whose own limit is 128).
const MAX_DEPTH: usize = 64;

/// Check the value at `b[i]` the way `Decoder::value` would read it, without
/// building it: the index after it, or `None` for what the fast path leaves
/// to serde_json.
fn skip_value(b: &[u8], i: usize, depth: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => flat_str(b, i).map(|(_, next)| next),
        open @ (b'{' | b'[') if depth < MAX_DEPTH => {
            let close = if open == b'{' { b'}' } else { b']' };
            let mut i = skip_ws(b, i + 1);
            if b.get(i) == Some(&close) {
                return Some(i + 1);
            }
            loop {
                if open == b'{' {
                    i = skip_ws(b, flat_str(b, i)?.1);
                    if b.get(i) != Some(&b':') {
                        return None;
                    }
                    i = skip_ws(b, i + 1);
                }
                i = skip_ws(b, skip_value(b, i, depth + 1)?);
                match *b.get(i)? {
                    b',' => i = skip_ws(b, i + 1),
                    c if c == close => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        b't' if b[i..].starts_with(b"true") => Some(i + 4),
        b'f' if b[i..].starts_with(b"false") => Some(i + 5),
        b'n' if b[i..].starts_with(b"null") => Some(i + 4),
        b'-' | b'0'..=b'9' => skip_number(b, i),
        _ => None,
    }
}

/// A number `flat_number` would take, checked but not converted where its
/// grammar alone tells (no exponent, not too long to be a finite float or
/// an i64).
fn skip_number(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + usize::from(b[i] == b'-');
    let int_start = j;
    while b.get(j).is_some_and(u8::is_ascii_digit) {
        j += 1;
    }
    let int_digits = j - int_start;
    if int_digits == 0 || (int_digits > 1 && b[int_start] == b'0') {
        return None;
    }
    let mut integer = true;
    if b.get(j) == Some(&b'.') {
        integer = false;
        let from = j + 1;
        j = from;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        if j == from {
            return None;
        }
    }
    let plain = !matches!(b.get(j), Some(b'e' | b'E'));
    if plain && ((integer && int_digits <= 18) || (!integer && int_digits <= 300)) {
        return Some(j);
    }
    flat_number(b, i).map(|(_, next)| next)
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// A string starting at `b[i] == '"'` without escapes or control
/// characters: its text and the index after the closing quote.
fn flat_str(b: &[u8], i: usize) -> Option<(&str, usize)> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = b[start..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    let end = start + len;
    if b[end] != b'"' {
        return None;
    }
    // The whole line was checked to be UTF-8 and quotes are ASCII.
    Some((std::str::from_utf8(&b[start..end]).ok()?, end + 1))
}

/// A JSON number starting at `b[i]`, checked against JSON's grammar.
fn flat_number(b: &[u8], i: usize) -> Option<(Value, usize)> {
    let digits = |mut j: usize| {
        let from = j;
        while b.get(j).is_some_and(u8::is_ascii_digit) {
            j += 1;
        }
        (j > from).then_some(j)
    };
    let mut j = i + usize::from(b[i] == b'-');
    if b.get(j) == Some(&b'0') {
        j += 1;
    } else {
        j = digits(j)?;
    }
    let mut integer = true;
    if b.get(j) == Some(&b'.') {
        integer = false;
        j = digits(j + 1)?;
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        integer = false;
        j += 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        j = digits(j)?;
    }
    let text = std::str::from_utf8(&b[i..j]).ok()?;
    let value = if integer {
        match text.parse::<i64>() {
            Ok(n) => Value::Int(n),
            // Same as serde_json: a u64 beyond i64 becomes a float.
            Err(_) => Value::Float(text.parse::<u64>().ok()? as f64),
        }
    } else {
        let x = text.parse::<f64>().ok()?;
        if !x.is_finite() {
            return None;
        }
        Value::Float(x)
    };
    Some((value, j))
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
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    // CBOR byte strings: text if they are UTF-8.
    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Value, E> {
        match std::str::from_utf8(b) {
            Ok(s) => Ok(Value::Str(self.names.get(s))),
            Err(_) => Err(E::custom("a byte string that is not UTF-8 text")),
        }
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
        // A CBOR header may claim any length: never trust it for an allocation.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(1024));
        while let Some(v) = seq.next_element_seed(ValueSeed { names: self.names })? {
            out.push(v);
        }
        Ok(Value::List(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out: Vec<(Arc<str>, Value)> = Vec::with_capacity(map.size_hint().unwrap_or(4).min(1024));
        while let Some(name) = map.next_key_seed(KeySeed {
            names: self.names,
            position: out.len(),
        })? {
            let v = map.next_value_seed(ValueSeed { names: self.names })?;
            // Like Python's json.loads, a repeated name keeps the last value.
            set_field(&mut out, name, v);
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
    write_at(v, out, 0);
}

/// Deeper than this, output would be refused by common JSON parsers
/// (serde_json stops at 128): the rest is written as a marker string.
const MAX_OUTPUT_DEPTH: usize = 100;

fn write_at(v: &Value, out: &mut String, depth: usize) {
    if depth > MAX_OUTPUT_DEPTH && matches!(v, Value::List(_) | Value::Tuple(_) | Value::Map(_)) {
        out.push_str("\"<nested deeper than 100 levels>\"");
        return;
    }
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
                write_at(x, out, depth + 1);
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
                write_at(x, out, depth + 1);
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

    /// The fast path and serde_json agree on everything the fast path takes.
    #[test]
    fn the_fast_path_decodes_like_serde_json() {
        let lines = [
            r#"{"sensor": "s-1", "ts": 1704067200.125, "temp": -21.5, "ok": true, "n": null, "k": 7}"#,
            r#"  {"a":1,"b":"x","a":2}  "#,
            r#"{}"#,
            r#"{"big": 18446744073709551615, "e": 1E-7, "f": 2.5e+3, "z": 0.1}"#,
            r#"{"long": "a string that is longer than thirty-two bytes, not shared"}"#,
            r#"{"ü": "ä€𝄞"}"#,
            r#"{"a": [1, [2, []], {}], "loc": {"lat": 52.1, "lon": -0.5, "a": {"b": [true, null]}}}"#,
            r#"[{"x": 1}, "y", -0.25, 3]"#,
            r#""just text""#,
        ];
        for line in lines {
            let mut fast = Decoder::default();
            let v = fast
                .decode_fast(line.as_bytes())
                .unwrap_or_else(|| panic!("fast path refused {line}"));
            let mut a = String::new();
            write(&v, &mut a);
            let mut b = String::new();
            let mut slow = Decoder::default();
            write(&slow.finish(serde_json::Deserializer::from_str(line)).unwrap(), &mut b);
            assert_eq!(a, b, "{line}");
        }
    }

    #[test]
    fn minus_zero_is_the_integer_zero_as_in_python() {
        // serde_json would make it the float -0.0; Python's json.loads gives 0.
        let v = Decoder::default().decode(br#"{"n": -0}"#).unwrap();
        assert!(matches!(v.field("n"), Some(Value::Int(0))));
    }

    /// Everything unusual goes to serde_json, which reports errors.
    #[test]
    fn the_fast_path_refuses_what_it_does_not_handle() {
        for line in [
            r#"{"a": [1,]}"#,
            r#"{"a": {"b" 1}}"#,
            r#"{"a": "esc\"aped"}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": -}"#,
            r#"{"a": 1e999}"#,
            r#"{"a": -99999999999999999999}"#,
            r#"{"a": tru}"#,
            r#"{"a": 1,}"#,
            r#"{"a": 1} x"#,
            r#"[1, 2"#,
            "{\"a\": \"tab\there\"}",
        ] {
            assert!(Decoder::default().decode_fast(line.as_bytes()).is_none(), "{line}");
        }
        let mut d = Decoder::default();
        assert!(d.decode(br#"{"a": 01}"#).is_err());
        assert!(matches!(
            d.decode(br#"{"a": -99999999999999999999}"#),
            Ok(Value::Map(_))
        ));
    }

    /// Keeping only some fields gives the full decoding without the
    /// others, whichever path a line takes, errors included.
    #[test]
    fn a_decoder_keeping_some_fields_equals_the_full_decoding_without_the_rest() {
        let deep = format!("{{\"k\": \"a\", \"deep\": {}1{}}}", "[".repeat(70), "]".repeat(70));
        let lines = [
            r#"{"sensor": "s-1", "ts": 1704067200.125, "temp": -21.5, "loc": {"lat": 1, "x": [1, 2]}, "v": [1e5, -0, 0.5]}"#,
            r#"{"temp": 1, "skip": "esc\"aped", "sensor": "s"}"#,
            r#"{"temp": 1, "temp": 2, "sensor": "s", "temp": 3}"#,
            r#"{"sensor": {"nested": "key"}, "temp": 1}"#,
            r#"{"temp": 1, "x": 1e999}"#,
            r#"{"temp": 1, "x": 123456789012345678901234567890}"#,
            r#"{"temp": 1, "x": 01}"#,
            r#"{"temp": 1, "x": [1,]}"#,
            r#"{"temp": 1, "x": {"a" 1}}"#,
            r#"{"temp": 1, "x": 2.5E+3, "y": 1.}"#,
            r#"{"temp": 1, "x": "tab	here"}"#,
            r#"{"temp": 1} trailing"#,
            r#"[1, {"temp": 2}]"#,
            r#"{}"#,
            r#"{"x": 1, "y": [true, false, null, "s"]}"#,
            &deep,
        ];
        let wanted: Arc<[Arc<str>]> = vec![Arc::from("sensor"), Arc::from("temp"), Arc::from("k")].into();
        for line in lines {
            let full = Decoder::default().decode(line.as_bytes());
            let kept = Decoder::reading(Some(wanted.clone())).decode(line.as_bytes());
            match (full, kept) {
                (Ok(full), Ok(kept)) => {
                    let (mut a, mut b) = (String::new(), String::new());
                    write(&Decoder::reading(Some(wanted.clone())).keep_fields(full), &mut a);
                    write(&kept, &mut b);
                    assert_eq!(a, b, "{line}");
                }
                (Err(_), Err(_)) => {}
                (full, kept) => panic!("{line}: full {full:?}, kept {kept:?}"),
            }
        }
        // Unwanted fields are not built at all on the fast path.
        let v = Decoder::reading(Some(wanted))
            .decode_fast(br#"{"a": [1, {"b": "c"}], "temp": 2, "z": "zz"}"#)
            .expect("fast path");
        assert!(matches!(&v, Value::Map(f) if f.len() == 1 && &*f[0].0 == "temp"));
    }

    #[test]
    fn malformed_json_is_an_error_not_a_panic() {
        let mut d = Decoder::default();
        assert!(d.decode(b"{\"a\": ").is_err());
        assert!(d.decode(b"{} trailing").is_err());
        assert!(d.decode(&[0xff, 0xfe]).is_err());
    }
}
