//! `runnel run`: the agent. Loads every flow file in the flows folder,
//! runs each live with its own sinks until SIGTERM/SIGINT, then stops the
//! flows and exits 0. A flow file that fails to load is logged and
//! skipped; the others run.

use std::process::ExitCode;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::{run_flow, FlowOptions, OutputMode};
use crate::flow;
use crate::python::PyRunner;

/// How long flows get to stop after SIGTERM before the agent exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    let py = PyRunner::start()?;
    let rt = crate::cli::runtime()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    // Listen for SIGTERM before loading flows, so an early stop is clean too.
    let mut term = rt
        .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) })
        .context("cannot install the SIGTERM handler")?;
    let ctrl_c = rt.spawn(tokio::signal::ctrl_c());

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
    let mut handles = Vec::new();
    for path in files {
        let file = match flow::load(&py, &path) {
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
            running.push((plan.flow_id.clone(), path.display().to_string()));
            tracing::info!("starting flow {:?} from {}", plan.flow_id, path.display());
            let opts = FlowOptions {
                live: true,
                inputs: Default::default(),
                output: OutputMode::Sinks,
                stop: Some(stop_rx.clone()),
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

    rt.block_on(async {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = ctrl_c => tracing::info!("SIGINT: stopping"),
        }
    });
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
    let started = std::time::Instant::now();
    let deadline = started + STOP_GRACE;
    let mut stopped = 0;
    let mut interrupted = false;
    while stopped < n {
        let now = std::time::Instant::now();
        // A flow still busy after a second is likely in a Python function
        // (a loop, a sleep, a network call): interrupt it, once.
        let wait = if interrupted {
            deadline.saturating_duration_since(now)
        } else {
            Duration::from_secs(1)
        };
        match done_rx.recv_timeout(wait) {
            Ok(report) => {
                crate::cli::summarize(&report);
                stopped += 1;
            }
            Err(_) if !interrupted => {
                tracing::info!("interrupting the running Python function (KeyboardInterrupt)");
                py.interrupt();
                interrupted = true;
            }
            Err(_) => break,
        }
    }
    if stopped < n {
        tracing::warn!(
            "{} flow(s) did not stop within {}s (a Python function still running?); exiting anyway",
            n - stopped,
            STOP_GRACE.as_secs()
        );
    }
    rt.shutdown_background();
    tracing::info!("runnel stopped");
    Ok(ExitCode::SUCCESS)
}
