//! Helpers shared by the integration tests.

pub mod mqtt;
pub mod serial;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// `text` without ANSI escape sequences (`ESC [ ... final-byte`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Write `text` to `dir/name`, creating missing folders; returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap_or_else(|e| panic!("create {}: {e}", parent.display()));
    }
    fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// `path` as a TOML string literal.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// The runnel binary as a command started in `dir`, with no log settings
/// inherited from the caller.
pub fn runnel_command(dir: &Path) -> Command {
    let mut cmd = Command::new(runnel_bin());
    cmd.current_dir(dir).env_remove("RUNNEL_LOG");
    cmd
}

/// Write `dir/runnel.toml` for `runnel run`: flows from `flows_dir`, state in
/// `dir/state`, log level info. Returns the config file's path.
pub fn write_agent_config(dir: &Path, flows_dir: &Path) -> PathBuf {
    write_agent_config_with(dir, flows_dir, "")
}

/// `write_agent_config` with `extra` top-level lines.
pub fn write_agent_config_with(dir: &Path, flows_dir: &Path, extra: &str) -> PathBuf {
    write_file(
        dir,
        "runnel.toml",
        &format!(
            "device_id = \"test-device\"\nflows_dir = {}\nstate_dir = {}\nlog_level = \"info\"\n{extra}",
            toml_path(flows_dir),
            toml_path(&dir.join("state"))
        ),
    )
}

/// The write end of a FIFO, held open so its reader never sees end of input.
pub struct Fifo {
    file: fs::File,
    path: PathBuf,
}

impl Fifo {
    /// Make a FIFO at `path` and open it. Read-write, so the open does not
    /// wait for the agent to open the read end.
    pub fn create(path: &Path) -> Fifo {
        let made = Command::new("mkfifo").arg(path).status().expect("run mkfifo");
        assert!(made.success(), "mkfifo {} failed", path.display());
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("open FIFO {}: {e}", path.display()));
        Fifo {
            file,
            path: path.to_path_buf(),
        }
    }

    /// Write `lines` into the FIFO now.
    pub fn send(&mut self, lines: &str) {
        use std::io::Write;
        self.file
            .write_all(lines.as_bytes())
            .and_then(|_| self.file.flush())
            .unwrap_or_else(|e| panic!("write to FIFO {}: {e}", self.path.display()));
    }

    /// Write `values` as JSON lines into the FIFO now.
    pub fn send_json(&mut self, values: &[serde_json::Value]) {
        let text: String = values.iter().map(|v| format!("{v}\n")).collect();
        self.send(&text);
    }
}

/// A running `runnel run --config CONFIG`, its stderr going to a file.
/// Dropping it kills the process if it still runs (a failed test must not
/// leave an agent behind).
pub struct Agent {
    child: Child,
    stderr_path: PathBuf,
}

impl Agent {
    /// Start `runnel run --config config` in `dir`; stderr goes to
    /// `dir/stderr.txt`, stdin and stdout are null.
    pub fn start(dir: &Path, config: &Path) -> Agent {
        Agent::start_logging_to(dir, config, "stderr.txt")
    }

    /// `start`, with stderr in `dir/log_name` (a restarted agent keeps the
    /// first one's log).
    pub fn start_logging_to(dir: &Path, config: &Path, log_name: &str) -> Agent {
        Agent::start_with_env(dir, config, log_name, &[])
    }

    /// `start_logging_to` with environment variables set.
    pub fn start_with_env(dir: &Path, config: &Path, log_name: &str, env: &[(&str, &str)]) -> Agent {
        let stderr_path = dir.join(log_name);
        let stderr = fs::File::create(&stderr_path).unwrap_or_else(|e| panic!("{}: {e}", stderr_path.display()));
        let mut cmd = runnel_command(dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start runnel run");
        Agent { child, stderr_path }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far, colour codes stripped.
    pub fn stderr(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// Panics (showing the log) if the agent has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("runnel run exited early ({status}):\n{}", self.stderr());
        }
    }

    /// Poll `probe` every 20 ms until it yields a value, and return it.
    /// Panics, showing `what`, the last probe's error text and the log,
    /// if the agent exits or `within` passes first.
    pub fn wait_for<T>(&mut self, within: Duration, what: &str, mut probe: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + within;
        loop {
            let why = match probe() {
                Ok(v) => return v,
                Err(why) => why,
            };
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}, in vain: {why}\nstderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait at most `within` until the log contains `needle`.
    pub fn wait_for_log(&mut self, within: Duration, needle: &str) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for the log line {needle:?}, in vain. stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no chance to save or flush anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send SIGTERM (as systemd stops a service) and wait at most `within`
    /// for the agent to exit; returns how it exited.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let killed = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(killed.success(), "kill -TERM {} failed", self.pid());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for runnel run") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "runnel run still running {within:?} after SIGTERM:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The complete lines (ending in a newline) of the JSON lines file `path`,
/// parsed; an absent file has none.
pub fn jsonl_items(path: &Path) -> Vec<serde_json::Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(end) => &text[..end],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: line is not JSON ({e}): {l}", path.display())))
        .collect()
}

/// Everything about a finished process, for assertion messages: the command,
/// its exit status, stdout, and stderr without colour codes.
pub fn show(done: &Finished) -> String {
    format!(
        "{}\nexit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        done.command,
        done.status,
        done.stdout_text(),
        strip_ansi(&done.stderr_text())
    )
}

/// Write `files` and the flow file `flow.py` into `dir`, then run
/// `runnel replay flow.py` there (at most 60 s).
pub fn replay_in(dir: &Path, flow: &str, files: &[(&str, &str)]) -> Finished {
    for (name, text) in files {
        write_file(dir, name, text);
    }
    let flow_path = write_file(dir, "flow.py", flow);
    run_with_timeout(
        runnel_command(dir).arg("replay").arg(&flow_path),
        Duration::from_secs(60),
    )
}

/// Every stdout line of a replay, parsed; panics on a line that is not a
/// `{"step": ..., "item": ...}` object.
pub fn replay_records(done: &Finished) -> Vec<(String, serde_json::Value)> {
    done.stdout_text()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line:?}\n{}", show(done)));
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("stdout line is not a JSON object: {line:?}\n{}", show(done)));
            assert!(
                obj.len() == 2 && obj.contains_key("step") && obj.contains_key("item"),
                "stdout line should have exactly the keys step and item: {line:?}\n{}",
                show(done)
            );
            (
                v["step"].as_str().expect("step is a string").to_string(),
                v["item"].clone(),
            )
        })
        .collect()
}

/// The items replay printed for output step `step`, in order.
pub fn items_of(done: &Finished, step: &str) -> Vec<serde_json::Value> {
    replay_records(done)
        .into_iter()
        .filter(|(s, _)| s == step)
        .map(|(_, item)| item)
        .collect()
}

/// `values` in a fixed order (by their JSON text), for order-free comparisons.
pub fn sorted(mut values: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    values.sort_by_key(|x| x.to_string());
    values
}

/// Clock ticks per second, the unit of the CPU times in /proc/PID/stat.
fn clock_ticks_per_second() -> f64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("run getconf CLK_TCK");
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("getconf CLK_TCK printed {text:?}: {e}"))
}

/// CPU seconds process `pid` has used so far, user plus system, all threads:
/// fields 14 (utime) and 15 (stime) of /proc/PID/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    // Field 2, the command name in parentheses, may contain spaces: count
    // from the last ')'. What follows starts at field 3.
    let rest = &stat[stat.rfind(')').expect("comm field") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |field: usize| -> f64 {
        fields[field - 3]
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("{path} field {field}: {e}\n{stat}")) as f64
    };
    (ticks(14) + ticks(15)) / clock_ticks_per_second()
}

/// A tiny deterministic generator (xorshift), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
