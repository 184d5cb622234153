//! Building a flow's operator graph from its plan, and the engine thread's
//! loop: receive a batch, push it through, sleep until the next deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::collect::CollectOp;
use super::stateless::{InputOp, KeyOnFieldOp, KeyRmOp, MergeOp, PyOp};
use super::window::WindowOp;
use super::{Cx, Operator, Out};
use crate::flow::{FlowPlan, PyOpKind, StepKind};
use crate::metrics::{Counters, Warnings};
use crate::python::PyRunner;
use crate::sinks::{OutputOp, SharedOut};
use crate::sources::{SourceConfig, SourceCtx, SourceMsg};
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
            let mut out = Out::new(self.nodes[n].consumers.len());
            self.nodes[n].op.on_eof(&self.cx, &mut out);
            self.route(n, out);
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
        self.nodes.iter().filter_map(|n| n.op.deadline()).min()
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
fn only_python_reads(steps: &[crate::flow::StepPlan], stream: usize, depth: usize) -> bool {
    use crate::flow::{ClockSpec, LogicSpec, TsGetter};
    let readers: Vec<&crate::flow::StepPlan> = steps.iter().filter(|s| s.ups.contains(&stream)).collect();
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

fn engine_main(plan: FlowPlan, opts: FlowOptions, py: PyRunner, rt: tokio::runtime::Handle) -> FlowReport {
    let counters = opts.counters.clone();
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
    let mut returns: Vec<Option<std::sync::mpsc::Sender<Vec<Item>>>> = vec![None];
    let mut sources = Vec::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut input_nodes = Vec::new();
    for s in &plan.steps {
        let op: Box<dyn Operator> = match &s.kind {
            StepKind::Input(spec) => {
                let config = opts
                    .inputs
                    .get(&s.step_id)
                    .cloned()
                    .unwrap_or_else(|| SourceConfig::from_spec(spec));
                origins.push(config.origin_name());
                sources.push((input_nodes.len(), s.step_id.clone(), (origins.len() - 1) as u32, config));
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
                states: (*kind == PyOpKind::StatefulMap).then(HashMap::new),
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
    for (i, s) in steps.into_iter().enumerate() {
        for (port, up) in s.ups.iter().enumerate() {
            if let Some((n, p)) = producer.get(up) {
                nodes[*n].consumers[*p].push((i, port));
            }
        }
        if let StepKind::Window(w) = s.kind {
            nodes[i].op = Box::new(WindowOp::new(s.step_id, w, Arc::from(s.location.as_str())));
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
        graveyard: Default::default(),
    };
    let n_inputs = input_nodes.len();
    let mut starts = Vec::new();
    for (input, step_id, origin, config) in sources {
        let (back_tx, back_rx) = std::sync::mpsc::channel();
        returns.resize(origin as usize + 1, None);
        returns[origin as usize] = Some(back_tx);
        let scx = SourceCtx {
            input,
            step_id,
            flow_id: flow_id.to_string(),
            origin,
            tx: tx.clone(),
            counters: counters.clone(),
            warnings: warnings.clone(),
            returns: back_rx,
        };
        starts.push((config, scx));
    }
    let mut engine = Engine { nodes, cx, returns };
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
        Stop,
    }
    loop {
        let deadline = if opts.live { engine.deadline() } else { None };
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
            tokio::select! {
                biased;
                _ = stopping => Next::Stop,
                m = rx.recv() => Next::Msg(m),
                _ = sleep => Next::Tick,
            }
        });
        match next {
            Next::Msg(Some(SourceMsg::Batch(input, items))) => {
                engine.push(input_nodes[input], 0, items);
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
                    break;
                }
            }
            Next::Msg(None) => {
                engine.eof();
                engine.flush();
                break;
            }
            Next::Tick => engine.tick(Instant::now()),
            Next::Stop => {
                stopped_early = true;
                break;
            }
        }
        engine.flush();
    }
    drop(rx);
    warnings.flush();
    FlowReport {
        flow_id: flow_id.to_string(),
        counters: counters.snapshot(),
        stopped_early,
    }
}
