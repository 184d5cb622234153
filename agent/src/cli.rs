//! The command line: `check`, `replay`, `run`, `demo`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::engine::{run_flow, FlowOptions, FlowReport, OutputMode};
use crate::flow::{self, Decode, StepKind};
use crate::python::PyRunner;
use crate::sinks::SharedOut;
use crate::sources::SourceConfig;

#[derive(Parser)]
#[command(
    name = "runnel",
    version,
    about = "Edge agent: Python flows in Bytewax's vocabulary on a Rust windowing engine"
)]
struct Cli {
    /// Log level or tracing filter (overrides RUNNEL_LOG and the config file).
    #[arg(long, global = true)]
    log_level: Option<String>,
    /// Seconds a flow file's top level may run before it is interrupted
    /// (default 10; for `run`, overrides flow_load_timeout of its config).
    #[arg(long, global = true, value_name = "SECONDS")]
    flow_load_timeout: Option<f64>,
    /// Seconds one Python job (a batch at one step) may run before it is
    /// interrupted (default 30; for `run`, overrides python_step_timeout of its config).
    #[arg(long, global = true, value_name = "SECONDS")]
    python_step_timeout: Option<f64>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a flow file and print its step graph; exit 0 if it is valid.
    Check {
        /// The flow file (`*.py`).
        flow: PathBuf,
    },
    /// Run a flow over files to the end, printing what reaches each output step.
    ///
    /// Every item reaching an `op.output` step is printed to stdout as one
    /// JSON object per line: {"step": "<output step id>", "item": <item>}.
    /// Logs and the summary go to stderr.
    Replay {
        /// The flow file (`*.py`).
        flow: PathBuf,
        /// Feed input step STEP from FILE (JSON lines, or CSV if it ends in .csv).
        /// STEP= may be left out when the flow has one input step. Input steps
        /// without --input read their own sources.file path.
        #[arg(long = "input", value_name = "[STEP=]FILE")]
        inputs: Vec<String>,
        /// Write to the flow's own sinks instead of printing to stdout.
        #[arg(long)]
        keep_sinks: bool,
    },
    /// Run the agent: every flow in the configured flows folder, until SIGTERM or SIGINT.
    Run {
        /// The agent's TOML config file.
        #[arg(long, default_value = "/etc/runnel/runnel.toml")]
        config: PathBuf,
    },
    /// Replay the bundled demo flow over the bundled capture (no broker, no files needed).
    Demo,
}

const DEMO_FLOW: &str = include_str!("../../flows/demo.py");
const DEMO_CAPTURE: &str = include_str!("../../flows/captures/greenhouse.jsonl");

/// A log level or tracing filter, or why not. A bare word that is not a
/// level (`warning`, `loud`) would otherwise filter out every line.
fn check_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let l = level.trim().to_ascii_lowercase();
    let is_filter = l.contains('=') || l.contains(',');
    if LEVELS.contains(&l.as_str()) || (is_filter && tracing_subscriber::EnvFilter::try_new(&l).is_ok()) {
        Ok(())
    } else {
        Err(format!(
            "unknown log level {level:?}: use error, warn, info, debug or trace (or a filter like \"info,runnel=debug\")"
        ))
    }
}

fn init_logging(level: &str) {
    let filter =
        || tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Under systemd with stderr going to the journal: straight to journald,
    // with its fields (PRIORITY from the level, CODE_FILE, CODE_LINE,
    // TARGET, SYSLOG_IDENTIFIER=runnel), so `journalctl -u runnel -p warning`
    // works. Otherwise text on stderr.
    if crate::systemd::stderr_is_journal() {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        if let Ok(journal) = tracing_journald::layer() {
            let journal = journal.with_syslog_identifier("runnel".into());
            let _ = tracing_subscriber::registry().with(filter()).with(journal).try_init();
            return;
        }
    }
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .try_init();
}

pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    let env_level = std::env::var("RUNNEL_LOG").ok();
    for (flag, v) in [
        ("--flow-load-timeout", cli.flow_load_timeout),
        ("--python-step-timeout", cli.python_step_timeout),
    ] {
        if let Some(Err(e)) = v.map(|v| crate::config::check_timeout(flag, v)) {
            init_logging("info");
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let timeouts = Timeouts {
        load: Duration::from_secs_f64(
            cli.flow_load_timeout
                .unwrap_or(crate::python::LOAD_TIMEOUT.as_secs_f64()),
        ),
        step: Duration::from_secs_f64(
            cli.python_step_timeout
                .unwrap_or(crate::python::STEP_TIMEOUT.as_secs_f64()),
        ),
    };
    let config = match &cli.command {
        Command::Run { config } => match crate::config::Config::load(config) {
            Ok(mut c) => {
                if let Some(t) = cli.flow_load_timeout {
                    c.flow_load_timeout = t;
                }
                if let Some(t) = cli.python_step_timeout {
                    c.python_step_timeout = t;
                }
                Some(c)
            }
            Err(e) => {
                init_logging("info");
                eprintln!("error: {e:#}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let level = cli
        .log_level
        .clone()
        .or(env_level)
        .or_else(|| config.as_ref().map(|c| c.log_level.clone()))
        .unwrap_or_else(|| "info".into());
    if let Err(e) = check_level(&level) {
        init_logging("info");
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    init_logging(&level);
    let result = match cli.command {
        Command::Check { flow } => check(&flow, timeouts),
        Command::Replay {
            flow,
            inputs,
            keep_sinks,
        } => replay(&flow, &inputs, keep_sinks, timeouts),
        Command::Run { .. } => crate::agent::run(config.expect("loaded above")),
        Command::Demo => demo(timeouts),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(16)
        .thread_name("runnel-io")
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The two Python deadlines of `check` and `replay`.
#[derive(Clone, Copy)]
struct Timeouts {
    load: Duration,
    step: Duration,
}

fn check(path: &Path, t: Timeouts) -> anyhow::Result<ExitCode> {
    let py = PyRunner::start()?.with_step_timeout(t.step);
    match flow::load(&py, path, t.load) {
        Ok(file) => {
            for plan in &file.flows {
                print!("{}", flow::describe(plan));
                if !plan.steps.iter().any(|s| matches!(s.kind, StepKind::Output(_))) {
                    eprintln!(
                        "warning: flow {:?} has no output step; its results go nowhere",
                        plan.flow_id
                    );
                }
                for warning in crate::engine::unpicklable_accumulators(plan, &py) {
                    eprintln!("warning: {warning}");
                }
            }
            // What `runnel run` would refuse (flows are code).
            if let Err(e) = crate::perms::check_flow_file(path, crate::perms::Owners::Service) {
                eprintln!("error: runnel run would refuse this file: {e}");
                return Ok(ExitCode::from(1));
            }
            println!("ok: {}", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn replay(path: &Path, inputs: &[String], keep_sinks: bool, t: Timeouts) -> anyhow::Result<ExitCode> {
    let py = PyRunner::start()?.with_step_timeout(t.step);
    // stdout carries the results; a flow's print() and op.inspect go to stderr.
    py.run(|py| {
        use pyo3::types::PyAnyMethods;
        let sys = py.import("sys")?;
        sys.setattr("stdout", sys.getattr("stderr")?)
    })?
    .context("cannot redirect Python's stdout")?;
    let file = match flow::load(&py, path, t.load) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let input_ids: Vec<String> = file
        .flows
        .iter()
        .flat_map(|p| {
            p.steps
                .iter()
                .filter(|s| matches!(s.kind, StepKind::Input(_)))
                .map(|s| s.step_id.clone())
        })
        .collect();
    let mut overrides: HashMap<String, SourceConfig> = HashMap::new();
    for arg in inputs {
        let (step, file_arg) = match arg.split_once('=') {
            Some((s, f)) if input_ids.iter().any(|i| i == s) => (s.to_string(), f.to_string()),
            Some((s, _)) if !Path::new(arg).exists() => {
                anyhow::bail!(
                    "--input {arg}: the flow has no input step {s:?}; its input steps are: {}",
                    input_ids.join(", ")
                )
            }
            _ if input_ids.len() == 1 => (input_ids[0].clone(), arg.clone()),
            _ => anyhow::bail!(
                "--input {arg}: the flow has {} input steps ({}); say which one with STEP=FILE",
                input_ids.len(),
                input_ids.join(", ")
            ),
        };
        let p = PathBuf::from(&file_arg);
        if !p.exists() {
            anyhow::bail!("--input {arg}: no such file {file_arg}");
        }
        let decode = Decode::for_path(&p);
        overrides.insert(
            step,
            SourceConfig::File {
                path: p,
                decode,
                start: None,
            },
        );
    }
    for plan in &file.flows {
        for s in &plan.steps {
            match &s.kind {
                StepKind::Input(spec @ (flow::SourceSpec::Mqtt(_) | flow::SourceSpec::Serial(_)))
                    if !overrides.contains_key(&s.step_id) =>
                {
                    anyhow::bail!(
                        "input step {:?} reads {spec}; replay it from a capture with --input {}=FILE (JSON lines or CSV), or run it live with `runnel run`",
                        s.step_id,
                        s.step_id
                    )
                }
                StepKind::Output(spec @ flow::SinkSpec::Mqtt(_)) if keep_sinks => anyhow::bail!(
                    "--keep-sinks: output step {:?} publishes ({spec}), which needs the agent's outbox; leave out --keep-sinks to print its items, or use `runnel run`",
                    s.step_id
                ),
                _ => {}
            }
        }
    }
    let rt = runtime()?;
    let out: SharedOut = Arc::new(Mutex::new(Box::new(std::io::BufWriter::with_capacity(
        64 * 1024,
        std::io::stdout(),
    ))));
    let mut handles = Vec::new();
    for plan in file.flows {
        let opts = FlowOptions {
            live: false,
            inputs: overrides.clone(),
            output: if keep_sinks {
                OutputMode::Sinks
            } else {
                OutputMode::Replay(out.clone())
            },
            stop: None,
            sink_env: None,
            durable: None,
            heartbeat: None,
            counters: Default::default(),
        };
        handles.push(run_flow(plan, opts, py.clone(), rt.handle().clone())?);
    }
    let mut unreadable = 0;
    for h in handles {
        match h.join() {
            Ok(report) => {
                summarize(&report);
                unreadable += report
                    .counters
                    .iter()
                    .filter(|(k, _)| k.ends_with(".source_errors"))
                    .map(|(_, n)| n)
                    .sum::<u64>();
            }
            Err(_) => anyhow::bail!("a flow's engine thread panicked"),
        }
    }
    let _ = out.lock().unwrap_or_else(|p| p.into_inner()).flush();
    rt.shutdown_background();
    if unreadable > 0 {
        // The replay ran on what could be read, but an input is missing: say so in the exit code.
        eprintln!("error: {unreadable} input file(s) could not be read (see above); the output is incomplete");
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// One summary line per flow on stderr: what came in, went out, was skipped.
pub(crate) fn summarize(report: &FlowReport) {
    let mut parts: Vec<String> = report.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        parts.push("no items".into());
    }
    tracing::info!(
        "flow {} {}: {}",
        report.flow_id,
        if report.stopped_early { "stopped" } else { "finished" },
        parts.join(" ")
    );
}

fn demo(t: Timeouts) -> anyhow::Result<ExitCode> {
    let dir = std::env::temp_dir().join(format!("runnel-demo-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("captures")).with_context(|| format!("cannot create {}", dir.display()))?;
    let flow_path = dir.join("demo.py");
    std::fs::write(&flow_path, DEMO_FLOW)?;
    std::fs::write(dir.join("captures/greenhouse.jsonl"), DEMO_CAPTURE)?;
    eprintln!("runnel demo: replaying the bundled flow (flows/demo.py) over the bundled greenhouse capture");
    let result = replay(&flow_path, &[], false, t);
    let _ = std::fs::remove_dir_all(&dir);
    result
}
