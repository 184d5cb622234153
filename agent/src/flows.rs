//! The agent's running flows, by flow file: loaded at start, and kept in
//! step with the flows folder while running (the folder is watched, and
//! SIGHUP asks for the same).
//!
//! A new or changed file is validated first: its permissions (`perms.rs`),
//! then loaded like `runnel check` does, its brokers checked. Only then are
//! the old version's flows stopped (each takes its last checkpoint) and the
//! new ones started; they restore the state of every step whose
//! fingerprint did not change (`engine/fingerprint.rs`). A file that does
//! not validate leaves the old version running and is logged with its
//! file:line. A removed file stops its flows. Files are compared by their
//! bytes, so an editor's write-to-temp-and-rename, or a burst of events,
//! reloads a file once. A failing file never disturbs the others.
//!
//! An MQTT input whose broker, topics and QoS are unchanged hands its inbox
//! (with the messages queued in it) to the new version, so a reload loses
//! no message; new topics are subscribed on the live connection.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::engine::{run_flow, Durable, FlowOptions, FlowReport, OutputMode};
use crate::flow::{self, FlowPlan, SinkSpec, SourceSpec, StepKind};
use crate::metrics::Counters;
use crate::mqtt::Hub;
use crate::python::PyRunner;
use crate::sinks::SinkEnv;
use crate::sources::{MqttInput, SourceConfig};
use crate::store::Store;

/// How long a flow gets to stop (and take its last checkpoint).
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(3);

/// What starting a flow needs.
pub(crate) struct Env {
    pub flows_dir: PathBuf,
    pub store: Store,
    pub py: PyRunner,
    pub rt: tokio::runtime::Handle,
    pub sink_env: Arc<SinkEnv>,
    pub load_timeout: Duration,
    pub snapshot_interval: Duration,
    pub commit_gap: Duration,
    /// How long an old version gets to stop at a reload (a Python job may
    /// run up to `python_step_timeout`).
    pub stop_limit: Duration,
}

pub(crate) struct Flows {
    env: Env,
    files: BTreeMap<PathBuf, FileState>,
}

struct FileState {
    /// A hash of the bytes, owner and mode last seen (loaded or refused).
    digest: u64,
    flows: Vec<Running>,
    /// An old version told to stop that had not stopped in time: the new
    /// one starts only once it has (two versions never run at once).
    stopping: Vec<Running>,
}

/// One running flow.
pub(crate) struct Running {
    pub figures: FlowFigures,
    pub heartbeat: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
    handle: Option<std::thread::JoinHandle<FlowReport>>,
    /// Its inputs as started (MQTT inboxes are handed on at a reload).
    inputs: HashMap<String, SourceConfig>,
}

/// FNV-1a of a file's bytes.
fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

/// The flow files of `dir`: `*.py`, except `_helpers.py` (modules flows
/// import) and hidden files (editors' temporary copies).
fn flow_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "py"))
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('_') || n.starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

impl Flows {
    pub(crate) fn new(env: Env) -> Flows {
        Flows {
            env,
            files: BTreeMap::new(),
        }
    }

    /// Whether an old version is still stopping (sync again soon).
    pub(crate) fn waiting(&self) -> bool {
        self.files.values().any(|s| !s.stopping.is_empty())
    }

    /// Every running flow.
    pub(crate) fn running(&self) -> impl Iterator<Item = &Running> {
        self.files.values().flat_map(|f| f.flows.iter())
    }

    /// Bring the running flows in line with the flows folder. `stopping`
    /// says the agent is stopping (no more files are loaded then).
    pub(crate) fn sync(&mut self, hub: &mut Hub, stopping: &dyn Fn() -> bool, force: bool) {
        // Old versions that have stopped since: their files may load now.
        for (path, state) in self.files.iter_mut() {
            let before = state.stopping.len();
            state
                .stopping
                .retain(|r| !r.handle.as_ref().is_none_or(|h| h.is_finished()));
            if state.stopping.len() < before && state.stopping.is_empty() {
                tracing::info!("the old version of {} has stopped", path.display());
                state.digest = 0;
            }
        }
        // SIGHUP: try again the files that run nothing (refused for a
        // reason outside the file: a broker, an id in use, a timeout).
        if force {
            for state in self.files.values_mut() {
                if state.flows.is_empty() {
                    state.digest = 0;
                }
            }
        }
        let dir = self.env.flows_dir.clone();
        let listed = match crate::perms::check_code(&dir, crate::perms::Owners::Running)
            .and_then(|_| flow_files(&dir).map_err(|e| format!("cannot read flows_dir {}: {e}", dir.display())))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(
                    "flows folder refused: {e}; {}",
                    if self.files.is_empty() {
                        "running with no flows"
                    } else {
                        "the flows running go on, and none is loaded or stopped until it is fixed"
                    }
                );
                return;
            }
        };
        let gone: Vec<PathBuf> = self.files.keys().filter(|p| !listed.contains(p)).cloned().collect();
        for path in gone {
            if let Some(state) = self.files.remove(&path) {
                for r in state.flows {
                    tracing::info!(
                        "flow {:?}: {} was removed; stopping the flow",
                        r.figures.flow_id,
                        path.display()
                    );
                    if let Err(r) = stop(r, self.env.stop_limit) {
                        tracing::error!("flow {:?} is still stopping", r.figures.flow_id);
                    }
                }
            }
        }
        for path in listed {
            if stopping() {
                tracing::info!("stopping: the remaining flow files are not loaded");
                return;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!("flow file {} cannot be read: {e}", path.display());
                    continue;
                }
            };
            // Owner and mode count too: fixing a refused file's permissions
            // (chmod, chown) has it loaded.
            let meta = std::fs::metadata(&path).map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.mode(), m.uid())
            });
            let d = digest(&bytes) ^ digest(format!("{meta:?}").as_bytes()).rotate_left(1);
            if self
                .files
                .get(&path)
                .is_some_and(|s| s.digest == d || !s.stopping.is_empty())
            {
                continue;
            }
            self.load(hub, &path, d);
        }
    }

    /// Load a new or changed file; on success its flows replace the old
    /// version's.
    fn load(&mut self, hub: &mut Hub, path: &Path, digest: u64) {
        let shown = path.display().to_string();
        let reload = self.files.get(path).is_some_and(|s| !s.flows.is_empty());
        let keep = if reload { " (the running version goes on)" } else { "" };
        // Remember the bytes either way: the same broken file is not
        // tried (and logged) again until it changes.
        let state = self.files.entry(path.to_path_buf()).or_insert(FileState {
            digest,
            flows: Vec::new(),
            stopping: Vec::new(),
        });
        state.digest = digest;
        if let Err(e) = crate::perms::check_flow_file(path, crate::perms::Owners::Running) {
            tracing::error!("flow file refused{keep}: {e}");
            return;
        }
        let file = match flow::load_staged(&self.env.py, path, self.env.load_timeout) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(
                    "flow file {}{keep}: {e}",
                    if reload { "not reloaded" } else { "skipped" }
                );
                return;
            }
        };
        // A flow id must be unique among the other files' flows.
        for plan in &file.flows {
            let other = self
                .files
                .iter()
                .filter(|(p, _)| p.as_path() != path)
                .find(|(_, s)| s.flows.iter().any(|r| r.figures.flow_id == plan.flow_id));
            if let Some((other, _)) = other {
                tracing::error!(
                    "flow {:?} in {shown} skipped{keep}: {} already runs a flow with that id; give each Dataflow its own id",
                    plan.flow_id,
                    other.display()
                );
                return;
            }
        }
        let old_inputs: HashMap<String, SourceConfig> = self.files[path]
            .flows
            .iter()
            .flat_map(|r| {
                r.inputs
                    .iter()
                    .map(|(k, v)| (format!("{}/{k}", r.figures.flow_id), v.clone()))
            })
            .collect();
        let mut connected = Vec::new();
        for plan in &file.flows {
            match connect_flow(hub, plan, self.env.snapshot_interval, &old_inputs) {
                Ok(inputs) => connected.push(inputs),
                Err(e) => {
                    tracing::error!("flow {:?} in {shown} skipped{keep}: {e}", plan.flow_id);
                    return;
                }
            }
        }
        // Valid: the old version stops (its last checkpoint saves what the
        // new one restores), then the new one starts.
        let old = std::mem::take(&mut self.files.get_mut(path).expect("entered above").flows);
        let limit = self.env.stop_limit;
        let late: Vec<Running> = old
            .into_iter()
            .filter_map(|r| stop(r, limit).err().map(|b| *b))
            .collect();
        if !late.is_empty() {
            tracing::error!(
                "{shown}: the old version did not stop within {}s (a long Python job, or a sink waiting for a full outbox); the new one starts once it has",
                limit.as_secs()
            );
            let state = self.files.get_mut(path).expect("entered above");
            state.stopping = late;
            state.digest = 0;
            return;
        }
        if let Err(e) = file.activate(&self.env.py) {
            tracing::error!("flow file {shown}: {e}");
            return;
        }
        let mut started = Vec::new();
        for (plan, inputs) in file.flows.into_iter().zip(connected) {
            let flow_id = plan.flow_id.clone();
            tracing::info!(
                "{} flow {flow_id:?} from {shown}",
                if reload { "reloaded: starting" } else { "starting" }
            );
            match self.start(plan, inputs) {
                Ok(r) => started.push(r),
                Err(e) => tracing::error!("flow {flow_id:?} in {shown} could not start: {e}"),
            }
        }
        self.files.get_mut(path).expect("entered above").flows = started;
    }

    fn start(&self, plan: FlowPlan, inputs: HashMap<String, SourceConfig>) -> std::io::Result<Running> {
        let counters = Counters::default();
        let figures = FlowFigures::new(&plan, counters.clone());
        let (stop_tx, stop_rx) = watch::channel(false);
        let heartbeat = Arc::new(AtomicU64::new(crate::engine::heartbeat_now()));
        let opts = FlowOptions {
            live: true,
            inputs: inputs.clone(),
            output: OutputMode::Sinks,
            stop: Some(stop_rx),
            sink_env: Some(self.env.sink_env.clone()),
            counters,
            durable: Some(Durable {
                store: self.env.store.clone(),
                interval: self.env.snapshot_interval,
                gap: self.env.commit_gap,
            }),
            heartbeat: Some(heartbeat.clone()),
        };
        let handle = run_flow(plan, opts, self.env.py.clone(), self.env.rt.clone())?;
        Ok(Running {
            figures,
            heartbeat,
            stop: stop_tx,
            handle: Some(handle),
            inputs,
        })
    }

    /// A running flow whose engine has not come round for longer than
    /// `limit` (stuck in a Python job, or wedged): its id and how long.
    pub(crate) fn wedged(&self, limit: Duration) -> Option<(String, Duration)> {
        let now = crate::engine::heartbeat_now();
        self.running().find_map(|r| {
            // A flow whose thread ended (its inputs ended, or it panicked) is not wedged.
            if r.handle.as_ref().is_none_or(|h| h.is_finished()) {
                return None;
            }
            let at = r.heartbeat.load(Ordering::Relaxed);
            let quiet = Duration::from_millis(now.saturating_sub(at));
            (at != u64::MAX && quiet > limit).then(|| (r.figures.flow_id.clone(), quiet))
        })
    }

    /// Stop every flow (the agent is stopping): all are told at once, then
    /// awaited until `deadline`. Returns how many did not stop in time.
    pub(crate) fn stop_all(&mut self, deadline: Instant) -> usize {
        let all: Vec<Running> = std::mem::take(&mut self.files)
            .into_values()
            .flat_map(|s| s.flows.into_iter().chain(s.stopping))
            .collect();
        for r in &all {
            let _ = r.stop.send(true);
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let n = all.len();
        for mut r in all {
            let tx = done_tx.clone();
            let handle = r.handle.take();
            std::thread::spawn(move || {
                if let Some(Ok(report)) = handle.map(|h| h.join()) {
                    let _ = tx.send(report);
                }
                drop(r);
            });
        }
        drop(done_tx);
        let mut stopped = 0;
        while stopped < n {
            match done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(report) => {
                    crate::cli::summarize(&report);
                    stopped += 1;
                }
                Err(_) => break,
            }
        }
        n - stopped
    }
}

/// Stop one flow (a reload, a removed file) and wait for it, at most
/// `limit`; a flow still running then is handed back.
fn stop(mut r: Running, limit: Duration) -> Result<(), Box<Running>> {
    let _ = r.stop.send(true);
    let Some(handle) = r.handle.take() else { return Ok(()) };
    let deadline = Instant::now() + limit;
    while !handle.is_finished() {
        if Instant::now() >= deadline {
            r.handle = Some(handle);
            return Err(Box::new(r));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if let Ok(report) = handle.join() {
        crate::cli::summarize(&report);
    }
    Ok(())
}

/// Two MQTT inputs that receive the same messages.
fn same_subscription(a: &crate::flow::MqttSourceSpec, b: &crate::flow::MqttSourceSpec) -> bool {
    let subs = |m: &crate::flow::MqttSourceSpec| m.filters.iter().map(|f| f.subscribe.clone()).collect::<Vec<_>>();
    a.broker == b.broker && a.qos == b.qos && subs(a) == subs(b)
}

/// Register a flow's MQTT inputs and outputs with the hub; every broker it
/// names must be usable, or the flow does not start. An input that `old`
/// (the previous version's inputs, by "flow/step") had with the same
/// subscription takes over its inbox.
fn connect_flow(
    hub: &mut Hub,
    plan: &FlowPlan,
    hold_for: Duration,
    old: &HashMap<String, SourceConfig>,
) -> Result<HashMap<String, SourceConfig>, String> {
    for s in &plan.steps {
        let broker = match &s.kind {
            StepKind::Input(SourceSpec::Mqtt(m)) => &m.broker,
            StepKind::Output(SinkSpec::Mqtt(m)) => &m.broker,
            _ => continue,
        };
        hub.check(broker)
            .map_err(|e| format!("step {:?} ({}): {e}", s.step_id, s.location))?;
        if let StepKind::Input(SourceSpec::Mqtt(m)) = &s.kind {
            if m.after_commit && !hub.persistent(broker) {
                return Err(format!(
                    "step {:?} ({}): ack=\"after-commit\" needs persistent_session = true in [brokers.{broker}] (without it the broker forgets unacknowledged messages when the connection drops)",
                    s.step_id, s.location
                ));
            }
        }
    }
    let mut inputs = HashMap::new();
    for s in &plan.steps {
        match &s.kind {
            StepKind::Input(SourceSpec::Mqtt(m)) => {
                let before = match old.get(&format!("{}/{}", plan.flow_id, s.step_id)) {
                    Some(SourceConfig::Mqtt(prev)) if same_subscription(&prev.spec, m) => Some(prev.inbox.clone()),
                    _ => None,
                };
                let inbox = match before {
                    Some(inbox) => inbox,
                    None => Arc::new(Mutex::new(Some(hub.subscribe(&m.broker, m.filters.clone(), m.qos)?))),
                };
                inputs.insert(
                    s.step_id.clone(),
                    SourceConfig::Mqtt(MqttInput {
                        spec: m.clone(),
                        inbox,
                        restored: None,
                        hold_for,
                    }),
                );
            }
            StepKind::Output(SinkSpec::Mqtt(m)) => hub.publish_on(&m.broker)?,
            _ => {}
        }
    }
    Ok(inputs)
}

/// A running flow's figures for the status: which counters are its input
/// and output steps.
pub(crate) struct FlowFigures {
    pub flow_id: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    counters: Counters,
}

impl FlowFigures {
    fn new(plan: &FlowPlan, counters: Counters) -> FlowFigures {
        let ids = |want_input: bool| {
            plan.steps
                .iter()
                .filter(|s| {
                    if want_input {
                        matches!(s.kind, StepKind::Input(_))
                    } else {
                        matches!(s.kind, StepKind::Output(_))
                    }
                })
                .map(|s| s.step_id.clone())
                .collect()
        };
        FlowFigures {
            flow_id: plan.flow_id.clone(),
            inputs: ids(true),
            outputs: ids(false),
            counters,
        }
    }

    /// (messages in, items out, decode errors)
    pub(crate) fn figures(&self) -> (u64, u64, u64) {
        let c = self.counters.snapshot();
        let sum = |steps: &[String], what: &str| -> u64 {
            steps
                .iter()
                .map(|s| c.get(&format!("{s}.{what}")).copied().unwrap_or(0))
                .sum()
        };
        (
            sum(&self.inputs, "items"),
            sum(&self.outputs, "items"),
            sum(&self.inputs, "malformed"),
        )
    }
}
