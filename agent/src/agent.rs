//! `runnel run`: the agent. Opens the state file, loads every flow file in
//! the flows folder (`flows.rs`), registers their MQTT subscriptions,
//! connects the brokers, and runs each flow live with its own sinks until
//! SIGTERM/SIGINT; then it stops the flows, says `offline` to the brokers
//! and exits 0. A flow file that fails to load (or names a broker that is
//! not usable) is logged and skipped; the others run. The flows folder is
//! watched (and SIGHUP rescans it): new, changed and removed files are
//! loaded, reloaded and stopped while the rest run on. Under systemd it
//! says when it is ready, how it is doing, and pings the watchdog while
//! healthy (`systemd.rs`).

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::flows::{Env, FlowFigures, Flows, STOP_GRACE};
use crate::mqtt::Hub;
use crate::python::PyRunner;
use crate::sinks::SinkEnv;
use crate::store::{outbox::Full, OutboxPolicy, Store};
use std::collections::HashMap;

/// After a signal, the process exits by this time whatever still runs, so
/// that systemd's stop never hangs.
const HARD_STOP: Duration = Duration::from_millis(4800);
/// Quiet time after a change in the flows folder before it is rescanned
/// (an editor's save is several events).
const SETTLE: Duration = Duration::from_millis(300);
/// How long after READY the code that only starting ran is paged out.
const PAGE_OUT_AFTER: Duration = Duration::from_secs(3);

/// Give back the pages of start-up code (see `memory`), on a thread of its
/// own (it is a system call per mapping, but the loop must not wait).
fn page_out_startup_code() {
    let _ = std::thread::Builder::new()
        .name("runnel-pageout".into())
        .spawn(|| match crate::memory::page_out_code() {
            Ok(p) => tracing::debug!(
                "paged out start-up code: {} mapping(s) of the binary and libpython, {} KiB",
                p.mappings,
                p.bytes >> 10
            ),
            Err(e) => tracing::debug!("cannot page out start-up code ({e}); it stays resident"),
        });
}

/// How long READY waits for every broker's first connection attempt.
const BROKERS_TRIED: Duration = Duration::from_secs(3);

pub(crate) fn run(config: Config) -> anyhow::Result<ExitCode> {
    tracing::info!(
        "runnel {} starting: device {}, flows from {}, state in {}",
        env!("CARGO_PKG_VERSION"),
        config.device_id(),
        config.flows_dir.display(),
        config.state_dir.display()
    );
    for o in &config.overrides {
        tracing::info!("config: {o}");
    }
    let mut notifier = crate::systemd::Notifier::from_env();
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
    let rt = crate::cli::runtime()?;
    let (conn_stop_tx, conn_stop_rx) = watch::channel(false);
    // Listen before flows load: SIGTERM/SIGINT stop the agent in every
    // phase (loading, running, stopping). A second later the Python job
    // still running is interrupted; past the hard limit the process exits
    // anyway, naming what it abandons.
    let mut term = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) })
        .context("cannot install the SIGTERM handler")?;
    let mut hup = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) })
        .context("cannot install the SIGHUP handler")?;
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

    // Changes in the flows folder: inotify (through `notify`), and SIGHUP.
    // `true`: SIGHUP (retry files refused for reasons outside them).
    let (changed_tx, mut changed_rx) = tokio::sync::mpsc::unbounded_channel::<bool>();
    let _watcher = watch_flows(&config.flows_dir, changed_tx.clone());
    rt.spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: rescanning {}", "the flows folder");
            let _ = changed_tx.send(true);
        }
    });

    let mut flows = Flows::new(Env {
        flows_dir: config.flows_dir.clone(),
        store: store.clone(),
        py: py.clone(),
        rt: rt.handle().clone(),
        sink_env,
        load_timeout: Duration::from_secs_f64(config.flow_load_timeout),
        snapshot_interval: Duration::from_secs_f64(config.snapshot_interval),
        commit_gap: Duration::from_secs_f64(config.commit_gap),
        stop_limit: Duration::from_secs_f64(config.python_step_timeout) + Duration::from_secs(10),
    });
    flows.sync(&mut hub, &stop_requested, false);
    if flows.running().next().is_none() {
        tracing::warn!(
            "no flows are running; add *.py flow files to {} (they are picked up while running)",
            config.flows_dir.display()
        );
    }

    hub.start(&store, rt.handle(), conn_stop_rx);
    // READY once every broker had its first try (connected or not: a
    // device in a field comes up whether or not the network does).
    let tried_by = std::time::Instant::now() + BROKERS_TRIED;
    while !hub.all_tried() && std::time::Instant::now() < tried_by && !stop_requested() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // An engine may sit in one Python job up to python_step_timeout; past
    // that (and the interrupt's grace) it is wedged.
    let wedged_after = Duration::from_secs_f64(config.python_step_timeout) + Duration::from_secs(15);
    let health = |flows: &Flows, hub: &Hub, py: &PyRunner, store: &Store| -> (bool, String) {
        health_line(flows, hub, py, store, wedged_after)
    };
    let (_, line) = health(&flows, &hub, &py, &store);
    notifier.ready(&line);
    if let Some(w) = notifier.watchdog() {
        if w <= wedged_after {
            tracing::warn!(
                "WatchdogSec ({:.0}s) is not longer than python_step_timeout + 15s ({:.0}s): a long Python job will look wedged to systemd",
                w.as_secs_f64(),
                wedged_after.as_secs_f64()
            );
        }
    }

    let mut signal_wait = signal_rx.clone();
    let started = std::time::Instant::now();
    let mut paged_out = false;
    let healthy = rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
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
                    let figures: Vec<&FlowFigures> = flows.running().map(|r| &r.figures).collect();
                    let text = stats_json(config.device_id(), started, &figures, &hub, &store, py.healthy());
                    hub.publish_stats(text.as_bytes());
                }
                _ = log_tick.tick() => {
                    let figures: Vec<&FlowFigures> = flows.running().map(|r| &r.figures).collect();
                    tracing::info!("{}", stats_line(&figures, &hub, &store));
                }
                _ = tick.tick() => {
                    if let Some(why) = store.failure() {
                        tracing::error!(
                            "the state file {} can no longer be written ({why}); is state_dir full or the SD card failing? check `df -h {}`; exiting so that systemd restarts runnel",
                            store.path().display(),
                            config.state_dir.display()
                        );
                        return false;
                    }
                    let (ok, line) = health(&flows, &hub, &py, &store);
                    notifier.status(&line);
                    if ok {
                        notifier.ping();
                    }
                    if !paged_out && started.elapsed() >= PAGE_OUT_AFTER {
                        paged_out = true;
                        page_out_startup_code();
                    }
                    // An old version that was slow to stop: its file loads once it has.
                    if flows.waiting() {
                        flows.sync(&mut hub, &|| *signal_wait.borrow(), false);
                    }
                }
                Some(first) = changed_rx.recv() => {
                    // Let the burst of events of one save settle (but not for ever).
                    let mut force = first;
                    let until = tokio::time::Instant::now() + 8 * SETTLE;
                    loop {
                        tokio::select! {
                            Some(f) = changed_rx.recv() => force |= f,
                            _ = tokio::time::sleep(SETTLE) => break,
                            _ = tokio::time::sleep_until(until) => break,
                            _ = signal_wait.changed() => break,
                        }
                    }
                    if *signal_wait.borrow() {
                        continue;
                    }
                    // A reload can take a while (a load, old versions stopping).
                    if health(&flows, &hub, &py, &store).0 {
                        notifier.ping();
                    }
                    flows.sync(&mut hub, &|| *signal_wait.borrow(), force);
                }
            }
        }
        true
    });
    notifier.stopping();
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    py.stop_all();
    // Messages taken from now on may never be processed: let the brokers keep them.
    hub.stop_acks();
    let left = flows.stop_all(std::time::Instant::now() + STOP_GRACE);
    if left > 0 {
        py.note_abandoned(format!(
            "{left} flow(s) that did not stop within {}s{}",
            STOP_GRACE.as_secs(),
            py.current_job()
                .map(|j| format!(" ({j} is still running)"))
                .unwrap_or_default()
        ));
    }
    // The outbox is durable: whatever is not delivered now goes next start.
    let _ = conn_stop_tx.send(true);
    let conns = hub.take_tasks();
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

/// Watch the flows folder for changes (inotify); each event nudges `tx`.
/// Without a watch (the folder is missing, inotify is out of watches) the
/// agent still rescans on SIGHUP.
fn watch_flows(
    dir: &std::path::Path,
    tx: tokio::sync::mpsc::UnboundedSender<bool>,
) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    // Only flow files (and the folder itself: its mode) matter: outputs a
    // flow writes next to its file must not keep the folder "busy".
    let folder = dir.to_path_buf();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        use notify::event::{AccessKind, AccessMode};
        let relevant = event.is_ok_and(|e| {
            // Reads are nothing; a file closed after writing ends a save.
            !matches!(e.kind, notify::EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
                && e.paths
                    .iter()
                    .any(|p| p.extension().is_some_and(|x| x == "py") || *p == folder)
        });
        if relevant {
            let _ = tx.send(false);
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(
                "cannot watch the flows folder ({e}); send SIGHUP (systemctl reload runnel) after changing flows"
            );
            return None;
        }
    };
    if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
        tracing::warn!(
            "cannot watch {} ({e}); send SIGHUP (systemctl reload runnel) after changing flows",
            dir.display()
        );
        return None;
    }
    Some(watcher)
}

/// Whether the agent is healthy (for the watchdog), and one line saying
/// how it is doing (systemd's STATUS=).
fn health_line(flows: &Flows, hub: &Hub, py: &PyRunner, store: &Store, wedged_after: Duration) -> (bool, String) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut problems = Vec::new();
    if let Some((flow, quiet)) = flows.wedged(wedged_after) {
        problems.push(format!("flow {flow} has made no progress for {}s", quiet.as_secs()));
    }
    if !py.healthy() {
        problems.push("the Python thread is stuck in code it cannot interrupt".to_string());
    }
    if let Some(why) = store.failure() {
        problems.push(format!("the state file cannot be written ({why})"));
    }
    let n = flows.running().count();
    let items: u64 = flows.running().map(|r| r.figures.figures().0).sum();
    let brokers: Vec<String> = hub
        .stats()
        .into_iter()
        .filter(|(_, b)| b.started.load(Relaxed))
        .map(|(name, b)| {
            format!(
                "{name} {}",
                if b.connected.load(Relaxed) {
                    "connected"
                } else {
                    "disconnected"
                }
            )
        })
        .collect();
    let mut line = format!("{n} flow(s), {items} item(s) in");
    if !brokers.is_empty() {
        line.push_str(&format!("; brokers: {}", brokers.join(", ")));
    }
    if problems.is_empty() {
        (true, line)
    } else {
        (false, format!("UNHEALTHY: {}; {line}", problems.join("; ")))
    }
}

/// How often the figures go to the log (at info).
const STATS_LOG_EVERY: Duration = Duration::from_secs(60);

/// The stats message: one JSON object.
fn stats_json(
    device_id: &str,
    started: std::time::Instant,
    flows: &[&FlowFigures],
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
fn stats_line(flows: &[&FlowFigures], hub: &Hub, store: &Store) -> String {
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
