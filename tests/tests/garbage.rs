//! Bad input never crashes runnel: a replay over a capture full of garbage
//! (random bytes, truncated and nested JSON, wrong types, extreme numbers
//! and timestamps) still exits 0, writes only valid JSON results, counts
//! what it skipped, and never panics.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use runnel_tests::{run_with_timeout, runnel_command, strip_ansi, write_file};
use tempfile::TempDir;

use runnel_tests::Rng;

const ODD_VALUES: &[&str] = &[
    "null",
    "true",
    "[]",
    "{}",
    "\"\"",
    "\"x\"",
    "-0",
    "1e308",
    "-1e308",
    "1e-320",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551616",
    "99999999999999999999999",
    "\"2024-01-01T00:00:00Z\"",
    "\"9999-12-31T23:59:59Z\"",
    "\"0001-01-01T00:00:00Z\"",
    "\"not a time\"",
    "[1, [2, [3, [4]]]]",
    "{\"a\": {\"b\": {\"c\": 1}}}",
    "\"\\u0000\\n\\\"\"",
    "\"ü€𝄞\"",
    "0.1",
    "-17",
];

fn garbage_capture(seed: u64, lines: usize) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for i in 0..lines {
        let mut line = String::new();
        match rng.below(10) {
            // Plausible records, some with odd field values.
            0..=4 => {
                let sensor = if rng.below(8) == 0 {
                    ODD_VALUES[rng.below(ODD_VALUES.len() as u64) as usize].to_string()
                } else {
                    format!("\"s{}\"", rng.below(4))
                };
                let ts = if rng.below(8) == 0 {
                    ODD_VALUES[rng.below(ODD_VALUES.len() as u64) as usize].to_string()
                } else {
                    format!("{}", 1_704_067_200 + i as u64 / 3 + rng.below(5))
                };
                let temp = if rng.below(6) == 0 {
                    ODD_VALUES[rng.below(ODD_VALUES.len() as u64) as usize].to_string()
                } else {
                    format!("{}.{}", rng.below(40), rng.below(10))
                };
                let _ = write!(line, "{{\"sensor\": {sensor}, \"ts\": {ts}, \"temp\": {temp}}}");
            }
            // A bare odd JSON value instead of an object.
            5 => line.push_str(ODD_VALUES[rng.below(ODD_VALUES.len() as u64) as usize]),
            // A truncated record.
            6 => line.push_str(&"{\"sensor\": \"s1\", \"ts\": 1704067200, \"temp\": 20.5}"[..rng.below(40) as usize]),
            // Random bytes (no newline).
            7 => {
                let bytes: Vec<u8> = (0..rng.below(60))
                    .map(|_| rng.below(256) as u8)
                    .filter(|b| *b != b'\n')
                    .collect();
                out.extend_from_slice(&bytes);
            }
            // Extreme timestamps.
            8 => {
                let ts = [
                    "-1e300",
                    "1e300",
                    "-9223372036854775808",
                    "9223372036854775807",
                    "253402300800",
                    "-62135596801",
                ][rng.below(6) as usize];
                let _ = write!(line, "{{\"sensor\": \"s1\", \"ts\": {ts}, \"temp\": 1}}");
            }
            // Deep nesting.
            _ => {
                let depth = rng.below(200) as usize;
                line.push_str(&"[".repeat(depth));
                line.push_str(&"]".repeat(depth));
            }
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

const FLOW: &str = r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, sinks, sources, win

ALIGN = datetime(2024, 1, 1, tzinfo=timezone.utc)
flow = Dataflow("garbage")
readings = op.input("in", flow, sources.file("capture.jsonl"))
keyed = op.key_on("by_sensor", readings, "sensor")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=5), unit="s")
stats = win.aggregate("stats", keyed, clock, win.SlidingWindower(timedelta(seconds=10), timedelta(seconds=5), ALIGN),
                      {"temp": ["count", "sum", "mean", "min", "max", "stddev", "first", "last", "p50", "p90", "p99"]})
op.output("stats_out", stats.down, sinks.stdout())
op.output("late", stats.late, sinks.stdout())

def scaled(r):
    return {"sensor": r["sensor"], "at": r["ts"], "temp": r["temp"] * 2}

py_keyed = op.key_on("py_key", op.map("scale", readings, scaled), lambda r: r["sensor"])
py_clock = win.EventClock(lambda r: datetime.fromtimestamp(r["at"], tz=timezone.utc), timedelta(seconds=5))
sessions = win.fold_window("sessions", py_keyed, py_clock, win.SessionWindower(timedelta(seconds=3)),
                           lambda: 0.0, lambda acc, r: acc + r["temp"], lambda a, b: a + b)
op.output("sessions_out", sessions.down, sinks.stdout())
op.output("meta", sessions.meta, sinks.stdout())
"#;

fn replay_garbage(dir: &Path, seed: u64) {
    write_file(dir, "garbage.py", FLOW);
    std::fs::write(dir.join("capture.jsonl"), garbage_capture(seed, 3000)).unwrap();
    let done = run_with_timeout(
        runnel_command(dir).args(["replay", "garbage.py"]),
        Duration::from_secs(120),
    );
    let stderr = strip_ansi(&done.stderr_text());
    assert_eq!(done.status.code(), Some(0), "seed {seed}: replay failed\n{stderr}");
    assert!(!stderr.contains("panicked"), "seed {seed}: a panic\n{stderr}");
    let stdout = done.stdout_text();
    let mut results = 0;
    for line in stdout.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("seed {seed}: output is not JSON ({e}): {line}"));
        assert!(v["step"].is_string() && !v["item"].is_null(), "seed {seed}: {line}");
        results += 1;
    }
    assert!(
        results > 0,
        "seed {seed}: the good records produced no results\n{stderr}"
    );
    let summary = stderr
        .lines()
        .find(|l| l.contains("flow garbage finished"))
        .unwrap_or_else(|| {
            panic!("seed {seed}: no summary line\n{stderr}");
        });
    for counter in ["in.malformed=", "by_sensor.skipped.", "stats.skipped.bad_timestamp="] {
        assert!(
            summary.contains(counter),
            "seed {seed}: summary lacks {counter}: {summary}"
        );
    }
}

#[test]
fn a_capture_full_of_garbage_is_skipped_and_counted_without_a_crash() {
    for seed in [1, 2, 3] {
        let dir = TempDir::new().unwrap();
        replay_garbage(dir.path(), seed);
    }
}
