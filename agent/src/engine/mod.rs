//! The flow runtime: a graph of operators fed with batches.
//!
//! Each flow runs on its own engine thread. Sources (tokio tasks or
//! blocking readers) send batches through one bounded channel, which is the
//! backpressure; the engine pushes each batch through the graph, calling
//! the Python thread once per batch at each Python step. Window timers are
//! deadlines the engine sleeps until — nothing polls.

mod agg;
mod collect;
mod fingerprint;
mod graph;
pub(crate) mod snapshot;
mod stateless;
mod window;

use std::sync::Arc;
use std::time::Instant;

use crate::metrics::{Counters, Warnings};
use crate::python::error::PyFailure;
use crate::python::PyRunner;
use crate::value::{Item, Origin};

pub(crate) use fingerprint::unpicklable_accumulators;
pub(crate) use graph::{heartbeat_now, run_flow, Durable, FlowOptions, FlowReport, OutputMode};

/// What one step hands on: a batch per output port.
pub(crate) struct Out {
    pub ports: Vec<Vec<Item>>,
}

impl Out {
    fn new(n: usize) -> Out {
        Out {
            ports: (0..n).map(|_| Vec::new()).collect(),
        }
    }
}

/// A step at run time.
pub(crate) trait Operator: Send {
    /// Handle a batch arriving on input `port`.
    fn on_batch(&mut self, cx: &Cx, port: usize, batch: Vec<Item>, out: &mut Out);
    /// Every input has ended: emit what is left (windows flush here).
    /// Returns true to be called again after `out` went on (a step with
    /// many keys hands its last results on in parts, bounding memory).
    fn on_eof(&mut self, _cx: &Cx, _out: &mut Out) -> bool {
        false
    }
    /// A deadline of this step has passed.
    fn on_tick(&mut self, _cx: &Cx, _now: Instant, _out: &mut Out) {}
    /// When this step next needs `on_tick` (live mode only).
    fn deadline(&self) -> Option<Instant> {
        None
    }
    /// Make written output visible (sinks).
    fn flush(&mut self, _cx: &Cx) {}
    /// Whether output waits for a checkpoint to be committed (MQTT sinks:
    /// then the engine checkpoints at once instead of at the interval).
    fn has_pending(&self) -> bool {
        false
    }
    /// Put what changed since the last checkpoint into `snap` (stateful
    /// steps and sinks whose output is committed with the state).
    fn snapshot(&mut self, _cx: &Cx, _snap: &mut Snap) {}
    /// A row to save before any input when the step has none yet (a file
    /// sink's current length).
    fn baseline(&mut self) -> Option<(String, Vec<u8>)> {
        None
    }
    /// Take the rows the store holds for this step (before any input).
    /// Returns what was restored, for the log line.
    fn restore(&mut self, _cx: &Cx, _rows: Vec<(String, Vec<u8>)>) -> Restored {
        Restored::default()
    }
}

/// What one checkpoint commits for a flow.
#[derive(Default)]
pub(crate) struct Snap {
    /// Rows to put (their Python objects are pickled before the commit).
    pub rows: Vec<snapshot::PendingRow>,
    /// Rows to delete: (step, row).
    pub deletes: Vec<(Arc<str>, String)>,
    /// Other operations of the same commit (outbox appends).
    pub ops: Vec<crate::store::Op>,
    /// Called with the outcome once the commit is done (or failed).
    pub after: Vec<Box<dyn FnOnce(bool) + Send>>,
    /// Set by a step that cannot complete this checkpoint: nothing of it is
    /// committed (the state stays at the last one).
    pub abort: Option<String>,
}

impl Snap {
    pub(crate) fn put(&mut self, step: &Arc<str>, row: String, enc: snapshot::Enc) {
        self.rows.push(snapshot::PendingRow {
            step: step.clone(),
            row,
            enc,
        });
    }
    pub(crate) fn delete(&mut self, step: &Arc<str>, row: String) {
        self.deletes.push((step.clone(), row));
    }
}

/// What a step restored (summed for the flow's log line).
#[derive(Default, Clone, Copy)]
pub(crate) struct Restored {
    pub keys: u64,
    pub windows: u64,
    pub queued: u64,
    pub bad_rows: u64,
}

impl std::ops::AddAssign for Restored {
    fn add_assign(&mut self, o: Restored) {
        self.keys += o.keys;
        self.windows += o.windows;
        self.queued += o.queued;
        self.bad_rows += o.bad_rows;
    }
}

/// What every operator of a flow may use.
pub(crate) struct Cx {
    pub py: PyRunner,
    /// The flow's heartbeat (`run`): long waits that are not a wedge (an
    /// MQTT sink waiting for outbox room) beat it too.
    pub heartbeat: Option<Arc<std::sync::atomic::AtomicU64>>,
    pub flow_id: Arc<str>,
    /// The flow file as given; tracebacks are matched against it.
    pub file: Arc<str>,
    pub counters: Counters,
    pub warnings: Warnings,
    /// Names of item origins (index 0 is "made by a step").
    pub origins: Arc<Vec<String>>,
    /// Live (`run`): watermarks also advance with the monotonic clock and
    /// timers fire. Replay: time comes from the data alone.
    pub live: bool,
    /// The flow's state is kept in the store (`run`): steps track what
    /// changed since the last checkpoint.
    pub durable: bool,
    /// A Python job of this flow was interrupted while runnel stopped: its
    /// batch is half done, so no last checkpoint may be taken.
    pub struck_while_stopping: std::cell::Cell<bool>,
    /// The flow's running-time clock for saved state (`snapshot::EngineClock`).
    pub clock: std::cell::Cell<snapshot::EngineClock>,
    /// Items steps are done with; the engine hands them back to the
    /// sources that allocated them (see `SourceCtx::returns`).
    pub graveyard: std::cell::RefCell<Vec<Item>>,
}

impl Cx {
    /// Run a job on the Python thread, counting it (`python.jobs` in the
    /// summary): a flow calls Python once per batch and Python step, never
    /// once per item, and none at all on the native path.
    ///
    /// The job is interrupted past `python_step_timeout`; its remaining
    /// items then take the fate of a raising function (see `ItemError::Interrupted`).
    pub(crate) fn python<R, F>(&self, step: &str, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(pyo3::Python<'_>) -> R + Send + 'static,
    {
        self.counters.add("python.jobs", 1);
        let (r, struck) = self
            .py
            .run_step(format!("flow {} step {step:?}", self.flow_id), move |py| {
                let r = f(py);
                (r, crate::python::watchdog::interrupted())
            })?;
        if struck && self.py.is_stopping() {
            self.struck_while_stopping.set(true);
        }
        Ok(r)
    }

    /// Count and log (rate-limited) a state row that could not be written
    /// or read (an object that cannot be pickled, a damaged row).
    pub(crate) fn state_error(&self, step: &str, message: impl FnOnce() -> String) {
        self.counters.add(&format!("{step}.state_errors"), 1);
        let key = format!("flow {} step {step}: state", self.flow_id);
        self.warnings
            .warn(&key, || format!("flow {} step {step:?}: {}", self.flow_id, message()));
    }

    /// Count and log (rate-limited) the items of a batch skipped because
    /// its Python job ran past `python_step_timeout`.
    pub(crate) fn timed_out(&self, step: &str, n: u64) {
        if n == 0 {
            return;
        }
        self.counters.add(&format!("{step}.skipped.timeout"), n);
        let key = format!("flow {} step {step}: timeout", self.flow_id);
        self.warnings.warn(&key, || {
            format!(
                "flow {} step {step:?}: its Python job was interrupted (python_step_timeout passed, or runnel is stopping); the {n} item(s) of the batch it had not reached are skipped",
                self.flow_id
            )
        });
    }

    /// A step is done with these items.
    pub(crate) fn bury(&self, items: impl IntoIterator<Item = Item>) {
        self.graveyard.borrow_mut().extend(items);
    }

    /// "data.jsonl line 12", or "" when a step made the item.
    pub(crate) fn origin(&self, at: Origin) -> String {
        match self.origins.get(at.src as usize) {
            // MQTT origins end in "message": "mqtt broker default message 17".
            Some(name) if at.src != 0 && name.ends_with(" message") => format!(" (from {name} {})", at.line),
            Some(name) if at.src != 0 => format!(" (from {name} line {})", at.line),
            _ => String::new(),
        }
    }

    /// Count and log (rate-limited) an item a step could not handle.
    pub(crate) fn skip(&self, step: &str, cause: &str, at: Origin, message: impl FnOnce() -> String) {
        self.counters.add(&format!("{step}.skipped.{cause}"), 1);
        let key = format!("flow {} step {step}: {cause}", self.flow_id);
        self.warnings.warn(&key, || {
            format!(
                "flow {} step {step:?}: {}{}; item skipped",
                self.flow_id,
                message(),
                self.origin(at)
            )
        });
    }

    /// Count and log (rate-limited) a Python exception raised by a user function.
    pub(crate) fn py_error(&self, step: &str, at: Origin, f: &PyFailure, fate: &str) {
        self.counters.add(&format!("{step}.python_errors"), 1);
        let key = format!("flow {} step {step}: python exception", self.flow_id);
        self.warnings.warn(&key, || {
            format!(
                "flow {} step {step:?}: {} at {}{}; {fate}\n{}",
                self.flow_id,
                f.message,
                f.location,
                self.origin(at),
                f.traceback.trim_end()
            )
        });
    }
}

/// A problem with one item inside a Python job: an exception, or a result
/// of the wrong shape.
pub(crate) enum ItemError {
    Py(PyFailure),
    Shape(String),
    /// Not tried: the job was interrupted before reaching this item.
    Interrupted,
}
