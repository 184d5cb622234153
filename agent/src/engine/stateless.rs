//! Steps that look at one item at a time: native key handling, merge, and
//! the Python-function operators (map, filter, branch, stateful_map, ...),
//! which run a whole batch in one job on the Python thread.

use std::collections::HashMap;
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyList, PyString, PyTuple};

use super::{Cx, ItemError, Operator, Out};
use crate::flow::{py_op_name, PyFn, PyOpKind};
use crate::python::convert::{from_py, rust_str, to_py, type_name};
use crate::python::error::PyFailure;
use crate::value::{Item, Origin, Value};

/// An input step: passes its source's batches on and counts them.
pub(crate) struct InputOp {
    pub step_id: String,
}

impl Operator for InputOp {
    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        cx.counters.add(&format!("{}.items", self.step_id), batch.len() as u64);
        out.ports[0] = batch;
    }
}

/// `op.merge`: every input port goes to the one output.
pub(crate) struct MergeOp;

impl Operator for MergeOp {
    fn on_batch(&mut self, _cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        out.ports[0] = batch;
    }
}

/// `op.key_rm`: `(key, value)` becomes `value`.
pub(crate) struct KeyRmOp {
    pub step_id: String,
}

impl Operator for KeyRmOp {
    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        for item in batch {
            match item.v.into_keyed() {
                Ok((_, v)) => out.ports[0].push(Item::new(v, item.at)),
                Err(v) => cx.skip(&self.step_id, "not_keyed", item.at, || not_keyed(&v)),
            }
        }
    }
}

pub(crate) fn not_keyed(v: &Value) -> String {
    format!("expects (key, value) 2-tuples with a str key; got a {}", v.type_name())
}

/// `op.key_on` with a field name: the key is read in Rust.
pub(crate) struct KeyOnFieldOp {
    pub step_id: String,
    pub field: Arc<str>,
}

impl Operator for KeyOnFieldOp {
    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        for item in batch {
            if let Some((k, v, at)) = key_on_field(cx, &self.step_id, &self.field, item) {
                out.ports[0].push(Item::new(Value::keyed(k, v), at));
            }
        }
    }
}

/// `key_on` by field name for one item: its key and value, or `None` when
/// it has no such str or int field (counted and logged as skipped by
/// `step_id`). A window step right after a `key_on` by field calls this
/// itself, saving the `(key, value)` tuple.
pub(crate) fn key_on_field(cx: &Cx, step_id: &str, field: &Arc<str>, item: Item) -> Option<(Arc<str>, Value, Origin)> {
    let key: Option<Arc<str>> = match item.v.field(field) {
        Some(Value::Str(s)) => Some(s.clone()),
        Some(Value::Int(n)) => Some(Arc::from(n.to_string().as_str())),
        _ => None,
    };
    match key {
        Some(k) => Some((k, item.v, item.at)),
        None => {
            let found = item.v.field(field).map(Value::type_name);
            cx.skip(step_id, "no_key", item.at, || match found {
                Some(t) => format!("key field {field:?} is a {t}, not a str or int"),
                None if matches!(item.v, Value::Map(_)) => {
                    format!("item has no key field {field:?}")
                }
                None => format!(
                    "expects dict items with a key field {field:?}; got a {}",
                    item.v.type_name()
                ),
            });
            cx.bury([item]);
            None
        }
    }
}

/// A Python-function operator.
pub(crate) struct PyOp {
    pub step_id: String,
    pub kind: PyOpKind,
    pub f: PyFn,
    /// Per-key state of `stateful_map` (Python objects, touched only on the Python thread).
    pub states: Option<MapStates>,
    /// Hand results on as Python objects (every consumer is Python).
    pub keep_py: bool,
    /// Where the step is defined (file:line).
    pub location: Arc<str>,
}

/// `stateful_map`'s per-key states, and the keys changed since the last
/// checkpoint.
#[derive(Default)]
pub(crate) struct MapStates {
    pub map: HashMap<Arc<str>, Arc<Py<PyAny>>>,
    pub dirty: std::collections::HashSet<Arc<str>>,
}

/// What a Python batch job returns to the engine thread: output batches
/// per port, item errors, the step's per-key state, and the inputs it is
/// done with.
type JobResult = (Vec<Vec<Item>>, Vec<(Origin, ItemError)>, Option<MapStates>, Vec<Item>);

impl Operator for PyOp {
    fn snapshot(&mut self, _cx: &Cx, snap: &mut super::Snap) {
        self.snapshot_states(snap);
    }

    fn restore(&mut self, cx: &Cx, rows: Vec<(String, Vec<u8>)>) -> super::Restored {
        self.restore_states(cx, rows)
    }

    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        let n = batch.len();
        let kind = self.kind;
        let f = self.f.clone();
        let file = cx.file.clone();
        let full_id: Arc<str> = Arc::from(format!("{}.{}", cx.flow_id, self.step_id).as_str());
        let states = self.states.take();
        let n_ports = out.ports.len();
        let keep_py = self.keep_py;
        let location = self.location.clone();
        let job = cx.python(&self.step_id, move |py| {
            run_batch(
                py,
                kind,
                &f,
                (&file, &location),
                &full_id,
                batch,
                states,
                n_ports,
                keep_py,
            )
        });
        match job {
            Ok((ports, errors, mut states, husks)) => {
                if !cx.durable {
                    if let Some(s) = states.as_mut() {
                        s.dirty.clear();
                    }
                }
                self.states = states;
                cx.bury(husks);
                for (i, p) in ports.into_iter().enumerate() {
                    out.ports[i] = p;
                }
                let skipped = errors
                    .iter()
                    .filter(|(_, e)| matches!(e, ItemError::Interrupted))
                    .count();
                cx.timed_out(&self.step_id, skipped as u64);
                for (at, e) in errors {
                    match e {
                        ItemError::Interrupted => {}
                        ItemError::Py(f) => {
                            let fate = if kind == PyOpKind::Inspect {
                                "item passed on"
                            } else {
                                "item skipped"
                            };
                            cx.py_error(&self.step_id, at, &f, fate)
                        }
                        ItemError::Shape(m) => cx.skip(&self.step_id, "bad_result", at, || m),
                    }
                }
            }
            Err(e) => {
                cx.counters.add(&format!("{}.python_errors", self.step_id), n as u64);
                tracing::error!(
                    "flow {} step {:?}: a batch of {n} items was lost: {e}",
                    cx.flow_id,
                    self.step_id
                );
                if self.kind == PyOpKind::StatefulMap {
                    // The job never returned the states (the Python thread
                    // failed); the store keeps what the last checkpoint wrote.
                    self.states = Some(MapStates::default());
                }
            }
        }
    }
}

impl PyOp {
    /// `stateful_map`: the changed keys' states, pickled at the checkpoint.
    pub(crate) fn snapshot_states(&mut self, snap: &mut super::Snap) {
        let Some(states) = self.states.as_mut() else { return };
        let step: Arc<str> = Arc::from(self.step_id.as_str());
        for k in std::mem::take(&mut states.dirty) {
            let row = format!("k:{k}");
            match states.map.get(&k) {
                None => snap.delete(&step, row),
                Some(obj) => {
                    let mut e = super::snapshot::Enc::default();
                    e.obj(obj.clone());
                    snap.put(&step, row, e);
                }
            }
        }
    }

    pub(crate) fn restore_states(&mut self, cx: &Cx, rows: Vec<(String, Vec<u8>)>) -> super::Restored {
        let mut done = super::Restored::default();
        if self.kind != PyOpKind::StatefulMap || rows.is_empty() {
            return done;
        }
        let decoded = cx.python(&self.step_id, move |py| {
            super::snapshot::key_rows(rows, Some(py), |d| {
                Ok(d.obj()?.ok_or("its state could not be pickled when saved")?)
            })
        });
        let decoded = match decoded {
            Ok(d) => d,
            Err(e) => {
                cx.state_error(&self.step_id, || format!("cannot restore the stateful_map states: {e}"));
                return done;
            }
        };
        let states = self.states.get_or_insert_with(MapStates::default);
        for (row, r) in decoded {
            match r {
                Ok((key, obj)) => {
                    done.keys += 1;
                    states.map.insert(key, Arc::new(obj));
                }
                Err(why) => {
                    done.bad_rows += 1;
                    cx.state_error(&self.step_id, || {
                        format!("saved state row {row:?} cannot be read ({why}); that key starts empty")
                    });
                }
            }
        }
        done
    }
}

#[allow(clippy::too_many_arguments)]
fn run_batch(
    py: Python<'_>,
    kind: PyOpKind,
    f: &PyFn,
    (file, location): (&str, &str),
    full_id: &str,
    batch: Vec<Item>,
    mut states: Option<MapStates>,
    n_ports: usize,
    keep_py: bool,
) -> JobResult {
    let f = f.bind(py);
    let mut ports: Vec<Vec<Item>> = (0..n_ports)
        .map(|_| Vec::with_capacity(if kind == PyOpKind::Filter { batch.len() } else { 0 }))
        .collect();
    let mut errors = Vec::new();
    // Inputs this step is done with go back to the engine, which returns
    // them to the thread that allocated them.
    let mut husks: Vec<Item> = Vec::new();
    let fail = |e: PyErr| ItemError::Py(PyFailure::capture(py, &e, file).or_at(file, location));
    let name = py_op_name(kind);

    if kind == PyOpKind::FlatMapBatch {
        let at = batch.first().map(|i| i.at).unwrap_or_default();
        let result = (|| -> Result<(), ItemError> {
            let list = PyList::empty(py);
            for item in &batch {
                list.append(to_py(py, &item.v).map_err(fail)?).map_err(fail)?;
            }
            let r = f.call1((list,)).map_err(fail)?;
            for x in r.try_iter().map_err(|_| {
                ItemError::Shape(format!(
                    "{name}: mapper must return an iterable; got a {}",
                    type_name(&r)
                ))
            })? {
                let x = x.map_err(fail)?;
                let v = if keep_py { py_value(x) } else { from_py(&x) };
                ports[0].push(Item::new(v, Origin::default()));
            }
            Ok(())
        })();
        if let Err(e) = result {
            errors.push((at, e));
        }
        return (ports, errors, states, batch);
    }

    // With `keep_py`, results stay Python objects: every consumer is Python
    // too, so converting back and forth would be wasted work.
    let keep = |obj: Bound<'_, PyAny>| if keep_py { py_value(obj) } else { from_py(&obj) };
    for item in batch {
        let at = item.at;
        if crate::python::watchdog::interrupted() {
            if kind == PyOpKind::Inspect {
                // An inspector's failure never stops an item.
                ports[0].push(item);
            } else {
                errors.push((at, ItemError::Interrupted));
                husks.push(item);
            }
            continue;
        }
        let result = (|| -> Result<(), ItemError> {
            match kind {
                PyOpKind::Map => {
                    let r = f.call1((to_py(py, &item.v).map_err(fail)?,)).map_err(fail)?;
                    ports[0].push(Item::new(keep(r), at));
                    husks.push(item);
                }
                PyOpKind::Filter | PyOpKind::Branch => {
                    let x = to_py(py, &item.v).map_err(fail)?;
                    let r = f.call1((x.clone(),)).map_err(fail)?;
                    let keep_it = want_bool(name, &r)?;
                    let port = if keep_it {
                        0
                    } else if kind == PyOpKind::Branch {
                        1
                    } else {
                        husks.push(item);
                        return Ok(());
                    };
                    let v = pass_on(keep_py, item.v, x, &mut husks, at);
                    ports[port].push(Item::new(v, at));
                }
                PyOpKind::FilterMap => {
                    let r = f.call1((to_py(py, &item.v).map_err(fail)?,)).map_err(fail)?;
                    if !r.is_none() {
                        ports[0].push(Item::new(keep(r), at));
                    }
                    husks.push(item);
                }
                PyOpKind::FlatMap => {
                    let r = f.call1((to_py(py, &item.v).map_err(fail)?,)).map_err(fail)?;
                    for x in iterate(name, &r)? {
                        ports[0].push(Item::new(keep(x.map_err(fail)?), at));
                    }
                    husks.push(item);
                }
                PyOpKind::KeyOn => {
                    let x = to_py(py, &item.v).map_err(fail)?;
                    let r = f.call1((x.clone(),)).map_err(fail)?;
                    let key = r.cast::<PyString>().map_err(|_| {
                        ItemError::Shape(format!(
                            "return value of `key` must be a `str`; got a {}",
                            type_name(&r)
                        ))
                    })?;
                    let key: Arc<str> = rust_str(key).map_err(fail)?;
                    let v = pass_on(keep_py, item.v, x, &mut husks, at);
                    ports[0].push(Item::new(Value::keyed(key, v), at));
                }
                PyOpKind::Inspect => {
                    let x = to_py(py, &item.v).map_err(fail)?;
                    let r = f.call1((full_id, x.clone()));
                    let v = pass_on(keep_py, item.v, x, &mut husks, at);
                    ports[0].push(Item::new(v, at));
                    r.map_err(fail)?;
                }
                PyOpKind::MapValue | PyOpKind::FilterValue | PyOpKind::FlatMapValue | PyOpKind::StatefulMap => {
                    let (k, v) = split_keyed(py, item.v).map_err(|v| ItemError::Shape(not_keyed(&v)))?;
                    let pv = to_py(py, &v).map_err(fail)?;
                    match kind {
                        PyOpKind::MapValue => {
                            let r = f.call1((pv,)).map_err(fail)?;
                            ports[0].push(Item::new(Value::keyed(k, keep(r)), at));
                            husks.push(Item::new(v, at));
                        }
                        PyOpKind::FilterValue => {
                            let r = f.call1((pv.clone(),)).map_err(fail)?;
                            if want_bool(name, &r)? {
                                let v = pass_on(keep_py, v, pv, &mut husks, at);
                                ports[0].push(Item::new(Value::keyed(k, v), at));
                            } else {
                                husks.push(Item::new(v, at));
                            }
                        }
                        PyOpKind::FlatMapValue => {
                            let r = f.call1((pv,)).map_err(fail)?;
                            for x in iterate(name, &r)? {
                                ports[0].push(Item::new(Value::keyed(k.clone(), keep(x.map_err(fail)?)), at));
                            }
                            husks.push(Item::new(v, at));
                        }
                        _ => {
                            let states = states.get_or_insert_with(MapStates::default);
                            states.dirty.insert(k.clone());
                            let old = states.map.remove(&k);
                            let state = old
                                .as_ref()
                                .map(|s| s.bind(py).clone())
                                .unwrap_or_else(|| py.None().into_bound(py));
                            let r = match f.call1((state, pv)) {
                                Ok(r) => r,
                                Err(e) => {
                                    if let Some(old) = old {
                                        states.map.insert(k, old);
                                    }
                                    return Err(fail(e));
                                }
                            };
                            // Like Bytewax's `s, w = res`: any iterable of exactly two.
                            let pair: Option<Vec<Bound<'_, PyAny>>> = r
                                .try_iter()
                                .ok()
                                .and_then(|it| it.take(3).collect::<PyResult<Vec<_>>>().ok())
                                .filter(|items| items.len() == 2);
                            let Some(mut pair) = pair else {
                                if let Some(old) = old {
                                    states.map.insert(k, old);
                                }
                                return Err(ItemError::Shape(format!(
                                    "return value of `mapper` must be a 2-tuple of `(updated_state, emit_value)`; got a {}",
                                    type_name(&r)
                                )));
                            };
                            let emit = pair.pop().expect("two items");
                            let new_state = pair.pop().expect("two items");
                            if !new_state.is_none() {
                                states.map.insert(k.clone(), Arc::new(new_state.unbind()));
                            }
                            ports[0].push(Item::new(Value::keyed(k, keep(emit)), at));
                            husks.push(Item::new(v, at));
                        }
                    }
                }
                PyOpKind::FlatMapBatch => unreachable!("handled above"),
            }
            Ok(())
        })();
        if let Err(e) = result {
            errors.push((at, e));
        }
    }
    (ports, errors, states, husks)
}

/// The form in which a step passes its input on: the Python object when
/// every consumer is Python, else a Rust value (converted back if an
/// upstream step handed over a Python object).
fn pass_on(keep_py: bool, v: Value, obj: Bound<'_, PyAny>, husks: &mut Vec<Item>, at: Origin) -> Value {
    if keep_py {
        husks.push(Item::new(v, at));
        py_value(obj)
    } else if v.has_py() {
        // An upstream Python step handed over Python objects (perhaps inside
        // a keyed pair): Rust readers need Rust values.
        from_py(&obj)
    } else {
        v
    }
}

/// A Python result handed on as a Python object, except that a
/// `(str, value)` pair stays visibly keyed, so keyed steps downstream (Rust
/// or Python) see a keyed stream, as in Bytewax.
fn py_value(obj: Bound<'_, PyAny>) -> Value {
    // Exact tuples only: a namedtuple rides on whole, keeping its class.
    match py_pair(&obj, true) {
        Some((k, v)) => Value::keyed(k, Value::Py(Arc::new(v.unbind()))),
        None => Value::Py(Arc::new(obj.unbind())),
    }
}

/// A Python 2-tuple whose first item is a `str`, split into key and value;
/// `exact` leaves tuple subclasses (namedtuples) alone.
fn py_pair<'py>(obj: &Bound<'py, PyAny>, exact: bool) -> Option<(Arc<str>, Bound<'py, PyAny>)> {
    let t = if exact {
        obj.cast_exact::<PyTuple>().ok()?
    } else {
        obj.cast::<PyTuple>().ok()?
    };
    if t.len() != 2 {
        return None;
    }
    let k = rust_str(t.get_item(0).ok()?.cast::<PyString>().ok()?).ok()?;
    Some((k, t.get_item(1).ok()?))
}

/// Split a keyed item on the Python thread: Rust `(key, value)` tuples, and
/// Python 2-tuples (namedtuples too) whose first item is a `str`.
fn split_keyed(py: Python<'_>, v: Value) -> Result<(Arc<str>, Value), Value> {
    match v.into_keyed() {
        Ok(kv) => Ok(kv),
        Err(Value::Py(o)) => match py_pair(o.bind(py), false) {
            Some((k, v)) => Ok((k, Value::Py(Arc::new(v.unbind())))),
            None => Err(Value::Py(o)),
        },
        Err(other) => Err(other),
    }
}

fn want_bool(name: &str, r: &Bound<'_, PyAny>) -> Result<bool, ItemError> {
    if r.is_exact_instance_of::<PyBool>() {
        Ok(r.is_truthy().unwrap_or(false))
    } else {
        Err(ItemError::Shape(format!(
            "return value of the {name} predicate must be a `bool`; got a {}",
            type_name(r)
        )))
    }
}

fn iterate<'py>(name: &str, r: &Bound<'py, PyAny>) -> Result<Bound<'py, pyo3::types::PyIterator>, ItemError> {
    r.try_iter().map_err(|_| {
        ItemError::Shape(format!(
            "{name}: mapper must return an iterable; got a {}",
            type_name(r)
        ))
    })
}
