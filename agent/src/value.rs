//! The item model: what travels between steps.
//!
//! Items stay Rust values from decoding to output; they become Python
//! objects only at Python steps (see `python::convert`). A Python result
//! that has no faithful Rust form (a user class, a namedtuple, a naive
//! datetime) rides along as `Value::Py` and is handed back unchanged.

use std::sync::Arc;

use pyo3::{Py, PyAny};

/// Microseconds since the Unix epoch, UTC: the resolution of Python's datetime.
pub(crate) type Micros = i64;

/// One item's data.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Arc<str>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// A dict with string keys, in insertion order.
    Map(Vec<(Arc<str>, Value)>),
    /// A timezone-aware datetime, in UTC.
    DateTime(Micros),
    /// A `runnel.win.WindowMetadata`.
    Meta(Box<WindowMeta>),
    /// A Python object without a Rust form; only the Python thread looks inside.
    Py(Arc<Py<PyAny>>),
}

/// When a window opened and closed, and which sessions were merged into it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct WindowMeta {
    pub open: Micros,
    pub close: Micros,
    pub merged_ids: Vec<i64>,
}

/// Where an item came from, for log lines that help: source index and line.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Origin {
    /// Index into the engine's origin names; 0 means "made by a step".
    pub src: u32,
    pub line: u64,
}

/// An item and where it came from.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    pub v: Value,
    pub at: Origin,
}

impl Item {
    pub(crate) fn new(v: Value, at: Origin) -> Self {
        Item { v, at }
    }
}

/// Set the field `name` of a dict's fields. A name already there keeps its
/// place and takes the new value, as with Python's `json.loads`,
/// `csv.DictReader` and dict assignment.
pub(crate) fn set_field<N: AsRef<str> + Into<Arc<str>>>(fields: &mut Vec<(Arc<str>, Value)>, name: N, v: Value) {
    match fields.iter_mut().find(|(n, _)| **n == *name.as_ref()) {
        Some(slot) => slot.1 = v,
        None => fields.push((name.into(), v)),
    }
}

impl Value {
    pub(crate) fn str(s: &str) -> Value {
        Value::Str(Arc::from(s))
    }

    /// The field `name` of a dict value.
    pub(crate) fn field(&self, name: &str) -> Option<&Value> {
        match self {
            Value::Map(fields) => fields.iter().find(|(k, _)| &**k == name).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Split a keyed item `(key, value)` into its parts.
    pub(crate) fn into_keyed(self) -> Result<(Arc<str>, Value), Value> {
        match self {
            Value::Tuple(parts) if parts.len() == 2 && matches!(parts[0], Value::Str(_)) => {
                let mut parts = parts.into_iter();
                match (parts.next(), parts.next()) {
                    (Some(Value::Str(k)), Some(v)) => Ok((k, v)),
                    _ => unreachable!("checked: two parts, the first a str"),
                }
            }
            other => Err(other),
        }
    }

    pub(crate) fn keyed(key: Arc<str>, v: Value) -> Value {
        Value::Tuple(vec![Value::Str(key), v])
    }

    /// Whether a Python object hides anywhere inside (then JSON needs the Python thread).
    pub(crate) fn has_py(&self) -> bool {
        match self {
            Value::Py(_) => true,
            Value::List(xs) | Value::Tuple(xs) => xs.iter().any(Value::has_py),
            Value::Map(fs) => fs.iter().any(|(_, v)| v.has_py()),
            _ => false,
        }
    }

    /// A short description for log lines.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Map(_) => "dict",
            Value::DateTime(_) => "datetime",
            Value::Meta(_) => "WindowMetadata",
            Value::Py(_) => "Python object",
        }
    }
}
