//! Helpers shared by the integration tests.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The workspace root: the folder holding the top-level `Cargo.toml`.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

fn exe_name(name: &str) -> String {
    format!("{name}{}", std::env::consts::EXE_SUFFIX)
}

/// The runnel binary under test: `$RUNNEL_BIN`, else
/// `<workspace>/target/release/runnel`, else `<workspace>/target/debug/runnel`.
pub fn runnel_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("RUNNEL_BIN").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "RUNNEL_BIN={} is not a file", path.display());
        return path;
    }
    let target = workspace_root().join("target");
    for profile in ["release", "debug"] {
        let path = target.join(profile).join(exe_name("runnel"));
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "no runnel binary in {}/{{release,debug}}: build it (cargo build --release -p runnel) \
         or point RUNNEL_BIN at it",
        target.display()
    );
}

/// The Python that runs `flows/bytewax_adapter.py`: `$RUNNEL_BYTEWAX_PYTHON`,
/// which must have bytewax 0.21.1 installed.
pub fn bytewax_python() -> PathBuf {
    match std::env::var_os("RUNNEL_BYTEWAX_PYTHON").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "RUNNEL_BYTEWAX_PYTHON is not set. The Bytewax oracle tests need a Python with \
             bytewax==0.21.1 installed: run them with the test command in README.md, which \
             creates that virtualenv and sets RUNNEL_BYTEWAX_PYTHON"
        ),
    }
}

/// The Python for the stdlib-only helper scripts (tests/oracle/*.py):
/// `$RUNNEL_PYTHON`, else `python3`.
pub fn python3() -> PathBuf {
    std::env::var_os("RUNNEL_PYTHON")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Finished {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// The command line, for messages.
    pub command: String,
}

impl Finished {
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// stderr as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Whether the process exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Run `cmd` (stdin closed, stdout and stderr captured) and wait for it at
/// most `timeout`; panics, after killing it, if it takes longer or cannot
/// be started.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Finished {
    let command = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command}: {e}"));
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let err = stderr.join().unwrap_or_default();
                panic!(
                    "{command} did not finish within {timeout:?}; it was killed. stderr:\n{}",
                    String::from_utf8_lossy(&err)
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {command}: {e}"),
        }
    };
    Finished {
        status,
        stdout: stdout.join().expect("stdout reader thread"),
        stderr: stderr.join().expect("stderr reader thread"),
        command,
    }
}

/// Like [`run_with_timeout`], and panics unless the process exits with 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Finished {
    let done = run_with_timeout(cmd, timeout);
    assert!(
        done.success(),
        "{} failed ({}). stderr:\n{}",
        done.command,
        done.status,
        done.stderr_text()
    );
    done
}

fn replay_lines(replay: &str) -> impl Iterator<Item = serde_json::Value> + '_ {
    replay.lines().filter(|l| !l.trim().is_empty()).map(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("replay output line is not JSON ({e}): {line}"))
    })
}

/// Number of replay lines (`{"step": ..., "item": ...}`) per output step.
pub fn count_per_step(replay: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in replay_lines(replay) {
        let step = line["step"].as_str().unwrap_or("<no step>").to_string();
        *counts.entry(step).or_insert(0) += 1;
    }
    counts
}

/// Number of `meta` items of output step `step` whose window metadata lists
/// merged window ids, i.e. session windows that absorbed other sessions.
/// Items look like `[key, [window_id, {"open_time", "close_time", "merged_ids"}]]`.
pub fn merged_sessions(replay: &str, step: &str) -> usize {
    replay_lines(replay)
        .filter(|line| line["step"] == step)
        .filter(|line| {
            line["item"][1][1]["merged_ids"]
                .as_array()
                .is_some_and(|ids| !ids.is_empty())
        })
        .count()
}
