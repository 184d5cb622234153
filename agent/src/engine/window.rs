//! Window operators: Bytewax 0.21's windowing, per key, in Rust.
//!
//! For every key: a clock gives each value a timestamp and a watermark;
//! values older than the watermark are late (emitted on `late`, never
//! folded); the rest wait in a queue until the watermark passes them
//! (`ordered`), then go into the windows the windower assigns; windows close
//! when the watermark passes their close time. `fold_window` and friends
//! keep their accumulators as Python objects, changed in one job on the
//! Python thread per batch; `count_window` and `win.aggregate` never call
//! Python.
//!
//! In replay the watermark is the largest timestamp minus the wait. Live,
//! it also advances with the monotonic clock while a key is idle (never the
//! wall clock, so an NTP jump after boot cannot flush or freeze windows), and
//! the engine sleeps until the next close time instead of polling.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::prelude::*;

use super::agg::AggAcc;
use super::snapshot::{self, Dec, DecResult, Enc};
use super::{Cx, ItemError, Operator, Out, Restored, Snap};
use crate::flow::{AggSpec, ClockSpec, LogicSpec, TsGetter, TsUnit, WindowPlan, WindowerSpec};
use crate::python::convert::{from_py, micros, to_py};
use crate::python::error::PyFailure;
use crate::time;
use crate::value::{Item, Micros, Origin, Value, WindowMeta};

const LATE_SESSION_ID: i64 = -1;

/// A value waiting for the watermark to pass it.
struct Queued {
    value: Value,
    ts: Micros,
    at: Origin,
}

#[derive(Clone, Copy)]
struct Clock {
    /// Largest timestamp seen minus the wait (`i64::MIN` before any).
    base: Micros,
    /// When `base` last moved, on the monotonic clock.
    moved_at: Instant,
}

/// A key's open windows. Kept small: a flow may have 100,000 keys.
enum Windows {
    /// Ids of the tumbling and sliding windows opened so far, ascending
    /// (their times follow from the windower).
    Sliding(smallvec::SmallVec<[i64; 2]>),
    Session(Box<Sessions>),
}

struct Sessions {
    max_id: i64,
    sessions: BTreeMap<i64, WindowMeta>,
    merges: Vec<(i64, i64)>,
}

/// A native accumulator (boxed statistics: a key between readings keeps
/// no window open, and then no room for them).
enum Acc {
    Count(i64),
    Agg(Box<AggAcc>),
}

/// Values waiting for the watermark: one inline (a key with a reading now
/// and then holds just one), more on the heap.
type Queue = smallvec::SmallVec<[Queued; 1]>;

struct KeyState {
    clock: Clock,
    windows: Windows,
    /// Sorted by timestamp, ties in arrival order (only when `ordered`).
    queue: Queue,
    /// Native accumulators by window id (Python ones live on the Python
    /// thread); a key has few windows open, so a list.
    accs: Accs,
    /// The watermark this batch left, while the key waits for its flush.
    touched: Option<Micros>,
}

/// Accumulators by window id: one inline (most keys have one window open).
type Accs = smallvec::SmallVec<[(i64, Acc); 1]>;

/// The accumulator of window `id`, made by `new` if there is none.
fn acc_entry(accs: &mut Accs, id: i64, new: impl FnOnce() -> Acc) -> &mut Acc {
    let at = match accs.iter().position(|(i, _)| *i == id) {
        Some(at) => at,
        None => {
            accs.push((id, new()));
            accs.len() - 1
        }
    };
    &mut accs[at].1
}

fn acc_take(accs: &mut Accs, id: i64) -> Option<Acc> {
    let at = accs.iter().position(|(i, _)| *i == id)?;
    Some(accs.swap_remove(at).1)
}

/// The times of tumbling/sliding window `id`.
fn sliding_meta(spec: &WindowerSpec, id: i64) -> WindowMeta {
    let WindowerSpec::Sliding { length, offset, align } = *spec else {
        unreachable!("sliding windows come from a sliding windower")
    };
    let open = align.saturating_add(offset.saturating_mul(id));
    WindowMeta {
        open,
        close: open.saturating_add(length),
        merged_ids: Vec::new(),
    }
}

/// Work for the Python thread, in the order it must happen.
enum PyAction {
    Fold {
        key: Arc<str>,
        id: i64,
        value: Value,
        at: Origin,
    },
    Merge {
        key: Arc<str>,
        from: i64,
        into: i64,
    },
    Close {
        key: Arc<str>,
        id: i64,
    },
}

/// Python accumulators by (key, window id). Shared handles, so that a
/// checkpoint can hand them to the Python thread for pickling.
type PyStates = HashMap<(Arc<str>, i64), Arc<Py<PyAny>>>;

/// A batch split into (key, value, origin).
type Keyed = Vec<(Arc<str>, Value, Origin)>;

pub(crate) struct WindowOp {
    step_id: String,
    /// Where the step is defined (file:line).
    location: Arc<str>,
    plan: WindowPlan,
    /// Boxed: the table of 100,000 keys then holds pointers, not states.
    keys: HashMap<Arc<str>, Box<KeyState>>,
    py_states: Option<PyStates>,
    /// Every key's next deadline, in order (live mode sleeps until the
    /// first): kept up to date as keys change, so neither a tick nor the
    /// engine's wait scans every key (at a window boundary hundreds of keys
    /// fall due within milliseconds, one wake each).
    deadlines: std::collections::BTreeSet<(Instant, Arc<str>)>,
    deadline_of: HashMap<Arc<str>, Instant>,
    /// Keys changed since the last checkpoint (only when state is kept).
    dirty: rustc_hash::FxHashSet<Arc<str>>,
    step: Arc<str>,
    /// Whether anything reads the late items (port 1) and the window
    /// metadata (port 2); when not, they are not made.
    pub(crate) late_out: bool,
    pub(crate) meta_out: bool,
    /// Set when the step before is a `key_on` by field read by this step
    /// alone: (its step id, the field). Items then come unkeyed and are
    /// keyed here, as that step would, without the `(key, value)` tuple.
    pub(crate) key_on: Option<(String, Arc<str>)>,
    /// At the end of input: the keys still to flush.
    eof_keys: Option<Vec<Arc<str>>>,
}

/// At the end of input, keys flushed before their results go on.
const EOF_KEYS_AT_ONCE: usize = 4096;

impl WindowOp {
    pub(crate) fn new(step_id: String, plan: WindowPlan, location: Arc<str>) -> WindowOp {
        WindowOp {
            location,
            plan,
            keys: HashMap::default(),
            py_states: Some(HashMap::default()),
            deadlines: Default::default(),
            deadline_of: HashMap::default(),
            dirty: Default::default(),
            step: Arc::from(step_id.as_str()),
            step_id,
            late_out: true,
            meta_out: true,
            key_on: None,
            eof_keys: None,
        }
    }

    fn new_key(windower: &WindowerSpec, now: Instant) -> KeyState {
        KeyState {
            touched: None,
            clock: Clock {
                base: i64::MIN,
                moved_at: now,
            },
            windows: match windower {
                WindowerSpec::Sliding { .. } => Windows::Sliding(Default::default()),
                WindowerSpec::Session { .. } => Windows::Session(Box::new(Sessions {
                    max_id: LATE_SESSION_ID,
                    sessions: BTreeMap::new(),
                    merges: Vec::new(),
                })),
            },
            queue: Queue::new(),
            accs: Accs::new(),
        }
    }

    /// Timestamps for a batch of values; `Err` items are skipped.
    fn timestamps(&self, cx: &Cx, values: Keyed, wall_now: Micros) -> (Keyed, Vec<Option<Micros>>) {
        match &self.plan.clock {
            ClockSpec::System => {
                let n = values.len();
                (values, vec![Some(wall_now); n])
            }
            ClockSpec::Event {
                getter: TsGetter::Field { name, unit },
                ..
            } => {
                let stamps = values
                    .iter()
                    .map(|(_, v, at)| match field_ts(v, name, *unit) {
                        Ok(ts) => Some(ts),
                        Err(why) => {
                            cx.skip(&self.step_id, "bad_timestamp", *at, || why);
                            None
                        }
                    })
                    .collect();
                (values, stamps)
            }
            ClockSpec::Event {
                getter: TsGetter::Py(f),
                ..
            } => {
                let f = f.clone();
                let file = cx.file.clone();
                let location = self.location.clone();
                let n = values.len();
                let res = cx.python(&self.step_id, move |py| {
                    let f = f.bind(py);
                    let stamps = values
                        .iter()
                        .map(|(_, v, _)| {
                            if crate::python::watchdog::interrupted() {
                                return Err(ItemError::Interrupted);
                            }
                            let fail =
                                |e: PyErr| ItemError::Py(PyFailure::capture(py, &e, &file).or_at(&file, &location));
                            let r = f.call1((to_py(py, v).map_err(fail)?,)).map_err(fail)?;
                            micros(&r).map_err(|m| ItemError::Shape(format!("timestamp getter: {m}")))
                        })
                        .collect::<Vec<Result<Micros, ItemError>>>();
                    (values, stamps)
                });
                match res {
                    Ok((values, list)) => {
                        let skipped = list.iter().filter(|r| matches!(r, Err(ItemError::Interrupted))).count();
                        cx.timed_out(&self.step_id, skipped as u64);
                        let stamps = list
                            .into_iter()
                            .zip(&values)
                            .map(|(r, (_, _, at))| match r {
                                Ok(ts) => Some(ts),
                                Err(ItemError::Py(f)) => {
                                    cx.py_error(&self.step_id, *at, &f, "item skipped");
                                    None
                                }
                                Err(ItemError::Shape(m)) => {
                                    cx.skip(&self.step_id, "bad_timestamp", *at, || m);
                                    None
                                }
                                Err(ItemError::Interrupted) => None,
                            })
                            .collect();
                        (values, stamps)
                    }
                    Err(e) => {
                        tracing::error!(
                            "flow {} step {:?}: timestamps of a batch failed: {e}",
                            cx.flow_id,
                            self.step_id
                        );
                        (Vec::new(), vec![None; n])
                    }
                }
            }
        }
    }
}

/// The watermark of `clock` at `now` (replay: from the data alone).
fn watermark(spec: &ClockSpec, live: bool, clock: &Clock, now: Instant, wall_now: Micros) -> Micros {
    match spec {
        ClockSpec::System => wall_now,
        ClockSpec::Event { .. } if live && clock.base != i64::MIN => {
            let idle = now
                .saturating_duration_since(clock.moved_at)
                .as_micros()
                .min(i64::MAX as u128) as i64;
            clock.base.saturating_add(idle)
        }
        ClockSpec::Event { .. } => clock.base,
    }
}

impl WindowOp {
    /// Close times and queue entries become due: flush `key` at `wm`.
    fn flush_key(&mut self, cx: &Cx, key: &Arc<str>, wm: Micros, out: &mut Out, actions: &mut Vec<PyAction>) {
        let plan = &self.plan;
        let Some(ks) = self.keys.get_mut(key) else {
            self.refresh_deadline(key);
            return;
        };
        if cx.durable {
            self.dirty.insert(key.clone());
        }
        let mut graveyard = cx.graveyard.borrow_mut();
        // The queue is kept sorted when ordered, so the due entries are a prefix.
        let n_due = if plan.ordered {
            ks.queue.partition_point(|q| q.ts <= wm)
        } else {
            ks.queue.len()
        };
        for q in ks.queue.drain(..n_due) {
            let ids = open_for(&plan.windower, &mut ks.windows, q.ts);
            let n = ids.clone().count();
            let mut value = Some(q.value);
            for (i, id) in ids.into_iter().enumerate() {
                let v = if i + 1 == n {
                    value.take().expect("value")
                } else {
                    value.clone().expect("value")
                };
                match &plan.logic {
                    LogicSpec::Fold { .. } => actions.push(PyAction::Fold {
                        key: key.clone(),
                        id,
                        value: v,
                        at: q.at,
                    }),
                    LogicSpec::Count => {
                        if let Acc::Count(c) = acc_entry(&mut ks.accs, id, || Acc::Count(0)) {
                            *c += 1;
                        }
                        graveyard.push(Item::new(v, q.at));
                    }
                    LogicSpec::Aggregate(spec) => {
                        if let Acc::Agg(a) = acc_entry(&mut ks.accs, id, || Acc::Agg(Box::new(AggAcc::new(spec)))) {
                            a.add_queued(spec, &v);
                        }
                        graveyard.push(Item::new(v, q.at));
                    }
                }
            }
        }
        if let Windows::Session(sessions) = &mut ks.windows {
            for (from, into) in std::mem::take(&mut sessions.merges) {
                if from == into {
                    continue;
                }
                match &plan.logic {
                    LogicSpec::Fold { .. } => actions.push(PyAction::Merge {
                        key: key.clone(),
                        from,
                        into,
                    }),
                    _ => {
                        if let Some(src) = acc_take(&mut ks.accs, from) {
                            match (ks.accs.iter_mut().find(|(i, _)| *i == into), src) {
                                (Some((_, Acc::Count(a))), Acc::Count(b)) => *a += b,
                                (Some((_, Acc::Agg(a))), Acc::Agg(b)) => a.merge(*b),
                                (None, src) => ks.accs.push((into, src)),
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        for (id, meta) in close_for(&plan.windower, &mut ks.windows, wm) {
            match &plan.logic {
                LogicSpec::Fold { .. } => actions.push(PyAction::Close { key: key.clone(), id }),
                LogicSpec::Count => {
                    let n = match acc_take(&mut ks.accs, id) {
                        Some(Acc::Count(n)) => n,
                        _ => 0,
                    };
                    out.ports[0].push(emit(key, id, Value::Int(n)));
                }
                LogicSpec::Aggregate(spec) => {
                    let r = match acc_take(&mut ks.accs, id) {
                        Some(Acc::Agg(a)) => a.result(spec),
                        _ => AggAcc::new(spec).result(spec),
                    };
                    out.ports[0].push(emit(key, id, r));
                }
            }
            if self.meta_out {
                out.ports[2].push(emit(key, id, Value::Meta(Box::new(meta))));
            }
        }
        // A key with nothing open is forgotten (Bytewax does the same for
        // tumbling/sliding windows; for sessions it also bounds memory).
        let empty = ks.queue.is_empty()
            && match &ks.windows {
                Windows::Sliding(open) => open.is_empty(),
                Windows::Session(s) => s.sessions.is_empty(),
            };
        if empty {
            self.keys.remove(key);
        }
        // Replay takes time from the data alone: no deadlines to keep.
        if cx.live {
            self.refresh_deadline(key);
        }
    }

    /// Recompute `key`'s place in `deadlines` after it changed (or went).
    fn refresh_deadline(&mut self, key: &Arc<str>) {
        let next = self
            .keys
            .get(key)
            .and_then(|ks| self.key_deadline(ks, Instant::now(), time::now_utc()));
        if let Some(old) = self.deadline_of.remove(key) {
            self.deadlines.remove(&(old, key.clone()));
        }
        if let Some(at) = next {
            self.deadlines.insert((at, key.clone()));
            self.deadline_of.insert(key.clone(), at);
        }
    }

    /// Run the batch's Python accumulator work in one job.
    fn run_py(&mut self, cx: &Cx, actions: Vec<PyAction>, out: &mut Out) {
        if actions.is_empty() {
            return;
        }
        let LogicSpec::Fold {
            builder,
            folder,
            merger,
        } = &self.plan.logic
        else {
            return;
        };
        let (builder, folder, merger) = (builder.clone(), folder.clone(), merger.clone());
        let file = cx.file.clone();
        let location = self.location.clone();
        let mut states = self.py_states.take().unwrap_or_default();
        let res = cx.python(&self.step_id, move |py| {
            let mut emitted: Vec<(Arc<str>, i64, Value)> = Vec::new();
            let mut not_folded = 0u64;
            let mut errors: Vec<(Origin, PyFailure, &'static str)> = Vec::new();
            let mut husks: Vec<Item> = Vec::new();
            let fail = |e: PyErr| PyFailure::capture(py, &e, &file).or_at(&file, &location);
            for action in actions {
                match action {
                    PyAction::Fold { value, at, .. } if crate::python::watchdog::interrupted() => {
                        not_folded += 1;
                        husks.push(Item::new(value, at));
                    }
                    PyAction::Fold { key, id, value, at } => {
                        let slot = match states.entry((key, id)) {
                            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                            std::collections::hash_map::Entry::Vacant(v) => match builder.bind(py).call0() {
                                Ok(a) => v.insert(Arc::new(a.unbind())),
                                Err(e) => {
                                    errors.push((at, fail(e), "item skipped (builder failed)"));
                                    continue;
                                }
                            },
                        };
                        let r = to_py(py, &value).and_then(|v| folder.bind(py).call1((slot.bind(py), v)));
                        match r {
                            Ok(new) => *slot = Arc::new(new.unbind()),
                            Err(e) => errors.push((at, fail(e), "item skipped, window state kept")),
                        }
                        husks.push(Item::new(value, at));
                    }
                    PyAction::Merge { key, from, into } => {
                        let Some(src) = states.remove(&(key.clone(), from)) else {
                            continue;
                        };
                        let Some(dst) = states.remove(&(key.clone(), into)) else {
                            states.insert((key, into), src);
                            continue;
                        };
                        match merger.bind(py).call1((dst.bind(py), src.bind(py))) {
                            Ok(m) => {
                                states.insert((key, into), Arc::new(m.unbind()));
                            }
                            Err(e) => {
                                errors.push((Origin::default(), fail(e), "merged window's values dropped"));
                                states.insert((key, into), dst);
                            }
                        }
                    }
                    PyAction::Close { key, id } => {
                        let v = match states.remove(&(key.clone(), id)) {
                            Some(acc) => from_py(acc.bind(py)),
                            None => match builder.bind(py).call0() {
                                Ok(a) => from_py(&a),
                                Err(e) => {
                                    errors.push((Origin::default(), fail(e), "window emitted nothing"));
                                    continue;
                                }
                            },
                        };
                        emitted.push((key, id, v));
                    }
                }
            }
            (emitted, errors, states, husks, not_folded)
        });
        match res {
            Ok((emitted, errors, states, husks, not_folded)) => {
                cx.timed_out(&self.step_id, not_folded);
                self.py_states = Some(states);
                cx.bury(husks);
                for (key, id, v) in emitted {
                    out.ports[0].push(emit(&key, id, v));
                }
                for (at, f, fate) in errors {
                    cx.py_error(&self.step_id, at, &f, fate);
                }
            }
            Err(e) => {
                tracing::error!("flow {} step {:?}: window state lost: {e}", cx.flow_id, self.step_id);
                self.py_states = Some(HashMap::default());
            }
        }
    }

    /// The system instant at which `ks` next needs a flush.
    fn key_deadline(&self, ks: &KeyState, now: Instant, wall_now: Micros) -> Option<Instant> {
        let close_due = match (&ks.windows, self.plan.windower) {
            // Ids ascend, and so do close times.
            (Windows::Sliding(open), spec) => open.first().map(|id| sliding_meta(&spec, *id).close),
            (Windows::Session(s), WindowerSpec::Session { gap }) => s
                .sessions
                .values()
                .map(|m| m.close.saturating_add(gap).saturating_add(1))
                .min(),
            _ => None,
        };
        let queue_due = if self.plan.ordered {
            ks.queue.iter().map(|q| q.ts).min()
        } else {
            None
        };
        let due = match (close_due, queue_due) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        let (from, wm_then) = match self.plan.clock {
            ClockSpec::System => (now, wall_now),
            ClockSpec::Event { .. } => (ks.clock.moved_at, ks.clock.base),
        };
        if wm_then == i64::MIN {
            return None;
        }
        let wait = due.saturating_sub(wm_then).max(0) as u64;
        Some(from + Duration::from_micros(wait))
    }
}

fn emit(key: &Arc<str>, id: i64, v: Value) -> Item {
    Item::new(
        Value::keyed(key.clone(), Value::Tuple(vec![Value::Int(id), v])),
        Origin::default(),
    )
}

/// Read a timestamp field in Rust.
fn field_ts(v: &Value, name: &str, unit: TsUnit) -> Result<Micros, String> {
    let Some(raw) = v.field(name) else {
        return Err(if matches!(v, Value::Map(_)) {
            format!("no timestamp field {name:?}")
        } else {
            format!(
                "expects dict values with a timestamp field {name:?}; got a {}",
                v.type_name()
            )
        });
    };
    // Floats are scaled in double precision and rounded half to even, as
    // Python's datetime.fromtimestamp rounds.
    let scale = |x: f64, per_sec: f64| -> Result<Micros, String> {
        let us = (x * (1e6 / per_sec)).round_ties_even();
        if us.is_finite() && us.abs() < 9.2e18 {
            Ok(us as i64)
        } else {
            Err(format!("timestamp field {name:?} is out of range: {x}"))
        }
    };
    let us = match (raw, unit) {
        (Value::DateTime(us), _) => Ok(*us),
        (Value::Int(n), TsUnit::Seconds) => n
            .checked_mul(1_000_000)
            .ok_or_else(|| format!("timestamp {n} s is out of range")),
        (Value::Int(n), TsUnit::Millis) => n
            .checked_mul(1_000)
            .ok_or_else(|| format!("timestamp {n} ms is out of range")),
        (Value::Int(n), TsUnit::Micros) => Ok(*n),
        (Value::Int(n), TsUnit::Nanos) => Ok(n.div_euclid(1_000)),
        (Value::Float(x), TsUnit::Seconds) => scale(*x, 1.0),
        (Value::Float(x), TsUnit::Millis) => scale(*x, 1e3),
        (Value::Float(x), TsUnit::Micros) => scale(*x, 1e6),
        (Value::Float(x), TsUnit::Nanos) => scale(*x, 1e9),
        (Value::Str(s), TsUnit::Iso8601) => {
            time::parse_iso(s).ok_or_else(|| format!("timestamp field {name:?} is not ISO 8601 text: {s:?}"))
        }
        (other, unit) => Err(format!(
            "timestamp field {name:?} is a {} but the clock's unit is {unit:?}",
            other.type_name()
        )),
    }?;
    // The range of Python's datetime (years 1 to 9999).
    if !(PY_MIN_MICROS..=PY_MAX_MICROS).contains(&us) {
        return Err(format!("timestamp field {name:?} is outside the years 1 to 9999"));
    }
    Ok(us)
}

const PY_MIN_MICROS: Micros = -62_135_596_800_000_000;
const PY_MAX_MICROS: Micros = 253_402_300_799_999_999;

/// Window ids of a tumbling/sliding windower that contain `ts`.
fn intersects(length: Micros, offset: Micros, align: Micros, ts: Micros) -> std::ops::RangeInclusive<i64> {
    let since = ts.saturating_sub(align);
    let first = since.saturating_sub(length).div_euclid(offset) + 1;
    let last = since.div_euclid(offset);
    first..=last
}

fn open_for(spec: &WindowerSpec, windows: &mut Windows, ts: Micros) -> std::ops::RangeInclusive<i64> {
    match (spec, windows) {
        (WindowerSpec::Sliding { length, offset, align }, Windows::Sliding(open)) => {
            let ids = intersects(*length, *offset, *align, ts);
            for id in ids.clone() {
                if let Err(at) = open.binary_search(&id) {
                    open.insert(at, id);
                }
            }
            ids
        }
        (WindowerSpec::Session { gap }, Windows::Session(s)) => {
            let Sessions {
                max_id,
                sessions,
                merges,
            } = &mut **s;
            for (id, meta) in sessions.iter_mut() {
                let until_open = meta.open - ts;
                let since_close = ts - meta.close;
                if until_open <= 0 && since_close <= 0 {
                    return *id..=*id;
                } else if until_open > 0 && until_open <= *gap {
                    meta.open = ts;
                    let id = *id;
                    find_merges(sessions, *gap, merges);
                    return id..=id;
                } else if since_close > 0 && since_close <= *gap {
                    meta.close = ts;
                    let id = *id;
                    find_merges(sessions, *gap, merges);
                    return id..=id;
                }
            }
            *max_id += 1;
            sessions.insert(
                *max_id,
                WindowMeta {
                    open: ts,
                    close: ts,
                    merged_ids: Vec::new(),
                },
            );
            *max_id..=*max_id
        }
        #[allow(clippy::reversed_empty_ranges)]
        _ => 1..=0,
    }
}

/// Merge sessions that now lie within `gap` of each other (Bytewax's rule:
/// sort by open time, fold each into the previous if close enough).
fn find_merges(sessions: &mut BTreeMap<i64, WindowMeta>, gap: Micros, merges: &mut Vec<(i64, i64)>) {
    if sessions.len() < 2 {
        return;
    }
    let mut order: Vec<(i64, Micros)> = sessions.iter().map(|(id, m)| (*id, m.open)).collect();
    order.sort_by_key(|(_, open)| *open);
    let mut last = order[0].0;
    for (this, _) in order.into_iter().skip(1) {
        let (this_open, this_close) = {
            let m = &sessions[&this];
            (m.open, m.close)
        };
        let last_close = sessions[&last].close;
        if this_open - last_close <= gap {
            let l = sessions.get_mut(&last).expect("session");
            l.close = l.close.max(this_close);
            l.merged_ids.push(this);
            merges.push((this, last));
            sessions.remove(&this);
        } else {
            last = this;
        }
    }
}

fn close_for(spec: &WindowerSpec, windows: &mut Windows, wm: Micros) -> Vec<(i64, WindowMeta)> {
    match (spec, windows) {
        (WindowerSpec::Sliding { .. }, Windows::Sliding(open)) => {
            let mut closed = Vec::new();
            open.retain(|id| {
                let meta = sliding_meta(spec, *id);
                let close = meta.close <= wm;
                if close {
                    closed.push((*id, meta));
                }
                !close
            });
            closed
        }
        (WindowerSpec::Session { gap }, Windows::Session(s)) => {
            let sessions = &mut s.sessions;
            // End of input (wm = MAX) closes every session, whatever the gap.
            let close_after = if wm == i64::MAX {
                i64::MAX
            } else {
                wm.saturating_sub(*gap)
            };
            let ids: Vec<i64> = sessions
                .iter()
                .filter(|(_, m)| m.close < close_after)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter()
                .map(|id| (id, sessions.remove(&id).expect("session")))
                .collect()
        }
        _ => Vec::new(),
    }
}

fn late_ids(spec: &WindowerSpec, ts: Micros) -> Vec<i64> {
    match spec {
        WindowerSpec::Sliding { length, offset, align } => intersects(*length, *offset, *align, ts).collect(),
        WindowerSpec::Session { .. } => vec![LATE_SESSION_ID],
    }
}

impl Operator for WindowOp {
    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        let now = Instant::now();
        let wall_now = time::now_utc();
        let mut values = Vec::with_capacity(batch.len());
        match &self.key_on {
            Some((step, field)) => {
                values.extend(
                    batch
                        .into_iter()
                        .filter_map(|item| super::stateless::key_on_field(cx, step, field, item)),
                );
            }
            None => {
                for item in batch {
                    match item.v.into_keyed() {
                        Ok((k, v)) => values.push((k, v, item.at)),
                        Err(v) => cx.skip(&self.step_id, "not_keyed", item.at, || super::stateless::not_keyed(&v)),
                    }
                }
            }
        }
        if values.is_empty() {
            return;
        }
        let (values, stamps) = self.timestamps(cx, values, wall_now);
        let wait = match self.plan.clock {
            ClockSpec::Event { wait, .. } => wait,
            ClockSpec::System => 0,
        };
        // Per key, in order of first appearance; each key's state remembers
        // the watermark the batch left it at.
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut late = 0u64;
        let (plan, keys, live) = (&self.plan, &mut self.keys, cx.live);
        for ((key, value, at), ts) in values.into_iter().zip(stamps) {
            let Some(ts) = ts else { continue };
            let ks = keys
                .entry(key.clone())
                .or_insert_with(|| Box::new(Self::new_key(&plan.windower, now)));
            let mut wm = watermark(&plan.clock, live, &ks.clock, now, wall_now);
            if let ClockSpec::Event { .. } = plan.clock {
                let candidate = ts.saturating_sub(wait);
                if candidate > wm {
                    ks.clock = Clock {
                        base: candidate,
                        moved_at: now,
                    };
                    wm = candidate;
                }
            }
            if ks.touched.replace(wm).is_none() {
                touched.push(key.clone());
            }
            if ts < wm {
                late += 1;
                if self.late_out {
                    for id in late_ids(&plan.windower, ts) {
                        let item = Value::keyed(key.clone(), Value::Tuple(vec![Value::Int(id), value.clone()]));
                        out.ports[1].push(Item::new(item, at));
                    }
                }
                cx.bury([Item::new(value, at)]);
            } else {
                // Native steps keep only what they read: a key may wait with
                // a value queued for as long as its next reading, and
                // checkpoints write less. The rest goes back to the source
                // thread to be freed.
                let value = match &plan.logic {
                    LogicSpec::Count => {
                        cx.bury([Item::new(value, at)]);
                        Value::Null
                    }
                    LogicSpec::Aggregate(spec) => {
                        let mut rest = None;
                        let v = AggAcc::queued(spec, value, &mut rest);
                        cx.bury(rest.map(|r| Item::new(r, at)));
                        v
                    }
                    LogicSpec::Fold { .. } => value,
                };
                let q = Queued { value, ts, at };
                if plan.ordered && ks.queue.last().is_some_and(|last| last.ts > ts) {
                    // Out of order: find its place (after equal timestamps).
                    let pos = ks.queue.partition_point(|e| e.ts <= ts);
                    ks.queue.insert(pos, q);
                } else {
                    ks.queue.push(q);
                }
            }
        }
        cx.counters.add(&format!("{}.late", self.step_id), late);
        let mut actions = Vec::new();
        for key in touched {
            let wm = self.keys.get_mut(&key).and_then(|ks| ks.touched.take());
            if let Some(wm) = wm {
                self.flush_key(cx, &key, wm, out, &mut actions);
            }
        }
        self.run_py(cx, actions, out);
    }

    fn on_eof(&mut self, cx: &Cx, out: &mut Out) -> bool {
        let mut keys = self.eof_keys.take().unwrap_or_else(|| {
            let mut keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
            // Descending, so that popping goes in key order.
            keys.sort_unstable_by(|a, b| b.cmp(a));
            keys
        });
        let mut actions = Vec::new();
        for _ in 0..EOF_KEYS_AT_ONCE {
            let Some(key) = keys.pop() else { break };
            self.flush_key(cx, &key, i64::MAX, out, &mut actions);
        }
        self.run_py(cx, actions, out);
        let more = !keys.is_empty();
        if more {
            self.eof_keys = Some(keys);
        }
        more
    }

    fn on_tick(&mut self, cx: &Cx, now: Instant, out: &mut Out) {
        let wall_now = time::now_utc();
        let due: Vec<(Arc<str>, Micros)> = self
            .deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, k)| {
                // A key that is gone has no watermark; flush_key drops its entry.
                let wm = self.keys.get(k).map_or(i64::MIN, |ks| {
                    watermark(&self.plan.clock, cx.live, &ks.clock, now, wall_now)
                });
                (k.clone(), wm)
            })
            .collect();
        let mut actions = Vec::new();
        for (key, wm) in due {
            self.flush_key(cx, &key, wm, out, &mut actions);
        }
        self.run_py(cx, actions, out);
    }

    fn deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    fn snapshot(&mut self, cx: &Cx, snap: &mut Snap) {
        let clock = cx.clock.get();
        let empty = PyStates::default();
        let py_states = self.py_states.as_ref().unwrap_or(&empty);
        for key in self.dirty.drain() {
            let row = format!("k:{key}");
            let Some(ks) = self.keys.get(&key) else {
                snap.delete(&self.step, row);
                continue;
            };
            let mut e = Enc::default();
            encode_key(&mut e, ks, &self.plan.windower, clock);
            let ids: Vec<i64> = match &ks.windows {
                Windows::Sliding(open) => open.to_vec(),
                Windows::Session(s) => s.sessions.keys().copied().collect(),
            };
            let held: Vec<(i64, &Arc<Py<PyAny>>)> = ids
                .into_iter()
                .filter_map(|id| py_states.get(&(key.clone(), id)).map(|a| (id, a)))
                .collect();
            e.u(held.len() as u64);
            for (id, acc) in held {
                e.i(id);
                e.obj(acc.clone());
            }
            snap.put(&self.step, row, e);
        }
    }

    fn restore(&mut self, cx: &Cx, rows: Vec<(String, Vec<u8>)>) -> Restored {
        let windower = self.plan.windower;
        let agg = match &self.plan.logic {
            LogicSpec::Aggregate(a) => Some(a.clone()),
            _ => None,
        };
        let needs_py = snapshot::any_objects(&rows);
        let clock = cx.clock.get();
        let decode_all = move |py: Option<Python<'_>>| {
            let now = Instant::now();
            snapshot::key_rows(rows, py, |d| {
                let ks = decode_key(d, &windower, agg.as_ref(), clock, now)?;
                let n = d.n()?;
                let mut accs = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = d.i()?;
                    if let Some(o) = d.obj()? {
                        accs.push((id, Arc::new(o)));
                    }
                }
                Ok((ks, accs))
            })
        };
        let decoded = if needs_py {
            match cx.python(&self.step_id, move |py| decode_all(Some(py))) {
                Ok(d) => d,
                Err(e) => {
                    cx.state_error(&self.step_id, || format!("cannot restore the window state: {e}"));
                    return Restored {
                        bad_rows: 1,
                        ..Restored::default()
                    };
                }
            }
        } else {
            decode_all(None)
        };
        let mut done = Restored::default();
        let py_states = self.py_states.get_or_insert_with(Default::default);
        for (row, r) in decoded {
            match r {
                Ok((key, (ks, accs))) => {
                    done.keys += 1;
                    done.windows += match &ks.windows {
                        Windows::Sliding(open) => open.len(),
                        Windows::Session(s) => s.sessions.len(),
                    } as u64;
                    done.queued += ks.queue.len() as u64;
                    for (id, acc) in accs {
                        py_states.insert((key.clone(), id), acc);
                    }
                    self.keys.insert(key, Box::new(ks));
                }
                Err(why) => {
                    done.bad_rows += 1;
                    cx.state_error(&self.step_id, || {
                        format!("saved state row {row:?} cannot be read ({why}); that key starts empty")
                    });
                }
            }
        }
        if cx.live {
            let keys: Vec<Arc<str>> = self.keys.keys().cloned().collect();
            for k in keys {
                self.refresh_deadline(&k);
            }
        }
        done
    }
}

/// One key's windows, queue, clock and native accumulators, for the store.
fn encode_key(e: &mut Enc, ks: &KeyState, spec: &WindowerSpec, clock: snapshot::EngineClock) {
    e.i(ks.clock.base);
    e.i(clock.at(ks.clock.moved_at));
    match &ks.windows {
        Windows::Sliding(open) => {
            e.u(0);
            e.u(open.len() as u64);
            for id in open {
                e.i(*id);
                e.meta(&sliding_meta(spec, *id));
            }
        }
        Windows::Session(s) => {
            let Sessions {
                max_id,
                sessions,
                merges,
            } = &**s;
            e.u(1);
            e.i(*max_id);
            e.u(sessions.len() as u64);
            for (id, m) in sessions {
                e.i(*id);
                e.meta(m);
            }
            e.u(merges.len() as u64);
            for (a, b) in merges {
                e.i(*a);
                e.i(*b);
            }
        }
    }
    e.u(ks.queue.len() as u64);
    for q in &ks.queue {
        e.i(q.ts);
        e.u(q.at.src as u64);
        e.u(q.at.line);
        e.value(&q.value);
    }
    e.u(ks.accs.len() as u64);
    for (id, acc) in &ks.accs {
        e.i(*id);
        match acc {
            Acc::Count(n) => {
                e.u(0);
                e.i(*n);
            }
            Acc::Agg(a) => {
                e.u(1);
                a.encode(e);
            }
        }
    }
}

fn decode_key(
    d: &mut Dec<'_>,
    windower: &WindowerSpec,
    agg: Option<&AggSpec>,
    clock: snapshot::EngineClock,
    now: Instant,
) -> DecResult<KeyState> {
    let base = d.i()?;
    let moved_at = clock.instant(d.i()?, now);
    let windows = match (d.u()?, windower) {
        (0, WindowerSpec::Sliding { .. }) => {
            let n = d.n()?;
            let mut open = smallvec::SmallVec::<[i64; 2]>::with_capacity(n.min(1024));
            for _ in 0..n {
                let id = d.i()?;
                d.meta()?; // the times follow from the windower
                open.push(id);
            }
            open.sort_unstable();
            open.dedup();
            Windows::Sliding(open)
        }
        (1, WindowerSpec::Session { .. }) => {
            let max_id = d.i()?;
            let n = d.n()?;
            let mut sessions = BTreeMap::new();
            for _ in 0..n {
                let id = d.i()?;
                sessions.insert(id, d.meta()?);
            }
            let n = d.n()?;
            let merges = (0..n)
                .map(|_| Ok((d.i()?, d.i()?)))
                .collect::<DecResult<Vec<(i64, i64)>>>()?;
            Windows::Session(Box::new(Sessions {
                max_id,
                sessions,
                merges,
            }))
        }
        (t, _) => return Err(format!("window kind {t} does not match the step's windower")),
    };
    let n = d.n()?;
    let mut queue = Queue::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let ts = d.i()?;
        let src = d.u()? as u32;
        let line = d.u()?;
        let mut value = d.value()?;
        if let (Some(spec), Value::Map(_)) = (agg, &value) {
            // Saved before queued values were kept in `AggAcc::queued`'s
            // form (a dict of the aggregated fields), or a dict of several.
            value = AggAcc::queued(spec, value, &mut None);
        }
        queue.push(Queued {
            value,
            ts,
            at: Origin { src, line },
        });
    }
    let n = d.n()?;
    let mut accs = Accs::with_capacity(n.min(1024));
    for _ in 0..n {
        let id = d.i()?;
        let acc = match (d.u()?, agg) {
            (0, _) => Acc::Count(d.i()?),
            (1, Some(spec)) => Acc::Agg(Box::new(AggAcc::decode(d, spec)?)),
            (t, _) => return Err(format!("accumulator kind {t} does not match the step")),
        };
        accs.retain(|(i, _)| *i != id);
        accs.push((id, acc));
    }
    Ok(KeyState {
        clock: Clock { base, moved_at },
        windows,
        queue,
        accs,
        touched: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_ids_follow_bytewax_alignment_including_negative_ids() {
        // length 10, offset 5, aligned at 0: ts 12 is in [5,15) id 1 and [10,20) id 2.
        assert_eq!(intersects(10, 5, 0, 12).collect::<Vec<_>>(), vec![1, 2]);
        // Open inclusive, close exclusive: ts 10 is in [5,15) and [10,20), not [0,10).
        assert_eq!(intersects(10, 5, 0, 10).collect::<Vec<_>>(), vec![1, 2]);
        // Before the alignment point ids are negative.
        assert_eq!(intersects(10, 10, 100, 95).collect::<Vec<_>>(), vec![-1]);
    }

    #[test]
    fn sessions_that_grow_into_each_other_merge_into_the_older_one() {
        let spec = WindowerSpec::Session { gap: 10 };
        let mut w = Windows::Session(Box::new(Sessions {
            max_id: LATE_SESSION_ID,
            sessions: BTreeMap::new(),
            merges: Vec::new(),
        }));
        assert_eq!(open_for(&spec, &mut w, 0), 0..=0);
        assert_eq!(open_for(&spec, &mut w, 20), 1..=1);
        // 10 extends session 0 to [0,10], which is now within 10 of session 1.
        assert_eq!(open_for(&spec, &mut w, 10), 0..=0);
        let Windows::Session(s) = &w else { unreachable!() };
        let Sessions { sessions, merges, .. } = &**s;
        assert_eq!(merges, &vec![(1, 0)]);
        assert_eq!(
            sessions[&0],
            WindowMeta {
                open: 0,
                close: 20,
                merged_ids: vec![1]
            }
        );
    }

    #[test]
    fn timestamp_fields_are_read_in_the_clocks_unit() {
        let v = |x: Value| Value::Map(vec![(Arc::from("ts"), x)]);
        assert_eq!(field_ts(&v(Value::Int(2)), "ts", TsUnit::Seconds), Ok(2_000_000));
        assert_eq!(field_ts(&v(Value::Float(1.5)), "ts", TsUnit::Millis), Ok(1_500));
        assert_eq!(field_ts(&v(Value::Int(1_999)), "ts", TsUnit::Nanos), Ok(1));
        assert_eq!(
            field_ts(&v(Value::str("1970-01-01T00:00:01Z")), "ts", TsUnit::Iso8601),
            Ok(1_000_000)
        );
        assert!(field_ts(&v(Value::str("soon")), "ts", TsUnit::Seconds).is_err());
        assert!(field_ts(&Value::Map(vec![]), "ts", TsUnit::Seconds).is_err());
    }
}
