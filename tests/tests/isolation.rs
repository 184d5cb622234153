//! One bad flow file must not wedge the agent: a top level that never
//! returns, a Python step that blocks, code Python cannot interrupt, and
//! SIGTERM arriving in every phase. Real processes, real signals.

use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::{jsonl_items, runnel_command, toml_path, write_file, Agent};
use serde_json::json;

/// systemd's stop must never hang: every stop below is timed against this.
const STOP_WITHIN: Duration = Duration::from_secs(5);

fn config(dir: &Path, extra: &str) -> std::path::PathBuf {
    write_file(
        dir,
        "runnel.toml",
        &format!(
            "device_id = \"iso\"\nflows_dir = {}\nstate_dir = {}\nstatus_interval = 0\n{extra}\n",
            toml_path(&dir.join("flows")),
            toml_path(&dir.join("state"))
        ),
    )
}

/// A flow that maps every line of `input` through Python into `out`.
fn mapping_flow(name: &str, input: &str, out: &str, body: &str) -> String {
    format!(
        r#"
import time
from runnel import Dataflow, op, sources, sinks

def step(x):
{body}
    return {{"n": x["n"], "by": "{name}"}}

flow = Dataflow("{name}")
xs = op.input("in", flow, sources.file("{input}"))
op.output("out", op.map("py_map", xs, step), sinks.file("{out}"))
"#
    )
}

fn lines(n: usize) -> String {
    (0..n).map(|i| format!("{{\"n\": {i}}}\n")).collect()
}

const HANGING_TOP_LEVEL: &str = "import time\nfrom runnel import Dataflow\n\nwhile True:\n    time.sleep(1)\n";

#[test]
fn a_flow_file_that_never_finishes_loading_is_skipped_and_the_others_run() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "flows/a_hang.py", HANGING_TOP_LEVEL);
    // A second one waits for the Python thread behind the first: it gets
    // its own full deadline, and is not blamed for the first one's time.
    write_file(dir.path(), "flows/a_hang2.py", HANGING_TOP_LEVEL);
    write_file(dir.path(), "flows/in.jsonl", &lines(5));
    write_file(
        dir.path(),
        "flows/b_good.py",
        &mapping_flow("good", "in.jsonl", "out.jsonl", "    pass"),
    );
    let cfg = config(dir.path(), "flow_load_timeout = 1.5");
    let mut agent = Agent::start(dir.path(), &cfg);
    let out = dir.path().join("flows/out.jsonl");
    let got = agent.wait_for(Duration::from_secs(20), "the good flow's results", || {
        let items = jsonl_items(&out);
        (items.len() == 5)
            .then_some(items)
            .ok_or(format!("{} lines", jsonl_items(&out).len()))
    });
    assert_eq!(got[4], json!({"n": 4, "by": "good"}));
    let log = agent.stderr();
    assert!(log.contains("a_hang.py:5: Interrupted: loading"), "{log}");
    assert!(log.contains("a_hang2.py:5: Interrupted: loading"), "{log}");
    assert_eq!(
        log.matches("ran longer than flow_load_timeout (1.5s)").count(),
        4,
        "{log}"
    );
    assert!(!log.contains("could not be interrupted"), "{log}");
    assert!(agent.terminate(STOP_WITHIN).success(), "{}", agent.stderr());
}

#[test]
fn check_on_a_hanging_flow_file_exits_non_zero_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let flow = write_file(dir.path(), "hang.py", HANGING_TOP_LEVEL);
    let started = Instant::now();
    let out = runnel_command(dir.path())
        .args(["check", "--flow-load-timeout", "1"])
        .arg(&flow)
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("hang.py:5: Interrupted: loading"), "{err}");
    assert!(err.contains("flow_load_timeout (1s)"), "{err}");
}

/// Wait for `needle` in the log, send SIGTERM, and return the exit code
/// once the agent exited, asserting it did so within `STOP_WITHIN`.
fn sigterm_after(agent: &mut Agent, needle: &str) -> (Option<i32>, String) {
    agent.wait_for_log(Duration::from_secs(20), needle);
    let started = Instant::now();
    let status = agent.terminate(STOP_WITHIN);
    let log = agent.stderr();
    assert!(started.elapsed() < STOP_WITHIN, "took {:?}:\n{log}", started.elapsed());
    (status.code(), log)
}

#[test]
fn sigterm_during_a_hanging_load_stops_the_agent_in_time() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "flows/hang.py", HANGING_TOP_LEVEL);
    let cfg = config(dir.path(), "flow_load_timeout = 600");
    let mut agent = Agent::start(dir.path(), &cfg);
    // The load has started once the agent logged its start line.
    agent.wait_for_log(Duration::from_secs(20), "runnel 0.1.0 starting");
    thread::sleep(Duration::from_millis(500));
    let (code, log) = sigterm_after(&mut agent, "starting");
    assert_eq!(code, Some(1), "the load was abandoned: not a clean stop\n{log}");
    assert!(
        log.contains("runnel stopped, abandoning: loading"),
        "names what it abandoned:\n{log}"
    );
    assert!(
        log.contains("interrupting loading"),
        "names what it interrupted:\n{log}"
    );
    assert!(log.contains("hang.py:5: Interrupted: runnel is stopping"), "{log}");
}

#[test]
fn sigterm_during_a_blocking_python_step_stops_the_agent_in_time() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "flows/in.jsonl", &lines(3));
    write_file(
        dir.path(),
        "flows/block.py",
        &mapping_flow("block", "in.jsonl", "out.jsonl", "    time.sleep(3600)"),
    );
    let cfg = config(dir.path(), "python_step_timeout = 600");
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_for_log(Duration::from_secs(20), "starting flow");
    thread::sleep(Duration::from_millis(800));
    let (code, log) = sigterm_after(&mut agent, "starting flow");
    assert_eq!(code, Some(1), "the step was abandoned: not a clean stop\n{log}");
    assert!(log.contains("interrupting flow block step \"py_map\""), "{log}");
    assert!(
        log.contains("runnel stopped, abandoning: flow block step \"py_map\" (interrupted)"),
        "{log}"
    );
}

#[test]
fn sigterm_during_a_long_file_replay_stops_run_and_replay_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("flows/big.jsonl");
    std::fs::create_dir_all(big.parent().unwrap()).unwrap();
    std::fs::write(&big, lines(3_000_000)).unwrap();
    write_file(
        dir.path(),
        "flows/long.py",
        &mapping_flow("long", "big.jsonl", "out.jsonl", "    pass"),
    );
    let cfg = config(dir.path(), "");
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_for(Duration::from_secs(20), "some output", || {
        let n = std::fs::metadata(dir.path().join("flows/out.jsonl"))
            .map(|m| m.len())
            .unwrap_or(0);
        (n > 0).then_some(()).ok_or(n.to_string())
    });
    let (code, log) = sigterm_after(&mut agent, "starting flow");
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("flow long stopped"), "{log}");

    // `runnel replay` keeps the default disposition of SIGTERM: it ends at once.
    let mut child = runnel_command(dir.path())
        .args(["replay"])
        .arg(dir.path().join("flows/long.py"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the replay should still run");
    let started = Instant::now();
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < STOP_WITHIN, "replay still running after SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_blocking_step_is_interrupted_after_python_step_timeout_and_other_flows_go_on() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "flows/in.jsonl", &lines(4));
    // Flow "stuck" blocks on its item 1, for good.
    write_file(
        dir.path(),
        "flows/stuck.py",
        &mapping_flow(
            "stuck",
            "in.jsonl",
            "stuck.jsonl",
            "    if x[\"n\"] == 1:\n        time.sleep(3600)",
        ),
    );
    write_file(
        dir.path(),
        "flows/other.py",
        &mapping_flow("other", "in.jsonl", "other.jsonl", "    pass"),
    );
    let cfg = config(dir.path(), "python_step_timeout = 1.5");
    let mut agent = Agent::start(dir.path(), &cfg);
    let other = dir.path().join("flows/other.jsonl");
    agent.wait_for(Duration::from_secs(20), "the other flow's results", || {
        let n = jsonl_items(&other).len();
        (n == 4).then_some(()).ok_or(format!("{n} results"))
    });
    agent.wait_for_log(Duration::from_secs(20), "ran longer than python_step_timeout (1.5s)");
    agent.wait_for_log(
        Duration::from_secs(5),
        "the 2 item(s) of the batch it had not reached are skipped",
    );
    // Item 0 went through before the stuck one.
    let stuck = jsonl_items(&dir.path().join("flows/stuck.jsonl"));
    assert_eq!(stuck, vec![json!({"n": 0, "by": "stuck"})]);
    let log = agent.stderr();
    assert!(
        log.contains("stuck.py:7"),
        "the traceback names the line it was stuck on:\n{log}"
    );
    let status = agent.terminate(STOP_WITHIN);
    let log = agent.stderr();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("py_map.python_errors=1"), "{log}");
    assert!(log.contains("py_map.skipped.timeout=2"), "{log}");
}

#[test]
fn code_python_cannot_interrupt_is_reported_and_sigterm_still_ends_the_process() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "flows/in.jsonl", &lines(1));
    // A loop inside C that never looks at signals: `any` over a C iterator
    // (about 45 minutes of C code on this machine).
    write_file(
        dir.path(),
        "flows/regex.py",
        &mapping_flow(
            "regex",
            "in.jsonl",
            "out.jsonl",
            "    import itertools\n    any(itertools.repeat(False, 10**12))",
        ),
    );
    let cfg = config(dir.path(), "python_step_timeout = 1");
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_for_log(Duration::from_secs(20), "did not give way 5s after being interrupted");
    let log = agent.stderr();
    assert!(log.contains("flow regex step \"py_map\""), "{log}");
    let started = Instant::now();
    let status = agent.terminate(STOP_WITHIN);
    let log = agent.stderr();
    assert!(started.elapsed() < STOP_WITHIN, "{:?}", started.elapsed());
    assert_ne!(
        status.code(),
        Some(0),
        "something was abandoned: not a clean exit\n{log}"
    );
    assert!(log.contains("abandoning"), "{log}");
}

#[test]
fn a_load_that_swallows_the_interrupt_is_ended_by_the_second_one() {
    let dir = tempfile::tempdir().unwrap();
    // A retry loop with a bare `except:` catches runnel.Interrupted too.
    let flow = write_file(
        dir.path(),
        "retry.py",
        "import time\n\nwhile True:\n    try:\n        time.sleep(1)\n    except:\n        pass\n",
    );
    let started = Instant::now();
    let out = runnel_command(dir.path())
        .args(["check", "--flow-load-timeout", "1"])
        .arg(&flow)
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}: {err}");
    assert!(err.contains("retry.py:"), "{err}");
    assert!(err.contains("Interrupted: loading"), "{err}");
}
