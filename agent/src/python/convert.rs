//! Crossing the border: Rust `Value`s to Python objects and back.
//!
//! Exact built-in types convert both ways (`dict` with `str` keys, `list`,
//! `tuple`, `str`, `int` within i64, `float`, `bool`, `None`, aware
//! `datetime`). Anything else, subclasses included, stays a Python object
//! (`Value::Py`) so a user's namedtuple or class comes back as itself.

use std::sync::Arc;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyDateTime, PyDelta, PyDict, PyFloat, PyFrozenSet, PyInt, PyList, PySet, PyString, PyTuple, PyType,
};

use crate::value::{Micros, Value, WindowMeta};

static META_CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();

type StringCache = rustc_hash::FxHashMap<usize, (Arc<str>, Py<PyString>)>;

thread_local! {
    /// Python strings for the shared `Arc<str>`s of field names and short
    /// values (see `json::Names`), keyed by address. Holding the `Arc` keeps
    /// the address from being reused by another text. Only the Python thread
    /// converts, so this lives there.
    static PY_STRINGS: std::cell::RefCell<StringCache> = Default::default();
}

const PY_STRINGS_MAX: usize = 8192;

type KeyCache = rustc_hash::FxHashMap<usize, (Py<PyString>, Arc<str>)>;

thread_local! {
    /// The other direction: Python strings returned as keys (usually the
    /// very objects `py_str` handed out) to shared `Arc<str>`s, keyed by
    /// address; holding the Python string keeps the address from reuse.
    static RUST_STRINGS: std::cell::RefCell<KeyCache> = Default::default();
}

/// A Python `str` as a shared Rust string, reusing earlier conversions.
pub(crate) fn rust_str(s: &Bound<'_, PyString>) -> PyResult<Arc<str>> {
    let addr = s.as_ptr() as usize;
    RUST_STRINGS.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, a)) = cache.get(&addr) {
            return Ok(a.clone());
        }
        let a: Arc<str> = Arc::from(s.to_str()?);
        if a.len() <= 32 {
            if cache.len() >= PY_STRINGS_MAX {
                cache.clear();
            }
            cache.insert(addr, (s.clone().unbind(), a.clone()));
        }
        Ok(a)
    })
}

fn py_str<'py>(py: Python<'py>, s: &Arc<str>) -> Bound<'py, PyString> {
    if s.len() > 32 {
        return PyString::new(py, s);
    }
    PY_STRINGS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let addr = Arc::as_ptr(s) as *const u8 as usize;
        if let Some((_, p)) = cache.get(&addr) {
            return p.bind(py).clone();
        }
        if cache.len() >= PY_STRINGS_MAX {
            cache.clear();
        }
        let p = PyString::intern(py, s);
        cache.insert(addr, (s.clone(), p.clone().unbind()));
        p
    })
}

/// Build the Python object for `v`.
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Int(n) => n.into_pyobject(py)?.into_any(),
        Value::Float(x) => PyFloat::new(py, *x).into_any(),
        Value::Str(s) => py_str(py, s).into_any(),
        Value::List(xs) => {
            let l = PyList::empty(py);
            for x in xs {
                l.append(to_py(py, x)?)?;
            }
            l.into_any()
        }
        Value::Tuple(xs) => {
            let items = xs.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>()?;
            PyTuple::new(py, items)?.into_any()
        }
        Value::Map(fs) => {
            let d = PyDict::new(py);
            for (k, x) in fs {
                d.set_item(py_str(py, k), to_py(py, x)?)?;
            }
            d.into_any()
        }
        Value::DateTime(us) => datetime(py, *us)?,
        Value::Meta(m) => {
            let cls = META_CLASS.import(py, "runnel.win", "WindowMetadata")?;
            let ids = PySet::new(py, &m.merged_ids)?;
            cls.call1((datetime(py, m.open)?, datetime(py, m.close)?, ids))?
        }
        Value::Py(o) => o.bind(py).clone(),
    })
}

fn datetime(py: Python<'_>, us: Micros) -> PyResult<Bound<'_, PyAny>> {
    let dt = DateTime::<Utc>::from_timestamp_micros(us)
        .ok_or_else(|| pyo3::exceptions::PyOverflowError::new_err(format!("timestamp {us} µs is out of range")))?;
    Ok(dt.into_pyobject(py)?.into_any())
}

/// Containers nested deeper than this stay Python objects (and a list that
/// contains itself stops here instead of overflowing the stack).
const MAX_DEPTH: usize = 256;

/// Convert a Python object back into a `Value`.
pub(crate) fn from_py(o: &Bound<'_, PyAny>) -> Value {
    from_py_at(o, 0)
}

fn from_py_at(o: &Bound<'_, PyAny>, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Py(Arc::new(o.clone().unbind()));
    }
    if o.is_none() {
        return Value::Null;
    }
    if o.is_exact_instance_of::<PyBool>() {
        return Value::Bool(o.is_truthy().unwrap_or(false));
    }
    if o.is_exact_instance_of::<PyInt>() {
        if let Ok(n) = o.extract::<i64>() {
            return Value::Int(n);
        }
    } else if o.is_exact_instance_of::<PyFloat>() {
        if let Ok(x) = o.extract::<f64>() {
            return Value::Float(x);
        }
    } else if let Ok(s) = o.cast_exact::<PyString>() {
        if let Ok(s) = rust_str(s) {
            return Value::Str(s);
        }
    } else if let Ok(t) = o.cast_exact::<PyTuple>() {
        return Value::Tuple(t.iter().map(|x| from_py_at(&x, depth + 1)).collect());
    } else if let Ok(l) = o.cast_exact::<PyList>() {
        return Value::List(l.iter().map(|x| from_py_at(&x, depth + 1)).collect());
    } else if let Ok(d) = o.cast_exact::<PyDict>() {
        let mut fields = Vec::with_capacity(d.len());
        for (k, x) in d.iter() {
            match k
                .cast_exact::<PyString>()
                .ok()
                .and_then(|s| s.to_str().ok().map(Arc::<str>::from))
            {
                Some(name) => fields.push((name, from_py_at(&x, depth + 1))),
                None => return Value::Py(Arc::new(o.clone().unbind())),
            }
        }
        return Value::Map(fields);
    } else if o.is_exact_instance_of::<PyDateTime>() {
        if let Ok(us) = micros(o) {
            return Value::DateTime(us);
        }
    }
    Value::Py(Arc::new(o.clone().unbind()))
}

/// Microseconds since the epoch of a timezone-aware datetime.
pub(crate) fn micros(o: &Bound<'_, PyAny>) -> Result<Micros, String> {
    use pyo3::types::{PyDateAccess, PyTimeAccess, PyTzInfoAccess};
    let Ok(dt) = o.cast::<PyDateTime>() else {
        return Err(format!("expected a datetime, got {}", type_name(o)));
    };
    let Some(tz) = dt.get_tzinfo() else {
        return Err(format!(
            "got a naive datetime {}; runnel needs timezone-aware datetimes (add tzinfo=timezone.utc)",
            repr(o)
        ));
    };
    // Fast path: `timezone.utc`, read from the C struct without Python calls.
    if pyo3::types::PyTzInfo::utc(o.py()).is_ok_and(|utc| tz.is(&*utc)) {
        let date = chrono::NaiveDate::from_ymd_opt(dt.get_year(), dt.get_month().into(), dt.get_day().into());
        let time = chrono::NaiveTime::from_hms_micro_opt(
            dt.get_hour().into(),
            dt.get_minute().into(),
            dt.get_second().into(),
            dt.get_microsecond(),
        );
        if let (Some(d), Some(t)) = (date, time) {
            return Ok(d.and_time(t).and_utc().timestamp_micros());
        }
    }
    if let Ok(dt) = o.extract::<DateTime<FixedOffset>>() {
        return Ok(dt.timestamp_micros());
    }
    // Zones whose offset depends on the date (zoneinfo): ask Python.
    let utc = o
        .call_method1(
            "astimezone",
            (pyo3::types::PyTzInfo::utc(o.py()).map_err(|e| e.to_string())?,),
        )
        .map_err(|e| e.to_string())?;
    utc.extract::<DateTime<FixedOffset>>()
        .map(|d| d.timestamp_micros())
        .map_err(|e| e.to_string())
}

/// Microseconds of a timedelta.
pub(crate) fn delta_micros(o: &Bound<'_, PyAny>) -> PyResult<i64> {
    let td: TimeDelta = o.extract()?;
    td.num_microseconds()
        .ok_or_else(|| pyo3::exceptions::PyOverflowError::new_err("timedelta too large"))
}

pub(crate) fn type_name(o: &Bound<'_, PyAny>) -> String {
    o.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn repr(o: &Bound<'_, PyAny>) -> String {
    o.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "<unprintable>".into())
}

/// Replace every Python object inside `v` by its JSON form, as
/// `runnel replay` promises: datetimes as text, WindowMetadata as an
/// object, sets as sorted lists, timedeltas as seconds, tuples/lists/dicts
/// (subclasses too) recursively, anything else as its `repr()`.
pub(crate) fn resolve_for_json(py: Python<'_>, v: Value) -> Value {
    match v {
        Value::Py(o) => json_form(o.bind(py)),
        Value::List(xs) => Value::List(xs.into_iter().map(|x| resolve_for_json(py, x)).collect()),
        Value::Tuple(xs) => Value::Tuple(xs.into_iter().map(|x| resolve_for_json(py, x)).collect()),
        Value::Map(fs) => Value::Map(fs.into_iter().map(|(k, x)| (k, resolve_for_json(py, x))).collect()),
        other => other,
    }
}

fn json_form(o: &Bound<'_, PyAny>) -> Value {
    json_form_at(o, 0)
}

fn json_form_at(o: &Bound<'_, PyAny>, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::str(&repr(o));
    }
    let py = o.py();
    if let Ok(cls) = META_CLASS.import(py, "runnel.win", "WindowMetadata") {
        if o.is_instance(cls.as_any()).unwrap_or(false) {
            let get = |name: &str| o.getattr(name).ok().and_then(|d| micros(&d).ok());
            let ids: Vec<i64> = o
                .getattr("merged_ids")
                .ok()
                .and_then(|s| {
                    s.try_iter()
                        .ok()
                        .map(|it| it.filter_map(|x| x.ok()?.extract().ok()).collect())
                })
                .unwrap_or_default();
            if let (Some(open), Some(close)) = (get("open_time"), get("close_time")) {
                return Value::Meta(Box::new(WindowMeta {
                    open,
                    close,
                    merged_ids: ids,
                }));
            }
        }
    }
    if o.is_instance_of::<PyBool>() {
        return Value::Bool(o.is_truthy().unwrap_or(false));
    }
    if o.is_instance_of::<PyInt>() {
        return match o.extract::<i64>() {
            Ok(n) => Value::Int(n),
            Err(_) => o.extract::<f64>().map(Value::Float).unwrap_or(Value::Null),
        };
    }
    if o.is_instance_of::<PyFloat>() {
        return o.extract::<f64>().map(Value::Float).unwrap_or(Value::Null);
    }
    if o.is_instance_of::<PyString>() {
        return Value::str(&o.to_string());
    }
    if o.is_instance_of::<PyDateTime>() {
        return match micros(o) {
            Ok(us) => Value::DateTime(us),
            Err(_) => Value::str(&o.call_method0("isoformat").map(|s| s.to_string()).unwrap_or_default()),
        };
    }
    if o.is_instance_of::<PyDelta>() {
        return delta_micros(o)
            .map(|us| Value::Float(us as f64 / 1e6))
            .unwrap_or(Value::Null);
    }
    if let Ok(d) = o.cast::<PyDict>() {
        return Value::Map(
            d.iter()
                .map(|(k, x)| {
                    let name = k
                        .cast::<PyString>()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|_| k.to_string());
                    (Arc::from(name.as_str()), json_form_at(&x, depth + 1))
                })
                .collect(),
        );
    }
    if o.is_instance_of::<PyList>() || o.is_instance_of::<PyTuple>() {
        if let Ok(it) = o.try_iter() {
            return Value::List(it.filter_map(|x| x.ok()).map(|x| json_form_at(&x, depth + 1)).collect());
        }
    }
    if o.is_instance_of::<PySet>() || o.is_instance_of::<PyFrozenSet>() {
        if let Ok(it) = o.try_iter() {
            let mut items: Vec<(String, Value)> = it
                .filter_map(|x| x.ok())
                .map(|x| {
                    let v = json_form_at(&x, depth + 1);
                    let mut key = String::new();
                    crate::json::write(&v, &mut key);
                    (key, v)
                })
                .collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            return Value::List(items.into_iter().map(|(_, v)| v).collect());
        }
    }
    if let Ok(v) = from_py_plain(o) {
        return v;
    }
    Value::str(&repr(o))
}

fn from_py_plain(o: &Bound<'_, PyAny>) -> Result<Value, ()> {
    match from_py(o) {
        Value::Py(_) => Err(()),
        v => Ok(v),
    }
}
