//! runnel on real serial hardware. Opt-in: the tests in `tests/` skip (and
//! say why) unless `RUNNEL_HW_SERIAL` names a port.
//!
//! - `RUNNEL_HW_SERIAL=/dev/ttyUSB0`: the port runnel reads.
//! - `RUNNEL_HW_SERIAL_TX=/dev/ttyAMA0`: the port the test writes to, wired
//!   to the first (TX to RX, and ground). Without it the test writes to the
//!   same port, whose TX is wired to its own RX (a loopback jumper).
//! - `RUNNEL_HW_BAUD=115200,921600`: the rates to test (default 115200).
//! - `RUNNEL_HW_UNPLUG=1`: also the interactive test that asks you to pull
//!   the adapter out and put it back.
//!
//! The same code runs in CI against a pseudo-terminal that loops back what
//! is written to it (socat's `PIPE`), so what a hardware run executes is
//! itself tested.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runnel_tests::{jsonl_items, write_agent_config, write_file, Agent};

/// 2024-01-01T00:00:00Z in Unix seconds.
const T0: i64 = 1_704_067_200;
/// Readings per second of event time in what the test sends.
const PER_SECOND: u64 = 100;

/// What to test on.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The port runnel reads.
    pub port: PathBuf,
    /// The port the test writes to; `None`: `port` itself (looped back).
    pub tx: Option<PathBuf>,
    pub bauds: Vec<u32>,
}

/// The setup from the environment, or why the hardware tests skip.
pub fn from_env() -> Result<Setup, String> {
    let Some(port) = std::env::var_os("RUNNEL_HW_SERIAL").filter(|p| !p.is_empty()) else {
        return Err(
            "skipped: set RUNNEL_HW_SERIAL=/dev/ttyUSB0 (a port with TX wired to RX, or with \
             RUNNEL_HW_SERIAL_TX naming a second port wired to it) to run the serial hardware tests"
                .into(),
        );
    };
    let tx = std::env::var_os("RUNNEL_HW_SERIAL_TX")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    let bauds = match std::env::var("RUNNEL_HW_BAUD") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|b| {
                b.trim()
                    .parse::<u32>()
                    .map_err(|e| format!("RUNNEL_HW_BAUD: {b:?}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => vec![115_200],
    };
    Ok(Setup {
        port: PathBuf::from(port),
        tx,
        bauds,
    })
}

/// The test's end of the line.
pub enum Writer {
    /// The port runnel reads, opened before runnel opens it exclusively:
    /// what is written goes out on TX and comes back on RX to runnel.
    SamePort(File),
    /// A second port, wired to the first.
    Peer(Box<dyn serialport::SerialPort>),
}

impl Writer {
    /// Open the writing end. For the same port this must happen before
    /// runnel opens it (runnel's exclusive open refuses later openers).
    pub fn open(setup: &Setup, baud: u32) -> Writer {
        match &setup.tx {
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(&setup.port)
                    .unwrap_or_else(|e| panic!("open {}: {e}", setup.port.display()));
                // Blocking writes from here on: the line paces the test.
                use std::os::fd::AsRawFd;
                let fd = f.as_raw_fd();
                // SAFETY: fcntl on a descriptor this function owns.
                unsafe {
                    let flags = libc::fcntl(fd, libc::F_GETFL);
                    libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
                }
                Writer::SamePort(f)
            }
            Some(tx) => Writer::Peer(
                serialport::new(tx.to_string_lossy(), baud)
                    .timeout(Duration::from_secs(10))
                    .open()
                    .unwrap_or_else(|e| panic!("open {}: {e}", tx.display())),
            ),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        let r = match self {
            Writer::SamePort(f) => f.write_all(bytes).and_then(|_| f.flush()),
            Writer::Peer(p) => p.write_all(bytes).and_then(|_| p.flush()),
        };
        r.unwrap_or_else(|e| panic!("write to the serial line: {e}"));
    }
}

/// What one run measured.
#[derive(Debug)]
pub struct Report {
    pub baud: u32,
    pub lines: u64,
    /// From the first byte written to the last window out.
    pub seconds: f64,
    /// The most lines per second an 8N1 line at `baud` carries, for lines
    /// as long as these.
    pub line_rate: f64,
}

impl Report {
    pub fn lines_per_second(&self) -> f64 {
        self.lines as f64 / self.seconds
    }
}

/// A flow reading `port` at `baud`: JSON readings keyed by "id", tumbling
/// windows of 10 s of event time, count and sum of "v" to `hw.jsonl`.
fn flow(port: &Path, baud: u32) -> String {
    format!(
        r#"from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("hw")
items = op.input("in", flow, sources.serial({port:?}, baud={baud}, decode="json"))
keyed = op.key_on("by_key", items, "id")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(0), unit="s")
windower = win.TumblingWindower(timedelta(seconds=10), datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("stats", keyed, clock, windower, {{"v": ["count", "sum"]}})
op.output("out", stats.down, sinks.file("hw.jsonl"))
"#,
        port = port.display().to_string()
    )
}

fn reading(i: u64) -> Vec<u8> {
    let ts = T0 as f64 + i as f64 / PER_SECOND as f64;
    format!(
        "{{\"id\": \"hw\", \"seq\": {i}, \"ts\": {ts:.2}, \"v\": {}}}\n",
        i % 100
    )
    .into_bytes()
}

/// (window id -> (count, sum)) that readings `from..to` must give.
fn expected(range: std::ops::Range<u64>) -> std::collections::BTreeMap<i64, (u64, u64)> {
    let mut want = std::collections::BTreeMap::new();
    for i in range {
        let w: &mut (u64, u64) = want.entry((i / PER_SECOND / 10) as i64).or_default();
        w.0 += 1;
        w.1 += i % 100;
    }
    want
}

fn windows(path: &Path) -> std::collections::BTreeMap<i64, (u64, u64)> {
    jsonl_items(path)
        .iter()
        .map(|v| {
            let id = v[1][0].as_i64().unwrap_or_else(|| panic!("window id in {v}"));
            let s = &v[1][1]["v"];
            let sum = s["sum"].as_f64().unwrap_or_else(|| panic!("sum in {v}"));
            (
                id,
                (
                    s["count"].as_u64().unwrap_or_else(|| panic!("count in {v}")),
                    sum as u64,
                ),
            )
        })
        .collect()
}

/// A started agent reading the setup's port.
pub struct Bench {
    pub dir: tempfile::TempDir,
    pub agent: Agent,
    /// The test's end of the line (`None` while the adapter is away).
    pub writer: Option<Writer>,
    out: PathBuf,
}

impl Bench {
    pub fn start(setup: &Setup, baud: u32) -> Bench {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let flows = dir.path().join("flows");
        write_file(&flows, "hw.py", &flow(&setup.port, baud));
        let config = write_agent_config(dir.path(), &flows);
        let writer = Writer::open(setup, baud);
        let mut agent = Agent::start(dir.path(), &config);
        agent.wait_for_log(Duration::from_secs(20), &format!("reading {}", setup.port.display()));
        Bench {
            out: flows.join("hw.jsonl"),
            dir,
            agent,
            writer: Some(writer),
        }
    }

    /// Send readings `range` as fast as the line takes them; returns the
    /// bytes sent.
    pub fn send(&mut self, range: std::ops::Range<u64>) -> usize {
        let writer = self.writer.as_mut().expect("the writing end is open");
        let (mut chunk, mut total) = (Vec::new(), 0);
        for i in range {
            chunk.extend(reading(i));
            if chunk.len() > 512 {
                writer.send(&chunk);
                total += chunk.len();
                chunk.clear();
            }
        }
        writer.send(&chunk);
        total + chunk.len()
    }

    /// Close every window so far with a reading far ahead, and wait until
    /// the windows of readings `range` are all out; they must be exact.
    pub fn check(&mut self, range: std::ops::Range<u64>, within: Duration) {
        let closer = reading(range.end + 100_000 * PER_SECOND);
        self.writer.as_mut().expect("the writing end is open").send(&closer);
        let want = expected(range);
        let out = self.out.clone();
        let got = self.agent.wait_for(within, "every window of the readings sent", || {
            let got = windows(&out);
            if got.len() >= want.len() {
                Ok(got)
            } else {
                Err(format!("{} of {} windows", got.len(), want.len()))
            }
        });
        assert_eq!(
            got, want,
            "windows differ from the readings sent (bytes lost or damaged on the line?)"
        );
    }

    /// Stop the agent; returns its log.
    pub fn stop(mut self) -> String {
        let status = self.agent.terminate(Duration::from_secs(6));
        let log = self.agent.stderr();
        assert_eq!(status.code(), Some(0), "{log}");
        assert!(!log.contains("malformed"), "nothing sent was malformed:\n{log}");
        log
    }
}

/// Send about `seconds` of line time of readings at `baud` through the
/// line and check that every one arrives in its window.
pub fn loopback(setup: &Setup, baud: u32, seconds: f64) -> Report {
    let guess = reading(PER_SECOND * 1000).len() as f64;
    let n = ((baud as f64 / 10.0 / guess * seconds) as u64).max(PER_SECOND * 20);
    let mut bench = Bench::start(setup, baud);
    let started = Instant::now();
    let bytes = bench.send(0..n);
    bench.check(0..n, Duration::from_secs_f64(30.0 + seconds * 3.0));
    let took = started.elapsed();
    bench.stop();
    Report {
        baud,
        lines: n,
        seconds: took.as_secs_f64(),
        // 8N1: ten bits a byte, at the mean length of the lines sent.
        line_rate: baud as f64 / 10.0 / (bytes as f64 / n as f64),
    }
}

/// Readings before, the adapter pulled out and put back, readings after;
/// nothing before the cut may be lost. `ask` tells the person at the device
/// what to do ("unplug", "plug"); the CI test does it itself.
pub fn unplug(setup: &Setup, baud: u32, ask: &mut dyn FnMut(&str)) {
    let mut bench = Bench::start(setup, baud);
    let shown = setup.port.display().to_string();
    bench.send(0..2000);
    // What the writes left in the kernel's buffer goes out meanwhile.
    std::thread::sleep(Duration::from_secs(1));
    ask("unplug");
    bench.agent.wait_for_log(Duration::from_secs(60), "went away");
    // The writing end on the adapter that went away goes too (an open file
    // would keep its device number, and the adapter would come back as
    // another ttyUSB).
    bench.writer = None;
    ask("plug");
    bench
        .agent
        .wait_for_log(Duration::from_secs(60), &format!("reading {shown} again"));
    if setup.tx.is_none() {
        eprintln!(">>> the loopback writer opens the port again: runnel holds it exclusively now, so this needs root (or RUNNEL_HW_SERIAL_TX)");
    }
    bench.writer = Some(Writer::open(setup, baud));
    bench.send(2000..4000);
    bench.check(0..4000, Duration::from_secs(60));
    let log = bench.stop();
    // Once when it went; again only for a new reason (a replugged adapter
    // is often busy or not yet in its group for a moment).
    assert!(log.matches(&format!("waiting for {shown}")).count() >= 1, "{log}");
}

/// What a person at the device is asked to do, on stderr, with time to do it.
pub fn ask_person(what: &str) {
    match what {
        "unplug" => eprintln!("\n>>> unplug the adapter now (within 60 s)"),
        _ => eprintln!(">>> runnel saw it go. Plug it back in (within 60 s)"),
    }
}
