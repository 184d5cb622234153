//! The encoding of operator state for the store (see `store/state.rs`).
//!
//! A row is a compact binary body (varints, tagged values) followed by the
//! pickles of the Python objects the body refers to by index. Encoding
//! happens on the engine thread; the Python objects a row refers to are
//! pickled in one job on the Python thread for the whole checkpoint, and
//! unpickled in one job on restore. A row that does not decode is skipped
//! (counted, logged), never a crash.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::value::{Micros, Value, WindowMeta};

/// Bumped when the body layout changes (rows of another version are set aside).
pub(crate) const ROW_VERSION: u8 = 1;
/// The same layout with the body LZ4-compressed (rows with readings queued
/// are mostly repeated field names: a quarter of the bytes to write).
const ROW_VERSION_LZ4: u8 = 2;
/// Bodies shorter than this are stored as they are.
const COMPRESS_FROM: usize = 256;
/// No row body is larger than this (a damaged size must not allocate more).
const MAX_BODY: usize = 64 << 20;
/// Values nested deeper than this are a damaged row (the encoder never
/// writes them: conversions stop at 100 levels).
const MAX_DEPTH: u32 = 200;

/// A Python object to pickle for a row.
pub(crate) type PyObj = Arc<Py<PyAny>>;

/// A row being written.
#[derive(Default)]
pub(crate) struct Enc {
    pub buf: Vec<u8>,
    pub py: Vec<PyObj>,
}

impl Enc {
    pub(crate) fn u(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.buf.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.buf.push(n as u8);
    }
    pub(crate) fn i(&mut self, n: i64) {
        self.u(((n << 1) ^ (n >> 63)) as u64);
    }
    pub(crate) fn f(&mut self, x: f64) {
        self.buf.extend_from_slice(&x.to_le_bytes());
    }
    pub(crate) fn b(&mut self, x: bool) {
        self.buf.push(x as u8);
    }
    pub(crate) fn s(&mut self, s: &str) {
        self.u(s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
    }
    /// A Python object, pickled later.
    pub(crate) fn obj(&mut self, o: PyObj) {
        self.u(self.py.len() as u64);
        self.py.push(o);
    }
    pub(crate) fn meta(&mut self, m: &WindowMeta) {
        self.i(m.open);
        self.i(m.close);
        self.u(m.merged_ids.len() as u64);
        for id in &m.merged_ids {
            self.i(*id);
        }
    }
    pub(crate) fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.buf.push(0),
            Value::Bool(false) => self.buf.push(1),
            Value::Bool(true) => self.buf.push(2),
            Value::Int(n) => {
                self.buf.push(3);
                self.i(*n);
            }
            Value::Float(x) => {
                self.buf.push(4);
                self.f(*x);
            }
            Value::Str(s) => {
                self.buf.push(5);
                self.s(s);
            }
            Value::List(xs) | Value::Tuple(xs) => {
                self.buf.push(if matches!(v, Value::List(_)) { 6 } else { 7 });
                self.u(xs.len() as u64);
                for x in xs {
                    self.value(x);
                }
            }
            Value::Map(fs) => {
                self.buf.push(8);
                self.u(fs.len() as u64);
                for (k, x) in fs {
                    self.s(k);
                    self.value(x);
                }
            }
            Value::DateTime(us) => {
                self.buf.push(9);
                self.i(*us);
            }
            Value::Meta(m) => {
                self.buf.push(10);
                self.meta(m);
            }
            Value::Py(o) => {
                self.buf.push(11);
                self.obj(o.clone());
            }
        }
    }
}

/// A row being read; `objs` are the row's unpickled objects.
pub(crate) struct Dec<'a> {
    b: &'a [u8],
    objs: Vec<Option<Py<PyAny>>>,
    depth: u32,
}

pub(crate) type DecResult<T> = Result<T, String>;

impl<'a> Dec<'a> {
    pub(crate) fn u(&mut self) -> DecResult<u64> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or("row ends early")?;
            self.b = rest;
            n |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err("bad varint".into())
    }
    pub(crate) fn i(&mut self) -> DecResult<i64> {
        let z = self.u()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }
    /// A count of things each taking at least one byte (bounds allocations).
    pub(crate) fn n(&mut self) -> DecResult<usize> {
        let n = self.u()? as usize;
        if n > self.b.len() {
            return Err("count beyond the row".into());
        }
        Ok(n)
    }
    pub(crate) fn f(&mut self) -> DecResult<f64> {
        let (x, rest) = self.b.split_first_chunk::<8>().ok_or("row ends early")?;
        self.b = rest;
        Ok(f64::from_le_bytes(*x))
    }
    pub(crate) fn b(&mut self) -> DecResult<bool> {
        let (&x, rest) = self.b.split_first().ok_or("row ends early")?;
        self.b = rest;
        Ok(x != 0)
    }
    pub(crate) fn s(&mut self) -> DecResult<Arc<str>> {
        let n = self.n()?;
        let (text, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(Arc::from(std::str::from_utf8(text).map_err(|_| "text is not UTF-8")?))
    }
    /// A Python object (`None` if it could not be pickled when written).
    pub(crate) fn obj(&mut self) -> DecResult<Option<Py<PyAny>>> {
        let i = self.u()? as usize;
        let slot = self.objs.get_mut(i).ok_or("object index beyond the row")?;
        Ok(slot.take())
    }
    pub(crate) fn meta(&mut self) -> DecResult<WindowMeta> {
        let open = self.i()?;
        let close = self.i()?;
        let n = self.n()?;
        let merged_ids = (0..n).map(|_| self.i()).collect::<DecResult<_>>()?;
        Ok(WindowMeta {
            open,
            close,
            merged_ids,
        })
    }
    pub(crate) fn value(&mut self) -> DecResult<Value> {
        if self.depth >= MAX_DEPTH {
            return Err("values nested too deep".into());
        }
        self.depth += 1;
        let v = self.value_inner();
        self.depth -= 1;
        v
    }

    fn value_inner(&mut self) -> DecResult<Value> {
        let (&tag, rest) = self.b.split_first().ok_or("row ends early")?;
        self.b = rest;
        Ok(match tag {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => Value::Int(self.i()?),
            4 => Value::Float(self.f()?),
            5 => Value::Str(self.s()?),
            6 | 7 => {
                let n = self.n()?;
                let xs = (0..n).map(|_| self.value()).collect::<DecResult<Vec<_>>>()?;
                if tag == 6 {
                    Value::List(xs)
                } else {
                    Value::Tuple(xs)
                }
            }
            8 => {
                let n = self.n()?;
                let mut fs = Vec::with_capacity(n);
                for _ in 0..n {
                    let k = self.s()?;
                    fs.push((k, self.value()?));
                }
                Value::Map(fs)
            }
            9 => Value::DateTime(self.i()?),
            10 => Value::Meta(Box::new(self.meta()?)),
            11 => match self.obj()? {
                Some(o) => Value::Py(Arc::new(o)),
                None => Value::Null,
            },
            t => return Err(format!("unknown value tag {t}")),
        })
    }
    pub(crate) fn done(&self) -> DecResult<()> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err("bytes left over at the end of the row".into())
        }
    }
}

/// A row whose body is encoded and whose objects are still to be pickled.
pub(crate) struct PendingRow {
    pub step: Arc<str>,
    pub row: String,
    pub enc: Enc,
}

/// Rows ready for the store, (step, row, bytes), and the objects that could
/// not be pickled, (step, row, why).
pub(crate) type Finished = (Vec<(Arc<str>, String, Vec<u8>)>, Vec<(Arc<str>, String, String)>);

/// Pickle every row's objects (on the Python thread) and give the rows'
/// bytes. An object that cannot be pickled is written as missing: the
/// caller learns the (step, row, message) of each. `None` if the job was
/// interrupted (stopping, or past `python_step_timeout`): a failure then
/// says nothing about the object, so nothing of this checkpoint may be
/// committed.
pub(crate) fn finish(py: Python<'_>, rows: Vec<PendingRow>) -> Option<Finished> {
    let dumps = py
        .import("pickle")
        .and_then(|m| m.getattr("dumps"))
        .map_err(|e| e.to_string());
    let mut out = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    for r in rows {
        let mut pickles: Vec<Option<Vec<u8>>> = Vec::with_capacity(r.enc.py.len());
        for o in &r.enc.py {
            let res = match &dumps {
                Ok(d) => d
                    .call1((o.bind(py), 4))
                    .and_then(|b| b.cast_into::<PyBytes>().map_err(Into::into))
                    .map(|b| b.as_bytes().to_vec())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            if crate::python::watchdog::interrupted() {
                return None;
            }
            match res {
                Ok(b) => pickles.push(Some(b)),
                Err(e) => {
                    failed.push((r.step.clone(), r.row.clone(), e));
                    pickles.push(None);
                }
            }
        }
        out.push((r.step, r.row, assemble(&r.enc.buf, &pickles)));
    }
    Some((out, failed))
}

/// A decoded per-key row: its name, and its key and value or why not.
pub(crate) type KeyRow<T> = (String, DecResult<(Arc<str>, T)>);

/// Decode every per-key row (`k:<key>`) with `f`, which reads the body and
/// must consume all of it: (row name, key and value or why not).
pub(crate) fn key_rows<T>(
    rows: Vec<(String, Vec<u8>)>,
    py: Option<Python<'_>>,
    mut f: impl FnMut(&mut Dec<'_>) -> DecResult<T>,
) -> Vec<KeyRow<T>> {
    rows.into_iter()
        .map(|(row, bytes)| {
            let r = (|| {
                let key: Arc<str> = Arc::from(row.strip_prefix("k:").ok_or("not a key row")?);
                let raw = split(&bytes)?;
                let mut d = raw.decoder(py)?;
                let v = f(&mut d)?;
                d.done()?;
                Ok((key, v))
            })();
            (row, r)
        })
        .collect()
}

/// Whether any of `rows` holds Python objects (restoring it needs the
/// Python thread).
pub(crate) fn any_objects(rows: &[(String, Vec<u8>)]) -> bool {
    rows.iter().any(|(_, b)| split(b).is_ok_and(|r| r.has_objects()))
}

/// A row with no Python objects.
pub(crate) fn plain(enc: &Enc) -> Vec<u8> {
    assemble(&enc.buf, &[])
}

fn assemble(body: &[u8], pickles: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut e = Enc::default();
    if body.len() >= COMPRESS_FROM {
        e.buf.push(ROW_VERSION_LZ4);
        let packed = lz4_flex::compress_prepend_size(body);
        e.u(packed.len() as u64);
        e.buf.extend_from_slice(&packed);
    } else {
        e.buf.push(ROW_VERSION);
        e.u(body.len() as u64);
        e.buf.extend_from_slice(body);
    }
    e.u(pickles.len() as u64);
    for p in pickles {
        match p {
            Some(b) => {
                e.buf.push(1);
                e.u(b.len() as u64);
                e.buf.extend_from_slice(b);
            }
            None => e.buf.push(0),
        }
    }
    e.buf
}

/// A stored row split into its body and its pickles.
pub(crate) struct RawRow<'a> {
    body: std::borrow::Cow<'a, [u8]>,
    pickles: Vec<Option<&'a [u8]>>,
}

pub(crate) fn split(row: &[u8]) -> DecResult<RawRow<'_>> {
    let (&version, rest) = row.split_first().ok_or("empty row")?;
    if version != ROW_VERSION && version != ROW_VERSION_LZ4 {
        return Err(format!(
            "row version {version}, this runnel reads {ROW_VERSION} and {ROW_VERSION_LZ4}"
        ));
    }
    let mut d = Dec {
        b: rest,
        objs: Vec::new(),
        depth: 0,
    };
    let n = d.n()?;
    let (body, rest) = d.b.split_at(n);
    d.b = rest;
    let body = if version == ROW_VERSION_LZ4 {
        let size = body
            .first_chunk::<4>()
            .map(|b| u32::from_le_bytes(*b) as usize)
            .ok_or("compressed body too short")?;
        if size > MAX_BODY {
            return Err(format!("compressed body claims {size} bytes"));
        }
        std::borrow::Cow::Owned(
            lz4_flex::decompress_size_prepended(body).map_err(|e| format!("cannot decompress: {e}"))?,
        )
    } else {
        std::borrow::Cow::Borrowed(body)
    };
    let count = d.n()?;
    let mut pickles = Vec::with_capacity(count);
    for _ in 0..count {
        if d.b()? {
            let n = d.n()?;
            let (p, rest) = d.b.split_at(n);
            d.b = rest;
            pickles.push(Some(p));
        } else {
            pickles.push(None);
        }
    }
    d.done()?;
    Ok(RawRow { body, pickles })
}

impl RawRow<'_> {
    pub(crate) fn has_objects(&self) -> bool {
        !self.pickles.is_empty()
    }

    /// A decoder for the body, with objects unpickled (on the Python thread
    /// when there are any: `py` must then be given).
    pub(crate) fn decoder(&self, py: Option<Python<'_>>) -> DecResult<Dec<'_>> {
        let mut objs = Vec::with_capacity(self.pickles.len());
        if !self.pickles.is_empty() {
            let py = py.ok_or("the row holds Python objects")?;
            let loads = py
                .import("pickle")
                .and_then(|m| m.getattr("loads"))
                .map_err(|e| e.to_string())?;
            for p in &self.pickles {
                match p {
                    Some(b) => {
                        let o = loads
                            .call1((PyBytes::new(py, b),))
                            .map_err(|e| format!("cannot unpickle: {e}"))?;
                        objs.push(Some(o.unbind()));
                    }
                    None => objs.push(None),
                }
            }
        }
        Ok(Dec {
            b: &self.body,
            objs,
            depth: 0,
        })
    }
}

/// A flow's clock for saved state: microseconds of running time, carried
/// across restarts (each checkpoint saves it). A key's "last moved" instant
/// is stored on it, so that after a restart its idle time is what it was at
/// the last checkpoint, even if the key itself was last written long before.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EngineClock {
    pub base: Micros,
    pub started: std::time::Instant,
}

impl EngineClock {
    pub(crate) fn new(base: Micros) -> EngineClock {
        EngineClock {
            base,
            started: std::time::Instant::now(),
        }
    }

    /// The clock's reading at `t`.
    pub(crate) fn at(&self, t: std::time::Instant) -> Micros {
        if t >= self.started {
            self.base.saturating_add(micros_of(t - self.started))
        } else {
            self.base.saturating_sub(micros_of(self.started - t))
        }
    }

    /// The instant (at or before `now`) the clock read `c`.
    pub(crate) fn instant(&self, c: Micros, now: std::time::Instant) -> std::time::Instant {
        let back = self.at(now).saturating_sub(c).max(0) as u64;
        now.checked_sub(std::time::Duration::from_micros(back)).unwrap_or(now)
    }
}

/// A duration on the monotonic clock as stored (microseconds, saturating).
pub(crate) fn micros_of(d: std::time::Duration) -> Micros {
    d.as_micros().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_a_row() {
        let v = Value::Map(vec![
            (Arc::from("a"), Value::Int(-5)),
            (Arc::from("b"), Value::Float(1.5)),
            (
                Arc::from("c"),
                Value::Tuple(vec![Value::str("x"), Value::List(vec![Value::Null, Value::Bool(true)])]),
            ),
            (Arc::from("d"), Value::DateTime(-1)),
            (
                Arc::from("e"),
                Value::Meta(Box::new(WindowMeta {
                    open: 1,
                    close: 2,
                    merged_ids: vec![3],
                })),
            ),
        ]);
        let mut e = Enc::default();
        e.value(&v);
        e.i(i64::MIN);
        e.u(u64::MAX);
        let row = plain(&e);
        let raw = split(&row).unwrap();
        let mut d = raw.decoder(None).unwrap();
        let back = d.value().unwrap();
        assert_eq!(format!("{back:?}"), format!("{v:?}"));
        assert_eq!(d.i().unwrap(), i64::MIN);
        assert_eq!(d.u().unwrap(), u64::MAX);
        d.done().unwrap();
    }

    #[test]
    fn the_flow_clock_carries_idle_time_across_a_restart() {
        let before = EngineClock::new(5_000_000);
        let now = std::time::Instant::now();
        // A key that last moved 2 s before the checkpoint...
        let moved = before.at(now - std::time::Duration::from_secs(2));
        let saved = before.at(now);
        // ...is 2 s idle right after the restart, whenever the row was written.
        let after = EngineClock::new(saved);
        let now2 = after.started;
        let idle = now2.duration_since(after.instant(moved, now2));
        assert!((1_999..=2_001).contains(&idle.as_millis()), "{idle:?}");
    }

    #[test]
    fn long_rows_are_compressed_and_read_back() {
        let mut e = Enc::default();
        let reading = Value::Map(vec![
            (Arc::from("temperature"), Value::Float(21.5)),
            (Arc::from("sensor"), Value::str("a1")),
        ]);
        for _ in 0..100 {
            e.value(&reading);
        }
        let row = plain(&e);
        assert_eq!(row[0], ROW_VERSION_LZ4);
        assert!(row.len() * 4 < e.buf.len(), "{} bytes for {}", row.len(), e.buf.len());
        let raw = split(&row).unwrap();
        let mut d = raw.decoder(None).unwrap();
        for _ in 0..100 {
            assert_eq!(format!("{:?}", d.value().unwrap()), format!("{reading:?}"));
        }
        d.done().unwrap();
        // Every cut and a flipped size are errors, not panics.
        for cut in 0..row.len() {
            if let Ok(raw) = split(&row[..cut]) {
                let _ = raw.decoder(None).and_then(|mut d| d.value());
            }
        }
        let mut bad = row.clone();
        bad[3] ^= 0xff;
        let _ = split(&bad).map(|r| r.decoder(None).and_then(|mut d| d.value()));
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let mut e = Enc::default();
        e.value(&Value::List(vec![Value::str("abc"); 3]));
        let row = plain(&e);
        for cut in 0..row.len() {
            if let Ok(raw) = split(&row[..cut]) {
                let _ = raw.decoder(None).and_then(|mut d| d.value());
            }
        }
        let mut bad = row.clone();
        bad[0] = 99;
        assert!(split(&bad).is_err());
        // A count far beyond the row's length is refused before allocating.
        let mut huge = Enc::default();
        huge.buf.push(6);
        huge.u(u64::MAX >> 1);
        let row = plain(&huge);
        assert!(split(&row).unwrap().decoder(None).unwrap().value().is_err());
    }
}
