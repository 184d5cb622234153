//! Building a flow's operator graph from its plan, and the engine thread's
//! loop: receive a batch, push it through, sleep until the next deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::collect::CollectOp;
use super::stateless::{InputOp, KeyOnFieldOp, KeyRmOp, MergeOp, PyOp};
use super::window::WindowOp;
use super::{Cx, Operator, Out, Restored, Snap};
use crate::flow::{FlowPlan, PyOpKind, StepKind};
use crate::metrics::{Counters, Warnings};
use crate::python::PyRunner;
use crate::sinks::{OutputOp, SharedOut};
use crate::sources::{FilePos, Mark, SourceConfig, SourceCtx, SourceMsg};
use crate::store::state::StateOp;
use crate::store::{Op, Store};
use crate::value::Item;

/// Where output steps write.
pub(crate) enum OutputMode {
    /// `runnel replay`: every output step prints `{"step", "item"}` lines here.
    Replay(SharedOut),
    /// The flow's own sinks.
    Sinks,
}

pub(crate) struct FlowOptions {
    /// Live (`run`) or replay.
    pub live: bool,
    /// Sources replacing those of named input steps (`replay --input`).
    pub inputs: HashMap<String, SourceConfig>,
    pub output: OutputMode,
    /// Becomes true when the agent shuts down.
    pub stop: Option<watch::Receiver<bool>>,
    /// What MQTT sinks need (the agent's outbox); `None` outside `run`.
    pub sink_env: Option<Arc<crate::sinks::SinkEnv>>,
    /// The flow's counters (the agent reads them for its status).
    pub counters: Counters,
    /// Keep the flow's state in the store (`runnel run`).
    pub durable: Option<Durable>,
    /// Set to the time (`heartbeat_now`) each time the engine loop comes
    /// round (at least every `BEAT`, idle or not), and to `u64::MAX` when
    /// the flow has ended: the agent's watchdog tells a wedged engine by it.
    pub heartbeat: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// How often an idle engine loop still comes round to show it is alive.
pub(crate) const BEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// Milliseconds on a monotonic clock, for heartbeats.
pub(crate) fn heartbeat_now() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Where and how often a flow checkpoints.
#[derive(Clone)]
pub(crate) struct Durable {
    pub store: Store,
    /// The longest a change to the state waits for a commit.
    pub interval: std::time::Duration,
    /// Results for MQTT sinks commit at once, but no sooner than this after
    /// the previous checkpoint (`commit_gap`).
    pub gap: std::time::Duration,
}

/// What a flow did, for the summary line and tests.
pub(crate) struct FlowReport {
    pub flow_id: String,
    pub counters: BTreeMap<String, u64>,
    /// Set if the flow was stopped before its inputs ended.
    pub stopped_early: bool,
}

struct Node {
    op: Box<dyn Operator>,
    /// For each output port: the (node, input port) pairs reading it.
    consumers: Vec<Vec<(usize, usize)>>,
}

struct Engine {
    nodes: Vec<Node>,
    cx: Cx,
    /// Per origin index, the way back to the source that allocated its items.
    returns: Vec<Option<std::sync::mpsc::Sender<Vec<Item>>>>,
    cp: Checkpoints,
}

/// The engine's checkpoint bookkeeping (inert without `Durable`).
struct Checkpoints {
    durable: Option<Durable>,
    /// Step id of each input.
    input_steps: Vec<Arc<str>>,
    /// Each input's position after the last batch taken, if not yet committed.
    marks: Vec<Option<FilePos>>,
    /// MQTT messages taken since the last checkpoint, to acknowledge after it.
    held: Vec<crate::sources::MqttHeld>,
    /// Commits submitted and not yet done, oldest first.
    in_flight: std::collections::VecDeque<std::sync::mpsc::Receiver<bool>>,
    /// Notified when a commit is done (the engine's wait wakes up).
    wake: Arc<tokio::sync::Notify>,
    /// When the state first changed since the last checkpoint.
    changed_since: Option<Instant>,
    /// A checkpoint was called off while stopping: take no more.
    gave_up: bool,
    /// When the last checkpoint was taken.
    last: Instant,
}

impl Checkpoints {
    fn on(&self) -> bool {
        self.durable.is_some() && !self.gave_up
    }

    /// Results waiting for an MQTT sink are committed at once, but no
    /// sooner than this after the previous checkpoint: when many keys'
    /// windows close around one boundary (each key on its own watermark),
    /// their results share a commit instead of costing one each.
    fn gap(&self) -> std::time::Duration {
        self.durable.as_ref().map(|d| d.gap).unwrap_or_default()
    }

    fn changed(&mut self, now: Instant) {
        if self.on() && self.changed_since.is_none() {
            self.changed_since = Some(now);
        }
    }

    /// Forget commits that are done; whether none is left in flight.
    fn settled(&mut self) -> bool {
        while let Some(rx) = self.in_flight.front() {
            match rx.try_recv() {
                Err(std::sync::mpsc::TryRecvError::Empty) => return false,
                _ => {
                    self.in_flight.pop_front();
                }
            }
        }
        true
    }

    /// When the next checkpoint is due without new input (the engine
    /// sleeps until then); `None` while one is in flight (its end wakes the
    /// engine) or nothing changed.
    fn deadline(&self) -> Option<Instant> {
        let d = self.durable.as_ref()?;
        if !self.in_flight.is_empty() || self.gave_up {
            return None;
        }
        let by_change = self.changed_since.map(|t| t + d.interval);
        let now = Instant::now();
        let by_ack = self.held.iter().map(|h| h.due(now)).min();
        match (by_change, by_ack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

impl Engine {
    fn push(&mut self, node: usize, port: usize, batch: Vec<Item>) {
        if batch.is_empty() {
            return;
        }
        let mut out = Out::new(self.nodes[node].consumers.len());
        self.nodes[node].op.on_batch(&self.cx, port, batch, &mut out);
        self.route(node, out);
    }

    fn route(&mut self, node: usize, out: Out) {
        for (port, items) in out.ports.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let consumers = self.nodes[node].consumers[port].clone();
            if consumers.is_empty() {
                self.cx.bury(items);
                continue;
            }
            let mut items = Some(items);
            for (i, (n, p)) in consumers.iter().enumerate() {
                let batch = if i + 1 == consumers.len() {
                    items.take().unwrap_or_default()
                } else {
                    items.clone().unwrap_or_default()
                };
                self.push(*n, *p, batch);
            }
        }
    }

    fn eof(&mut self) {
        for n in 0..self.nodes.len() {
            loop {
                let mut out = Out::new(self.nodes[n].consumers.len());
                let more = self.nodes[n].op.on_eof(&self.cx, &mut out);
                self.route(n, out);
                // What the part left behind is freed before the next part.
                self.return_husks();
                if !more {
                    break;
                }
            }
        }
    }

    fn tick(&mut self, now: Instant) {
        for n in 0..self.nodes.len() {
            if self.nodes[n].op.deadline().is_some_and(|d| d <= now) {
                let mut out = Out::new(self.nodes[n].consumers.len());
                self.nodes[n].op.on_tick(&self.cx, now, &mut out);
                self.route(n, out);
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let ops = self.nodes.iter().filter_map(|n| n.op.deadline()).min();
        let mut cp = self.cp.deadline();
        if self.cp.on() && self.cp.in_flight.is_empty() && self.nodes.iter().any(|n| n.op.has_pending()) {
            let at = self.cp.last + self.cp.gap();
            cp = Some(cp.map_or(at, |c| c.min(at)));
        }
        match (ops, cp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Checkpoint if it is due: a sink holds messages, held MQTT messages
    /// are due for acknowledgement, or the state changed `interval` ago.
    /// At most one checkpoint is in flight; its end wakes the engine.
    fn maybe_checkpoint(&mut self, now: Instant) {
        if !self.cp.on() || !self.cp.settled() {
            return;
        }
        let interval = self.cp.durable.as_ref().map(|d| d.interval).unwrap_or_default();
        let due = (now >= self.cp.last + self.cp.gap() && self.nodes.iter().any(|n| n.op.has_pending()))
            || self.cp.held.iter().any(|h| h.due(now) <= now)
            || self.cp.changed_since.is_some_and(|t| now >= t + interval);
        if due {
            self.checkpoint();
        }
    }

    /// Commit what changed since the last checkpoint, with the outbox
    /// entries it produced and the sources' positions, in one transaction.
    fn checkpoint(&mut self) {
        let Some(durable) = self.cp.durable.clone() else { return };
        if self.cp.gave_up {
            return;
        }
        // A job interrupted while stopping left its batch half done: the
        // state stays at the last checkpoint, and the next start takes
        // those items again.
        if self.cx.struck_while_stopping.get() {
            self.abandon_checkpoints("a Python job was interrupted while stopping", durable.store.clone());
            return;
        }
        let mut snap = Snap::default();
        for n in &mut self.nodes {
            if snap.abort.is_some() {
                break;
            }
            n.op.snapshot(&self.cx, &mut snap);
        }
        if let Some(why) = snap.abort.take() {
            self.abandon_checkpoints(&why, durable.store.clone());
            return;
        }
        let mut clock = super::snapshot::Enc::default();
        clock.i(self.cx.clock.get().at(Instant::now()));
        snap.put(&Arc::from(ENGINE_STEP), "clock".into(), clock);
        for (i, mark) in self.cp.marks.iter_mut().enumerate() {
            if let Some(pos) = mark.take() {
                snap.put(&self.cp.input_steps[i], "pos".into(), pos.encode());
            }
        }
        let mut seen: Vec<(Arc<str>, Arc<std::sync::Mutex<crate::sources::MqttSeen>>)> = Vec::new();
        for h in self.cp.held.drain(..) {
            let (step, s) = h.checkpoint(&mut snap);
            if !seen.iter().any(|(st, _)| *st == step) {
                seen.push((step, s));
            }
        }
        for (step, s) in seen {
            let row = s.lock().unwrap_or_else(|p| p.into_inner()).encode();
            snap.put(&step, "seen".into(), row);
        }
        self.cp.changed_since = None;
        self.cp.last = Instant::now();
        let rows = std::mem::take(&mut snap.rows);
        let encoded = if rows.iter().any(|r| !r.enc.py.is_empty()) {
            let label = format!("flow {} checkpoint (pickling state)", self.cx.flow_id);
            let result = self.cx.py.run_step(label, move |py| super::snapshot::finish(py, rows));
            match result {
                Ok(Some(r)) => r,
                failed => {
                    let why = match failed {
                        Err(e) => e.to_string(),
                        _ => "pickling the state was interrupted".to_string(),
                    };
                    self.abandon_checkpoints(&why, durable.store.clone());
                    for f in snap.after {
                        f(false);
                    }
                    return;
                }
            }
        } else {
            (
                rows.into_iter()
                    .map(|r| {
                        let b = super::snapshot::plain(&r.enc);
                        (r.step, r.row, b)
                    })
                    .collect(),
                Vec::new(),
            )
        };
        let (puts, failed) = encoded;
        for (step, row, why) in failed {
            self.cx.state_error(&step, || {
                format!("state of {row:?} cannot be pickled ({why}); it is saved without it and would start empty after a restart")
            });
        }
        let mut by_step: BTreeMap<Arc<str>, crate::store::state::Rows> = BTreeMap::new();
        for (step, row, bytes) in puts {
            by_step.entry(step).or_default().push((row, Some(bytes)));
        }
        for (step, row) in snap.deletes {
            by_step.entry(step).or_default().push((row, None));
        }
        let mut ops: Vec<Op> = by_step
            .into_iter()
            .map(|(step, rows)| {
                Op::State(StateOp::Rows {
                    flow: self.cx.flow_id.clone(),
                    step,
                    rows,
                })
            })
            .collect();
        ops.append(&mut snap.ops);
        if ops.is_empty() && snap.after.is_empty() {
            return;
        }
        self.cx.counters.add("checkpoints", 1);
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = self.cp.wake.clone();
        let after = snap.after;
        let flow = self.cx.flow_id.clone();
        durable.store.submit_then(
            ops,
            Box::new(move |r| {
                if let Err(e) = &r {
                    tracing::error!("flow {flow}: checkpoint not committed: {e}");
                }
                let ok = r.is_ok();
                for f in after {
                    f(ok);
                }
                let _ = tx.send(ok);
                wake.notify_one();
            }),
        );
        self.cp.in_flight.push_back(rx);
    }

    /// A checkpoint could not be completed after its steps handed over what
    /// changed: later ones would miss it. While stopping the next start
    /// resumes from the last committed one; while running, runnel exits
    /// (like a failed commit) so that systemd restarts it from there.
    fn abandon_checkpoints(&mut self, why: &str, store: Store) {
        self.cp.gave_up = true;
        for h in self.cp.held.drain(..) {
            h.release(false);
        }
        if self.cx.py.is_stopping() {
            tracing::warn!(
                "flow {}: last checkpoint not taken ({why}); the next start resumes from the one before",
                self.cx.flow_id
            );
            self.cx
                .py
                .note_abandoned(format!("the last checkpoint of flow {} ({why})", self.cx.flow_id));
        } else {
            tracing::error!("flow {}: checkpoint failed ({why})", self.cx.flow_id);
            store.fail(format!("flow {}: a checkpoint failed ({why})", self.cx.flow_id));
        }
    }

    /// The last checkpoint (end of input, or stopping): take it and wait
    /// for every commit in flight, at most `limit`.
    fn final_checkpoint(&mut self, limit: std::time::Duration) {
        if self.cp.durable.is_none() {
            return;
        }
        self.checkpoint();
        let until = Instant::now() + limit;
        while let Some(rx) = self.cp.in_flight.pop_front() {
            if rx
                .recv_timeout(until.saturating_duration_since(Instant::now()))
                .is_err()
            {
                tracing::warn!("flow {}: the last checkpoint did not commit in time", self.cx.flow_id);
                break;
            }
        }
    }

    /// Read the flow's state from the store into its steps (before any
    /// input). Steps whose fingerprint changed, and steps the flow no longer
    /// has, are set aside. Returns the input steps' rows (their positions).
    fn restore(&mut self, steps: &[(Arc<str>, Option<String>)]) -> HashMap<Arc<str>, Vec<(String, Vec<u8>)>> {
        let mut starts = HashMap::new();
        let Some(durable) = self.cp.durable.clone() else {
            return starts;
        };
        let flow = self.cx.flow_id.clone();
        let mut stored = match durable.store.flow_state(&flow) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("flow {flow}: cannot read its saved state ({e}); starting empty");
                return starts;
            }
        };
        // The flow's clock first: keys' idle times are measured on it.
        if let Some(engine) = stored.remove(ENGINE_STEP) {
            let clock = engine.rows.iter().find(|(r, _)| r == "clock").and_then(|(_, b)| {
                let raw = super::snapshot::split(b).ok()?;
                raw.decoder(None).ok()?.i().ok()
            });
            if let Some(c) = clock {
                self.cx.clock.set(super::snapshot::EngineClock::new(c));
            }
        }
        let mut ops = Vec::new();
        let mut total = Restored::default();
        let mut restored_steps = 0;
        let mut baselines = Vec::new();
        for (i, (step, fp)) in steps.iter().enumerate() {
            let Some(fp) = fp else { continue };
            let old = stored.remove(&**step).unwrap_or_default();
            // A step starting without saved rows (first start, or changed)
            // records where it starts before any input is read: a file
            // sink's length, so that a crash before the first checkpoint
            // cuts the file back to it.
            let fresh = old.fingerprint.as_deref() != Some(fp.as_str()) || old.rows.is_empty();
            if fresh {
                if let Some((row, bytes)) = self.nodes[i].op.baseline() {
                    // After the set-aside below, which would take it along.
                    baselines.push(Op::State(StateOp::Rows {
                        flow: flow.clone(),
                        step: step.clone(),
                        rows: vec![(row, Some(bytes))],
                    }));
                }
            }
            if old.fingerprint.as_deref() != Some(fp.as_str()) {
                if !old.rows.is_empty() {
                    tracing::warn!(
                        "flow {flow} step {step:?}: the step changed since its state was saved (windower, clock, logic or source differ); its saved state ({} row(s)) is set aside and the step starts empty",
                        old.rows.len()
                    );
                    ops.push(Op::State(StateOp::SetAside {
                        flow: flow.clone(),
                        step: step.clone(),
                    }));
                }
                ops.push(Op::State(StateOp::Fingerprint {
                    flow: flow.clone(),
                    step: step.clone(),
                    fp: fp.clone(),
                }));
                continue;
            }
            if old.rows.is_empty() {
                continue;
            }
            restored_steps += 1;
            if self.cp.input_steps.contains(step) {
                // A source's position: the source takes it when it starts.
                starts.insert(step.clone(), old.rows);
                continue;
            }
            total += self.nodes[i].op.restore(&self.cx, old.rows);
        }
        for (step, old) in stored {
            tracing::warn!(
                "flow {flow}: step {step:?} is no longer in the flow (or keeps no state); its saved state ({} row(s)) is set aside",
                old.rows.len()
            );
            ops.push(Op::State(StateOp::SetAside {
                flow: flow.clone(),
                step: Arc::from(step.as_str()),
            }));
        }
        ops.append(&mut baselines);
        if !ops.is_empty() {
            if let Err(e) = durable.store.commit(ops) {
                tracing::error!("flow {flow}: cannot record its steps in the state file: {e}");
            }
        }
        if restored_steps > 0 {
            tracing::info!(
                "flow {flow}: restored its state: {} key(s), {} open window(s), {} queued item(s) in {restored_steps} step(s){}",
                total.keys,
                total.windows,
                total.queued,
                if total.bad_rows > 0 {
                    format!(", {} damaged row(s) skipped", total.bad_rows)
                } else {
                    String::new()
                }
            );
        }
        starts
    }

    fn flush(&mut self) {
        for n in &mut self.nodes {
            n.op.flush(&self.cx);
        }
        self.return_husks();
    }

    /// Hand buried items back to their sources (dropped here if a source is gone).
    fn return_husks(&mut self) {
        let husks = std::mem::take(&mut *self.cx.graveyard.borrow_mut());
        if husks.is_empty() {
            return;
        }
        let mut by_source: Vec<Vec<Item>> = (0..self.returns.len()).map(|_| Vec::new()).collect();
        for item in husks {
            if let Some(list) = by_source.get_mut(item.at.src as usize) {
                list.push(item);
            }
        }
        for (src, list) in by_source.into_iter().enumerate() {
            if let (false, Some(Some(tx))) = (list.is_empty(), self.returns.get(src)) {
                let _ = tx.send(list);
            }
        }
    }
}

/// Whether every step reading `stream` (through merges, key_rm and collect)
/// handles Python objects as well as Rust values: Python steps, and window
/// steps whose clock and accumulator are Python. Then a Python step can hand
/// its results on unconverted, and the next Python step gets the very same
/// objects, as in Bytewax.
/// The steps that read `stream`, with their indexes.
fn readers(steps: &[crate::flow::StepPlan], stream: usize) -> impl Iterator<Item = (usize, &crate::flow::StepPlan)> {
    steps.iter().enumerate().filter(move |(_, s)| s.ups.contains(&stream))
}

fn only_python_reads(steps: &[crate::flow::StepPlan], stream: usize, depth: usize) -> bool {
    use crate::flow::{ClockSpec, LogicSpec, TsGetter};
    let readers: Vec<&crate::flow::StepPlan> = readers(steps, stream).map(|(_, s)| s).collect();
    if readers.is_empty() || depth > 16 {
        return false;
    }
    readers.iter().all(|s| match &s.kind {
        StepKind::Py(..) => true,
        StepKind::Merge | StepKind::KeyRm | StepKind::Collect { .. } => {
            s.downs.iter().all(|d| only_python_reads(steps, *d, depth + 1))
        }
        StepKind::Window(w) => {
            matches!(
                w.clock,
                ClockSpec::System
                    | ClockSpec::Event {
                        getter: TsGetter::Py(_),
                        ..
                    }
            ) && !matches!(w.logic, LogicSpec::Aggregate(_))
        }
        StepKind::Input(_) | StepKind::Output(_) | StepKind::KeyOnField(_) => false,
    })
}

/// Each `key_on` by field whose stream only one window step reads (and
/// that step nothing else): (its node, the window's node, its step id, the
/// field). The window keys the items itself and the `key_on` passes them
/// on as they are.
fn fused_key_ons(steps: &[crate::flow::StepPlan]) -> Vec<(usize, usize, String, Arc<str>)> {
    let mut fused = Vec::new();
    for (k, s) in steps.iter().enumerate() {
        let (StepKind::KeyOnField(field), [down]) = (&s.kind, s.downs.as_slice()) else {
            continue;
        };
        let readers: Vec<usize> = readers(steps, *down).map(|(r, _)| r).collect();
        if let [w] = readers.as_slice() {
            if matches!(steps[*w].kind, StepKind::Window(_)) && steps[*w].ups.len() == 1 {
                fused.push((k, *w, s.step_id.clone(), field.clone()));
            }
        }
    }
    fused
}

/// The fields of the items on `stream` that the plan reads, when only
/// native steps read them and only by field name (`key_on` by field, an
/// event clock on a field, `win.aggregate` or `count_window` whose late
/// items go nowhere): a source decodes just those. `None` when anything
/// sees whole items (a Python step, a sink, late items that are output).
pub(crate) fn read_fields(steps: &[crate::flow::StepPlan], stream: usize) -> Option<Vec<Arc<str>>> {
    let mut fields = Vec::new();
    (readers(steps, stream).next().is_some() && fields_read(steps, stream, 0, &mut fields)).then_some(fields)
}

fn fields_read(steps: &[crate::flow::StepPlan], stream: usize, depth: usize, fields: &mut Vec<Arc<str>>) -> bool {
    use crate::flow::{ClockSpec, LogicSpec, TsGetter};
    fn add(fields: &mut Vec<Arc<str>>, f: &Arc<str>) {
        if !fields.contains(f) {
            fields.push(f.clone());
        }
    }
    let unread = |port: Option<&usize>| port.is_none_or(|d| readers(steps, *d).next().is_none());
    if depth > 16 {
        return false;
    }
    for (_, s) in readers(steps, stream) {
        let ok = match &s.kind {
            StepKind::KeyOnField(f) => {
                add(fields, f);
                s.downs.iter().all(|d| fields_read(steps, *d, depth + 1, fields))
            }
            StepKind::Merge | StepKind::KeyRm => s.downs.iter().all(|d| fields_read(steps, *d, depth + 1, fields)),
            StepKind::Window(w) => {
                match &w.clock {
                    ClockSpec::Event {
                        getter: TsGetter::Field { name, .. },
                        ..
                    } => add(fields, name),
                    ClockSpec::System => {}
                    ClockSpec::Event { .. } => return false,
                }
                let logic = match &w.logic {
                    LogicSpec::Aggregate(spec) => {
                        spec.fields.iter().for_each(|(f, _)| add(fields, f));
                        true
                    }
                    LogicSpec::Count => true,
                    LogicSpec::Fold { .. } => false,
                };
                // Port 1 carries late items whole.
                logic && unread(s.downs.get(1))
            }
            StepKind::Py(..) | StepKind::Collect { .. } | StepKind::Input(_) | StepKind::Output(_) => false,
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The rows of the flow itself (its clock) go under this step name, which
/// no step can have (step ids are printable).
const ENGINE_STEP: &str = "\u{1}flow";

/// How long the last checkpoint may take to commit (the agent's stop grace is 3 s).
const FINAL_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Run `plan` on a new engine thread; the handle yields its report.
pub(crate) fn run_flow(
    plan: FlowPlan,
    opts: FlowOptions,
    py: PyRunner,
    rt: tokio::runtime::Handle,
) -> std::io::Result<std::thread::JoinHandle<FlowReport>> {
    std::thread::Builder::new()
        .name(format!("flow-{}", plan.flow_id))
        .spawn(move || engine_main(plan, opts, py, rt))
}

fn engine_main(plan: FlowPlan, mut opts: FlowOptions, py: PyRunner, rt: tokio::runtime::Handle) -> FlowReport {
    let counters = opts.counters.clone();
    let durable = opts.durable.take();
    let fingerprints = if durable.is_some() {
        super::fingerprint::of_plan(&plan, &py)
    } else {
        Vec::new()
    };
    let warnings = Warnings::default();
    let (tx, mut rx) = mpsc::channel::<SourceMsg>(8);

    // Which node produces each stream, and each step's node index.
    let mut producer: HashMap<usize, (usize, usize)> = HashMap::new();
    for (i, s) in plan.steps.iter().enumerate() {
        for (port, d) in s.downs.iter().enumerate() {
            producer.insert(*d, (i, port));
        }
    }
    let mut origins = vec![String::new()];
    let returns: Vec<Option<std::sync::mpsc::Sender<Vec<Item>>>> = vec![None];
    let mut sources = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut input_nodes = Vec::new();
    let mut input_steps: Vec<Arc<str>> = Vec::new();
    for s in &plan.steps {
        let op: Box<dyn Operator> = match &s.kind {
            StepKind::Input(spec) => {
                let config = opts
                    .inputs
                    .get(&s.step_id)
                    .cloned()
                    .unwrap_or_else(|| SourceConfig::from_spec(spec));
                origins.push(config.origin_name());
                input_steps.push(Arc::from(s.step_id.as_str()));
                let fields = s.downs.first().and_then(|d| read_fields(&plan.steps, *d));
                sources.push((
                    input_nodes.len(),
                    s.step_id.clone(),
                    (origins.len() - 1) as u32,
                    config,
                    fields.map(Arc::from),
                ));
                input_nodes.push(nodes.len());
                Box::new(InputOp {
                    step_id: s.step_id.clone(),
                })
            }
            StepKind::Output(spec) => match &opts.output {
                OutputMode::Replay(w) => Box::new(OutputOp::replay(s.step_id.clone(), w.clone())),
                OutputMode::Sinks => Box::new(OutputOp::sink(
                    &plan.flow_id,
                    s.step_id.clone(),
                    spec,
                    opts.sink_env.as_ref(),
                )),
            },
            StepKind::Py(kind, f) => Box::new(PyOp {
                step_id: s.step_id.clone(),
                kind: *kind,
                f: f.clone(),
                states: (*kind == PyOpKind::StatefulMap).then(Default::default),
                keep_py: s.downs.iter().all(|d| only_python_reads(&plan.steps, *d, 0)),
                location: Arc::from(s.location.as_str()),
            }),
            StepKind::KeyOnField(field) => Box::new(KeyOnFieldOp {
                step_id: s.step_id.clone(),
                field: field.clone(),
            }),
            StepKind::KeyRm => Box::new(KeyRmOp {
                step_id: s.step_id.clone(),
            }),
            StepKind::Merge => Box::new(MergeOp),
            StepKind::Collect { timeout, max_size } => Box::new(CollectOp::new(s.step_id.clone(), *timeout, *max_size)),
            StepKind::Window(_) => {
                // Moved out below (plans own Python handles we cannot clone here).
                Box::new(MergeOp)
            }
        };
        nodes.push(Node {
            op,
            consumers: vec![Vec::new(); s.downs.len()],
        });
    }
    // Window plans move into their operators.
    let flow_id: Arc<str> = Arc::from(plan.flow_id.as_str());
    let file: Arc<str> = Arc::from(plan.file.as_str());
    let steps = plan.steps;
    let key_ons = fused_key_ons(&steps);
    for (i, s) in steps.iter().enumerate() {
        for (port, up) in s.ups.iter().enumerate() {
            if let Some((n, p)) = producer.get(up) {
                nodes[*n].consumers[*p].push((i, port));
            }
        }
    }
    for (i, s) in steps.into_iter().enumerate() {
        if let StepKind::Window(w) = s.kind {
            let mut op = WindowOp::new(s.step_id, w, Arc::from(s.location.as_str()));
            op.late_out = nodes[i].consumers.get(1).is_some_and(|c| !c.is_empty());
            op.meta_out = nodes[i].consumers.get(2).is_some_and(|c| !c.is_empty());
            if let Some((k, _, step, field)) = key_ons.iter().find(|(_, w, _, _)| *w == i) {
                op.key_on = Some((step.clone(), field.clone()));
                nodes[*k].op = Box::new(MergeOp);
            }
            nodes[i].op = Box::new(op);
        }
    }

    let cx = Cx {
        py,
        flow_id: flow_id.clone(),
        file,
        counters: counters.clone(),
        warnings: warnings.clone(),
        origins: Arc::new(origins),
        live: opts.live,
        durable: durable.is_some(),
        struck_while_stopping: Default::default(),
        heartbeat: opts.heartbeat.clone(),
        clock: std::cell::Cell::new(super::snapshot::EngineClock::new(0)),
        graveyard: Default::default(),
    };
    let n_inputs = input_nodes.len();
    let cp = Checkpoints {
        durable,
        marks: vec![None; n_inputs],
        input_steps,
        held: Vec::new(),
        in_flight: Default::default(),
        wake: Arc::new(tokio::sync::Notify::new()),
        changed_since: None,
        gave_up: false,
        last: Instant::now(),
    };
    let mut engine = Engine { nodes, cx, returns, cp };
    let positions = engine.restore(&fingerprints);
    let mut starts = Vec::new();
    for (input, step_id, origin, mut config, fields) in sources {
        if let Some(rows) = positions.get(step_id.as_str()) {
            let row = |name: &str| rows.iter().find(|(r, _)| r == name).map(|(_, b)| b.clone());
            match &mut config {
                SourceConfig::File { start, .. } => match row("pos").map(|b| FilePos::decode(&b)) {
                    Some(Ok(p)) => *start = Some(p),
                    Some(Err(why)) => engine.cx.state_error(&step_id, || {
                        format!("saved position cannot be read ({why}); reading from the start")
                    }),
                    None => {}
                },
                SourceConfig::Mqtt(m) => m.restored = row("seen"),
                SourceConfig::Serial(_) | SourceConfig::Unavailable(_) => {}
            }
        }
        let (back_tx, back_rx) = std::sync::mpsc::channel();
        engine.returns.resize(origin as usize + 1, None);
        engine.returns[origin as usize] = Some(back_tx);
        let scx = SourceCtx {
            input,
            step_id,
            flow_id: flow_id.to_string(),
            origin,
            tx: tx.clone(),
            counters: counters.clone(),
            warnings: warnings.clone(),
            returns: back_rx,
            fields,
        };
        starts.push((config, scx));
    }
    for (config, scx) in starts {
        config.start(scx, &rt);
    }
    drop(tx);

    let waiter = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a timer runtime");
    let mut stop = opts.stop;
    let mut ended = vec![false; n_inputs];
    let mut stopped_early = false;
    enum Next {
        Msg(Option<SourceMsg>),
        Tick,
        Committed,
        Stop,
        Beat,
    }
    let wake = engine.cp.wake.clone();
    // A source's batch into the graph, with where the source will be after it.
    let take = |engine: &mut Engine, input: usize, items: Vec<Item>, mark: Mark| {
        match mark {
            Mark::None => {}
            Mark::File(p) => engine.cp.marks[input] = Some(p),
            Mark::Mqtt(h) => engine.cp.held.push(h),
        }
        engine.cp.changed(Instant::now());
        engine.push(input_nodes[input], 0, items);
    };
    let heartbeat = opts.heartbeat.clone();
    let beat = |at: u64| {
        if let Some(h) = &heartbeat {
            h.store(at, std::sync::atomic::Ordering::Relaxed);
        }
    };
    loop {
        beat(heartbeat_now());
        let deadline = if opts.live { engine.deadline() } else { None };
        let in_flight = !engine.cp.in_flight.is_empty();
        let next = waiter.block_on(async {
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            let stopping = async {
                match stop.as_mut() {
                    Some(s) => {
                        while !*s.borrow() {
                            if s.changed().await.is_err() {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let committed = async {
                if in_flight {
                    wake.notified().await
                } else {
                    std::future::pending().await
                }
            };
            let beat = async {
                if heartbeat.is_some() {
                    tokio::time::sleep(BEAT).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                biased;
                _ = stopping => Next::Stop,
                m = rx.recv() => Next::Msg(m),
                _ = committed => Next::Committed,
                _ = sleep => Next::Tick,
                _ = beat => Next::Beat,
            }
        });
        match next {
            Next::Msg(Some(SourceMsg::Batch(input, items, mark))) => {
                take(&mut engine, input, items, mark);
                // A busy input must not starve other keys' timers: what was
                // due before this batch fires now (`deadline` is None in replay).
                let now = Instant::now();
                if deadline.is_some_and(|d| d <= now) {
                    engine.tick(now);
                }
            }
            Next::Msg(Some(SourceMsg::Eof(input))) => {
                ended[input] = true;
                if ended.iter().all(|e| *e) {
                    engine.eof();
                    engine.flush();
                    engine.cp.changed(Instant::now());
                    engine.final_checkpoint(FINAL_WAIT);
                    if opts.live {
                        tracing::info!(
                            "flow {}: every input has ended; its windows are flushed{}",
                            engine.cx.flow_id,
                            if engine.cp.durable.is_some() {
                                " and its state saved"
                            } else {
                                ""
                            }
                        );
                    }
                    break;
                }
            }
            Next::Msg(None) => {
                engine.eof();
                engine.flush();
                engine.cp.changed(Instant::now());
                engine.final_checkpoint(FINAL_WAIT);
                break;
            }
            Next::Tick => {
                engine.cp.changed(Instant::now());
                engine.tick(Instant::now());
            }
            Next::Committed | Next::Beat => {}
            Next::Stop => {
                stopped_early = true;
                // Batches already queued were taken from their sources (MQTT
                // messages acknowledged): they go in before the last
                // checkpoint, or a reload would lose them.
                // (Not when the agent stops: its Python jobs are cut short
                // then, and that would cost the last checkpoint.)
                // Closed first: a source's send from now on fails, and the
                // source keeps what it holds for the next version (a batch
                // sent after the drain but before the channel went would be
                // lost).
                rx.close();
                let until = Instant::now() + std::time::Duration::from_secs(1);
                while !engine.cx.py.is_stopping() && Instant::now() < until {
                    match rx.try_recv() {
                        Ok(SourceMsg::Batch(input, items, mark)) => take(&mut engine, input, items, mark),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                engine.flush();
                // A job interrupted while stopping left its batch half done:
                // the state stays at the last checkpoint, and the next start
                // takes those items again.
                engine.final_checkpoint(FINAL_WAIT);
                break;
            }
        }
        engine.flush();
        engine.maybe_checkpoint(Instant::now());
    }
    drop(rx);
    beat(u64::MAX);
    warnings.flush();
    FlowReport {
        flow_id: flow_id.to_string(),
        counters: counters.snapshot(),
        stopped_early,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{
        AggSpec, ClockSpec, LogicSpec, SinkSpec, Stat, StepPlan, TsGetter, TsUnit, WindowPlan, WindowerSpec,
    };

    fn step(kind: StepKind, ups: &[usize], downs: &[usize]) -> StepPlan {
        StepPlan {
            step_id: format!("s{}", downs.first().copied().unwrap_or(99)),
            kind,
            ups: ups.to_vec(),
            downs: downs.to_vec(),
            location: String::new(),
        }
    }

    fn aggregate(field: &str) -> StepKind {
        StepKind::Window(WindowPlan {
            clock: ClockSpec::Event {
                getter: TsGetter::Field {
                    name: Arc::from("ts"),
                    unit: TsUnit::Seconds,
                },
                wait: 0,
            },
            windower: WindowerSpec::Sliding {
                length: 10,
                offset: 10,
                align: 0,
            },
            logic: LogicSpec::Aggregate(AggSpec {
                fields: vec![(Arc::from(field), vec![Stat::Mean])],
            }),
            ordered: true,
        })
    }

    fn key_on() -> StepKind {
        StepKind::KeyOnField(Arc::from("sensor"))
    }

    fn names(fields: Option<Vec<Arc<str>>>) -> Option<Vec<String>> {
        fields.map(|f| f.iter().map(|s| s.to_string()).collect())
    }

    /// Streams: 0 input, 1 keyed, 2/3/4 the window's down/late/meta.
    #[test]
    fn a_source_decodes_only_the_fields_native_steps_read_and_everything_when_anything_sees_items() {
        let out = |up| step(StepKind::Output(SinkSpec::Stdout), &[up], &[]);
        let base = || vec![step(key_on(), &[0], &[1]), step(aggregate("temp"), &[1], &[2, 3, 4])];
        let fields = ["sensor", "ts", "temp"].map(String::from).to_vec();

        // Results and metadata going out: only the fields read.
        let mut steps = base();
        steps.extend([out(2), out(4)]);
        assert_eq!(names(read_fields(&steps, 0)), Some(fields.clone()));
        assert_eq!(fused_key_ons(&steps).len(), 1, "the window keys its items itself");

        // Late items going out carry whole items.
        let mut steps = base();
        steps.push(out(3));
        assert_eq!(read_fields(&steps, 0), None);

        // The keyed stream read by an output too: whole items, and no fusing.
        let mut steps = base();
        steps.push(out(1));
        assert_eq!(read_fields(&steps, 0), None);
        assert!(fused_key_ons(&steps).is_empty());

        // Two windows on one keyed stream: the union, and no fusing.
        let mut steps = base();
        steps.push(step(aggregate("rh"), &[1], &[5, 6, 7]));
        let mut both = fields.clone();
        both.push("rh".into());
        assert_eq!(names(read_fields(&steps, 0)), Some(both));
        assert!(fused_key_ons(&steps).is_empty());

        // Nothing reads the input: decode as usual.
        assert_eq!(read_fields(&[], 0), None);
    }
}
