//! `runnel run`: the agent. Opens the state file, loads every flow file in
//! the flows folder, registers their MQTT subscriptions, connects the
//! brokers, and runs each flow live with its own sinks until SIGTERM/SIGINT;
//! then it stops the flows, says `offline` to the brokers and exits 0. A
//! flow file that fails to load (or names a broker that is not usable) is
//! logged and skipped; the others run.

use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::engine::Durable;
use crate::engine::{run_flow, FlowOptions, OutputMode};
use crate::flow::{self, FlowPlan, SinkSpec, SourceSpec, StepKind};
use crate::metrics::Counters;
use crate::mqtt::Hub;
use crate::python::PyRunner;
use crate::sinks::SinkEnv;
use crate::sources::{MqttInput, SourceConfig};
use crate::store::{outbox::Full, OutboxPolicy, Store};

/// How long flows get to stop after SIGTERM before they are abandoned.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// After a signal, the process exits by this time whatever still runs, so
/// that systemd's stop never hangs.
const HARD_STOP: Duration = Duration::from_millis(4800);

pub(crate) fn run(config: Config) -> anyhow::Result<ExitCode> {
    tracing::info!(
        "runnel {} starting: device {}, flows from {}, state in {}",
        env!("CARGO_PKG_VERSION"),
        config.device_id(),
        config.flows_dir.display(),
        config.state_dir.display()
    );
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create state_dir {} (set state_dir in the config file)",
            config.state_dir.display()
        )
    })?;
    let policies: HashMap<String, OutboxPolicy> = config
        .brokers
        .iter()
        .map(|(name, b)| {
            let full = if b.outbox_full == "block" {
                Full::Block
            } else {
                Full::DropOldest
            };
            (
                name.clone(),
                OutboxPolicy {
                    max_bytes: b.max_outbox_bytes,
                    full,
                },
            )
        })
        .collect();
    let store = Store::open(&config.state_dir, policies)?;
    for (broker, d) in store.outboxes().depths() {
        if d.entries == 0 {
            continue;
        }
        if config.brokers.contains_key(&broker) || broker == "default" {
            tracing::info!(
                "outbox of broker {broker}: {} undelivered message(s) ({} bytes) from before; delivering them first",
                d.entries,
                d.bytes
            );
        } else {
            tracing::warn!(
                "outbox of broker {broker}: {} undelivered message(s) ({} bytes), but the config has no [brokers.{broker}]; they are kept until it has one again",
                d.entries,
                d.bytes
            );
        }
    }
    let mut hub = Hub::new(&config.brokers, config.device_id());
    let stopping = Arc::new(AtomicBool::new(false));
    let sink_env = Arc::new(SinkEnv {
        device_id: Arc::from(config.device_id()),
        store: store.clone(),
        stopping: stopping.clone(),
        stopped_at: Default::default(),
    });
    let py = PyRunner::start()?.with_step_timeout(Duration::from_secs_f64(config.python_step_timeout));
    let load_timeout = Duration::from_secs_f64(config.flow_load_timeout);
    let rt = crate::cli::runtime()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let (conn_stop_tx, conn_stop_rx) = watch::channel(false);
    // Listen before flows load: SIGTERM/SIGINT stop the agent in every
    // phase (loading, running, stopping). A second later the Python job
    // still running is interrupted; past the hard limit the process exits
    // anyway, naming what it abandons.
    let mut term = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) })
        .context("cannot install the SIGTERM handler")?;
    let (signal_tx, signal_rx) = watch::channel(false);
    {
        let py = py.clone();
        rt.spawn(async move {
            let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping"),
                _ = &mut ctrl_c => tracing::info!("SIGINT: stopping"),
            }
            py.stop_all();
            let _ = signal_tx.send(true);
            let second = async {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            };
            let stages = async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(job) = py.interrupt("runnel is stopping") {
                    tracing::info!("interrupting {job} (runnel.Interrupted)");
                }
                tokio::time::sleep(HARD_STOP - Duration::from_secs(1)).await;
            };
            let why = tokio::select! {
                _ = second => "a second signal came",
                _ = stages => "still not stopped",
            };
            let what = py
                .current_job()
                .map(|j| format!("; still running: {j}"))
                .unwrap_or_default();
            tracing::error!(
                "{why} {:.1}s after the first; exiting now, abandoning what still runs{what}",
                HARD_STOP.as_secs_f64()
            );
            std::process::exit(1);
        });
    }
    let stop_requested = || *signal_rx.borrow();

    let mut files: Vec<_> = match std::fs::read_dir(&config.flows_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "py"))
            // `_helpers.py`: a module flows import, not a flow.
            .filter(|p| {
                !p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('_'))
            })
            .collect(),
        Err(e) => {
            tracing::error!(
                "cannot read flows_dir {}: {e}; running with no flows",
                config.flows_dir.display()
            );
            Vec::new()
        }
    };
    files.sort();
    let mut running: Vec<(String, String)> = Vec::new();
    let mut status: Vec<FlowFigures> = Vec::new();
    let mut handles = Vec::new();
    for path in files {
        if stop_requested() {
            tracing::info!("stopping: the remaining flow files are not loaded");
            break;
        }
        let file = match flow::load(&py, &path, load_timeout) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("flow file skipped: {e}");
                continue;
            }
        };
        for plan in file.flows {
            if let Some((_, other)) = running.iter().find(|(id, _)| *id == plan.flow_id) {
                tracing::error!(
                    "flow {:?} in {} skipped: {} already runs a flow with that id; give each Dataflow its own id",
                    plan.flow_id,
                    path.display(),
                    other
                );
                continue;
            }
            let inputs = match connect_flow(&mut hub, &plan, Duration::from_secs_f64(config.snapshot_interval)) {
                Ok(inputs) => inputs,
                Err(e) => {
                    tracing::error!("flow {:?} in {} skipped: {e}", plan.flow_id, path.display());
                    continue;
                }
            };
            running.push((plan.flow_id.clone(), path.display().to_string()));
            tracing::info!("starting flow {:?} from {}", plan.flow_id, path.display());
            let counters = Counters::default();
            status.push(FlowFigures::new(&plan, counters.clone()));
            let opts = FlowOptions {
                live: true,
                inputs,
                output: OutputMode::Sinks,
                stop: Some(stop_rx.clone()),
                sink_env: Some(sink_env.clone()),
                counters,
                durable: Some(Durable {
                    store: store.clone(),
                    interval: Duration::from_secs_f64(config.snapshot_interval),
                    gap: Duration::from_secs_f64(config.commit_gap),
                }),
            };
            handles.push(run_flow(plan, opts, py.clone(), rt.handle().clone())?);
        }
    }
    if handles.is_empty() {
        tracing::warn!(
            "no flows are running; add *.py flow files to {} and restart",
            config.flows_dir.display()
        );
    }

    let conns = hub.start(&store, rt.handle(), conn_stop_rx);
    let mut signal_wait = signal_rx.clone();
    let started = std::time::Instant::now();
    let healthy = rt.block_on(async {
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let every = Duration::from_secs(config.status_interval.max(1));
        let mut status_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut log_tick = tokio::time::interval_at(tokio::time::Instant::now() + STATS_LOG_EVERY, STATS_LOG_EVERY);
        loop {
            if *signal_wait.borrow() {
                break;
            }
            tokio::select! {
                _ = signal_wait.changed() => {}
                _ = status_tick.tick(), if config.status_interval > 0 => {
                    let text = stats_json(config.device_id(), started, &status, &hub, &store, py.healthy());
                    hub.publish_stats(text.as_bytes());
                }
                _ = log_tick.tick() => tracing::info!("{}", stats_line(&status, &hub, &store)),
                _ = health.tick() => {
                    if let Some(why) = store.failure() {
                        tracing::error!(
                            "the state file {} can no longer be written ({why}); is state_dir full or the SD card failing? check `df -h {}`; exiting so that systemd restarts runnel",
                            store.path().display(),
                            config.state_dir.display()
                        );
                        return false;
                    }
                }
            }
        }
        true
    });
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    py.stop_all();
    // Messages taken from now on may never be processed: let the brokers keep them.
    hub.stop_acks();
    let _ = stop_tx.send(true);
    let n = handles.len();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for h in handles {
        let tx = done_tx.clone();
        std::thread::spawn(move || {
            if let Ok(report) = h.join() {
                let _ = tx.send(report);
            }
        });
    }
    drop(done_tx);
    let deadline = std::time::Instant::now() + STOP_GRACE;
    let mut stopped = 0;
    while stopped < n {
        match done_rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(report) => {
                crate::cli::summarize(&report);
                stopped += 1;
            }
            Err(_) => break,
        }
    }
    if stopped < n {
        py.note_abandoned(format!(
            "{} flow(s) that did not stop within {}s{}",
            n - stopped,
            STOP_GRACE.as_secs(),
            py.current_job()
                .map(|j| format!(" ({j} is still running)"))
                .unwrap_or_default()
        ));
    }
    // The outbox is durable: whatever is not delivered now goes next start.
    let _ = conn_stop_tx.send(true);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_millis(1000), async {
            for c in conns {
                let _ = c.await;
            }
        })
        .await;
    });
    for (broker, d) in store.outboxes().depths() {
        if d.entries > 0 {
            tracing::info!(
                "outbox of broker {broker}: {} message(s) not yet delivered; they go out after the next start",
                d.entries
            );
        }
    }
    store.flush();
    rt.shutdown_background();
    if let Some(job) = py.current_job() {
        py.note_abandoned(format!("{job} (still running)"));
    }
    let abandoned = py.abandoned();
    if abandoned.is_empty() && healthy && py.healthy() {
        tracing::info!("runnel stopped");
        Ok(ExitCode::SUCCESS)
    } else {
        if !abandoned.is_empty() {
            tracing::warn!("runnel stopped, abandoning: {}", abandoned.join("; "));
        }
        Ok(ExitCode::FAILURE)
    }
}

/// How often the figures go to the log (at info).
const STATS_LOG_EVERY: Duration = Duration::from_secs(60);

/// Register a flow's MQTT inputs and outputs with the hub; every broker it
/// names must be usable, or the flow does not start.
fn connect_flow(hub: &mut Hub, plan: &FlowPlan, hold_for: Duration) -> Result<HashMap<String, SourceConfig>, String> {
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
                let inbox = hub.subscribe(&m.broker, m.filters.clone(), m.qos)?;
                inputs.insert(
                    s.step_id.clone(),
                    SourceConfig::Mqtt(MqttInput {
                        spec: m.clone(),
                        inbox: Arc::new(Mutex::new(Some(inbox))),
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
struct FlowFigures {
    flow_id: String,
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
    fn figures(&self) -> (u64, u64, u64) {
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

/// The stats message: one JSON object.
fn stats_json(
    device_id: &str,
    started: std::time::Instant,
    flows: &[FlowFigures],
    hub: &Hub,
    store: &Store,
    python_ok: bool,
) -> String {
    use crate::value::Value;
    use std::sync::atomic::Ordering::Relaxed;
    let s = |t: &str| Value::str(t);
    let n = |x: u64| Value::Int(x as i64);
    let flow_values: Vec<(Arc<str>, Value)> = flows
        .iter()
        .map(|f| {
            let (i, o, bad) = f.figures();
            (
                Arc::from(f.flow_id.as_str()),
                Value::Map(vec![
                    (Arc::from("in"), n(i)),
                    (Arc::from("out"), n(o)),
                    (Arc::from("decode_errors"), n(bad)),
                ]),
            )
        })
        .collect();
    let brokers: Vec<(Arc<str>, Value)> = hub
        .stats()
        .into_iter()
        .map(|(name, b)| {
            let d = store.outboxes().depth(name);
            (
                Arc::from(name),
                Value::Map(vec![
                    (Arc::from("connected"), Value::Bool(b.connected.load(Relaxed))),
                    (Arc::from("reconnects"), n(b.reconnects.load(Relaxed))),
                    (Arc::from("received"), n(b.received.load(Relaxed))),
                    (Arc::from("delivered"), n(b.delivered.load(Relaxed))),
                    (Arc::from("rejected"), n(b.rejected.load(Relaxed))),
                    (Arc::from("dropped_qos0"), n(b.dropped_qos0.load(Relaxed))),
                    (Arc::from("outbox_entries"), n(d.entries)),
                    (Arc::from("outbox_bytes"), n(d.bytes)),
                    (Arc::from("outbox_dropped"), n(d.dropped)),
                ]),
            )
        })
        .collect();
    let v = Value::Map(vec![
        (Arc::from("device_id"), s(device_id)),
        (Arc::from("uptime_s"), n(started.elapsed().as_secs())),
        (Arc::from("flows_loaded"), n(flows.len() as u64)),
        (Arc::from("python_ok"), Value::Bool(python_ok)),
        (Arc::from("flows"), Value::Map(flow_values)),
        (Arc::from("brokers"), Value::Map(brokers)),
    ]);
    let mut out = String::new();
    crate::json::write(&v, &mut out);
    out
}

/// The same figures as one log line.
fn stats_line(flows: &[FlowFigures], hub: &Hub, store: &Store) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let mut parts = vec![format!("{} flow(s)", flows.len())];
    for f in flows {
        let (i, o, bad) = f.figures();
        parts.push(format!("{}: in={i} out={o} decode_errors={bad}", f.flow_id));
    }
    for (name, b) in hub.stats() {
        let d = store.outboxes().depth(name);
        if b.received.load(Relaxed) == 0
            && d.entries == 0
            && !b.connected.load(Relaxed)
            && b.delivered.load(Relaxed) == 0
        {
            continue;
        }
        parts.push(format!(
            "broker {name}: {} reconnects={} received={} delivered={} outbox={} ({} bytes, {} dropped)",
            if b.connected.load(Relaxed) {
                "connected"
            } else {
                "disconnected"
            },
            b.reconnects.load(Relaxed),
            b.received.load(Relaxed),
            b.delivered.load(Relaxed),
            d.entries,
            d.bytes,
            d.dropped
        ));
    }
    format!("stats: {}", parts.join("; "))
}
